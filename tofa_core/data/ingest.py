"""Ingestion: source -> validated, versioned data set in the store.

Stages (`ingest()` chains them; the Prefect flow in flows/ingest.py runs each as a task):
  plan      list the source, find the parent version, tell known items from new ones
  decode    decode only the new items, in parallel processes
  validate  labels, duplicates and per-source checks; the quarantine; the version id
  write     shards: the parent's where they are unchanged, new ones for the rest
  commit    the quarantine, then the manifest (exactly once) - the version now exists
Nothing is written before validation passes, and nothing of an existing version is ever
rewritten, so a failed or killed ingest leaves every committed version as it was.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from tofa_core import config_files, names
from tofa_core.data.decode import Decoded, decode_bytes, from_array
from tofa_core.data.sources import Item, Listing, SourceError, list_source
from tofa_core.data.spill import Spill
from tofa_core.data.store import (
    QUARANTINE_SCHEMA,
    SHARD_SCHEMA,
    DatasetStore,
    Manifest,
    QuarantineSummary,
    ShardRef,
    now,
)
from tofa_core.storage import NotFound, NotRegular, StorageError, TooLarge, open_storage

log = logging.getLogger(__name__)
_SPLIT_PRIORITY = {"test": 0, "train": 1, "unlabeled": 2}  # which copy of a duplicate is kept
# Decoding goes in chunks of this many images; each worker has at most CHUNKS_AHEAD chunks
# queued, so the pixels in flight are bounded by workers x CHUNKS_AHEAD x DECODE_CHUNK images.
DECODE_CHUNK = 64
CHUNKS_AHEAD = 2
PARALLEL_FROM = 512  # fewer new images than this decode in-process: workers cost more to start
# A shard is cut at shard_rows rows or at this many pixel bytes, whichever comes first, so
# writing one holds a bounded amount of large images.
SHARD_MAX_BYTES = 32 * 2**20


class IngestConfig(BaseModel):
    """Ingest settings; the `ingest:` section of a config file."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    labelled_fraction: float = Field(0.1, gt=0, le=1, description="digits: labelled share of non-test images")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="digits: test share")
    seed: int = 0
    classes: list[str] | None = Field(None, description="fixed class order; other labels are quarantined")
    min_per_class: int = Field(2, ge=1, description="labelled training images each class needs")
    max_quarantine_fraction: float = Field(0.25, ge=0, le=1, description="fail the source above this")
    max_pixels: int = Field(4096 * 4096, ge=1, description="larger images are quarantined as bombs")
    max_file_bytes: int = Field(
        32 * 2**20, ge=1, description="larger files are quarantined without being read"
    )
    image_size: int | None = Field(None, ge=1, le=4096, description="resize every image to this square side")
    channels: Literal[1, 3] | None = Field(
        None, description="1 (grey) or 3 (colour) for the version; default: what most images are"
    )
    shard_rows: int = Field(8192, ge=1)
    workers: int | None = Field(None, ge=1, le=512, description="decode processes; default: CPU count")

    @classmethod
    def from_yaml(cls, path: str | Path) -> IngestConfig:
        return config_files.load_section_model(cls, path, "ingest")


@dataclass(slots=True)
class Record:
    """A newly decoded image of the version being built."""

    source_id: str
    path: str
    split: str
    label: str | None
    decoded: Decoded


@dataclass
class ParentIndex:
    """The parent version's rows, column by column and without pixels.

    Columns, not row objects: an incremental ingest of a large data set must cost a small
    fraction of a full one, and per-row Python objects for every known image would not.
    """

    manifest: Manifest
    source_id: list[str]
    path: list[str]
    split: list[str]
    label: list[int | None]
    content_hash: list[str]
    channels: list[int]
    shard: list[int]  # index into manifest.shards
    row: list[int]  # row within that shard

    @classmethod
    def read(cls, store: DatasetStore, manifest: Manifest) -> ParentIndex:
        ds = store.dataset(manifest.dataset)
        cols: dict[str, list] = {
            k: [] for k in ("source_id", "path", "split", "label", "content_hash", "channels")
        }
        shard, row = [], []
        for i, ref in enumerate(manifest.shards):
            table = ds.read_table(ref.path, list(cols)).to_pydict()
            for name, values in cols.items():
                values.extend(table[name])
            shard.extend([i] * ref.rows)
            row.extend(range(ref.rows))
        return cls(manifest, shard=shard, row=row, **cols)

    @functools.cached_property
    def names(self) -> list[str | None]:
        """Label name per row."""
        classes = self.manifest.classes
        return [None if label is None else classes[label] for label in self.label]

    def columns(self, rows: list[int]) -> tuple[list[str], list[str], list[str | None]]:
        """(content_hash, split, label name) of `rows`; whole columns when that is all rows."""
        if len(rows) == len(self.label):  # rows are distinct, so this is every row
            return self.content_hash, self.split, self.names
        return (
            [self.content_hash[i] for i in rows],
            [self.split[i] for i in rows],
            [self.names[i] for i in rows],
        )


