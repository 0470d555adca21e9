"""Where the accuracy ceiling comes from: the training recipe or the search space's network family.

Trains, per seed, on the same data (digits, 10% labels unless said), with the same augmentation,
the same teacher loss (labelled cross-entropy + masked pseudo-labels), schedule, optimizer and
BN-recalibrated evaluation as `tofa train`:
  plain  a plain 5-layer CNN (3x3 convs 32-32-64-64-128, two max-pools, ReLU), ~1.8M MACs at 8 px
  max    the search space's largest subnet, trained alone (`train_supernet(fixed=...)`, the baseline)
  min    the smallest subnet, trained alone
and prints test accuracy mean ± std per network. If `plain` reaches what the space's networks do
not, the shortfall is the space (MBConv blocks at 8 px), not the semi-supervised recipe.

    .venv/bin/python benchmarks/bench_ceiling.py [--nets plain,max,min] [--seeds 3] \
        [--config '{"space": "tiny"}'] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _datasets import ingest_dataset  # noqa: E402

from tofa_core.costs import count_macs  # noqa: E402
from tofa_core.data.augment import Augmenter  # noqa: E402
from tofa_core.data.loaders import BatchStream, DataSplits, load_splits  # noqa: E402
from tofa_core.data.store import DatasetStore  # noqa: E402
from tofa_core.storage import open_storage  # noqa: E402
from tofa_core.training.config import TrainConfig  # noqa: E402
from tofa_core.training.evaluate import accuracy, recalibrate_bn  # noqa: E402
from tofa_core.training.loop import space_for, train_supernet  # noqa: E402
from tofa_core.training.loss import teacher_loss  # noqa: E402


def plain_cnn(channels: int, classes: int) -> nn.Sequential:
    def conv(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *conv(channels, 32), *conv(32, 32), nn.MaxPool2d(2),
        *conv(32, 64), *conv(64, 64), nn.MaxPool2d(2),
        *conv(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes),
    )  # fmt: skip


def macs(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def hook(module, _inputs, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += (
                out.numel()
                // out.shape[0]
                * module.in_channels
                // module.groups
                * math.prod(module.kernel_size)
            )
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model.eval()(x[:1])
    for h in handles:
        h.remove()
    return total


@dataclass
class PlainRun:
    """A plain CNN with its data streams, augmentation and optimizer, seeded as `train_supernet`."""

    net: nn.Module
    labelled: BatchStream
    unlabelled: BatchStream
    aug: Augmenter
    gen: torch.Generator
    optimizer: torch.optim.Optimizer


def plain_run(cfg: TrainConfig, splits: DataSplits) -> PlainRun:
    torch.manual_seed(cfg.seed)
    net = plain_cnn(splits.channels, len(splits.classes))
    labelled = BatchStream(splits.train, cfg.batch_size, seed=cfg.seed * 7919)
    unlabelled = BatchStream(splits.unlabeled, cfg.batch_size * cfg.mu, seed=cfg.seed * 7919 + 104729)
    decay = [p for p in net.parameters() if p.dim() > 1]
    no_decay = [p for p in net.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 2 * 104729)
    return PlainRun(
        net.train(), labelled, unlabelled, Augmenter(cfg.augment, splits.channels), gen, optimizer
    )


def plain_step(run: PlainRun, cfg: TrainConfig, ramp: float) -> None:
    """One update by the teacher's loss: labelled cross-entropy (+ pseudo-labels when semi-supervised)."""
    x, y = next(run.labelled)
    inputs, n_u = run.aug.weak(x, run.gen), 0
    if cfg.semi_supervised:
        u, _ = next(run.unlabelled)
        inputs, n_u = torch.cat([inputs, run.aug.weak(u, run.gen), run.aug.strong(u, run.gen)]), len(u)
    loss, _, _ = teacher_loss(run.net(inputs), y, n_u, cfg, ramp)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()


def plain_test_accuracy(run: PlainRun, cfg: TrainConfig, splits: DataSplits) -> float:
    """Test accuracy after BN recalibration on the same sample of training images as a subnet's."""
    pool = torch.cat([splits.train.images, splits.unlabeled.images])
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.calib_images]
    recalibrate_bn(run.net, run.aug.normalize(pool[pick])).eval()
    return accuracy(run.net, run.aug.normalize(splits.test.images), splits.test.labels)


def train_plain(cfg: TrainConfig, store: DatasetStore, dataset: str) -> tuple[float, int]:
    """The loop of `train_supernet(fixed=...)` with a plain CNN in place of the subnet."""
    splits = load_splits(store, dataset, val_fraction=cfg.val_fraction, seed=cfg.seed)
    run = plain_run(cfg, splits)
    total = cfg.epochs * cfg.epoch_steps(len(splits.train), len(splits.unlabeled))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(run.optimizer, total)
    for step in range(1, total + 1):
        plain_step(run, cfg, min(1.0, step / (cfg.warmup * total)) if cfg.warmup > 0 else 1.0)
        scheduler.step()
    x = torch.zeros(1, splits.channels, splits.size, splits.size)
    return plain_test_accuracy(run, cfg, splits), macs(run.net, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="plain,max,min")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", default="digits", choices=["digits", "mnist5k", "fmnist"])
    parser.add_argument("--labelled", type=float, default=0.1)
    parser.add_argument("--config", default="{}", help="TrainConfig overrides as JSON")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    nets = args.nets.split(",")
    if unknown := set(nets) - {"plain", "max", "min"}:
        raise SystemExit(f"unknown --nets {sorted(unknown)}: choose from plain, max, min")
    overrides = json.loads(args.config)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(open_storage(f"{tmp}/store"))
        ingest_dataset(args.data, store, Path(tmp), labelled=args.labelled)
        for net in nets:
            for seed in range(args.seeds):
                cfg = TrainConfig(**{**overrides, "seed": seed})
                start = time.perf_counter()
                if net == "plain":
                    acc, n_macs = train_plain(cfg, store, args.data)
                else:
                    splits = load_splits(store, args.data, val_fraction=cfg.val_fraction, seed=seed)
                    space = space_for(cfg, splits)
                    arch = space.max_arch() if net == "max" else space.min_arch()
                    run_dir = open_storage(f"{tmp}/store").child(f"runs/{net}-{seed}")
                    acc = train_supernet(cfg, store, args.data, run_dir, fixed=arch).final["test_acc/arch"]
                    n_macs = count_macs(arch, space)
                row = {
                    "net": net,
                    "seed": seed,
                    "acc": acc,
                    "macs": n_macs,
                    "seconds": time.perf_counter() - start,
                }
                rows.append(row)
                print(
                    json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                    flush=True,
                )
    print(
        f"\n{args.data}, {args.labelled:.0%} labels, {args.seeds} seed(s), TrainConfig overrides {overrides}"
    )
    print("| network | MACs | test accuracy % | seconds / run |")
    print("| --- | ---: | ---: | ---: |")
    for net in nets:
        mine = [r for r in rows if r["net"] == net]
        acc = [100 * r["acc"] for r in mine]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        seconds = statistics.mean(r["seconds"] for r in mine)
        mean = statistics.mean(acc)
        print(f"| {net} | {mine[0]['macs'] / 1e6:.2f}M | {mean:.1f} ± {spread:.1f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
