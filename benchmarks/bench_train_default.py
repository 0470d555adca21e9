"""The default training run on digits (10% labels): seconds and test accuracy, in one process.

What `tofa train --data digits` trains (TrainConfig's defaults), without Prefect, Ray and
MLflow around it, so the schedule can be judged on its own: issue 4 asks for a max subnet
of >= 97% and a min subnet of >= 94% test accuracy within 5 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/bench_train_default.py [--seeds 1] [--threads 2] [--labelled 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a busy machine)")
    parser.add_argument("--labelled", type=float, default=IngestConfig().labelled_fraction)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(open_storage(f"{tmp}/store"))
        ingest("digits", "digits", store, IngestConfig(labelled_fraction=args.labelled))
        for seed in range(args.seeds):
            cfg = TrainConfig(seed=seed)
            start = time.perf_counter()
            result = train_supernet(cfg, store, "digits", open_storage(f"{tmp}/run-{seed}"))
            row = {"seed": seed, "seconds": round(time.perf_counter() - start, 1)}
            row |= {k: round(v, 4) for k, v in result.final.items()}
            row["load_avg_1m"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    mean = {
        k: round(statistics.mean(r[k] for r in rows), 4) for k in ("seconds", "test_acc/max", "test_acc/min")
    }
    steps = cfg.epochs * cfg.steps_per_epoch
    print(f"labelled {args.labelled:.0%}, {args.seeds} seed(s), {steps} steps, {args.threads} thread(s)")
    print(json.dumps(mean))


if __name__ == "__main__":
    main()
