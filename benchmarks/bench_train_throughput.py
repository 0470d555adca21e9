"""Training throughput on Ray: 1 worker x 2 threads against 2 workers x 1 thread.

Trains the default unified loss on digits (resolution 8, batch 32 + 3 x 32 unlabelled,
4 subnets per step) for a few epochs with each layout, on Ray Train workers, and prints
labelled + unlabelled images per second (median over epochs after the first).

    .venv/bin/python benchmarks/bench_train_throughput.py [--epochs 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from flows.train import new_run_id, run_trainer
from tofa_core.data.ingest import ingest
from tofa_core.data.store import DatasetStore
from tofa_core.storage import open_storage
from tofa_core.training.config import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = open_storage(f"{tmp}/store")
        version = ingest("digits", "digits", DatasetStore(store)).manifest.version
        for workers, threads in ((1, 2), (2, 1)):
            cfg = TrainConfig(
                epochs=args.epochs, steps_per_epoch=args.steps, resolutions=(8,), threads=threads
            )
            out = run_trainer.fn(cfg, store, "digits", version, new_run_id(), workers, None)
            rates = [h["images_per_s"] for h in out["history"][1:]] or [out["history"][0]["images_per_s"]]
            results[f"{workers}x{threads}"] = round(statistics.median(rates), 1)
            print(
                f"{workers} worker(s) x {threads} thread(s): {results[f'{workers}x{threads}']} images/s",
                flush=True,
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