@dataclass
class Plan:
    dataset: str
    listing: Listing
    parent: ParentIndex | None
    known_rows: list[int]  # parent rows whose source item is still there, unchanged
    new_items: list[Item]
    repeats: list[tuple[str, str, str]]  # (path, reason, source_id): items listed twice


@dataclass
class Validated:
    plan: Plan
    version: str
    classes: list[str]
    kept_rows: list[int]
    new: list[Record]
    quarantine: list[tuple[str, str, str]]  # (path, reason, source_id)
    counts: dict[str, dict[str, int]]
    exists: bool
    channels: int = 1
    digest: str = ""
    staged: Staged | None = None  # the new images' pixels

    @property
    def num_images(self) -> int:
        return len(self.kept_rows) + len(self.new)


@dataclass
class IngestResult:
    manifest: Manifest
    created: bool
    decoded: int
    reused_shards: int
    written_shards: int
    quarantine: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per stage

    def reasons(self) -> dict[str, int]:
        """Quarantined records per kind of reason."""
        return dict(Counter(_reason_kind(r) for _, r, _ in self.quarantine))

    def summary(self) -> str:
        m = self.manifest
        what = "created" if self.created else "unchanged: this content is stored already, nothing written"
        head = f"data set {m.dataset!r}: version {m.version} {what}"
        counts = ", ".join(f"{split} {sum(c.values())}" for split, c in m.counts.items())
        lines = [
            head,
            f"  {m.num_images} images ({counts}), {len(m.classes)} classes, {m.channels} channel(s)",
        ]
        lines.append(
            f"  decoded {self.decoded} new images; "
            f"shards reused {self.reused_shards}, written {self.written_shards}"
        )
        if self.quarantine:
            reasons = self.reasons()
            lines.append(
                f"  quarantined {len(self.quarantine)}: " + ", ".join(f"{k} {n}" for k, n in reasons.items())
            )
        return "\n".join(lines)


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0]


# ----------------------------------------------------------------------------- plan


