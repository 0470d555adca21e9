"""Ingestion into the versioned store on local disk: sources, quarantine, per-source errors,
versioning, crash safety and the `ingest:` config section.

Every test makes its own tiny images in tmp_path (8x8 or 16x16), so the file runs in seconds.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tofa_core.data.ingest import IngestConfig, decode_items, ingest, plan_ingest, validate
from tofa_core.data.loaders import load_splits
from tofa_core.data.sources import SourceError
from tofa_core.data.store import DatasetStore, Manifest, images_array
from tofa_core.storage import LocalStorage, StorageError, open_storage

REPO = Path(__file__).resolve().parents[1]
FAST = IngestConfig(min_per_class=1, workers=1)


# ----------------------------------------------------------------------------- helpers


def noise(rng: np.random.Generator, size: int = 8, colour: bool = False) -> np.ndarray:
    shape = (size, size, 3) if colour else (size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def save(path: Path, pixels: np.ndarray) -> Path:
    """Write `pixels` as an image file; the format follows the suffix (.png, .jpg, .bmp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def make_folder(root: Path, per_class: dict[str, int], seed: int = 0, size: int = 8) -> Path:
    """train/<class>/<i>.png with distinct random grayscale pixels."""
    rng = np.random.default_rng(seed)
    for cls, n in per_class.items():
        for i in range(n):
            save(root / "train" / cls / f"{i:03d}.png", noise(rng, size))
    return root


def files(store_root: Path, dataset: str | None = None) -> dict[str, tuple[int, str]]:
    """Every object under the store (or one data set): key -> (size, mtime tag)."""
    storage = LocalStorage(store_root)
    prefix = f"datasets/{dataset}" if dataset else ""
    return {o.key: (o.size, o.tag) for o in storage.list(prefix)}


def manifest_bytes(store_root: Path, dataset: str, version: str) -> bytes:
    return (store_root / "datasets" / dataset / version / "manifest.json").read_bytes()


def rows_by_path(table: pa.Table) -> dict[str, dict]:
    return {r["path"]: r for r in table.to_pylist()}


def quarantine_by_path(store: DatasetStore, manifest: Manifest) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in store.read_quarantine(manifest).to_pylist()}


@pytest.fixture
def store_root(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_root) -> DatasetStore:
    return DatasetStore(open_storage(store_root))


# ----------------------------------------------------------------------------- sources


def test_folder_source_layout_formats_and_exact_pixels(tmp_path, store, store_root):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    written = {
        "train/cat/a.png": noise(rng, colour=True),
        "train/cat/b.jpg": noise(rng, colour=True),
        "train/cat/c.bmp": noise(rng),
        "train/dog/a.png": noise(rng),
        "train/dog/b.bmp": noise(rng, colour=True),
        "train/dog/sub/c.jpg": noise(rng),  # nested below the class folder: still a dog
        "test/cat/t.png": noise(rng),
        "test/dog/t.png": noise(rng, colour=True),
        "unlabeled/u1.png": noise(rng),
        "unlabeled/x/u2.jpg": noise(rng, colour=True),
        "unlabeled/x/y/u3.bmp": noise(rng, colour=True),  # 6 colour, 5 grey: a colour version
    }
    for rel, pixels in written.items():
        save(src / rel, pixels)
    (src / "README.txt").write_text("not part of any split")

    result = ingest(str(src), "pets", store, FAST)
    m = result.manifest
    assert (
        result.created and result.decoded == 11 and result.written_shards == 1 and result.reused_shards == 0
    )
    assert m.classes == ["cat", "dog"]
    assert m.counts == {"test": {"cat": 1, "dog": 1}, "train": {"cat": 3, "dog": 3}, "unlabeled": {"-": 3}}
    assert m.num_images == 11 and m.channels == 3 and m.parent is None
    assert [s.rows for s in m.shards] == [11]
    assert m.quarantine.count == 0 and store.read_quarantine(m).num_rows == 0
    assert store.latest("pets") == m and [v.version for v in store.versions("pets")] == [m.version]

    table = store.read_shards(m)
    rows = rows_by_path(table)
    assert set(rows) == set(written)
    assert rows["train/dog/sub/c.jpg"]["label"] == 1 and rows["train/dog/sub/c.jpg"]["split"] == "train"
    assert rows["test/cat/t.png"]["label"] == 0 and rows["test/cat/t.png"]["split"] == "test"
    assert rows["unlabeled/x/y/u3.bmp"]["label"] is None
    assert rows["train/cat/a.png"]["channels"] == 3 and rows["train/cat/c.bmp"]["channels"] == 1

    images = images_array(table)
    assert images.shape == (11, 3, 8, 8) and images.dtype == np.uint8
    index = {p: i for i, p in enumerate(table.column("path").to_pylist())}
    for rel in ("train/cat/a.png", "train/dog/b.bmp", "test/dog/t.png"):  # lossless colour
        np.testing.assert_array_equal(images[index[rel]], written[rel].transpose(2, 0, 1))
    for rel in ("train/dog/a.png", "train/cat/c.bmp", "unlabeled/u1.png"):  # grayscale -> 3 channels
        np.testing.assert_array_equal(images[index[rel]], np.repeat(written[rel][None], 3, axis=0))
    # A lossy JPEG decodes close to, not exactly, what was written.
    jpeg = images[index["train/cat/b.jpg"]].astype(int)
    assert jpeg.shape == (3, 8, 8) and not np.array_equal(jpeg, written["train/cat/b.jpg"].transpose(2, 0, 1))


