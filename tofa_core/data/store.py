"""The versioned data set store: `<root>/datasets/<name>/<version>/`.

A version is Parquet shards of decoded uint8 images (one row per image: content hash,
source id, path, split, label index, shape, pixels) plus `manifest.json`, written last and
exactly once. A version without a manifest does not exist: readers never see a half
written version, and a retry of a crashed ingest rewrites the same shards and commits.
Shards are referenced by path from the dataset folder, so a child version lists its
parent's shards instead of copying them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from tofa_core import names
from tofa_core.storage import NotFound, Storage, StorageError

log = logging.getLogger(__name__)
# Unreferenced files younger than this are left alone: they may be an ingest still writing.
GC_GRACE_SECONDS = 24 * 3600.0

SHARD_SCHEMA = pa.schema(
    [
        ("content_hash", pa.string()),
        ("source_id", pa.string()),
        ("path", pa.string()),
        ("split", pa.string()),
        ("label", pa.int32()),  # index into Manifest.classes; null = unlabelled
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int8()),
        ("pixels", pa.binary()),  # height x width x channels, uint8, row-major
    ]
)
QUARANTINE_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string()), ("source_id", pa.string())])


class ShardRef(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: str  # relative to the dataset folder, e.g. "v-0123abcd/shard-89ef.parquet"
    sha256: str
    rows: int


class QuarantineSummary(BaseModel):
    path: str | None = None
    count: int = 0
    reasons: dict[str, int] = {}


class Manifest(BaseModel):
    """What a committed version holds. Written once; never modified."""

    model_config = ConfigDict(extra="forbid")
    format: int = 1
    dataset: str
    version: str
    parent: str | None
    source: str
    created: str
    classes: list[str]
    channels: int
    shard_schema: list[tuple[str, str]] = [(f.name, str(f.type)) for f in SHARD_SCHEMA]
    counts: dict[str, dict[str, int]]  # split -> class name (or "-" for unlabelled) -> images
    num_images: int
    digest: str = ""  # sum of per-record digests (hex): children extend it without a full pass
    shards: list[ShardRef]
    quarantine: QuarantineSummary
    settings: dict = {}

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2, sort_keys=True)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class DatasetStore:
    """Versions of named data sets under one storage root (local folder or S3 prefix)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def dataset(self, name: str) -> Storage:
        return self.storage.child(f"datasets/{names.dataset_name(name)}")

    def versions(self, name: str) -> list[Manifest]:
        """Committed versions, oldest first."""
        ds = self.dataset(name)
        manifests = [o.key for o in ds.list() if o.key.count("/") == 1 and o.key.endswith("/manifest.json")]
        out = [Manifest.model_validate_json(ds.read_bytes(k)) for k in manifests]
        return sorted(out, key=lambda m: m.created)

    def latest(self, name: str) -> Manifest | None:
        """The version the last successful ingest committed or selected (training reads this).

        Recorded as an append-only log of refs (`refs/<time>-<version>.json`): an ingest whose
        content equals an older version selects that version again without rewriting it.
        """
        refs = [o.key for o in self.dataset(name).list("refs")]
        if not refs:
            return None
        return self.manifest(name, refs[-1].rsplit("/", 1)[-1].split("-", 1)[1].removesuffix(".json"))

    def set_latest(self, name: str, version: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        ref = json.dumps({"version": version, "at": now()}).encode()
        self.dataset(name).put_if_absent(f"refs/{stamp}-{version}.json", ref)

    def manifest(self, name: str, version: str | None = None) -> Manifest:
        if version is None:
            found = self.latest(name)
            if found is None:
                raise NotFound(f"no data set {name!r} in {self.storage.uri('datasets')}; ingest one first")
            return found
        try:
            key = f"{names.data_version(version)}/manifest.json"
            return Manifest.model_validate_json(self.dataset(name).read_bytes(key))
        except NotFound:
            raise NotFound(f"data set {name!r} has no version {version!r} in {self.storage.root}") from None

    def read_shards(self, manifest: Manifest, columns: list[str] | None = None) -> pa.Table:
        """All rows of a version (optionally only some columns), shard by shard in order."""
        ds = self.dataset(manifest.dataset)
        # Whole shards are checked against the manifest; a column read (an index) is not.
        tables = [ds.read_table(s.path, columns) if columns else read_shard(ds, s) for s in manifest.shards]
        if not tables:
            return SHARD_SCHEMA.empty_table().select(columns or SHARD_SCHEMA.names)
        return pa.concat_tables(tables)

    def garbage(self, name: str, older_than: float, at: float | None = None) -> list[str]:
        """Keys of the data set no committed version refers to: shards and quarantine tables of
        ingests killed before their commit, and temp files of interrupted writes. Only what last
        changed over `older_than` seconds ago counts, so an ingest still writing is left alone."""
        ds = self.dataset(name)
        listed = set()
        for m in self.versions(name):
            listed.update(s.path for s in m.shards)
            listed.add(m.quarantine.path)
        cutoff = (time.time() if at is None else at) - older_than
        out = []
        for o in ds.walk(hidden=True):
            folder, _, file = o.key.rpartition("/")
            if o.modified > cutoff or "/" in folder or not folder.startswith("v-"):
                continue  # new, or not inside a version folder (refs, locks)
            if file.endswith(".parquet") and not file.startswith(".") and o.key not in listed:
                out.append(o.key)
            elif file.startswith(".") and file.endswith(".tmp"):
                out.append(o.key)
        return sorted(out)

    def collect_garbage(self, name: str, older_than: float = GC_GRACE_SECONDS) -> list[str]:
        """Delete `garbage(name, older_than)`; returns the deleted keys."""
        ds = self.dataset(name)
        keys = self.garbage(name, older_than)
        for key in keys:
            ds.delete(key)
        if keys:
            log.info("data set %s: removed %d unreferenced file(s) of unfinished ingests", name, len(keys))
        return keys

    def read_quarantine(self, manifest: Manifest) -> pa.Table:
        if not manifest.quarantine.path:
            return QUARANTINE_SCHEMA.empty_table()
        return self.dataset(manifest.dataset).read_table(manifest.quarantine.path)


class DamagedShard(StorageError):
    """A stored shard whose bytes no longer match its manifest's SHA-256: every read fails alike."""


def read_shard(ds: Storage, shard: ShardRef) -> pa.Table:
    """The shard's table, its bytes checked against the manifest. A mismatch is read once more
    (a byte flipped on the way, not in the store) before it is called damaged."""
    for _ in range(2):
        data = ds.read_bytes(shard.path)
        if hashlib.sha256(data).hexdigest() == shard.sha256:
            return pq.read_table(pa.BufferReader(data))
    raise DamagedShard(
        f"{ds.uri(shard.path)} does not match the SHA-256 its manifest recorded: the stored shard "
        "is damaged or was changed; ingest the source again into a fresh store or data set name"
    )


def common_shape(heights: np.ndarray, widths: np.ndarray) -> tuple[int, int]:
    """The most common (height, width): what images of other sizes are resized to by default."""
    pairs, counts = np.unique(np.stack([heights, widths], 1), axis=0, return_counts=True)
    h, w = (int(v) for v in pairs[counts.argmax()])
    return h, w


def _pixel_bytes(column: pa.ChunkedArray) -> np.ndarray:
    """All rows' pixel bytes end to end, as a view of Arrow's data buffer where they already
    lie that way (no Python bytes object per image)."""
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    _, offsets_buf, data_buf = array.buffers()
    width = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    offsets = np.frombuffer(offsets_buf, dtype=width)[array.offset : array.offset + len(array) + 1]
    if data_buf is None or len(offsets) == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]