def plan_ingest(source: str, dataset: str, store: DatasetStore, config: IngestConfig) -> Plan:
    try:
        names.dataset_name(dataset)
    except names.InvalidName as err:
        raise SourceError(str(err)) from None
    try:
        listing = list_source(
            source,
            labelled_fraction=config.labelled_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
    except StorageError as err:
        raise SourceError(f"cannot read source {source}: {err}") from None
    latest = store.latest(dataset)
    parent = ParentIndex.read(store, latest) if latest else None
    by_source = dict(zip(parent.source_id, range(len(parent.source_id)))) if parent else {}
    known, new_items, repeats, seen = [], [], [], set()
    for item in listing.items:
        row = by_source.get(item.source_id)
        if row is None:
            new_items.append(item)
        elif row in seen:  # the same record twice in one table: its first copy is the parent's
            repeats.append((item.path, f"duplicate: same image as {parent.path[row]}", item.source_id))
        else:
            seen.add(row)
            known.append(row)
    log.info(
        "planned %s: %d items, %d new, parent %s",
        source,
        len(listing.items),
        len(new_items),
        latest and latest.version,
    )
    return Plan(dataset, listing, parent, known, new_items, repeats)


# ----------------------------------------------------------------------------- decode


class Limits(NamedTuple):
    """What one decode worker needs of IngestConfig (a tuple: sent to every worker process)."""

    max_pixels: int
    max_file_bytes: int
    image_size: int | None


def _read_source(storage, key: str, source_id: str, max_bytes: int) -> bytes | Decoded:
    """The file's bytes, or its quarantine entry: a source file is read only when it is a
    regular file inside the source within the byte limit."""
    try:
        return storage.read_bytes(key, max_bytes)
    except NotFound as err:
        what = "is a folder, not a file" if "folder" in str(err) else "does not exist"
        return Decoded(source_id, error=f"missing file: {key} {what}")
    except TooLarge as err:
        return Decoded(source_id, error=f"too large: {err} (ingest.max_file_bytes)")
    except NotRegular as err:
        return Decoded(source_id, error=f"not a regular file: {err}")
    except StorageError as err:
        return Decoded(source_id, error=f"unreadable: {err}")


def _decode_chunk(storage_uri: str | None, entries: list, limits: Limits) -> list[Decoded]:
    has_keys = storage_uri and any(e[1] for e in entries)
    storage = open_storage(storage_uri, confined=True) if has_keys else None
    out = []
    for source_id, key, data, array in entries:
        if array is not None:
            out.append(from_array(source_id, array))
            continue
        if key is not None:
            data = _read_source(storage, key, source_id, limits.max_file_bytes)
        elif len(data) > limits.max_file_bytes:  # a table cell
            data = Decoded(source_id, error=f"too large: {len(data)} bytes (ingest.max_file_bytes)")
        if isinstance(data, Decoded):
            out.append(data)
            continue
        out.append(decode_bytes(source_id, data, limits.max_pixels, limits.image_size))
    return out


@dataclass
class Staged:
    """The decoded new items: their metadata here, their pixels in a local spill file, so the
    ingest process never holds the data set's pixels. `close()` frees the spill."""

    items: list[Decoded]
    spill: Spill

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def pixels(self, d: Decoded) -> bytes:
        return self.spill.read(d.offset, d.height * d.width * d.channels)

    def close(self) -> None:
        self.spill.close()

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_items(plan: Plan, config: IngestConfig) -> Staged:
    """Decode the plan's new items chunk by chunk (several processes when there are enough to
    pay for them), parking each chunk's pixels in the spill as it arrives."""
    storage = plan.listing.storage
    uri = storage.root if storage is not None else None
    limits = Limits(config.max_pixels, config.max_file_bytes, config.image_size)
    workers = config.workers or os.cpu_count() or 1
    staged = Staged([], Spill())
    count = len(plan.new_items)
    try:
        if workers == 1 or count < PARALLEL_FROM or plan.listing.kind == "digits":
            _stage((_decode_chunk(uri, chunk, limits) for chunk in _chunks(plan)), staged)
            return staged
        try:
            _decode_parallel(uri, _chunks(plan), limits, workers, staged)
        except BrokenProcessPool:
            # Worker processes cannot start when __main__ is not a re-importable file (code
            # piped to python, some embedded interpreters): decode here instead, just slower.
            log.warning("decode workers could not start; decoding %d images in this process", count)
            staged.close()
            staged = Staged([], Spill())
            _stage((_decode_chunk(uri, chunk, limits) for chunk in _chunks(plan)), staged)
        return staged
    except BaseException:
        staged.close()
        raise


def _chunks(plan: Plan) -> Iterator[list[tuple]]:
    """The new items as decode entries (source_id, key, bytes, pixels), DECODE_CHUNK at a time,
    made as they are asked for: a table's image cells are read a batch at a time, in order."""
    cells = plan.listing.cells
    rows = [it.row for it in plan.new_items if it.row is not None]
    read = cells.read(rows) if cells is not None and rows else iter(())
    chunk = []
    for it in plan.new_items:
        data = it.data
        if it.row is not None:
            row, data = next(read)
            assert row == it.row, (row, it.row)  # both in the table's order
        chunk.append((it.source_id, it.key, data, it.array))
        if len(chunk) == DECODE_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decode_parallel(uri, chunks: list, limits: Limits, workers: int, staged: Staged) -> None:
    """At most CHUNKS_AHEAD chunks per worker are submitted and not yet staged, so decoded
    pixels in flight stay bounded however slow staging is."""
    # forkserver: safe beside the threads of Prefect, torch and boto3 (fork is not).
    with ProcessPoolExecutor(workers, mp_context=get_context("forkserver")) as pool:
        todo = iter(chunks)
        pending = deque(
            pool.submit(_decode_chunk, uri, c, limits) for c in islice(todo, workers * CHUNKS_AHEAD)
        )

        def results():
            while pending:
                part = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(_decode_chunk, uri, nxt, limits))
                yield part

        _stage(results(), staged)


