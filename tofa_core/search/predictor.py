"""The accuracy predictor: built once per trained supernet, shared by every target's search.

Sample subnets, recalibrate each one's BN, score it, and fit a small MLP from an arch
encoding to the score. Two scores are offered because small data makes the labelled
validation set tiny (its accuracy moves in steps of several points):
- `val`: accuracy on the labelled validation images;
- `agreement`: share of (plentiful) unlabelled images on which the subnet predicts what the
  largest subnet predicts. It needs no labels, so it is measured on thousands of images.
The default is `agreement`: it ranks subnets closer to their test accuracy in
benchmarks/bench_predictor.py (docs/results/engineering.md).
"""

from __future__ import annotations

import copy
import io
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import nn

from tofa_core.arch import Arch, SearchSpace
from tofa_core.storage import Storage
from tofa_core.supernet import Supernet
from tofa_core.training.evaluate import EvalData, calibrated_subnet, fuse_bn

SCORES = ("agreement", "val")


class ArchEncoder:
    """One-hot resolution and width, then per block slot one-hot kernel and expand (zeros
    for slots a shallower stage skips): OFA's encoding, one row per arch."""

    def __init__(self, space: SearchSpace):
        self.space = space
        self.res = {r: i for i, r in enumerate(space.resolutions)}
        self.width = {w: len(self.res) + i for i, w in enumerate(space.width_choices)}
        self.base = len(self.res) + len(self.width)
        self.nk, self.ne = len(space.kernel_choices), len(space.expand_choices)
        self.k = {k: i for i, k in enumerate(space.kernel_choices)}
        self.e = {e: self.nk + i for i, e in enumerate(space.expand_choices)}
        self.starts = np.cumsum([0] + [s.max_depth for s in space.stages])[:-1].tolist()
        self.dim = self.base + space.num_blocks_max * (self.nk + self.ne)

    def __call__(self, archs: Sequence[Arch]) -> torch.Tensor:
        out = np.zeros((len(archs), self.dim), np.float32)
        step = self.nk + self.ne
        for row, arch in enumerate(archs):
            hot = [self.res[arch.resolution], self.width[arch.width]]
            pos = 0
            for start, depth in zip(self.starts, arch.depths):
                for j in range(depth):
                    slot = self.base + (start + j) * step
                    hot.append(slot + self.k[arch.kernels[pos]])
                    hot.append(slot + self.e[arch.expands[pos]])
                    pos += 1
            out[row, hot] = 1.0
        return torch.from_numpy(out)


@dataclass
class Scored:
    arch: Arch
    val: float
    agreement: float

    def score(self, kind: str) -> float:
        return getattr(self, kind)

    def to_dict(self) -> dict:
        return {"arch": self.arch.to_dict(), "val": self.val, "agreement": self.agreement}

    @classmethod
    def from_dict(cls, d: dict) -> Scored:
        return cls(Arch.from_dict(d["arch"]), float(d["val"]), float(d["agreement"]))


@torch.no_grad()
def teacher_labels(net: Supernet, data: EvalData) -> torch.Tensor:
    """What the largest subnet predicts on the unlabelled pool (the agreement reference)."""
    return fuse_bn(calibrated_subnet(net, net.space.max_arch(), data.calib))(data.pool).argmax(1)


@torch.no_grad()
def score_subnets(
    net: Supernet,
    archs: Sequence[Arch],
    data: EvalData,
    progress: Callable[[int, int], None] | None = None,
    reference: torch.Tensor | None = None,
    subnet: Callable[[Arch], nn.Module] | None = None,
) -> list[Scored]:
    """Recalibrate and score every arch on the same images (both scores at once). `subnet`:
    where the recalibrated subnets come from when the caller keeps them (copied, not changed)."""
    if reference is None:
        reference = teacher_labels(net, data)
    out = []
    for i, arch in enumerate(archs):
        model = fuse_bn(copy.deepcopy(subnet(arch)) if subnet else calibrated_subnet(net, arch, data.calib))
        val = (model(data.val_x).argmax(1) == data.val_y).float().mean().item() if len(data.val_y) else 0.0
        agree = (model(data.pool).argmax(1) == reference).float().mean().item()
        out.append(Scored(arch, val, agree))
        if progress is not None:
            progress(i + 1, len(archs))
    return out


# The MLP and its full-batch fit. Strong weight decay: a few hundred noisy scores, ~80 one-hot
# inputs (it ranks held-out subnets as well as a ridge regression does; an unregularised MLP
# ranks them worse).
HIDDEN = 64
FIT_EPOCHS = 300
FIT_LR = 3e-3
FIT_WEIGHT_DECAY = 0.1