def images_array(
    table: pa.Table, size: int | None = None, channels: int | None = None, hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Stack a shard table's images into one (N, C, H, W) uint8 array.

    Images of another size are resized (bilinear) to `size` (or to `hw`; default: the most
    common size); grayscale images are repeated to 3 channels when `channels` is 3, and
    colour ones averaged when it is 1.
    """
    n = table.num_rows
    heights = table.column("height").to_numpy()
    widths = table.column("width").to_numpy()
    chans = table.column("channels").to_numpy()
    if n == 0:
        h, w = hw or (size or 1, size or 1)
        return np.zeros((0, channels or 1, h, w), dtype=np.uint8)
    if hw is not None:
        h, w = hw
    elif size is None:
        h, w = common_shape(heights, widths)
    else:
        h = w = size
    c = channels or int(chans.max())
    out = np.empty((n, c, h, w), dtype=np.uint8)
    uniform = bool((heights == h).all() and (widths == w).all() and (chans == c).all())
    if uniform:  # the common case: one copy out of Arrow's buffer, no per-image work
        out[:] = _pixel_bytes(table.column("pixels")).reshape(n, h, w, c).transpose(0, 3, 1, 2)
        return out
    pixels = table.column("pixels").to_pylist()
    from PIL import Image

    for i, raw in enumerate(pixels):
        img = np.frombuffer(raw, dtype=np.uint8).reshape(heights[i], widths[i], chans[i])
        if (heights[i], widths[i]) != (h, w):
            mode = "L" if chans[i] == 1 else "RGB"
            pil = Image.fromarray(img[:, :, 0] if chans[i] == 1 else img, mode)
            img = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR)).reshape(h, w, chans[i])
        if chans[i] != c:
            img = np.repeat(img, c, axis=2) if c == 3 else img.mean(axis=2, keepdims=True).round()
        out[i] = img.transpose(2, 0, 1)
    return out
