"""The unified semi-supervised loss (TOFA), one function per role.

Teacher (largest subnet):  CE(f_max(weak x), y) + r * lambda_u * mean_u 1[max p_max(weak u) >= tau]
                               * CE(f_max(strong u), argmax p_max(weak u))
Student (any other):       alpha * CE(f_a(weak x), y)
                           + r * lambda_kd * KL(sg(p_max) || p_a) on weak x, weak u and strong u
                             (on weak x and strong u only with `weak_view: label`)
                           + r * lambda_u * the same masked pseudo-label term (teacher's pseudo-labels)
r (`ramp`, from the loop) grows linearly from 0 to 1 over the first `warmup` share of training:
an untrained teacher's near-uniform outputs and guesses would only pull the students back.
With lambda_u = lambda_kd = 0 (and alpha = 1) this is plain supervised sandwich training.
tau is the fixed `cfg.tau`, or per class FreeMatch's self-adaptive threshold (`AdaptiveThreshold`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tofa_core.training.config import TrainConfig


@dataclass
class Targets:
    """What the teacher hands to the students: its probabilities and pseudo-labels (no grad)."""

    probs: torch.Tensor  # softmax of the teacher on every input row
    pseudo: torch.Tensor  # argmax on weak u
    mask: torch.Tensor  # float, 1 where the teacher is confident on weak u

    def without_weak(self, n_x: int) -> Targets:
        """The same targets for inputs that leave out the weak unlabelled rows (labelled, then strong)."""
        n_u = len(self.pseudo)
        probs = torch.cat([self.probs[:n_x], self.probs[n_x + n_u :]])
        return Targets(probs, self.pseudo, self.mask)


class AdaptiveThreshold:
    """FreeMatch's self-adaptive threshold (Wang et al., 2023): tau(c) = tau_g * p(c) / max p,
    where tau_g is an exponential moving average of the teacher's mean confidence on weak
    unlabelled images and p its mean class probabilities. Both start at 1 / classes, so early
    in training (an unsure teacher) more pseudo-labels pass than a fixed 0.8 lets through, and
    rarely predicted classes get a lower bar. Across workers the batch statistics are averaged,
    so every rank holds the same thresholds."""

    def __init__(self, classes: int, momentum: float):
        self.momentum = momentum
        self.confidence = torch.tensor(1.0 / classes)
        self.class_probs = torch.full((classes,), 1.0 / classes)

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """Fold in the teacher's probabilities on one batch of weak unlabelled images."""
        stats = torch.cat([probs.max(dim=1).values.mean().reshape(1), probs.mean(dim=0)]).float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)  # on the training device (NCCL reduces GPU tensors only)
            stats /= dist.get_world_size()
        stats = stats.cpu()  # the thresholds are a few numbers, kept where checkpoints are
        m = self.momentum
        self.confidence = m * self.confidence + (1 - m) * stats[0]
        self.class_probs = m * self.class_probs + (1 - m) * stats[1:]

    def thresholds(self) -> torch.Tensor:
        return self.confidence * self.class_probs / self.class_probs.max()

    def state_dict(self) -> dict:
        return {"confidence": self.confidence.clone(), "class_probs": self.class_probs.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.confidence, self.class_probs = state["confidence"].clone(), state["class_probs"].clone()


def _split(logits: torch.Tensor, n_x: int, n_u: int):
    return logits[:n_x], logits[n_x : n_x + n_u], logits[n_x + n_u :]


def _masked_ce(logits: torch.Tensor, targets: Targets) -> torch.Tensor:
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return (F.cross_entropy(logits, targets.pseudo, reduction="none") * targets.mask).mean()


def teacher_loss(
    logits, y, n_u: int, cfg: TrainConfig, ramp: float = 1.0, adaptive: AdaptiveThreshold | None = None
) -> tuple[torch.Tensor, Targets, dict[str, float]]:
    lx, lw, ls = _split(logits, len(y), n_u)
    with torch.no_grad():
        probs = logits.softmax(dim=1)
        confidence, pseudo = probs[len(y) : len(y) + n_u].max(dim=1)
        tau = cfg.tau
        if adaptive is not None and n_u:
            adaptive.update(probs[len(y) : len(y) + n_u])
            tau = adaptive.thresholds().to(pseudo.device)[pseudo]
        mask = (confidence >= tau).float()
    targets = Targets(probs, pseudo, mask)
    ce = F.cross_entropy(lx, y)
    pl = _masked_ce(ls, targets)
    loss = ce + ramp * cfg.lambda_u * pl
    logs = {"teacher/ce": ce.item(), "teacher/pseudo": pl.item()}
    if n_u:
        logs["mask_rate"] = mask.mean().item()
        if adaptive is not None:
            logs["threshold"] = adaptive.thresholds().mean().item()
    return loss, targets, logs


def student_loss(
    logits, y, n_u: int, targets: Targets, cfg: TrainConfig, ramp: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    # the strong rows are the last n_u: the weak ones may be left out (`weak_view: label`)
    lx, ls = logits[: len(y)], logits[logits.shape[0] - n_u :]
    ce = F.cross_entropy(lx, y)
    loss = cfg.alpha * ce
    logs = {"student/ce": ce.item()}
    if cfg.lambda_kd > 0:
        kd = F.kl_div(logits.log_softmax(dim=1), targets.probs, reduction="batchmean")
        loss = loss + ramp * cfg.lambda_kd * kd
        logs["student/kd"] = kd.item()
    if cfg.lambda_u > 0 and n_u:
        pl = _masked_ce(ls, targets)
        loss = loss + ramp * cfg.lambda_u * pl
        logs["student/pseudo"] = pl.item()
    return loss, logs
