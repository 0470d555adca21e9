"""The default training run on digits (10% labels): seconds and test accuracy, per seed.

Two ways, for issue 4's >= 97% max subnet and >= 94% min subnet within 5 minutes on 2 cores:
  default  TrainConfig's defaults in one process, without Prefect, Ray and MLflow around it,
           so the schedule can be judged on its own;
  --cli    the real `tofa train --data digits --workers 2`, one run per seed (seed 0: no config;
           others: a config file with only `train: {seed: N}`), wall time from the shell as a
           user sees it, in this checkout's store (.tofa/store or $TOFA_STORE) and MLflow.

    .venv/bin/python benchmarks/bench_train_default.py [--seeds 1] [--first-seed 0] [--threads 2]
        [--labelled 0.1] [--cli]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flows.settings import store_uri
from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.store import DatasetStore
from tofa_core.storage import open_storage
from tofa_core.training.config import TrainConfig
from tofa_core.training.loop import train_supernet


def in_process(seeds: range, threads: int, labelled: float) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(open_storage(f"{tmp}/store"))
        ingest("digits", "digits", store, IngestConfig(labelled_fraction=labelled))
        for seed in seeds:
            start = time.perf_counter()
            run_dir = open_storage(f"{tmp}/run-{seed}")
            result = train_supernet(TrainConfig(seed=seed), store, "digits", run_dir)
            row = {"seed": seed, "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row | {k: round(v, 4) for k, v in result.final.items()})
            print(json.dumps(rows[-1] | {"load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
    return rows


def with_cli(seeds: range) -> list[dict]:
    tofa = Path(sys.executable).parent / "tofa"
    records = open_storage(store_uri()).child("supernets/digits")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            command = [str(tofa), "train", "--data", "digits", "--workers", "2"]
            if seed:
                config = Path(tmp) / f"seed-{seed}.yaml"
                config.write_text(f"train:\n  seed: {seed}\n")
                command += ["--config", str(config)]
            before = {o.key for o in records.list()}
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            [new] = [o.key for o in records.list() if o.key not in before]
            summary = json.loads(records.read_bytes(new))
            row = {"seed": seed, "seconds": round(wall, 1), "training_s": round(summary["seconds"], 1)}
            row |= {k: round(summary[k], 4) for k in ("test_acc/max", "test_acc/min")}
            rows.append(row)
            load = round(os.getloadavg()[0], 2)
            print(json.dumps(row | {"run_id": summary["run_id"], "load_avg_1m": load}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a busy machine)")
    parser.add_argument(
        "--labelled", type=float, default=IngestConfig().labelled_fraction, help="not with --cli (default)"
    )
    parser.add_argument("--cli", action="store_true", help="run `tofa train` (Prefect, 2 Ray workers)")
    args = parser.parse_args()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows = with_cli(seeds) if args.cli else in_process(seeds, args.threads, args.labelled)
    mean = {
        k: round(statistics.mean(r[k] for r in rows), 4) for k in ("seconds", "test_acc/max", "test_acc/min")
    }
    steps = f"{TrainConfig().epochs} epochs of {TrainConfig().steps_per_epoch}"
    how = "tofa train, 2 Ray workers" if args.cli else f"one process, {args.threads} thread(s)"
    print(f"seeds {seeds.start}-{seeds.stop - 1}, {steps} steps, {how}")
    print(json.dumps(mean))


if __name__ == "__main__":
    main()
