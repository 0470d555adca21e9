"""Ingest speed: a full ingest of generated PNGs from a folder, then an incremental one.

Generates N 28x28 PNGs (10 classes, grayscale noise with a class-dependent pattern, so
every image is distinct) under train/<class>/ and ingests them into R fresh local stores
(R full runs); then adds 1% more images and ingests again into each store (R incremental
runs, each against its own parent). Prints the median images/s of the full runs and the
median incremental time as a fraction of the median full time.

    .venv/bin/python benchmarks/bench_ingest.py [--images 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.store import DatasetStore
from tofa_core.storage import open_storage


def write_pngs(root: Path, start: int, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        label = i % 10
        img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        img[label : label + 8, :] = 255  # class pattern
        folder = root / "train" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, "L").save(folder / f"{i:06d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        stores = [DatasetStore(open_storage(Path(tmp) / f"store{i}")) for i in range(args.repeats)]
        write_pngs(src, 0, args.images, seed=0)
        config = IngestConfig()
        full_runs, inc_runs = [], []
        for store in stores:
            start = time.perf_counter()
            full = ingest(str(src), "bench", store, config)
            full_runs.append((time.perf_counter() - start, full))
        extra = max(1, args.images // 100)
        write_pngs(src, args.images, extra, seed=1)
        for store in stores:
            start = time.perf_counter()
            inc = ingest(str(src), "bench", store, config)
            inc_runs.append((time.perf_counter() - start, inc))
    for (_, full), (_, inc) in zip(full_runs, inc_runs):
        assert full.manifest.num_images == args.images and inc.manifest.num_images == args.images + extra
        assert (
            inc.decoded == extra and inc.reused_shards >= 1 and inc.manifest.parent == full.manifest.version
        )
    t_full, full = sorted(full_runs, key=lambda r: r[0])[len(full_runs) // 2]
    t_inc, inc = sorted(inc_runs, key=lambda r: r[0])[len(inc_runs) // 2]
    result = {
        "images": args.images,
        "repeats": args.repeats,
        "full_s": round(t_full, 3),
        "full_runs_s": [round(t, 3) for t, _ in full_runs],
        "incremental_runs_s": [round(t, 3) for t, _ in inc_runs],
        "images_per_s": round(args.images / t_full),
        "incremental_images": extra,
        "incremental_s": round(t_inc, 3),
        "incremental_fraction": round(t_inc / t_full, 3),
        "full_stages_s": full.seconds,
        "incremental_stages_s": inc.seconds,
    }
    print(
        f"full ingest: {args.images} PNGs in {t_full:.2f} s = "
        f"{args.images / t_full:,.0f} images/s (aim >= 5,000)"
    )
    print(
        f"incremental: +{extra} PNGs in {t_inc:.2f} s = {t_inc / t_full:.1%} of the full run (must be <= 10%)"
    )
    print(json.dumps(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
