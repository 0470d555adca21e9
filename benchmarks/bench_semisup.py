"""Does the unified semi-supervised loss beat supervised-only sandwich training?

digits with 5% of the non-test images labelled; for each seed, the default supernet
schedule (TrainConfig's defaults, what `tofa train` runs) is trained twice: the unified loss
and supervised-only (lambda_u = lambda_kd = 0), equal epochs and steps. Prints test accuracy
of the largest and smallest subnet (after BN recalibration) per seed, the means, and the gaps.

    .venv/bin/python benchmarks/bench_semisup.py [--seeds 3] [--epochs N] [--steps N] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.store import DatasetStore
from tofa_core.storage import open_storage
from tofa_core.training.config import TrainConfig
from tofa_core.training.loop import train_supernet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--steps", type=int, default=None, help="steps per epoch; default: TrainConfig's")
    parser.add_argument("--labelled", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(open_storage(f"{tmp}/store"))
        ingest("digits", "digits", store, IngestConfig(labelled_fraction=args.labelled))
        schedule = {"epochs": args.epochs, "steps_per_epoch": args.steps}
        base = TrainConfig(**{k: v for k, v in schedule.items() if v is not None})
        for seed in range(args.seeds):
            for name, update in (("unified", {}), ("supervised", {"lambda_u": 0.0, "lambda_kd": 0.0})):
                cfg = base.model_copy(update={"seed": seed, **update})
                start = time.perf_counter()
                result = train_supernet(cfg, store, "digits", open_storage(f"{tmp}/run-{name}-{seed}"))
                row = {"seed": seed, "loss": name, "seconds": round(time.perf_counter() - start, 1)}
                row |= {k: round(v, 4) for k, v in result.final.items()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for name in ("unified", "supervised"):
        for net in ("max", "min"):
            summary[f"{name}/{net}"] = round(
                statistics.mean(r[f"test_acc/{net}"] for r in rows if r["loss"] == name), 4
            )
    for net in ("max", "min"):
        summary[f"gap/{net}"] = round(summary[f"unified/{net}"] - summary[f"supervised/{net}"], 4)
    print(
        f"labelled {args.labelled:.0%}, {args.seeds} seeds, {base.epochs * base.steps_per_epoch} steps each"
    )
    print("| loss | max subnet test acc | min subnet test acc |")
    print("| --- | --- | --- |")
    for name in ("unified", "supervised"):
        print(f"| {name} | {summary[f'{name}/max']:.1%} | {summary[f'{name}/min']:.1%} |")
    print(
        f"gap: max {summary['gap/max'] * 100:+.1f} points, "
        f"min {summary['gap/min'] * 100:+.1f} points (need >= +5)"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