def test_parquet_table_inline_bytes_label_names_and_split(tmp_path, store):
    rng = np.random.default_rng(2)
    pixels = [noise(rng) for _ in range(7)]
    table = pa.table(
        {
            "image": pa.array([encode(p) for p in pixels], pa.binary()),
            "label": ["zebra", "ant", "zebra", "ant", "ant", None, None],
            "split": ["train", "train", "train", None, "test", "unlabeled", None],
        }
    )
    pq.write_table(table, tmp_path / "data.parquet")

    m = ingest(str(tmp_path / "data.parquet"), "tab", store, FAST).manifest
    assert m.classes == ["ant", "zebra"]
    assert m.counts == {"test": {"ant": 1}, "train": {"ant": 2, "zebra": 2}, "unlabeled": {"-": 2}}
    assert m.num_images == 7 and m.channels == 1 and m.source == str(tmp_path / "data.parquet")
    shards = store.read_shards(m)
    rows = rows_by_path(shards)
    assert set(rows) == {f"row {i}" for i in range(7)}
    assert rows["row 3"]["split"] == "train" and rows["row 3"]["label"] == 0  # no split + label: train
    assert rows["row 6"]["split"] == "unlabeled" and rows["row 6"]["label"] is None
    images = images_array(shards)
    order = shards.column("path").to_pylist()
    np.testing.assert_array_equal(images[order.index("row 4"), 0], pixels[4])


def test_csv_table_relative_paths_and_integer_labels(tmp_path, store):
    rng = np.random.default_rng(3)
    tab = tmp_path / "tab"
    labels = [0, 0, 1, 1, 2, 2, 10, 10]
    for i in range(len(labels)):
        save(tab / "imgs" / f"{i}.png", noise(rng))
    lines = ["image,label"] + [f"imgs/{i}.png,{lb}" for i, lb in enumerate(labels)]
    save(tab / "imgs" / "u.png", noise(rng))
    lines += ["imgs/u.png,", "imgs/missing.png,1"]
    (tab / "data.csv").write_text("\n".join(lines) + "\n")

    result = ingest(str(tab / "data.csv"), "csv", store, FAST)
    m = result.manifest
    assert m.classes == ["0", "1", "2", "10"]  # integer labels sort numerically, not as text
    assert m.counts == {"train": {"0": 2, "1": 2, "10": 2, "2": 2}, "unlabeled": {"-": 1}}
    rows = rows_by_path(store.read_shards(m))
    assert rows["row 6 (imgs/6.png)"]["label"] == 3  # "10" is the 4th class
    q = quarantine_by_path(store, m)
    assert q == {"row 9 (imgs/missing.png)": "missing file: imgs/missing.png does not exist"}


def test_csv_empty_image_cell_is_quarantined(tmp_path, store):
    tab = make_folder(tmp_path / "tab", {"a": 2, "b": 2})
    (tab / "data.csv").write_text(
        "image,label\ntrain/a/000.png,a\ntrain/a/001.png,a\n,b\ntrain/b/000.png,b\ntrain/b/001.png,b\n"
    )
    m = ingest(str(tab / "data.csv"), "csv", store, FAST.model_copy(update={"max_quarantine_fraction": 0.5}))
    reasons = quarantine_by_path(store, m.manifest).values()
    assert m.manifest.num_images == 4 and any("empty 'image'" in r for r in reasons)


