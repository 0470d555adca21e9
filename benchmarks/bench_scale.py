"""A worker's memory whatever the data set's size: peak RSS per process against images.

Generates one Parquet table of 64x64 RGB PNGs (the bytes inside the table, as a user's
export would hold them) of 10 classes a network can learn (a filled circle, square,
triangle, cross or ring, in one of two colours, at a random place and size, on a noisy
background): 1,000 test rows (`split` test), and of the rest 1 in 10 labelled, the others
unlabelled. Each size is the table's first N rows, written a row group at a time. For each
size, in fresh processes: `tofa ingest TABLE`, then `tofa train --data TABLE --workers 2`
for a fixed number of steps (2 Ray workers, space `tiny` at 32 px, batch 32 + 64 unlabelled
over both workers, the default `train.in_memory_mb`: what one worker holds, so the smaller
sizes hold their share in memory and the larger ones stream it).
Measured: each process's peak RSS (VmHWM from /proc, sampled every 0.2 s over the command's
process tree), by role: ingest, driver (`tofa train`), each training worker, the largest
other process (Ray's own, Prefect's server); whether the unlabelled share was held or
streamed; and training images/s (labelled + unlabelled).

    .venv/bin/python benchmarks/bench_scale.py [--sizes 10000 30000 50000 90000 100000 200000]
        [--steps 150] [--json-out docs/results/scale.json] [--plot docs/results/scale.png]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import mib, run_sampled  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tofa_core.training.config import TrainConfig  # noqa: E402

SIDE = 64
TEST = 1000
LABELLED_EVERY = 10
ROW_GROUP = 5000
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


def _rows(start: int, count: int) -> pa.Table:
    """Rows start..start+count of the table: the first TEST are test images, then 1 in
    LABELLED_EVERY is labelled; every image's class is drawn from its own seeded generator."""
    cells, labels, splits = [], [], []
    for i in range(start, start + count):
        rng = np.random.default_rng(i)
        cls = int(rng.integers(10))
        buffer = io.BytesIO()
        shape_image(rng, cls).save(buffer, "PNG", compress_level=1)
        cells.append(buffer.getvalue())
        test = i < TEST
        labelled = test or i % LABELLED_EVERY == 0
        labels.append(f"c{cls}" if labelled else None)
        splits.append("test" if test else "train" if labelled else "unlabeled")
    return pa.table({"image": pa.array(cells, pa.binary()), "label": labels, "split": splits})


def generate(folder: Path, sizes: list[int]) -> dict[int, Path]:
    """One table per size, each the first N rows of the same sequence, a row group at a time
    (each group made once and appended to every table it belongs to)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {n: folder / f"scale-{n}.parquet" for n in sizes}
    writers = {}
    try:
        for start in range(0, max(sizes), ROW_GROUP):
            group = _rows(start, min(ROW_GROUP, max(sizes) - start))
            for n in sizes:
                if start < n:
                    part = group.slice(0, n - start)
                    if n not in writers:
                        writers[n] = pq.ParquetWriter(paths[n], part.schema)
                    writers[n].write_table(part)
    finally:
        for writer in writers.values():
            writer.close()
    return paths


def one_size(n: int, table: Path, tmp: Path, steps: int) -> dict:
    store = tmp / f"store-{n}"
    config = tmp / "scale.yaml"
    config.write_text(CONFIG.format(steps=steps))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOFA_STORE": str(store), "RAY_ADDRESS": ""}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow-{n}.db"
    tofa = [sys.executable, "-m", "flows.cli"]
    start = time.perf_counter()
    ingest_seen = run_sampled([*tofa, "ingest", str(table), "--dataset", "scale"], env).peaks
    ingest_s = time.perf_counter() - start
    ingest_pid = min(ingest_seen)
    start = time.perf_counter()
    command = ["train", "--data", str(table), "--dataset", "scale", "--workers", "2", "--config", str(config)]
    train = run_sampled([*tofa, *command], env, every=0.2)
    out, seen = train.output, train.peaks
    train_s = time.perf_counter() - start
    driver = min(seen)
    workers = [peak for pid, (peak, cmd) in seen.items() if "RayTrainWorker" in cmd]
    others = [peak for pid, (peak, cmd) in seen.items() if pid != driver and "RayTrainWorker" not in cmd]
    history = _history(store)
    labelled = len(range(TEST, n, LABELLED_EVERY))
    unlabelled = n - TEST - labelled
    held = (labelled * 0.9 + unlabelled / 2) * SIDE * SIDE * 3  # val takes a tenth of the labelled
    return {
        "images": n,
        "unlabelled_pixel_mib": mib(unlabelled * SIDE * SIDE * 3),
        "worker_share_mib": mib(unlabelled // 2 * SIDE * SIDE * 3),
        # the rule of worker_splits, at the default budget
        "unlabelled_share": "held" if held <= TrainConfig().in_memory_mb * 2**20 else "streamed",
        "ingest_s": round(ingest_s, 1),
        "ingest_peak_mib": mib(ingest_seen[ingest_pid][0]),
        "train_command_s": round(train_s, 1),
        "driver_peak_mib": mib(seen[driver][0]),
        "worker_peak_mib": sorted(mib(p) for p in workers),
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


def plot(rows: list[dict], path: Path) -> Path:
    """Peak RSS per process against images, the held/streamed switch marked."""
    from flows.plots import plt, save

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    sizes = [r["images"] / 1000 for r in rows]
    ax.plot(
        sizes, [max(r["worker_peak_mib"]) for r in rows], marker="o", label="training worker (larger of 2)"
    )
    ax.plot(sizes, [r["driver_peak_mib"] for r in rows], marker="s", label="driver (tofa train)")
    ax.plot(sizes, [r["ingest_peak_mib"] for r in rows], marker="^", label="ingest (tofa ingest)")
    streamed = [r for r in rows if r["unlabelled_share"] == "streamed"]
    ax.scatter([r["images"] / 1000 for r in streamed], [max(r["worker_peak_mib"]) for r in streamed], s=160,
               facecolors="none", edgecolors="black", label="worker streams its share")  # fmt: skip
    ax.axhline(2048, color="grey", linestyle="--", linewidth=1, label="2 GiB")
    ax.set_xlabel("images in the table (thousands; 64x64 RGB, 1 in 10 labelled)")
    ax.set_ylabel("peak resident memory (MiB)")
    ax.set_ylim(0, 2400)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 50000, 90000, 100000, 200000])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tofa-scale-") as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        tables = generate(tmp / "tables", sizes)
        print(f"generated {sizes[-1]} images in {time.perf_counter() - start:.0f} s", flush=True)
        for n in sizes:
            row = one_size(n, tables[n], tmp, args.steps)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "output_tail"}), flush=True)
            tables[n].unlink()
    result = {"side": SIDE, "steps": args.steps, "cpu_count": os.cpu_count(), "rows": rows}
    for row in rows:
        peaks = [row["ingest_peak_mib"], row["driver_peak_mib"], *row["worker_peak_mib"]]
        print(
            f"{row['images']:>7} images ({row['unlabelled_share']}): ingest {row['ingest_peak_mib']} MiB, "
            f"driver {row['driver_peak_mib']} MiB, workers {row['worker_peak_mib']} MiB "
            f"(largest {max(peaks)}; limit 2048), {row['images_per_s'] or 0:.0f} images/s"
        )
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    if args.plot:
        print(plot(rows, args.plot))


if __name__ == "__main__":
    main()