def _stage(parts, staged: Staged) -> None:
    for part in parts:
        for d in part:
            if not d.error:
                d.offset = staged.spill.append(d.pixels)
                d.pixels = b""
            staged.items.append(d)


# ----------------------------------------------------------------------------- validate


def _classes(plan: Plan, config: IngestConfig, present: set[str]) -> list[str]:
    if config.classes is not None:
        return list(config.classes)
    order = list(plan.parent.manifest.classes) if plan.parent else []
    order = [c for c in order if c in present]  # a class the source no longer has is dropped
    return order + [c for c in plan.listing.classes if c not in order and c in present]


def validate(plan: Plan, decoded: Staged, config: IngestConfig, store: DatasetStore) -> Validated:
    """Build the version's contents and quarantine; raise SourceError if the source fails as a whole."""
    listing, parent = plan.listing, plan.parent
    quarantine = [(path, reason, "") for path, reason in listing.rejected] + plan.repeats
    new = _decoded_records(plan, decoded, quarantine)
    kept = plan.known_rows
    # Common case of new data arriving: every parent row is still there. Then the parent's
    # counts and digest stand for them and this stage costs O(new), not O(data set).
    whole_parent = parent is not None and len(kept) == len(parent.label) and bool(parent.manifest.digest)
    classes = _classes(plan, config, _train_labels(new, parent, kept, whole_parent))
    new, kept, parent_intact = _drop_unknown_labels(
        plan, config, classes, new, kept, whole_parent, quarantine
    )
    new, kept, no_dropped = _drop_duplicates(parent, new, kept, quarantine)
    counts, digest = _counts(new, parent, kept, whole_parent and parent_intact and no_dropped)
    total = len(listing.items) + len(listing.rejected)
    _check_source(listing.uri, counts, classes, quarantine, total, config)

    digest_hex = f"{digest % 2**64:016x}"
    version = _version_id(classes, digest_hex, config.channels)
    exists = store.dataset(plan.dataset).exists(f"{version}/manifest.json")
    channels = _version_channels(new, parent, kept, config, listing.uri)
    by_split: dict[str, dict[str, int]] = {}
    for (split, label), n in sorted(counts.items()):
        by_split.setdefault(split, {})[label] = n
    return Validated(
        plan, version, classes, kept, new, quarantine, by_split, exists, channels, digest_hex, decoded
    )


def _decoded_records(plan: Plan, decoded: Staged, quarantine: list) -> list[Record]:
    """The new items that decoded; the others go to the quarantine with the decoder's reason."""
    by_id = {d.source_id: d for d in decoded}
    new: list[Record] = []
    for item in plan.new_items:
        d = by_id[item.source_id]
        if d.error:
            quarantine.append((item.path, d.error, item.source_id))
        else:
            new.append(Record(item.source_id, item.path, item.split, item.label, d))
    return new


def _train_labels(new: list[Record], parent, kept: list[int], whole_parent: bool) -> set[str]:
    present = {r.label for r in new if r.split == "train"}
    if whole_parent:
        present |= set(parent.manifest.counts.get("train", {}))
    elif parent:
        _, splits, names = parent.columns(kept)
        present |= {name for split, name in zip(splits, names) if split == "train"}
    return present


def _drop_unknown_labels(
    plan: Plan, config: IngestConfig, classes: list[str], new, kept, whole_parent: bool, quarantine: list
) -> tuple[list[Record], list[int], bool]:
    """Records (new and the parent's) whose label is not among `classes` go to the quarantine;
    the flag says whether the parent's rows all stayed."""
    parent, allowed = plan.parent, set(classes)

    def unknown(label: str | None) -> bool:
        return label is not None and label not in allowed

    for r in new:
        if unknown(r.label) and config.classes and r.label.isdigit() and int(r.label) < len(classes):
            r.label = classes[int(r.label)]  # a table may give class indices into ingest.classes
    for r in new:
        if unknown(r.label):
            reason = f"unknown label: {r.label!r} is not among the classes {classes}"
            quarantine.append((r.path, reason, r.source_id))
    new = [r for r in new if not unknown(r.label)]
    used = {c for split in parent.manifest.counts.values() for c in split} - {"-"} if whole_parent else None
    if parent and used is None:
        used = {parent.manifest.classes[lbl] for lbl in {parent.label[i] for i in kept} - {None}}
    if not parent or not any(unknown(name) for name in used):
        return new, kept, True
    for i in kept:
        if unknown(parent.names[i]):
            reason = f"unknown label: {parent.names[i]!r} is not among the classes {classes}"
            quarantine.append((parent.path[i], reason, parent.source_id[i]))
    return new, [i for i in kept if not unknown(parent.names[i])], False


