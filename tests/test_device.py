"""Training on the device a worker is given: its choice, bf16 autocast, device-free checkpoints.

The CUDA path itself runs in tests/test_cuda.py, which skips without a GPU."""

from __future__ import annotations

import random

import pytest
import torch

from flows.train import _gpus_per_worker
from tofa_core.arch import SearchSpace
from tofa_core.supernet import Supernet
from tofa_core.training.checkpoint import _on_cpu
from tofa_core.training.config import TrainConfig
from tofa_core.training.device import autocast, pick_device, uses_bf16
from tofa_core.training.step import sandwich, train_step

SPACE = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1, resolutions=(8,))
NO_CUDA = not torch.cuda.is_available()


def test_the_device_is_the_workers_not_the_drivers():
    assert pick_device(TrainConfig(device="cpu"), "cuda:0") == torch.device("cpu")
    assert pick_device(TrainConfig(), "cpu") == torch.device("cpu")  # Ray gave no GPU
    if NO_CUDA:
        assert pick_device(TrainConfig()) == torch.device("cpu")
        with pytest.raises(ValueError, match="--gpus-per-worker"):
            pick_device(TrainConfig(device="cuda"))


def test_ray_is_asked_for_the_configured_gpus_only():
    assert _gpus_per_worker(TrainConfig()) == 0  # whatever the driver has
    assert _gpus_per_worker(TrainConfig(gpus_per_worker=1)) == 1
    assert _gpus_per_worker(TrainConfig(gpus_per_worker=1, device="cpu")) == 0
    with pytest.raises(ValueError, match="--gpus-per-worker"):
        _gpus_per_worker(TrainConfig(device="cuda"))


@pytest.mark.slow  # bf16 convolutions on a CPU take ~20 s here (no native bf16 units)
def test_bf16_is_the_default_on_cuda_only_and_keeps_losses_and_gradients_fp32():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_bf16(TrainConfig(), cpu) and uses_bf16(TrainConfig(), cuda)
    assert not uses_bf16(TrainConfig(precision="fp32"), cuda)
    assert uses_bf16(TrainConfig(precision="bf16"), cpu)
    with autocast(TrainConfig(precision="bf16"), cpu):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    u = torch.randn(16, 1, 8, 8, generator=g)
    grads, losses = {}, {}
    for precision in ("fp32", "bf16"):  # bf16 autocast runs on CPUs too: the same code path
        torch.manual_seed(0)
        net = Supernet(SPACE)
        archs = sandwich(SPACE, random.Random(0), 1)
        losses[precision] = train_step(net, archs, x, y, u, u + 0.1, TrainConfig(precision=precision))
        grads[precision] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        assert grads[precision].dtype == torch.float32 and torch.isfinite(grads[precision]).all()
    # bf16 rounds the forward pass to ~3 significant digits: close to fp32, not equal
    assert losses["bf16"]["teacher/ce"] == pytest.approx(losses["fp32"]["teacher/ce"], rel=0.02)
    assert losses["bf16"]["teacher/ce"] != losses["fp32"]["teacher/ce"]
    assert torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0) > 0.9


def test_checkpoints_hold_cpu_tensors_whatever_the_device():
    state = {"model": {"w": torch.ones(2)}, "rng": [{"aug": torch.zeros(3)}], "sampler": (3, (1, 2), None)}
    moved = _on_cpu(state)
    assert moved["model"]["w"].device.type == "cpu" and moved["sampler"] == (3, (1, 2), None)
    if not NO_CUDA:
        assert _on_cpu({"w": torch.ones(2, device="cuda")})["w"].device.type == "cpu"