class AccuracyPredictor(nn.Module):
    """A small MLP from the arch encoding to a score, with the targets' mean and scale inside."""

    def __init__(self, space: SearchSpace, hidden: int = HIDDEN):
        super().__init__()
        self.space = space
        self.encode = ArchEncoder(space)
        self.mlp = nn.Sequential(
            nn.Linear(self.encode.dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self._numpy: list | None = None  # weights as arrays for predict(), made on first use

    def fit(
        self, archs: Sequence[Arch], scores: Sequence[float], epochs: int = FIT_EPOCHS, seed: int = 0
    ) -> AccuracyPredictor:
        with torch.random.fork_rng():  # a seeded start that leaves the caller's RNG alone
            torch.manual_seed(seed)
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        x = self.encode(archs)
        y = torch.tensor(scores, dtype=torch.float32)
        self.offset.fill_(y.mean())
        self.scale.fill_(y.std().clamp_min(1e-4) if len(y) > 1 else 1.0)
        target = (y - self.offset) / self.scale
        opt = torch.optim.AdamW(self.mlp.parameters(), lr=FIT_LR, weight_decay=FIT_WEIGHT_DECAY)
        self.mlp.train()
        for _ in range(epochs):  # full batch: a few hundred rows
            opt.zero_grad()
            loss = nn.functional.mse_loss(self.mlp(x).squeeze(1), target)
            loss.backward()
            opt.step()
        self.mlp.eval()
        self._numpy = None
        return self

    def predict(self, archs: Sequence[Arch]) -> np.ndarray:
        """Predicted scores, in NumPy: search calls this for small batches thousands of times,
        where torch's per-call overhead and thread pool cost more than the arithmetic."""
        if not archs:
            return np.zeros(0)
        if self._numpy is None:
            self._numpy = [
                (m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
                for m in self.mlp
                if isinstance(m, nn.Linear)
            ]
        x = self.encode(archs).numpy()
        for i, (w, b) in enumerate(self._numpy):
            x = x @ w + b
            if i < len(self._numpy) - 1:
                np.maximum(x, 0, out=x)
        return x[:, 0] * float(self.scale) + float(self.offset)

    def load_state_dict(self, *args, **kwargs):
        self._numpy = None
        return super().load_state_dict(*args, **kwargs)


@dataclass
class PredictorReport:
    score: str
    train: int
    held_out: int
    kendall_tau: float  # predicted vs measured score on held-out subnets
    scored: list[Scored]
    held_out_pairs: list[tuple[float, float]] = field(default_factory=list)  # (predicted, measured)


def build_predictor(
    net: Supernet,
    data: EvalData,
    *,
    samples: int = 300,
    score: str = "agreement",
    held_out: float = 0.2,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[AccuracyPredictor, PredictorReport]:
    """Sample `samples` subnets (plus the largest and smallest), score them, fit the predictor.

    Kendall tau is measured on the held-out share; the returned predictor is then refitted
    on all samples, since search benefits from every measured point.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    space = net.space
    rng = random.Random(seed)
    archs = list(
        dict.fromkeys([space.max_arch(), space.min_arch(), *(space.sample(rng) for _ in range(samples))])
    )
    scored = score_subnets(net, archs, data, progress)
    order = list(range(len(scored)))
    rng.shuffle(order)
    n_test = int(len(order) * held_out)
    n_test = n_test if n_test >= 5 else 0  # fewer held-out subnets say nothing about ranking
    test, train = order[:n_test], order[n_test:]
    tau, pairs = float("nan"), []
    if n_test:
        model = AccuracyPredictor(space).fit(
            [scored[i].arch for i in train], [scored[i].score(score) for i in train]
        )
        predicted = model.predict([scored[i].arch for i in test])
        measured = [scored[i].score(score) for i in test]
        tau = float(kendalltau(predicted, measured).statistic)
        pairs = [(float(p), float(m)) for p, m in zip(predicted, measured, strict=True)]
    model = AccuracyPredictor(space).fit(
        [s.arch for s in scored], [s.score(score) for s in scored], seed=seed
    )
    return model, PredictorReport(score, len(train), n_test, tau, scored, pairs)


def save_predictor(model: AccuracyPredictor) -> dict:
    """A weights-only state (loadable with torch.load(weights_only=True)) plus its space."""
    from tofa_core.training.checkpoint import space_dict

    return {
        "space": space_dict(model.space),
        "state": model.state_dict(),
        "hidden": model.mlp[0].out_features,
    }


def load_predictor(state: dict, space: SearchSpace) -> AccuracyPredictor:
    model = AccuracyPredictor(space, hidden=int(state["hidden"]))
    model.load_state_dict(state["state"])
    return model.eval()


def predictor_key(score: str, samples: int, seed: int) -> str:
    """Where a supernet's predictor lives in its run folder (its report: .json beside it)."""
    return f"predictor/{score}-{samples}-{seed}"


def cached_predictor(
    net: Supernet, data: EvalData, folder: Storage, *, samples: int, score: str, seed: int = 0
) -> tuple[AccuracyPredictor, dict, bool]:
    """The predictor of a trained supernet, built once and kept in its run `folder`; later
    calls reuse it. Returns it, its report, and whether it was reused."""
    key = predictor_key(score, samples, seed)
    # The report is written after the weights: with it present, both are complete.
    if folder.exists(f"{key}.json"):
        state = torch.load(io.BytesIO(folder.read_bytes(f"{key}.pt")), weights_only=True)
        return load_predictor(state, net.space), json.loads(folder.read_bytes(f"{key}.json")), True
    started = time.perf_counter()
    model, report = build_predictor(net, data, samples=samples, score=score, seed=seed)
    out = {
        "score": score,
        "samples": len(report.scored),
        "train": report.train,
        "held_out": report.held_out,
        "kendall_tau": report.kendall_tau,
        "seconds": round(time.perf_counter() - started, 2),
        "held_out_pairs": report.held_out_pairs,
        "scored": [s.to_dict() for s in report.scored],
    }
    buffer = io.BytesIO()
    torch.save(save_predictor(model), buffer)
    folder.write_bytes(f"{key}.pt", buffer.getvalue())
    folder.write_bytes(f"{key}.json", json.dumps(out).encode())
    return model, out, False