def _drop_duplicates(parent, new: list[Record], kept: list[int], quarantine: list):
    """Same pixels: one copy is kept, by split (test first), then the parent's, then path;
    conflicting labels quarantine every copy. The parent's rows are unique already, so only
    groups holding a new image need a look. Returns new, kept and whether no parent row went."""
    parent_by_hash = {parent.content_hash[i]: i for i in kept} if parent else {}
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in new:
        groups[r.decoded.content_hash].append(r)
    dropped_rows: set[int] = set()
    new = []
    for chash, records in groups.items():
        copies = [(_SPLIT_PRIORITY[r.split], 1, r.path, r.label, r) for r in records]
        row = parent_by_hash.get(chash)
        if row is not None:
            copies.append((_SPLIT_PRIORITY[parent.split[row]], 0, parent.path[row], parent.names[row], row))
        if len(copies) == 1:
            new.append(records[0])
            continue
        labels = {c[3] for c in copies if c[3] is not None}
        copies.sort(key=lambda c: c[:3])
        if len(labels) > 1:
            detail = ", ".join(f"{c[2]}={c[3]}" for c in copies if c[3] is not None)
            drop, reason = copies, f"duplicate with conflicting labels: {detail}"
        else:
            drop, reason = copies[1:], f"duplicate: same image as {copies[0][2]}"
            if isinstance(copies[0][4], Record):
                new.append(copies[0][4])
        for c in drop:
            if isinstance(c[4], Record):
                quarantine.append((c[2], reason, c[4].source_id))
            else:
                dropped_rows.add(c[4])
                quarantine.append((c[2], reason, parent.source_id[c[4]]))
    if dropped_rows:
        kept = [i for i in kept if i not in dropped_rows]
    return new, kept, not dropped_rows


def _counts(new: list[Record], parent, kept: list[int], whole_parent: bool) -> tuple[Counter, int]:
    """Images per (split, label) and the content digest (a sum of per-record digests)."""
    counts: Counter = Counter((r.split, r.label or "-") for r in new)
    digest = sum(_record_digest(r.decoded.content_hash, r.split, r.label) for r in new)
    if whole_parent:
        counts.update(
            {(split, c): n for split, per in parent.manifest.counts.items() for c, n in per.items()}
        )
        digest += int(parent.manifest.digest, 16)
    elif parent:
        hashes, splits, names = parent.columns(kept)
        counts.update(zip(splits, [name or "-" for name in names]))
        digest += sum(_record_digest(h, s, n) for h, s, n in zip(hashes, splits, names))
    return counts, digest


def _version_channels(new: list[Record], parent, kept: list[int], config: IngestConfig, uri: str) -> int:
    """`ingest.channels`, else the majority's (a tie: colour, which loses nothing). Rows keep
    their own pixels; the minority is converted when loaded (grey repeated, colour averaged)."""
    colour = sum(r.decoded.channels == 3 for r in new)
    if parent is not None:
        colour += sum(parent.channels[i] == 3 for i in kept)
    total = len(new) + len(kept)
    channels = config.channels or (3 if colour and 2 * colour >= total else 1)
    converted = colour if channels == 1 else total - colour
    if converted:
        kind = "colour images become grey" if channels == 1 else "grey images become colour"
        log.info(
            "%s: %d of %d %s when loaded (the version has %d channel(s))",
            uri,
            converted,
            total,
            kind,
            channels,
        )
    return channels


def _check_source(uri, counts: Counter, classes, quarantine, total, config: IngestConfig) -> None:
    labelled = {label: n for (split, label), n in counts.items() if split == "train"}
    if not labelled:
        raise SourceError(
            f"{uri}: no labelled training images; put them in train/<class>/ (folders) or give them "
            "a label (tables)"
        )
    thin = {c: labelled.get(c, 0) for c in classes if labelled.get(c, 0) < config.min_per_class}
    if thin:
        raise SourceError(
            f"{uri}: class(es) with fewer than min_per_class={config.min_per_class} labelled training "
            f"images: {thin}; add images or lower ingest.min_per_class"
        )
    if total and len(quarantine) / total > config.max_quarantine_fraction:
        reasons = Counter(_reason_kind(r) for _, r, _ in quarantine)
        examples = "; ".join(f"{p}: {r}" for p, r, _ in quarantine[:3])
        raise SourceError(
            f"{uri}: {len(quarantine)} of {total} records failed validation, above "
            f"max_quarantine_fraction={config.max_quarantine_fraction} ({dict(reasons)}; e.g. {examples}); "
            "fix the source or raise ingest.max_quarantine_fraction"
        )


