"""Training on data larger than memory: peak RSS per process must not grow with the data set.

Generates the largest data set once: 64x64 RGB PNGs of 10 classes a network can learn
(a filled circle, square, triangle, cross or ring, in one of two colours, at a random place
and size, on a noisy background), of which 2,000 labelled (train/<class>/), 1,000 test
(test/<class>/) and the rest unlabelled (unlabeled/). For each size (hard links to the first
N files), in fresh processes: `tofa ingest`, then `tofa train --workers 2` for a fixed number
of steps (2 Ray workers, space `tiny` at 32 px, batch 32 + 64 unlabelled over both workers, the default
`train.in_memory_mb`, so the unlabelled split of 1.1 GiB and more is streamed).
Measured: each process's peak RSS (VmHWM from /proc, sampled every 0.2 s over the command's
process tree), by role: ingest, driver (`tofa train`), each training worker, the largest
other process (Ray's own, Prefect's server); and training images/s (labelled + unlabelled).

    .venv/bin/python benchmarks/bench_scale.py [--sizes 100000 200000] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import mib, run_sampled  # noqa: E402

SIDE = 64
LABELLED, TEST = 2000, 1000
ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
train:
  space: tiny
  resolutions: [32]
  epochs: 1
  steps_per_epoch: {steps}
  batch_size: 32
  mu: 2
  k_random: 1
  calib_images: 256
  threads: 1
"""


def shape_image(rng: np.random.Generator, cls: int) -> Image.Image:
    img = Image.fromarray(rng.integers(0, 90, (SIDE, SIDE, 3), dtype=np.uint8))
    colour = (230, 60, 40) if cls < 5 else (40, 120, 230)
    r = int(rng.integers(12, 24))
    cx, cy = (int(v) for v in rng.integers(r, SIDE - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(img)
    kind = cls % 5
    if kind == 0:
        draw.ellipse(box, fill=colour)
    elif kind == 1:
        draw.rectangle(box, fill=colour)
    elif kind == 2:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif kind == 3:
        draw.rectangle((cx - r, cy - r // 4, cx + r, cy + r // 4), fill=colour)
        draw.rectangle((cx - r // 4, cy - r, cx + r // 4, cy + r), fill=colour)
    else:
        draw.ellipse(box, outline=colour, width=max(3, r // 3))
    return img


def generate(root: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        cls = i % 10
        if i < LABELLED:
            path = root / "train" / f"c{cls}" / f"{i:06d}.png"
        elif i < LABELLED + TEST:
            path = root / "test" / f"c{cls}" / f"{i:06d}.png"
        else:
            path = root / "unlabeled" / f"{i // 10000:03d}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape_image(rng, cls).save(path, compress_level=1)
        files.append(path)
    return files


def one_size(n: int, files: list[Path], all_root: Path, tmp: Path, steps: int) -> dict:
    source, store = tmp / f"src-{n}", tmp / f"store-{n}"
    for path in files[:n]:
        target = source / path.relative_to(all_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    config = tmp / "scale.yaml"
    config.write_text(CONFIG.format(steps=steps))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOFA_STORE": str(store), "RAY_ADDRESS": ""}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow-{n}.db"
    tofa = [sys.executable, "-m", "flows.cli"]
    start = time.perf_counter()
    ingest_seen = run_sampled([*tofa, "ingest", str(source), "--dataset", "scale"], env).peaks
    ingest_s = time.perf_counter() - start
    ingest_pid = min(ingest_seen)
    start = time.perf_counter()
    command = [
        "train",
        "--data",
        str(source),
        "--dataset",
        "scale",
        "--workers",
        "2",
        "--config",
        str(config),
    ]
    train = run_sampled([*tofa, *command], env, every=0.2)
    out, seen = train.output, train.peaks
    train_s = time.perf_counter() - start
    driver = min(seen)
    workers = [peak for pid, (peak, cmd) in seen.items() if "RayTrainWorker" in cmd]
    others = [peak for pid, (peak, cmd) in seen.items() if pid != driver and "RayTrainWorker" not in cmd]
    history = _history(store)
    return {
        "images": n,
        "unlabelled_pixel_mib": mib((n - LABELLED - TEST) * SIDE * SIDE * 3),
        "ingest_s": round(ingest_s, 1),
        "ingest_peak_mib": mib(ingest_seen[ingest_pid][0]),
        "train_command_s": round(train_s, 1),
        "driver_peak_mib": mib(seen[driver][0]),
        "worker_peaks_mib": sorted(mib(p) for p in workers),
        "largest_other_peak_mib": mib(max(others, default=0)),
        "images_per_s": history.get("images_per_s"),
        "test_acc_max": history.get("test_acc/max"),
        "output_tail": out[-400:],
    }


def _history(store: Path) -> dict:
    """The training run's last epoch row (progress.json in its folder) and its final scores."""
    records = sorted(store.glob("supernets/scale/*.json"))
    if not records:
        return {}
    record = json.loads(records[-1].read_text())
    progress = Path(record["run_dir"]) / "progress.json"
    row = json.loads(progress.read_text())[-1] if progress.exists() else {}
    return {**row, **{k: v for k, v in record.items() if k.startswith("test_acc/")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100000, 200000])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tofa-scale-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        files = generate(tmp / "all", sizes[-1])
        print(f"generated {sizes[-1]} images in {time.perf_counter() - start:.0f} s", flush=True)
        for n in sizes:
            row = one_size(n, files, tmp / "all", tmp, args.steps)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "output_tail"}), flush=True)
    result = {"side": SIDE, "steps": args.steps, "cpu_count": os.cpu_count(), "rows": rows}
    for row in rows:
        peaks = [row["ingest_peak_mib"], row["driver_peak_mib"], *row["worker_peaks_mib"]]
        print(
            f"{row['images']:>7} images: ingest {row['ingest_peak_mib']} MiB, "
            f"driver {row['driver_peak_mib']} MiB, workers {row['worker_peaks_mib']} MiB "
            f"(largest {max(peaks)}; limit 2048), {row['images_per_s']:.0f} images/s"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
