"""Where a training worker computes: its device and its number format.

The device comes from where the worker runs, never from the machine that launched it: a Ray
worker is handed the GPU Ray gave it (`device`); a process on its own takes its CUDA device
when it has one. `train.device` can pin either, and `train.precision` picks bf16 autocast
(the default on CUDA, where tensor cores run it at several times fp32's rate) or fp32.
"""

from __future__ import annotations

import contextlib
import os

import torch

from tofa_core.training.config import TrainConfig


def pick_device(cfg: TrainConfig, given: torch.device | str | None = None) -> torch.device:
    """The device this worker trains on: `cfg.device`, else `given` (the launcher's, e.g.
    Ray's `get_device()`), else this process's CUDA device when it has one, else the CPU."""
    if cfg.device == "cpu":
        return torch.device("cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "train.device is cuda but this worker sees no CUDA device (torch.cuda.is_available() "
            "is False): ask Ray for GPUs with --gpus-per-worker (train.gpus_per_worker), or set "
            "train.device: cpu"
        )
    if given is not None and (cfg.device == "auto" or torch.device(given).type == "cuda"):
        return torch.device(given)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast for the forward passes where `cfg.precision` asks for it (losses and
    weights stay fp32), else nothing."""
    if not uses_bf16(cfg, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