def _record_digest(content_hash: str, split: str, label: str | None) -> int:
    return int.from_bytes(hashlib.blake2b(f"{content_hash}:{split}:{label}".encode(), digest_size=8).digest())


def _version_id(classes: list[str], digest: str, channels: int | None = None) -> str:
    """The version id follows from the content: class order plus the multiset of (image, split,
    label), the latter as a sum of per-record digests, so a child extends its parent's sum."""
    key = [classes, digest] + ([channels] if channels else [])  # a fixed channel count is content too
    return f"v-{hashlib.blake2b(json.dumps(key).encode(), digest_size=8).hexdigest()}"


# ----------------------------------------------------------------------------- write + commit


def write_shards(
    validated: Validated, store: DatasetStore, config: IngestConfig
) -> tuple[list[ShardRef], int]:
    """Write the version's shards; return them and how many were the parent's, reused as they are.
    Rows stream through one shard's buffer: memory is bounded by a shard, not the data set."""
    plan, parent = validated.plan, validated.plan.parent
    ds = store.dataset(plan.dataset)
    index = {c: i for i, c in enumerate(validated.classes)}
    writer = _ShardWriter(ds, validated.version, config.shard_rows)
    reused: list[ShardRef] = []
    if parent:
        reused = _parent_rows(validated, ds, index, writer)
    staged = validated.staged
    for r in sorted(validated.new, key=lambda r: (r.split, r.label or "", r.path)):
        d = r.decoded
        pixels = staged.pixels(d) if d.offset >= 0 else d.pixels
        writer.add(
            {
                "content_hash": d.content_hash,
                "source_id": r.source_id,
                "path": r.path,
                "split": r.split,
                "label": index[r.label] if r.label is not None else None,
                "height": d.height,
                "width": d.width,
                "channels": d.channels,
                "pixels": pixels,
            }
        )
    writer.flush()
    return reused + writer.shards, len(reused)


def _parent_rows(validated: Validated, ds, index: dict[str, int], writer: _ShardWriter) -> list[ShardRef]:
    """The parent's shards whose rows all stay unchanged (returned: the child lists them as they
    are); rows of thinned or relabelled shards are copied to `writer` without decoding."""
    parent = validated.plan.parent
    remap = [index.get(c) for c in parent.manifest.classes]  # parent label index -> ours
    by_shard: dict[int, list[int]] = defaultdict(list)
    for i in validated.kept_rows:
        by_shard[parent.shard[i]].append(i)
    reused = []
    for s, ref in enumerate(parent.manifest.shards):
        rows = by_shard.get(s, [])
        labels = {parent.label[i] for i in rows} - {None}
        if len(rows) == ref.rows and all(remap[lbl] == lbl for lbl in labels):
            reused.append(ref)
        elif rows:
            table = ds.read_table(ref.path).take(pa.array([parent.row[i] for i in rows]))
            for row in table.to_pylist():
                row["label"] = None if row["label"] is None else remap[row["label"]]
                writer.add(row)
    return reused


class _ShardWriter:
    """Buffers rows and writes a shard every `max_rows` rows or SHARD_MAX_BYTES pixel bytes."""

    def __init__(self, ds, version: str, max_rows: int):
        self.ds, self.version, self.max_rows = ds, version, max_rows
        self.rows: list[dict] = []
        self.bytes = 0
        self.shards: list[ShardRef] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.bytes += len(row["pixels"])
        if len(self.rows) >= self.max_rows or self.bytes >= SHARD_MAX_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        rows, self.rows, self.bytes = self.rows, [], 0
        name = hashlib.blake2b("".join(r["content_hash"] for r in rows).encode(), digest_size=8).hexdigest()
        key = f"{self.version}/shard-{name}.parquet"
        data = self.ds.write_table(key, pa.Table.from_pylist(rows, schema=SHARD_SCHEMA))
        self.shards.append(ShardRef(path=key, sha256=hashlib.sha256(data).hexdigest(), rows=len(rows)))


