"""Ingest against hostile sources: it reads only regular files inside the source, within a byte
limit and in the accepted formats, never hangs, and quarantines what it refuses with a reason.

Each case failed (hung, crashed, read outside the source or stored a bad label) before the
source reader was confined; each ingest here has a timeout so a hang fails by name.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tofa_core import names
from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.sources import clean_label
from tofa_core.data.store import DatasetStore
from tofa_core.storage import LocalStorage, NotRegular, TooLarge, open_storage
from tofa_core.storage import StorageError as StorageErrorType

CONFIG = IngestConfig(min_per_class=1, workers=1, max_quarantine_fraction=1.0)
HANG = pytest.mark.timeout(60)  # reading a FIFO would block forever


def png(seed: int, size: int = 8, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def src(tmp_path):
    """A good folder source: two classes of two images each."""
    for i, cls in enumerate(["a", "a", "b", "b"]):
        write(tmp_path / "src" / "train" / cls / f"g{i}.png", png(i))
    return tmp_path / "src"


@pytest.fixture
def store(tmp_path):
    return DatasetStore(open_storage(tmp_path / "store"))


def run(source, store, config=CONFIG):
    result = ingest(str(source), "hostile", store, config)
    quarantine = {r["path"]: r["reason"] for r in store.read_quarantine(result.manifest).to_pylist()}
    paths = {r["path"] for r in store.read_shards(result.manifest).to_pylist()}
    return result, quarantine, paths


@HANG
def test_a_fifo_is_quarantined_without_being_opened(src, store):
    os.mkfifo(src / "train" / "a" / "pipe.png")
    _, quarantine, paths = run(src, store)
    assert "not a regular file" in quarantine["train/a/pipe.png"]
    assert paths == {f"train/{c}/g{i}.png" for i, c in enumerate("aabb")}


def test_links_stay_inside_the_source(src, store, tmp_path):
    secret = write(tmp_path / "outside" / "secret.png", png(99))
    os.symlink(secret, src / "train" / "a" / "out.png")
    os.symlink(src / "train" / "b" / "g2.png", src / "train" / "a" / "inside.png")  # in: fine
    os.symlink(src / "train", src / "train" / "b" / "up")  # a folder link: would walk in circles
    os.symlink("loop2.png", src / "train" / "a" / "loop1.png")
    os.symlink("loop1.png", src / "train" / "a" / "loop2.png")
    os.symlink("missing.png", src / "train" / "a" / "dangling.png")
    _, quarantine, paths = run(src, store)
    assert "link out of the source folder" in quarantine["train/a/out.png"]
    assert "link to a folder" in quarantine["train/b/up"]
    assert "unreadable" in quarantine["train/a/loop1.png"] and "train/a/loop2.png" in quarantine
    assert "dangling link" in quarantine["train/a/dangling.png"]
    # the in-source link is read; its pixels equal g2's, so one of the two is a duplicate
    assert ("train/a/inside.png" in paths) != ("train/a/inside.png" in quarantine)
    assert not any("secret" in p or "outside" in p for p in paths)


def test_a_link_swapped_in_after_listing_is_not_followed_out(tmp_path):
    """The read checks again: a file replaced by a link out between listing and reading."""
    root = tmp_path / "src"
    write(root / "x.png", png(1))
    secret = write(tmp_path / "secret.bin", b"secret")
    storage = LocalStorage(root, confined=True)
    assert [o.key for o in storage.walk()] == ["x.png"]
    (root / "x.png").unlink()
    os.symlink(secret, root / "x.png")
    with pytest.raises(NotRegular, match="link to outside"):
        storage.read_bytes("x.png")
    assert LocalStorage(root).read_bytes("x.png") == b"secret"  # the store's own reads are not confined


def test_files_over_the_byte_limit_are_not_read(src, store):
    write(src / "train" / "a" / "big.png", png(7, size=64))
    config = CONFIG.model_copy(update={"max_file_bytes": 1024})
    _, quarantine, paths = run(src, store, config)
    assert quarantine["train/a/big.png"].startswith("too large:")
    assert "ingest.max_file_bytes" in quarantine["train/a/big.png"]
    assert len(paths) == 4
    with pytest.raises(TooLarge):
        LocalStorage(src).read_bytes("train/a/big.png", max_bytes=100)


def test_only_the_accepted_formats_are_decoded(src, store):
    write(src / "train" / "a" / "image.ppm", png(8, fmt="PPM"))  # Pillow reads it; the store does not
    write(src / "train" / "a" / "doc.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    write(src / "train" / "b" / "ok.gif", png(9, fmt="GIF"))
    _, quarantine, paths = run(src, store)
    assert quarantine["train/a/image.ppm"].startswith("not an image: none of PNG, JPEG")
    assert quarantine["train/a/doc.eps"].startswith("not an image")
    assert "train/b/ok.gif" in paths


def test_a_file_name_that_is_not_utf8_is_quarantined_escaped(src, store):
    name = os.fsencode(src / "train" / "a") + b"/caf\xe9.png"
    with open(name, "wb") as f:
        f.write(png(10))
    _, quarantine, paths = run(src, store)
    assert quarantine["train/a/caf\\xe9.png"].startswith("file name is not valid UTF-8")
    assert len(paths) == 4


def test_labels_lose_control_characters(tmp_path, store):
    for i, folder in enumerate(["ca\x1bt", "dog\u202e"]):
        write(tmp_path / "src" / "train" / folder / f"{i}.png", png(i))
    result, _, _ = run(tmp_path / "src", store)
    assert result.manifest.classes == ["cat", "dog"]
    assert clean_label(" a\tb\x00\n") == "ab"


@HANG
def test_a_table_reads_only_the_files_its_rows_name(tmp_path, store):
    folder = tmp_path / "table"
    for i in range(4):
        write(folder / "img" / f"{i}.png", png(i))
    os.symlink("ring", folder / "ring")  # unnamed by any row: a walk of the folder trips on it
    os.mkfifo(folder / "img" / "pipe.png")  # named by a row: refused, not opened
    os.symlink(write(tmp_path / "secret.png", png(50)), folder / "img" / "out.png")
    rows = {
        "image": [f"img/{i}.png" for i in range(4)] + ["img/pipe.png", "img/out.png", "img/0.png"],
        "label": ["a", "a", "b\n", "b", "a", "a", ""],  # an empty cell: unlabelled
    }
    rows["split"] = ["train"] * 6 + [None]
    pq.write_table(pa.table(rows), folder / "data.parquet")
    result, quarantine, _ = run(folder / "data.parquet", store)
    assert "not a regular file" in quarantine["row 4 (img/pipe.png)"]
    assert "link out of the source folder" in quarantine["row 5 (img/out.png)"]
    assert result.manifest.classes == ["a", "b"]
    assert result.manifest.counts["train"] == {"a": 2, "b": 2}
    # row 6 repeats row 0's file, unlabelled: the same image, so one copy is quarantined
    assert "duplicate" in quarantine["row 6 (img/0.png)"]


def test_an_empty_csv_label_is_unlabelled(tmp_path, store):
    folder = tmp_path / "csv"
    for i in range(3):
        write(folder / f"{i}.png", png(i))
    (folder / "data.csv").write_text("image,label\n0.png,a\n1.png,b\n2.png,\n")
    result, quarantine, _ = run(folder / "data.csv", store)
    assert not quarantine
    assert result.manifest.counts == {"train": {"a": 1, "b": 1}, "unlabeled": {"-": 1}}
    assert result.manifest.classes == ["a", "b"]


@pytest.mark.parametrize(
    "name", ["../escape", "digits\n", "a/b", "", "x" * 200, "Upper", ".hidden", "ok\x00"]
)
def test_names_that_would_leave_the_store_are_refused(store, name):
    with pytest.raises(names.InvalidName, match="data set name") as err:
        store.dataset(name)
    assert len(str(err.value)) < 300  # a long name is shown cut
    if name != "Upper":  # a valid run id
        with pytest.raises(names.InvalidName, match="run id"):
            names.run_id(name)
    with pytest.raises(names.InvalidName, match="data version"):
        store.manifest("digits", name or "v-../../etc")
    assert names.dataset_name("fmnist_v2-a") == "fmnist_v2-a"
    assert names.run_id("20261130-165657-b2be87") == "20261130-165657-b2be87"


def test_a_damaged_shard_is_refused_when_read(src, store, tmp_path):
    from tofa_core.data.loaders import load_splits
    from tofa_core.storage import StorageError

    result, _, _ = run(src, store)
    shard = tmp_path / "store" / "datasets" / "hostile" / result.manifest.shards[0].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="does not match the SHA-256"):
        load_splits(store, "hostile", val_fraction=0.0)


def test_a_byte_flipped_in_transit_is_read_again_and_one_flipped_in_the_store_is_damage(
    src, store, tmp_path, monkeypatch
):
    from tofa_core.data.store import DamagedShard, read_shard

    result, _, _ = run(src, store)
    ds, shard = store.dataset("hostile"), result.manifest.shards[0]
    real, reads = type(ds).read_bytes, []

    def flips_once(self, key, max_bytes=None):  # the first read of the shard arrives damaged
        data = bytearray(real(self, key, max_bytes))
        if key == shard.path and not reads:
            data[len(data) // 2] ^= 0xFF
        reads.append(key)
        return bytes(data)

    monkeypatch.setattr(type(ds), "read_bytes", flips_once)
    assert read_shard(ds, shard).num_rows > 0  # the second read matched its SHA-256
    assert reads == [shard.path, shard.path]
    monkeypatch.undo()
    path = tmp_path / "store" / "datasets" / "hostile" / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedShard, match="ingest the source again"):
        read_shard(ds, shard)


def test_failed_writes_leave_no_temp_files(tmp_path, monkeypatch):
    from tofa_core.storage import StorageError

    storage = LocalStorage(tmp_path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("a folder cannot be replaced by a file")
    with pytest.raises(StorageError, match="cannot write"):
        storage.write_bytes("taken", b"data")

    def disk_full(fd):  # the OS failing mid-write: ENOSPC cannot be provoked safely here
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match="No space left"):
        storage.write_bytes("new.bin", b"data")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["taken", "x"]


def test_a_link_swapped_in_after_any_check_still_cannot_lead_out(tmp_path, monkeypatch):
    """No check-then-open window: even with every path check fooled (as if the swap came right
    after it), the open itself walks the path link by link and refuses to leave the root."""
    root = tmp_path / "src"
    write(root / "sub" / "x.png", png(1))
    secret = write(tmp_path / "outside" / "x.png", b"secret")
    storage = LocalStorage(root, confined=True)
    monkeypatch.setattr(os.path, "realpath", lambda p, **kw: str(root / "sub" / "x.png"))
    (root / "sub" / "x.png").unlink()
    os.symlink(secret, root / "sub" / "x.png")  # the file itself swapped
    with pytest.raises(NotRegular, match="outside"):
        storage.read_bytes("sub/x.png")
    os.unlink(root / "sub" / "x.png")
    os.rename(root / "sub", root / "old")
    os.symlink(tmp_path / "outside", root / "sub")  # a folder on the way swapped
    with pytest.raises(NotRegular, match="outside"):
        storage.read_bytes("sub/x.png")
    os.symlink("../outside", root / "rel")  # relative links resolve against the root too
    with pytest.raises(NotRegular, match="outside"):
        storage.read_bytes("rel/x.png")
    with pytest.raises(NotRegular, match="outside"):
        storage.read_bytes("../outside/x.png")


def test_links_inside_the_root_resolve_and_loops_end(tmp_path):
    root = tmp_path / "src"
    write(root / "a" / "x.png", b"inside")
    os.symlink("../a/x.png", write(root / "b" / "keep", b"").parent / "rel.png")
    os.symlink(root / "a", root / "abs")  # absolute, but inside
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.mkfifo(root / "a" / "pipe")
    storage = LocalStorage(root, confined=True)
    assert storage.read_bytes("b/rel.png") == b"inside"
    assert storage.read_bytes("abs/x.png") == b"inside"
    assert storage.read_bytes("a/../a/./x.png") == b"inside"
    with pytest.raises(StorageErrorType, match="loop"):
        storage.read_bytes("loop1")
    with pytest.raises(NotRegular, match="not a regular file"):
        storage.read_bytes("abs/pipe")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("a/missing.png")


def test_orphans_of_a_killed_ingest_are_removed_by_the_next_and_by_gc(src, store, tmp_path, monkeypatch):
    """Files no committed version lists go once they are older than the grace period; the
    committed versions, young files (an ingest may be writing them) and refs stay."""
    import time

    from typer.testing import CliRunner

    from flows.cli import app

    first, _, _ = run(src, store)
    folder = tmp_path / "store" / "datasets" / "hostile"
    old = time.time() - 2 * 24 * 3600
    orphans = [
        write(folder / "v-0123456789abcdef" / "shard-aa.parquet", b"killed before its commit"),
        write(folder / first.manifest.version / ".shard-bb.parquet.x1.tmp", b"killed mid-write"),
    ]
    young = write(folder / "v-fedcba9876543210" / "shard-cc.parquet", b"being written now")
    for path in orphans:
        os.utime(path, (old, old))
    os.utime(folder / first.manifest.shards[0].path, (old, old))  # old but listed: kept
    assert store.garbage("hostile", 24 * 3600) == sorted(str(p.relative_to(folder)) for p in orphans)

    write(src / "train" / "a" / "new.png", png(99))
    second, _, _ = run(src, store)
    assert second.created and all(not p.exists() for p in orphans) and young.exists()
    assert store.manifest("hostile", first.manifest.version) == first.manifest
    assert len(store.read_shards(first.manifest)) == 4 and len(store.read_shards(second.manifest)) == 5

    runner, args = CliRunner(), ["gc", "--dataset", "hostile", "--store", str(tmp_path / "store")]
    dry = runner.invoke(app, [*args, "--older-than", "0", "--dry-run"])
    assert dry.exit_code == 0 and "1 unreferenced file(s) would be removed" in dry.output and young.exists()
    done = runner.invoke(app, [*args, "--older-than", "0"])
    assert done.exit_code == 0 and "1 unreferenced file(s) removed" in done.output and not young.exists()
    assert len(store.read_shards(second.manifest)) == 5 and store.latest("hostile") == second.manifest


def test_gc_waits_for_no_one_while_a_run_holds_the_lock(src, store, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from tofa_core.runlock import RunLock

    run(src, store)
    with RunLock(store.storage, "hostile", "pipeline test"):
        out = CliRunner().invoke(app, ["gc", "--dataset", "hostile", "--store", str(tmp_path / "store")])
    assert out.exit_code == 2 and "pipeline test" in out.output


def test_a_folder_where_a_file_was_expected_is_not_found_and_leaks_no_descriptor(tmp_path):
    (tmp_path / "src" / "dir.png").mkdir(parents=True)
    before = len(os.listdir("/proc/self/fd"))
    for confined in (True, False):
        storage = LocalStorage(tmp_path / "src", confined=confined)
        for _ in range(5):
            with pytest.raises(FileNotFoundError, match="is a folder"):
                storage.read_bytes("dir.png")
    assert len(os.listdir("/proc/self/fd")) == before


def test_tidying_after_a_commit_never_fails_the_ingest(src, store, tmp_path):
    """A manifest this version cannot parse (a newer tool's extra field, say) stops the tidy,
    not the ingest that has just committed its version."""
    first, _, _ = run(src, store)
    folder = tmp_path / "store" / "datasets" / "hostile"
    write(folder / "v-00000000000000ff" / "manifest.json", b'{"dataset": "hostile", "from_the_future": 1}')
    write(src / "train" / "b" / "later.png", png(123))
    second, _, _ = run(src, store)
    assert second.created and second.manifest.parent == first.manifest.version
