"""Hostile inputs and faults against a scratch store: every case must end cleanly.

Each case feeds one hostile thing (a FIFO among the images, a link out of the source, a
"billion laughs" config, a name that climbs out of the store, a damaged shard, a held run
lock, ...) to the real code path a user's command takes, in a scratch store that already
holds a committed version, under a timeout. One line per case says what happened:

  refused      a clear error (one of the product's error types) and nothing stored changed
  quarantined  ingest went on and set the hostile item aside with its reason
  survived     the input was handled as documented (a cleaned label, a taken-over lock)
  FAILED       a traceback (an unexpected exception type), a hang past the timeout, a file
               written outside the store, or a committed version changed

    .venv/bin/python benchmarks/bench_chaos.py [--timeout 30]

Exits 1 when any case FAILED. Needs no service (the S3 and stack cases are in the tests).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tofa_core import names
from tofa_core.config_files import MAX_BYTES, ConfigError
from tofa_core.data.ingest import IngestConfig, decode_items, ingest, plan_ingest
from tofa_core.data.loaders import load_splits
from tofa_core.data.sources import SourceError
from tofa_core.data.store import GC_GRACE_SECONDS, DatasetStore
from tofa_core.runlock import RunLock, RunLocked
from tofa_core.search.targets import TargetError, load_targets
from tofa_core.storage import StorageError, open_storage
from tofa_core.training.config import TrainConfig

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "chaos.md"
CLEAN_ERRORS = (SourceError, StorageError, ConfigError, TargetError, names.InvalidName, RunLocked)
CONFIG = IngestConfig(min_per_class=1, workers=1, max_quarantine_fraction=1.0)


class Hang(Exception):
    pass


def png(seed: int, size: int = 8, fmt: str = "PNG", mode_16: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
    img = Image.fromarray(pixels.astype(np.uint16) * 200) if mode_16 else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def folder(root: Path, extra: Callable[[Path], None]) -> Path:
    """A good source (two classes) plus one hostile thing."""
    src = root / "src"
    for i, cls in enumerate("aabb"):
        (src / "train" / cls).mkdir(parents=True, exist_ok=True)
        (src / "train" / cls / f"g{i}.png").write_bytes(png(i))
    extra(src)
    return src


def put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ------------------------------------------------------------------ the cases
# Each returns ("quarantined" | "survived", detail) or raises; `ctx` holds root, store, outside.


def ingest_with(extra, hostile: str, config: IngestConfig = CONFIG):
    def case(ctx):
        src = folder(ctx["root"], extra)
        result = ingest(str(src), "chaos", ctx["store"], config)
        reasons = {r["path"]: r["reason"] for r in ctx["store"].read_quarantine(result.manifest).to_pylist()}
        hit = next((p for p in reasons if hostile in p), None)
        if hit is None:
            raise AssertionError(f"{hostile} was not quarantined: {sorted(reasons)}")
        return "quarantined", reasons[hit]

    return case


def ingest_refused(make_source: Callable[[Path], str], dataset: str = "chaos"):
    def case(ctx):
        ingest(make_source(ctx["root"]), dataset, ctx["store"], CONFIG)
        raise AssertionError("accepted")

    return case


def table(rows: dict, name: str = "t.parquet"):
    def make(root: Path) -> str:
        t = root / "table"
        for i in range(4):
            put(t / f"{i}.png", png(i))
        pq.write_table(pa.table(rows), t / name)
        return str(t / name)

    return make


def config_case(text: str | bytes, load=TrainConfig.from_yaml):
    def case(ctx):
        path = ctx["root"] / "c.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        load(path)
        raise AssertionError("accepted")

    return case


def targets_case(text: str):
    return config_case(text, load=lambda p: load_targets(p, devices=["host-cpu"]))


def cleaned_label(ctx):
    src = folder(ctx["root"], lambda s: put(s / "train" / "c\x1bat\u202e" / "x.png", png(40)))
    classes = ingest(str(src), "chaos", ctx["store"], CONFIG).manifest.classes
    if "cat" not in classes:
        raise AssertionError(classes)
    return "survived", f"classes {classes}"


def damaged_shard(ctx):
    store, committed = ctx["store"], ctx["committed"]
    shard = ctx["root"] / "store" / "datasets" / "base" / committed.shards[0].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    try:
        load_splits(store, "base", committed.version, val_fraction=0.0)
    finally:
        data[len(data) // 2] ^= 0xFF  # put it back: the next cases check the version is whole
        shard.write_bytes(bytes(data))
    raise AssertionError("a damaged shard was read")


def lock_held(ctx):
    with RunLock(ctx["store"].storage, "chaos", "another run"):
        RunLock(ctx["store"].storage, "chaos", "this run").acquire()
    raise AssertionError("two holders")


def lock_stale(ctx):
    dead = RunLock(ctx["store"].storage, "chaos", "killed run", lease=0.2)
    dead.acquire()
    dead._stop.set()  # killed: no renewal, no release
    time.sleep(0.3)
    with RunLock(ctx["store"].storage, "chaos", "next run"):
        pass
    return "survived", "a killed run's lock taken over after its lease"


def folder_swapped_mid_ingest(ctx):
    """A class folder replaced by a link to look-alike files outside the source after listing."""
    src = folder(ctx["root"], lambda s: None)
    plan = plan_ingest(str(src), "chaos", ctx["store"], CONFIG)
    decoy = ctx["root"] / "decoy"
    for i in (0, 1):
        put(decoy / f"g{i}.png", png(100 + i))
    os.rename(src / "train" / "a", src / "moved")
    (src / "train" / "a").symlink_to(decoy)
    with decode_items(plan, CONFIG) as staged:
        errors = [d.error for d in staged if d.error]
    if len(errors) != 2:
        raise AssertionError(f"read through the swapped folder: {errors}")
    return "quarantined", errors[0]


def orphans_of_a_killed_ingest(ctx):
    src = folder(ctx["root"], lambda s: None)
    first = ingest(str(src), "chaos", ctx["store"], CONFIG).manifest
    ds, key = ctx["store"].dataset("chaos"), "v-0123456789abcdef/shard-00.parquet"
    ds.write_bytes(key, b"written, never committed")
    old = time.time() - 2 * GC_GRACE_SECONDS
    os.utime(ctx["root"] / "store" / "datasets" / "chaos" / key, (old, old))
    put(src / "train" / "a" / "new.png", png(77))
    ingest(str(src), "chaos", ctx["store"], CONFIG)
    if ds.exists(key) or len(ctx["store"].read_shards(first)) != 4:
        raise AssertionError("the orphan shard is still there, or the first version lost rows")
    return "survived", "the next ingest removed the orphan shard; the committed versions are whole"


LAUGHS = "a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)

CASES: list[tuple[str, Callable]] = [
    ("FIFO among the images", ingest_with(lambda s: os.mkfifo(s / "train" / "a" / "pipe.png"), "pipe.png")),
    (
        "link to a file outside the source",
        ingest_with(
            lambda s: os.symlink(s.parent / "outside" / "secret.png", s / "train" / "a" / "out.png"),
            "out.png",
        ),
    ),
    (
        "symbolic link loop",
        ingest_with(
            lambda s: (
                os.symlink("l2.png", s / "train" / "a" / "l1.png"),
                os.symlink("l1.png", s / "train" / "a" / "l2.png"),
            ),
            "l1.png",
        ),
    ),
    ("dangling link", ingest_with(lambda s: os.symlink("gone.png", s / "train" / "a" / "d.png"), "d.png")),
    (
        "link to a folder (walk in circles)",
        ingest_with(lambda s: os.symlink(s / "train", s / "train" / "b" / "up"), "up"),
    ),
    (
        "file name not UTF-8",
        ingest_with(
            lambda s: open(os.fsencode(s / "train" / "a") + b"/caf\xe9.png", "wb").write(png(9)), "caf"
        ),
    ),
    (
        "file over max_file_bytes",
        ingest_with(
            lambda s: put(s / "train" / "a" / "big.png", png(7, 64)),
            "big.png",
            CONFIG.model_copy(update={"max_file_bytes": 1024}),
        ),
    ),
    (
        "decompression bomb",
        ingest_with(
            lambda s: put(s / "train" / "a" / "bomb.png", png(8, 64)),
            "bomb.png",
            CONFIG.model_copy(update={"max_pixels": 1000}),
        ),
    ),
    ("truncated PNG", ingest_with(lambda s: put(s / "train" / "a" / "t.png", png(10)[:40]), "t.png")),
    (
        "EPS (Ghostscript) file",
        ingest_with(
            lambda s: put(s / "train" / "a" / "x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"),
            "x.eps",
        ),
    ),
    (
        "PPM (a format not accepted)",
        ingest_with(lambda s: put(s / "train" / "a" / "x.ppm", png(11, fmt="PPM")), "x.ppm"),
    ),
    ("text named .png", ingest_with(lambda s: put(s / "train" / "a" / "notes.png", b"hello\n"), "notes.png")),
    (
        "16-bit image",
        ingest_with(lambda s: put(s / "train" / "a" / "deep.png", png(12, mode_16=True)), "deep.png"),
    ),
    (
        "image outside a class folder",
        ingest_with(lambda s: put(s / "train" / "loose.png", png(13)), "loose.png"),
    ),
    ("label with escapes and bidi overrides", cleaned_label),
    (
        "source without train/",
        ingest_refused(lambda r: (put(r / "empty" / "x.txt", b"x"), str(r / "empty"))[1]),
    ),
    ("source that does not exist", ingest_refused(lambda r: str(r / "nowhere"))),
    ("table without a label column", ingest_refused(table({"image": ["0.png"]}))),
    (
        "table path climbing out (../)",
        ingest_refused(table({"image": ["../../etc/passwd"] * 2, "label": ["a", "b"]})),
    ),
    (
        "data set name ../escape",
        ingest_refused(table({"image": ["0.png", "1.png"], "label": ["a", "b"]}), "../escape"),
    ),
    (
        "data set name with a newline",
        ingest_refused(table({"image": ["0.png", "1.png"], "label": ["a", "b"]}), "base\n"),
    ),
    ("run id climbing out", lambda ctx: names.run_id("../../etc/passwd")),
    ("config: billion laughs", config_case(LAUGHS)),
    ("config: duplicate key", config_case("train:\n  epochs: 3\n  epochs: 4\n")),
    ("config: misspelt section", config_case("ingset:\n  seed: 1\n")),
    ("config: absurd resolution", config_case("train:\n  resolutions: [100000]\n")),
    ("config: not UTF-8", config_case(b"train:\n  lr: \xff\n")),
    ("config: over 1 MiB", config_case(b"#" * (MAX_BYTES + 1))),
    ("config: a folder", lambda ctx: TrainConfig.from_yaml(ctx["root"])),
    ("targets: budget true", targets_case("- {name: t, max_macs: true}\n")),
    ("targets: budget .inf", targets_case("- {name: t, max_latency_ms: .inf, device: host-cpu}\n")),
    ("targets: billion laughs", targets_case(LAUGHS)),
    ("damaged shard", damaged_shard),
    ("second run while one holds the lock", lock_held),
    ("stale lock of a killed run", lock_stale),
    ("class folder swapped for a link out mid-ingest", folder_swapped_mid_ingest),
    ("orphan shard of a killed ingest", orphans_of_a_killed_ingest),
]


# ------------------------------------------------------------------ running them


def _snapshot(store_root: Path) -> dict[str, bytes]:
    """The committed versions: every manifest and shard (what must never change)."""
    base = store_root / "datasets" / "base"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def _outside(root: Path) -> set[str]:
    return {str(p) for p in root.parent.iterdir()} if root.parent.exists() else set()


def run_case(fn: Callable, timeout: int) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="tofa-chaos-") as tmp:
        root = Path(tmp) / "work"
        root.mkdir()
        put(Path(tmp) / "outside" / "secret.png", png(99))  # what a link out would reach
        (root / "outside").symlink_to(Path(tmp) / "outside")
        store = DatasetStore(open_storage(root / "store"))
        committed = ingest(str(folder(root / "base-src", lambda s: None)), "base", store, CONFIG).manifest
        before, around = _snapshot(root / "store"), _outside(root)
        ctx = {"root": root, "store": store, "committed": committed}
        signal.alarm(timeout)
        try:
            outcome, detail = fn(ctx) or ("survived", "")
        except CLEAN_ERRORS as err:
            outcome, detail = "refused", str(err).splitlines()[0]
        except Hang:
            return "FAILED", f"hung past {timeout} s"
        except Exception as err:  # noqa: BLE001 - exactly what this benchmark looks for
            return "FAILED", f"{type(err).__name__}: {str(err)[:60]}"
        finally:
            signal.alarm(0)
        if _snapshot(root / "store") != before:
            return "FAILED", "a committed version changed"
        if _outside(root) != around:
            return "FAILED", "something was written outside the work folder"
        return outcome, detail.replace(str(root), "WORK")[:90]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=int, default=30, help="seconds a case may take")
    parser.add_argument("--out", default=str(OUT), help="where the table is written as Markdown")
    args = parser.parse_args()

    def on_alarm(signum, frame):
        raise Hang

    signal.signal(signal.SIGALRM, on_alarm)
    counts: Counter = Counter()
    lines = ["| # | case | outcome | detail |", "| ---: | --- | --- | --- |"]
    print("\n".join(lines))
    for i, (name, fn) in enumerate(CASES, 1):
        outcome, detail = run_case(fn, args.timeout)
        counts[outcome] += 1
        lines.append(f"| {i} | {name} | {outcome} | {detail.replace('|', '/')} |")
        print(lines[-1], flush=True)
    total = ", ".join(f"{k} {counts[k]}" for k in ("refused", "quarantined", "survived", "FAILED"))
    lines.append(f"\n{len(CASES)} cases: {total}")
    print(lines[-1])
    Path(args.out).write_text("# `benchmarks/bench_chaos.py`\n\n" + "\n".join(lines) + "\n")
    sys.exit(1 if counts["FAILED"] else 0)


if __name__ == "__main__":
    main()