def commit(
    validated: Validated, shards: list[ShardRef], store: DatasetStore, config: IngestConfig
) -> Manifest:
    """Write the quarantine, then the manifest (once). Returns the version's manifest."""
    plan = validated.plan
    ds = store.dataset(plan.dataset)
    summary = QuarantineSummary(
        count=len(validated.quarantine),
        reasons=dict(Counter(_reason_kind(r) for _, r, _ in validated.quarantine)),
    )
    if validated.quarantine:
        summary.path = f"{validated.version}/quarantine.parquet"
        rows = [{"path": p, "reason": r, "source_id": s} for p, r, s in sorted(validated.quarantine)]
        ds.write_table(summary.path, pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA))
    manifest = Manifest(
        dataset=plan.dataset,
        version=validated.version,
        parent=plan.parent.manifest.version if plan.parent else None,
        source=plan.listing.uri,
        created=now(),
        classes=validated.classes,
        channels=validated.channels,
        counts=validated.counts,
        num_images=validated.num_images,
        digest=validated.digest,
        shards=shards,
        quarantine=summary,
        settings=config.model_dump(),
    )
    if not ds.put_if_absent(f"{validated.version}/manifest.json", manifest.to_json().encode()):
        log.info("version %s was committed concurrently; keeping that one", validated.version)
        manifest = store.manifest(plan.dataset, validated.version)
    store.set_latest(plan.dataset, manifest.version)
    return manifest


def tidy(store: DatasetStore, dataset: str) -> list[str]:
    """After a commit: remove what earlier ingests, killed before theirs, left unreferenced
    (older than the store's grace period). A failure here is logged, never the ingest's."""
    try:
        return store.collect_garbage(dataset)
    except Exception as err:  # noqa: BLE001 - the version is committed; tidying is best effort
        log.warning("data set %s: could not remove unreferenced files: %s", dataset, err)
        return []


def select_existing(validated: Validated, store: DatasetStore) -> Manifest:
    """The source's content is stored already: make that version the latest (if it is not)."""
    dataset = validated.plan.dataset
    latest = store.latest(dataset)
    if latest is None or latest.version != validated.version:
        store.set_latest(dataset, validated.version)
    return store.manifest(dataset, validated.version)


def ingest(
    source: str,
    dataset: str,
    store: DatasetStore,
    config: IngestConfig | None = None,
    run: Callable[..., Any] | None = None,
) -> IngestResult:
    """Ingest `source` as a new version of `dataset` (a no-op when the content is stored already).

    Each stage goes through `run(stage, fn, *args)`, which calls `fn(*args)`: the default
    times it; the Prefect flow runs each stage as its own task (retries, UI) instead.
    """
    config = config or IngestConfig()
    clock = _Clock(run)
    plan = clock("plan", plan_ingest, source, dataset, store, config)
    try:
        return _ingest_planned(plan, store, config, clock)
    finally:
        plan.listing.close()  # a table source's open file (or its local copy of an S3 object)


def _ingest_planned(plan: Plan, store: DatasetStore, config: IngestConfig, clock: _Clock) -> IngestResult:
    dataset = plan.dataset
    with clock("decode", decode_items, plan, config) as decoded:
        validated = clock("validate", validate, plan, decoded, config, store)
        if validated.exists:
            manifest = clock("select", select_existing, validated, store)
            return IngestResult(manifest, False, len(decoded), 0, 0, validated.quarantine, clock.seconds)
        shards, reused = clock("write", write_shards, validated, store, config)
    manifest = clock("commit", commit, validated, shards, store, config)
    tidy(store, dataset)
    return IngestResult(
        manifest, True, len(decoded), reused, len(shards) - reused, validated.quarantine, clock.seconds
    )


class _Clock:
    """Runs each stage (through `run` when given) and keeps its seconds."""

    def __init__(self, run: Callable[..., Any] | None = None):
        self.run = run or (lambda stage, fn, *args: fn(*args))
        self.seconds: dict[str, float] = {}

    def __call__(self, stage, fn, *args):
        start = time.perf_counter()
        try:
            return self.run(stage, fn, *args)
        finally:
            self.seconds[stage] = round(time.perf_counter() - start, 4)
