"""Ingest's peak memory against the data set's size: it must not grow with the image count
beyond the per-image metadata (the manifest's size), whatever the pixels weigh.

Generates the largest folder of 64x64 RGB PNGs once (10 classes under train/<class>/, random
pixels so every image is distinct), then for each size ingests a folder of hard links to the
first N images into a fresh store, each in its own process with the default settings
(decode workers = CPU count). Measured per size: the ingest process's peak RSS (its own
getrusage) and the peak of the whole process tree (ingest process + decode workers, sampled
every 50 ms from /proc; shared pages count once per process, so this overstates).

    .venv/bin/python benchmarks/bench_ingest_memory.py [--sizes 10000 30000 100000]
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
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import mib, run_sampled  # noqa: E402

SIDE = 64
CHILD = """
import json, resource, sys, time
from tofa_core.data.ingest import ingest
from tofa_core.data.store import DatasetStore
from tofa_core.storage import open_storage
start = time.perf_counter()
result = ingest(sys.argv[1], "mem", DatasetStore(open_storage(sys.argv[2])))
print(json.dumps({
    "seconds": round(time.perf_counter() - start, 1),
    "images": result.manifest.num_images,
    "shards": len(result.manifest.shards),
    "main_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
}))
"""


def write_pngs(root: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        folder = root / "train" / str(i % 10)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8), "RGB").save(
            path, compress_level=1
        )
        files.append(path)
    return files


def link_subset(files: list[Path], src_root: Path, dest: Path) -> None:
    for path in files:
        target = dest / path.relative_to(src_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)


def measure(source: Path, store: Path) -> dict:
    """Run one ingest in its own process; its result plus the tree's sampled peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = run_sampled([sys.executable, "-c", CHILD, str(source), str(store)], env, every=0.05)
    return {**json.loads(run.output.strip().splitlines()[-1]), "tree_peak_mib": mib(run.tree_peak)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 100000])
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "all"
        start = time.perf_counter()
        files = write_pngs(root, sizes[-1])
        print(
            f"generated {sizes[-1]} PNGs of {SIDE}x{SIDE} RGB in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        for n in sizes:
            source = Path(tmp) / f"src-{n}"
            link_subset(files[:n], root, source)
            row = {"images": n, "pixel_mib": round(n * SIDE * SIDE * 3 / 2**20, 1)}
            row.update(measure(source, Path(tmp) / f"store-{n}"))
            assert row["images"] == n, row
            rows.append(row)
            print(json.dumps(row), flush=True)
    first, last = rows[0], rows[-1]
    extra = last["images"] - first["images"]
    per_image = (last["main_peak_mib"] - first["main_peak_mib"]) * 2**20 / extra if extra else 0.0
    result = {
        "side": SIDE,
        "channels": 3,
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "main_growth_bytes_per_image": round(per_image),
        "pixel_bytes_per_image": SIDE * SIDE * 3,
    }
    print(
        f"ingest process peak: {first['main_peak_mib']} MiB at {first['images']} images, "
        f"{last['main_peak_mib']} MiB at {last['images']}: {per_image:.0f} bytes per extra image "
        f"(its pixels are {SIDE * SIDE * 3})"
    )
    print(json.dumps(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
