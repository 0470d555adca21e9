"""Ingest's memory is bounded by its chunks and one shard, not by the data set: decoded pixels
wait in a local spill file between decode and write, and shards are written one at a time.

benchmarks/bench_ingest_memory.py measures the process's peak RSS at 10k-100k images; here the
same property is checked with tracemalloc, which sees the pixel buffers Python and numpy hold.
"""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tofa_core.data.ingest import IngestConfig, decode_items, ingest, plan_ingest
from tofa_core.data.spill import Spill
from tofa_core.data.store import DatasetStore
from tofa_core.storage import open_storage

SIDE = 64
CONFIG = IngestConfig(min_per_class=1, workers=1, shard_rows=64)


def folder(root, count: int):
    rng = np.random.default_rng(count)
    for i in range(count):
        path = root / "train" / str(i % 4) / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(path, compress_level=0)
    return root


def peak_bytes(source, store) -> tuple[int, object]:
    tracemalloc.start()
    try:
        result = ingest(str(source), "mem", store, CONFIG)
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


@pytest.mark.timeout(300)
def test_peak_memory_does_not_grow_with_the_pixels(tmp_path):
    small, large = 200, 800
    peaks = {}
    for n in (small, large):
        store = DatasetStore(open_storage(tmp_path / f"store-{n}"))
        peak, result = peak_bytes(folder(tmp_path / f"src-{n}", n), store)
        assert result.manifest.num_images == n and len(result.manifest.shards) == n // 64 + (n % 64 > 0)
        peaks[n] = peak
    growth = peaks[large] - peaks[small]
    pixels = (large - small) * SIDE * SIDE * 3  # 7 MiB more pixels
    # Held per image: its listing entry, metadata and record (about a kilobyte), not its pixels.
    assert growth < 0.25 * pixels, (peaks, pixels)


def table(path, count: int):
    """A Parquet table of `count` PNGs inline (one row group: the whole column in one chunk)."""
    rng = np.random.default_rng(count)
    cells = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(
            buffer, "PNG", compress_level=0
        )
        cells.append(buffer.getvalue())
    labels = [str(i % 4) if i % 3 == 0 else None for i in range(count)]
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary()), "label": labels}), path)
    return path


@pytest.mark.timeout(300)
def test_a_parquet_table_is_read_a_batch_at_a_time_never_whole(tmp_path):
    small, large = 1200, 3600  # both over two batches of TABLE_BATCH rows (what a read holds)
    peaks = {}
    for n in (small, large):
        store = DatasetStore(open_storage(tmp_path / f"store-{n}"))
        peak, result = peak_bytes(table(tmp_path / f"t{n}.parquet", n), store)
        assert result.manifest.num_images == n and result.manifest.counts["train"] == {
            str(c): len(range(c * 3, n, 12)) for c in range(4)
        }
        peaks[n] = peak
    cells = (large - small) * SIDE * SIDE * 3  # 28 MiB more encoded images
    assert peaks[large] - peaks[small] < 0.25 * cells, (peaks, cells)


def test_decoded_pixels_wait_in_the_spill_and_come_back_intact(tmp_path):
    source = folder(tmp_path / "src", 12)
    store = DatasetStore(open_storage(tmp_path / "store"))
    plan = plan_ingest(str(source), "mem", store, CONFIG)
    with decode_items(plan, CONFIG) as staged:
        assert len(staged) == 12 and staged.spill.size == 12 * SIDE * SIDE * 3
        for item, d in zip(plan.new_items, staged):
            assert d.pixels == b"" and d.offset >= 0
            expected = np.asarray(Image.open(source / item.path)).tobytes()
            assert staged.pixels(d) == expected
    result = ingest(str(source), "mem", store, CONFIG)
    rows = store.read_shards(result.manifest).to_pylist()
    by_path = {r["path"]: r["pixels"] for r in rows}
    assert all(by_path[i.path] == np.asarray(Image.open(source / i.path)).tobytes() for i in plan.new_items)


def test_the_spill_reads_back_what_it_was_given_and_refuses_a_short_read():
    with Spill() as spill:
        a, b = spill.append(b"abc"), spill.append(b"defgh")
        assert (a, b, spill.size) == (0, 3, 8)
        assert spill.read(b, 5) == b"defgh" and spill.read(a, 3) == b"abc"
        with pytest.raises(OSError, match="truncated"):
            spill.read(b, 6)
