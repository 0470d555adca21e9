"""Training pace over a whole run: images/s per epoch of the default `tofa train` on
Fashion-MNIST (bench_quality's folder: 1,000 labels, 9,000 unlabelled, 2,000 test), 2 Ray
workers, in a fresh store. Prints every epoch's pace, the last against the first, and each
training worker's peak RSS: a pace that falls while memory grows is the code (a leak, growing
state); a pace that falls with flat memory on a loaded machine is the machine. Run it alone.

    .venv/bin/python benchmarks/bench_pace.py [--epochs 30] [--json-out docs/results/quality/pace.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _datasets import fmnist_folder  # noqa: E402
from _procs import mib, run_sampled  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tofa-pace-") as tmp_name:
        tmp = Path(tmp_name)
        folder = fmnist_folder(tmp / "fmnist")
        config = tmp / "pace.yaml"
        config.write_text(json.dumps({"train": {"epochs": args.epochs}}))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOFA_STORE": str(tmp / "store"), "RAY_ADDRESS": ""}
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        command = [sys.executable, "-m", "flows.cli", "train", "--data", str(folder), "--dataset", "fmnist"]
        start = time.perf_counter()
        done = run_sampled([*command, "--workers", "2", "--config", str(config)], env, every=1.0)
        seconds = time.perf_counter() - start
        progress = sorted((tmp / "store" / "runs").glob("*/progress.json"))
        if not progress:
            sys.exit(f"no training run finished:\n{done.output[-2000:]}")
        pace = [round(row["images_per_s"], 1) for row in json.loads(progress[-1].read_text())]
    workers = sorted(mib(peak) for peak, cmd in done.peaks.values() if "RayTrainWorker" in cmd)
    result = {
        "epochs": args.epochs,
        "command_seconds": round(seconds, 1),
        "images_per_s": pace,
        "last_over_first": round(pace[-1] / pace[0], 3),
        "worker_peak_mib": workers,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
