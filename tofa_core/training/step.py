"""The sandwich step: largest subnet teaches, smallest and k random ones learn, one update."""

from __future__ import annotations

import random

import torch

from tofa_core.arch import Arch, SearchSpace
from tofa_core.supernet import Supernet
from tofa_core.training.config import TrainConfig
from tofa_core.training.device import autocast
from tofa_core.training.loss import AdaptiveThreshold, student_loss, teacher_loss


def sandwich(space: SearchSpace, rng: random.Random, k: int) -> list[Arch]:
    """Largest first (the teacher), then the smallest, then k uniform samples."""
    return [space.max_arch(), space.min_arch()] + [space.sample(rng) for _ in range(k)]


def train_step(
    net: Supernet,
    archs: list[Arch],
    x: torch.Tensor,
    y: torch.Tensor,
    u_weak: torch.Tensor | None,
    u_strong: torch.Tensor | None,
    cfg: TrainConfig,
    ramp: float = 1.0,
    adaptive: AdaptiveThreshold | None = None,
) -> dict[str, float]:
    """Forward and backward every subnet of `archs` on one batch; gradients accumulate in `net`.

    `ramp` in [0, 1] scales the unlabelled and distillation terms (their warm-up); `adaptive`:
    FreeMatch's thresholds instead of the fixed `cfg.tau` (updated here, once per step).
    The optimizer step (and, across workers, the gradient all-reduce) is the caller's.
    """
    use_u = cfg.semi_supervised and u_weak is not None and len(u_weak) > 0
    n_u = len(u_weak) if use_u else 0

    def forward(inputs: torch.Tensor, arch: Arch) -> torch.Tensor:  # bf16 where cfg asks, fp32 out
        with autocast(cfg, inputs.device):
            return net(inputs, arch).float()

    if use_u and cfg.weak_view == "label":
        inputs = torch.cat([x, u_strong])
        with torch.no_grad():
            weak = forward(u_weak, archs[0])
        logits = forward(inputs, archs[0])
        logits = torch.cat([logits[: len(x)], weak, logits[len(x) :]])
    else:
        inputs = torch.cat([x, u_weak, u_strong]) if use_u else x
        logits = forward(inputs, archs[0])
    loss, targets, logs = teacher_loss(logits, y, n_u, cfg, ramp, adaptive)
    loss.backward()
    logs["teacher/loss"] = loss.item()
    if use_u and cfg.weak_view == "label":
        targets = targets.without_weak(len(x))
    student_logs: dict[str, float] = {}
    for arch in archs[1:]:
        loss, one = student_loss(forward(inputs, arch), y, n_u, targets, cfg, ramp)
        loss.backward()
        one["student/loss"] = loss.item()
        for key, value in one.items():
            student_logs[key] = student_logs.get(key, 0.0) + value / (len(archs) - 1)
    return logs | student_logs