def test_parquet_large_string_split_column(tmp_path, store):
    rng = np.random.default_rng(4)
    table = pa.table(
        {
            "image": pa.array([encode(noise(rng)) for _ in range(4)], pa.large_binary()),
            "label": pa.array(["a", "a", "b", "b"], pa.large_string()),
            "split": pa.array(["train"] * 4, pa.large_string()),
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    m = ingest(str(tmp_path / "t.parquet"), "ls", store, FAST).manifest
    assert m.counts == {"train": {"a": 2, "b": 2}}


def test_digits_default_split_sizes(store):
    m = ingest("digits", "digits", store, IngestConfig()).manifest
    sizes = {split: sum(c.values()) for split, c in m.counts.items()}
    assert sizes == {"test": 360, "train": 143, "unlabeled": 1294}
    assert m.classes == [str(i) for i in range(10)] and m.num_images == 1797 and m.channels == 1
    assert m.quarantine.count == 0 and m.source == "digits"
    assert all(n >= 14 for n in m.counts["train"].values())  # stratified: every class has its share
    images = images_array(store.read_shards(m))
    assert images.shape == (1797, 1, 8, 8) and images.max() == 255


def test_digits_labelled_fraction_changes_split(store):
    m = ingest("digits", "digits", store, IngestConfig(labelled_fraction=0.2)).manifest
    sizes = {split: sum(c.values()) for split, c in m.counts.items()}
    assert sizes == {"test": 360, "train": 287, "unlabeled": 1150}


def test_digits_all_labelled(store):
    """labelled_fraction 1.0: every non-test image labelled, none unlabelled."""
    m = ingest("digits", "digits", store, IngestConfig(labelled_fraction=1.0)).manifest
    sizes = {split: sum(c.values()) for split, c in m.counts.items()}
    assert sizes["test"] == 360 and sizes["train"] == 1437 and sizes.get("unlabeled", 0) == 0


def test_many_new_images_decode_in_worker_processes(tmp_path, store, caplog):
    src = make_folder(tmp_path / "src", {"a": 300, "b": 300})
    result = ingest(str(src), "big", store, IngestConfig(workers=2, shard_rows=256))
    assert "decode workers could not start" not in caplog.text  # the pool ran, no in-process fallback
    m = result.manifest
    assert result.decoded == 600 and m.counts == {"train": {"a": 300, "b": 300}}
    assert [s.rows for s in m.shards] == [256, 256, 88]
    single = DatasetStore(open_storage(tmp_path / "other"))
    assert (
        ingest(str(src), "big", single, IngestConfig(workers=1, shard_rows=256)).manifest.version == m.version
    )


# ----------------------------------------------------------------------------- per-record quarantine

QUARANTINE_CASES = {
    "train/a/trunc.png": "corrupt image",
    "train/a/random.png": "not an image: none of PNG, JPEG",
    "train/b/notes.txt": "not an image: none of PNG, JPEG",
    "train/b/bomb.png": "decompression bomb: 40x40 exceeds max_pixels=1000",
    "train/a/deep.png": "unsupported image mode 'I;16'",
    "test/zebra/z.png": "unknown label: 'zebra' is not among the classes ['a', 'b']",
    "train/a/g0_copy.png": "duplicate: same image as train/a/g0.png",
    "train/a/g1.png": "duplicate with conflicting labels: train/a/g1.png=a, train/b/conf.png=b",
    "train/b/conf.png": "duplicate with conflicting labels: train/a/g1.png=a, train/b/conf.png=b",
    "train/loose.png": "train/ images must sit in a class folder",
}


@pytest.fixture(scope="module")
def quarantined(tmp_path_factory):
    """One ingest of a folder holding every kind of bad record beside 8 good images."""
    root = tmp_path_factory.mktemp("quarantine")
    rng = np.random.default_rng(5)
    src = root / "src"
    good = {f"train/{c}/g{i}.png": noise(rng, 16) for c in "ab" for i in range(4)}
    for rel, pixels in good.items():
        save(src / rel, pixels)
    whole = encode(noise(rng, 16))
    (src / "train/a/trunc.png").write_bytes(whole[: len(whole) // 2])
    (src / "train/a/random.png").write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    (src / "train/b/notes.txt").write_text("labels are in the folder names\n")
    save(src / "train/b/bomb.png", noise(rng, 40))
    save(src / "train/a/deep.png", (np.arange(256, dtype=np.uint16).reshape(16, 16) * 200))
    save(src / "test/zebra/z.png", noise(rng, 16))
    save(src / "train/a/g0_copy.png", good["train/a/g0.png"])  # same pixels, same label
    save(src / "train/b/conf.png", good["train/a/g1.png"])  # same pixels, other label
    save(src / "train/loose.png", noise(rng, 16))
    store = DatasetStore(open_storage(root / "store"))
    config = IngestConfig(min_per_class=2, workers=1, max_pixels=1000, max_quarantine_fraction=1.0)
    return store, ingest(str(src), "q", store, config)


@pytest.mark.parametrize("path", sorted(QUARANTINE_CASES))
def test_bad_record_is_quarantined_with_reason(quarantined, path):
    store, result = quarantined
    q = quarantine_by_path(store, result.manifest)
    assert path in q, f"{path} not in quarantine {sorted(q)}"
    assert QUARANTINE_CASES[path] in q[path]
    assert path not in rows_by_path(store.read_shards(result.manifest))


def test_quarantine_run_goes_on_and_is_summarised(quarantined):
    store, result = quarantined
    m = result.manifest
    assert result.created
    assert m.counts == {"train": {"a": 3, "b": 4}}  # g1 and its conflicting copy are both out
    assert m.num_images == 7 and m.quarantine.count == 10 == len(result.quarantine)
    assert m.quarantine.path == f"{m.version}/quarantine.parquet"
    assert m.quarantine.reasons["not an image"] == 2
    assert m.quarantine.reasons["duplicate with conflicting labels"] == 2
    assert set(quarantine_by_path(store, m)) == set(QUARANTINE_CASES)
    assert set(rows_by_path(store.read_shards(m))) == {
        "train/a/g0.png", "train/a/g2.png", "train/a/g3.png",
        "train/b/g0.png", "train/b/g1.png", "train/b/g2.png", "train/b/g3.png",
    }  # fmt: skip
    summary = result.summary()
    assert "quarantined 10:" in summary and "decompression bomb 1" in summary


def test_label_outside_configured_classes_is_quarantined(tmp_path, store):
    src = make_folder(tmp_path / "src", {"a": 3, "b": 2})
    config = IngestConfig(classes=["a"], min_per_class=1, workers=1, max_quarantine_fraction=0.5)
    m = ingest(str(src), "cls", store, config).manifest
    assert m.classes == ["a"] and m.counts == {"train": {"a": 3}}
    q = quarantine_by_path(store, m)
    assert q == {
        "train/b/000.png": "unknown label: 'b' is not among the classes ['a']",
        "train/b/001.png": "unknown label: 'b' is not among the classes ['a']",
    }


def test_table_rows_with_unknown_split_or_empty_image_are_quarantined(tmp_path, store):
    rng = np.random.default_rng(6)
    images = [encode(noise(rng)) for _ in range(6)] + [None, encode(noise(rng))]
    table = pa.table(
        {
            "image": pa.array(images, pa.binary()),
            "label": ["a", "a", "b", "b", "a", "b", "a", "a"],
            "split": ["train", "train", "train", "train", "test", "test", "train", "validation"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    result = ingest(str(tmp_path / "t.parquet"), "t", store, FAST)
    m = result.manifest
    assert m.counts == {"test": {"a": 1, "b": 1}, "train": {"a": 2, "b": 2}}
    assert quarantine_by_path(store, m) == {
        "row 6": "empty 'image' cell",
        "row 7": "split 'validation' is not one of ['train', 'test', 'unlabeled']",
    }
    assert "quarantined 2:" in result.summary()


# ----------------------------------------------------------------------------- per-source errors


def _missing_train(tmp: Path) -> tuple[str, IngestConfig]:
    save(tmp / "only" / "unlabeled" / "u.png", noise(np.random.default_rng(7)))
    return str(tmp / "only"), FAST


def _missing_label_column(tmp: Path) -> tuple[str, IngestConfig]:
    pq.write_table(pa.table({"image": [b"x"], "split": ["train"]}), tmp / "t.parquet")
    return str(tmp / "t.parquet"), FAST


def _image_column_int(tmp: Path) -> tuple[str, IngestConfig]:
    pq.write_table(pa.table({"image": [1, 2], "label": ["a", "b"]}), tmp / "t.parquet")
    return str(tmp / "t.parquet"), FAST


def _no_labels(tmp: Path) -> tuple[str, IngestConfig]:
    rng = np.random.default_rng(8)
    table = pa.table({"image": [encode(noise(rng)) for _ in range(3)], "label": pa.nulls(3, pa.string())})
    pq.write_table(table, tmp / "t.parquet")
    return str(tmp / "t.parquet"), FAST


def _thin_class(tmp: Path) -> tuple[str, IngestConfig]:
    return str(make_folder(tmp / "thin", {"a": 3, "b": 1}, seed=9)), IngestConfig(min_per_class=2, workers=1)


def _too_much_quarantine(tmp: Path) -> tuple[str, IngestConfig]:
    src = make_folder(tmp / "bad", {"a": 2, "b": 2}, seed=10)
    for i in range(3):
        (src / "train" / "a" / f"junk{i}.png").write_bytes(b"not a png at all")
    return str(src), IngestConfig(min_per_class=1, workers=1, max_quarantine_fraction=0.25)


SOURCE_ERRORS = {
    "no-train-folder": (_missing_train, ["no train/ folder with images", "train/<class>/*"]),
    "missing-label-column": (
        _missing_label_column,
        ["missing column(s) ['label']", "it has ['image', 'split']"],
    ),
    "image-column-int": (_image_column_int, ["column 'image' has type int64", "bytes or path strings"]),
    "no-labelled-images": (_no_labels, ["no labelled training images", "give them a label"]),
    "thin-class": (_thin_class, ["fewer than min_per_class=2", "{'b': 1}", "lower ingest.min_per_class"]),
    "too-much-quarantine": (
        _too_much_quarantine,
        [
            "3 of 7 records failed validation",
            "max_quarantine_fraction=0.25",
            "raise ingest.max_quarantine_fraction",
        ],
    ),
}


@pytest.fixture
def committed(tmp_path, store, store_root):
    """A data set 'ds' with one good version; returns its manifest and a snapshot of its files."""
    src = make_folder(tmp_path / "good", {"a": 3, "b": 3}, seed=11)
    m = ingest(str(src), "ds", store, FAST).manifest
    return m, files(store_root), manifest_bytes(store_root, "ds", m.version)


def assert_untouched(store, store_root, committed):
    m, before, raw = committed
    assert files(store_root) == before  # nothing new, nothing rewritten, anywhere in the store
    assert manifest_bytes(store_root, "ds", m.version) == raw
    assert store.latest("ds") == m and [v.version for v in store.versions("ds")] == [m.version]
    assert store.read_shards(m).num_rows == 6


@pytest.mark.parametrize("case", sorted(SOURCE_ERRORS))
def test_source_error_names_source_and_fix_and_changes_nothing(tmp_path, store, store_root, committed, case):
    make, phrases = SOURCE_ERRORS[case]
    source, config = make(tmp_path)
    with pytest.raises(SourceError) as err:
        ingest(source, "ds", store, config)
    message = str(err.value)
    assert source in message
    for phrase in phrases:
        assert phrase in message, message
    assert_untouched(store, store_root, committed)


def test_bad_dataset_name(tmp_path, store, store_root, committed):
    src = make_folder(tmp_path / "src", {"a": 2, "b": 2})
    with pytest.raises(SourceError, match=r"data set name 'Bad Name' must match .*lower case"):
        ingest(str(src), "Bad Name", store, FAST)
    assert_untouched(store, store_root, committed)


# ----------------------------------------------------------------------------- versioning


def test_reingest_same_folder_is_a_noop(tmp_path, store, store_root):
    src = make_folder(tmp_path / "src", {"a": 4, "b": 4})
    first = ingest(str(src), "ds", store, FAST)
    before = files(store_root)
    again = ingest(str(src), "ds", store, FAST)
    assert first.created and not again.created
    assert again.manifest == first.manifest
    assert again.decoded == 0 and again.written_shards == 0 and again.reused_shards == 0
    assert files(store_root) == before
    assert "unchanged: this content is stored already, nothing written" in again.summary()


def test_new_files_make_a_child_version_reusing_parent_shards(tmp_path, store, store_root):
    src = make_folder(tmp_path / "src", {"a": 13, "b": 12})
    config = IngestConfig(min_per_class=1, workers=1, shard_rows=10)
    parent = ingest(str(src), "ds", store, config).manifest
    assert [s.rows for s in parent.shards] == [10, 10, 5]
    raw = manifest_bytes(store_root, "ds", parent.version)
    rng = np.random.default_rng(12)
    for i in range(4):
        save(src / "train" / ("a" if i % 2 else "c") / f"new{i}.png", noise(rng))

    result = ingest(str(src), "ds", store, config)
    child = result.manifest
    assert result.created and result.decoded == 4
    assert result.reused_shards == 3 and result.written_shards == 1
    assert child.parent == parent.version and child.version != parent.version
    assert child.shards[:3] == parent.shards  # the parent's shard files, by the same path
    assert all(s.path.startswith(f"{parent.version}/") for s in child.shards[:3])
    assert child.shards[3].path.startswith(f"{child.version}/") and child.shards[3].rows == 4
    assert child.classes == ["a", "b", "c"]
    assert child.counts == {"train": {"a": 15, "b": 12, "c": 2}} and child.num_images == 29
    assert store.latest("ds") == child
    # the parent is still readable and unchanged
    assert manifest_bytes(store_root, "ds", parent.version) == raw
    assert store.read_shards(parent).num_rows == 25
    rows = rows_by_path(store.read_shards(child))
    assert len(rows) == 29 and rows["train/c/new0.png"]["label"] == 2


def test_deleting_a_file_makes_a_version_without_it(tmp_path, store, store_root):
    src = make_folder(tmp_path / "src", {"a": 3, "b": 3})
    parent = ingest(str(src), "ds", store, FAST).manifest
    raw = manifest_bytes(store_root, "ds", parent.version)
    (src / "train" / "a" / "001.png").unlink()
    result = ingest(str(src), "ds", store, FAST)
    child = result.manifest
    assert result.created and result.decoded == 0 and child.parent == parent.version
    assert child.counts == {"train": {"a": 2, "b": 3}}
    assert "train/a/001.png" not in rows_by_path(store.read_shards(child))
    assert "train/a/001.png" in rows_by_path(store.read_shards(parent))
    assert manifest_bytes(store_root, "ds", parent.version) == raw


def test_moving_a_file_to_another_class_relabels_it(tmp_path, store):
    src = make_folder(tmp_path / "src", {"a": 3, "b": 3})
    parent = ingest(str(src), "ds", store, FAST).manifest
    old = rows_by_path(store.read_shards(parent))["train/a/002.png"]
    shutil.move(src / "train" / "a" / "002.png", src / "train" / "b" / "moved.png")
    result = ingest(str(src), "ds", store, FAST)
    child = result.manifest
    assert result.created and result.decoded == 1 and result.quarantine == []
    assert child.counts == {"train": {"a": 2, "b": 4}}
    rows = rows_by_path(store.read_shards(child))
    assert "train/a/002.png" not in rows
    assert (
        rows["train/b/moved.png"]["label"] == 1
        and rows["train/b/moved.png"]["content_hash"] == old["content_hash"]
    )


def test_version_id_is_deterministic(tmp_path):
    src = make_folder(tmp_path / "src", {"a": 3, "b": 3})
    one = ingest(str(src), "ds", DatasetStore(open_storage(tmp_path / "s1")), FAST).manifest
    two = ingest(str(src), "ds", DatasetStore(open_storage(tmp_path / "s2")), FAST).manifest
    assert one.version == two.version and one.version.startswith("v-")
    assert [s.path for s in one.shards] == [s.path for s in two.shards]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)  # new mtimes and another location: same content, same id
    three = ingest(str(copy), "ds", DatasetStore(open_storage(tmp_path / "s3")), FAST).manifest
    assert three.version == one.version


def test_reverting_the_source_makes_its_version_latest(tmp_path, store):
    src = make_folder(tmp_path / "src", {"a": 3, "b": 3})
    first = ingest(str(src), "ds", store, FAST).manifest
    data = (src / "train/a/000.png").read_bytes()
    (src / "train/a/000.png").unlink()
    second = ingest(str(src), "ds", store, FAST).manifest
    (src / "train/a/000.png").write_bytes(data)
    third = ingest(str(src), "ds", store, FAST)
    assert not third.created and third.manifest.version == first.version != second.version
    assert store.latest("ds").version == third.manifest.version


# ----------------------------------------------------------------------------- crash safety


class FailingStorage(LocalStorage):
    """Local storage whose writes start failing after `state['writes_left']` of them."""

    def __init__(self, root, state: dict):
        super().__init__(root)
        self.state = state

    def child(self, prefix: str) -> FailingStorage:
        return FailingStorage(self.path / prefix, self.state)

    def write_bytes(self, key: str, data: bytes) -> None:
        if self.state["writes_left"] <= 0:
            raise StorageError(f"cannot write {self.uri(key)}: injected failure")
        self.state["writes_left"] -= 1
        super().write_bytes(key, data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self.state["commits"] += 1
        return super().put_if_absent(key, data)


def expected_version(source: str, store: DatasetStore, config: IngestConfig) -> str:
    """The version id an ingest would commit, computed by the read-only stages."""
    plan = plan_ingest(source, "ds", store, config)
    return validate(plan, decode_items(plan, config), config, store).version


def test_write_failure_leaves_previous_version_and_retry_completes(tmp_path, store, store_root):
    config = IngestConfig(min_per_class=1, workers=1, shard_rows=5)
    src = make_folder(tmp_path / "src", {"a": 5, "b": 5})
    parent = ingest(str(src), "ds", store, config).manifest
    raw = manifest_bytes(store_root, "ds", parent.version)
    parent_files = {
        k: v for k, v in files(store_root).items() if k.startswith(f"datasets/ds/{parent.version}/")
    }
    make_folder(src, {"c": 20}, seed=13)
    new_version = expected_version(str(src), store, config)

    state = {"writes_left": 2, "commits": 0}
    flaky = DatasetStore(FailingStorage(store_root, state))
    with pytest.raises(StorageError, match="injected failure"):
        ingest(str(src), "ds", flaky, config)
    assert state == {"writes_left": 0, "commits": 0}
    written = [k for k in files(store_root) if k.startswith(f"datasets/ds/{new_version}/")]
    assert len(written) == 2 and all("/shard-" in k for k in written)  # shards only, no manifest
    assert not (store_root / "datasets/ds" / new_version / "manifest.json").exists()
    assert store.latest("ds") == parent and [v.version for v in store.versions("ds")] == [parent.version]
    assert manifest_bytes(store_root, "ds", parent.version) == raw
    assert {k: v for k, v in files(store_root).items() if k.startswith(f"datasets/ds/{parent.version}/")} == (
        parent_files
    )
    assert store.read_shards(parent).num_rows == 10

    retry = ingest(str(src), "ds", store, config)
    assert retry.created and retry.manifest.version == new_version and retry.manifest.parent == parent.version
    assert retry.manifest.counts == {"train": {"a": 5, "b": 5, "c": 20}}
    assert store.latest("ds") == retry.manifest and store.read_shards(retry.manifest).num_rows == 30


KILL_SCRIPT = """
import sys, time
from tofa_core.storage import LocalStorage

_write = LocalStorage.write_bytes

def slow_write(self, key, data):
    _write(self, key, data)
    time.sleep(0.05)

LocalStorage.write_bytes = slow_write

from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.store import DatasetStore
from tofa_core.storage import open_storage

if __name__ == "__main__":
    config = IngestConfig(min_per_class=1, workers=1, shard_rows=5)
    ingest(sys.argv[1], "ds", DatasetStore(open_storage(sys.argv[2])), config)
    print("finished")
"""


def test_kill_during_shard_writes_leaves_previous_version_and_retry_completes(tmp_path, store, store_root):
    config = IngestConfig(min_per_class=1, workers=1, shard_rows=5)
    src = make_folder(tmp_path / "src", {"a": 5, "b": 5})
    parent = ingest(str(src), "ds", store, config).manifest
    raw = manifest_bytes(store_root, "ds", parent.version)
    make_folder(src, {"c": 150, "d": 150}, seed=14)  # 60 new shards of 5 rows, 0.05 s each
    new_version = expected_version(str(src), store, config)
    new_dir = store_root / "datasets" / "ds" / new_version

    script = tmp_path / "slow_ingest.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(src), str(store_root)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        shards: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            shards = list(new_dir.glob("shard-*.parquet")) if new_dir.exists() else []
            if len(shards) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"ingest ended before the kill: {proc.communicate()}"
        assert len(shards) >= 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = list(new_dir.glob("shard-*.parquet"))
    assert 2 <= len(left) < 60 and not (new_dir / "manifest.json").exists()
    assert store.latest("ds") == parent and [v.version for v in store.versions("ds")] == [parent.version]
    assert (
        manifest_bytes(store_root, "ds", parent.version) == raw and store.read_shards(parent).num_rows == 10
    )

    retry = ingest(str(src), "ds", store, config)
    m = retry.manifest
    assert retry.created and m.version == new_version and m.parent == parent.version
    assert retry.reused_shards == 2 and retry.written_shards == 60
    assert m.counts == {"train": {"a": 5, "b": 5, "c": 150, "d": 150}} and m.num_images == 310
    assert store.latest("ds") == m and store.read_shards(m).num_rows == 310


# ----------------------------------------------------------------------------- config


def test_ingest_config_from_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "train:\n  epochs: 3\ningest:\n  labelled_fraction: 0.3\n  classes: [cat, dog]\n  shard_rows: 64\n"
    )
    config = IngestConfig.from_yaml(path)
    assert config.labelled_fraction == 0.3 and config.classes == ["cat", "dog"] and config.shard_rows == 64
    assert config.min_per_class == 2 and config.max_quarantine_fraction == 0.25  # defaults kept
    path.write_text("train:\n  epochs: 3\n")
    assert IngestConfig.from_yaml(path) == IngestConfig()


@pytest.mark.parametrize(
    "body, phrases",
    [
        (
            "ingest:\n  labelled_fraction: 1.5\n",
            ["ingest.labelled_fraction", "less than or equal to 1", "1.5"],
        ),
        ("ingest:\n  min_per_class: 0\n", ["ingest.min_per_class", "greater than or equal to 1"]),
        ("ingest:\n  shard_rowz: 10\n", ["ingest.shard_rowz", "Extra inputs are not permitted"]),
        ("ingest: [1, 2]\n", ["'ingest' must be a mapping"]),
        ("ingest:\n  seed: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_ingest_config_bad_values_name_file_and_field(tmp_path, body, phrases):
    path = tmp_path / "config.yaml"
    path.write_text(body)
    with pytest.raises(ValueError) as err:
        IngestConfig.from_yaml(path)
    message = str(err.value)
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message, message


def test_channels_follow_the_majority_not_one_stray_image(tmp_path, store):
    src = make_folder(tmp_path / "src", {"a": 2, "b": 2})
    rng = np.random.default_rng(15)
    save(src / "train" / "a" / "rgb.png", noise(rng, colour=True))
    stray = ingest(str(src), "ds", store, FAST).manifest
    assert stray.channels == 1  # one colour image among grey ones is converted, not the version
    assert load_splits(store, "ds", val_fraction=0.0).train.images.shape[1] == 1
    for i in range(4):
        save(src / "train" / "b" / f"rgb{i}.png", noise(rng, colour=True))
    assert ingest(str(src), "ds", store, FAST).manifest.channels == 3  # now most are colour
    for i in range(4):
        (src / "train" / "b" / f"rgb{i}.png").unlink()
    child = ingest(str(src), "ds", store, FAST).manifest
    assert child.version == stray.version and child.channels == 1  # the content decides, not history
    forced = ingest(str(src), "ds", store, FAST.model_copy(update={"channels": 3})).manifest
    assert forced.channels == 3 and forced.version != stray.version


def test_incremental_version_equals_a_fresh_ingest_of_the_same_content(tmp_path):
    src = make_folder(tmp_path / "src", {"a": 4, "b": 4})
    step = DatasetStore(open_storage(tmp_path / "step"))
    ingest(str(src), "d", step, FAST)
    save(src / "train" / "b" / "extra.png", noise(np.random.default_rng(99)))
    child = ingest(str(src), "d", step, FAST)
    assert child.manifest.parent is not None and child.decoded == 1
    fresh = ingest(str(src), "d", DatasetStore(open_storage(tmp_path / "fresh")), FAST)
    assert fresh.manifest.version == child.manifest.version
    assert fresh.manifest.digest == child.manifest.digest and fresh.manifest.counts == child.manifest.counts
