"""Sources: what a data set is made of before it is ingested.

A source is `digits` (scikit-learn's bundled 8x8 digits), a folder (`train/<class>/*`,
optional `test/<class>/*` and `unlabeled/**`), or a Parquet/CSV table (`image`, `label`,
optional `split`); folders and tables may live on local disk or under `s3://`. Listing a
source reads no pixels: each item carries a `source_id` that changes whenever the item
does (path, size and mtime/ETag, plus its label and split), so a re-ingest decodes only
items it has not seen.
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tofa_core.storage import LocalStorage, NotFound, Storage, StorageError, open_storage

SPLITS = ("train", "test", "unlabeled")
# Bidirectional overrides: they make a label print as another (U+202A-202E, U+2066-2069).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
TABLE_SUFFIXES = (".parquet", ".csv")
TABLE_BATCH = 512  # rows of a table read at a time


class SourceError(ValueError):
    """The source as a whole cannot be ingested; the message names it and the fix."""


class Item(NamedTuple):  # a tuple: a listing makes one per file, tens of thousands
    source_id: str
    path: str  # shown in the quarantine: a file key, or "row N" of a table
    split: str
    label: str | None
    key: str | None = None  # read the bytes from this key of `Listing.storage`
    data: bytes | None = None  # or take them inline (table cells)
    array: np.ndarray | None = None  # or take already-decoded pixels (digits)
    row: int | None = None  # or read them from this row of `Listing.cells` (a Parquet table)


@dataclass
class Listing:
    uri: str
    kind: str  # digits | folder | table
    items: list[Item]
    storage: Storage | None = None
    classes: list[str] = field(default_factory=list)  # the source's own class order, if it has one
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while listing
    cells: TableCells | None = None  # a Parquet table's image cells, for the items with a `row`

    def close(self) -> None:
        if self.cells is not None:
            self.cells.close()


def _sid(*parts: object) -> str:
    return "|".join(str(p) for p in parts)


def list_source(uri: str, *, labelled_fraction: float, test_fraction: float, seed: int) -> Listing:
    """List a source's items without decoding them."""
    if uri == "digits":
        return _list_digits(labelled_fraction, test_fraction, seed)
    text = str(uri).rstrip("/")
    if text.lower().endswith(TABLE_SUFFIXES):
        parent, _, name = text.rpartition("/")
        storage = open_storage(parent or ".", confined=True)
        return _list_table(storage, name, text)
    storage = open_storage(text, confined=True)
    if isinstance(storage, LocalStorage) and not storage.path.is_dir():
        raise SourceError(f"{uri}: no such folder (a source is digits, a folder, or a .parquet/.csv table)")
    return _list_folder(storage, text)


def _list_digits(labelled_fraction: float, test_fraction: float, seed: int) -> Listing:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # 0..16 grey levels -> 0..255 uint8
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    index = np.arange(len(images))
    rest, test = train_test_split(index, test_size=test_fraction, stratify=digits.target, random_state=seed)
    if labelled_fraction >= 1.0:  # every training image labelled (sklearn refuses train_size=1.0)
        labelled = rest
    else:
        labelled, _ = train_test_split(
            rest, train_size=labelled_fraction, stratify=digits.target[rest], random_state=seed
        )
    split = np.full(len(images), "unlabeled", dtype=object)
    split[test] = "test"
    split[labelled] = "train"
    items = []
    for i in index:
        label = str(digits.target[i]) if split[i] != "unlabeled" else None
        items.append(
            Item(_sid("digits", i, split[i], label), f"digits[{i}]", split[i], label, array=images[i])
        )
    return Listing("digits", "digits", items, classes=[str(c) for c in range(10)])


def _list_folder(storage: Storage, uri: str) -> Listing:
    items, rejected, skipped = [], [], []
    for o in storage.walk(rejected=skipped):  # unsorted: ingest orders what it writes itself
        top, _, rest = o.key.partition("/")
        if top not in SPLITS:
            continue  # README, manifests, other folders: not images of this source
        label, slash, _ = rest.partition("/")
        label = clean_label(label)
        if top == "unlabeled":
            label = None
        elif not slash or not label:
            rejected.append((o.key, f"{top}/ images must sit in a class folder: {top}/<class>/<file>"))
            continue
        items.append(Item(f"{o.key}|{top}|{label}|{o.size}|{o.tag}", o.key, top, label, o.key))
    rejected += [(key, reason) for key, reason in skipped if key.partition("/")[0] in SPLITS]
    if not any(i.split == "train" for i in items):
        raise SourceError(
            f"{uri}: no train/ folder with images; a folder source holds train/<class>/* "
            "(and optionally test/<class>/* and unlabeled/**)"
        )
    classes = sorted({i.label for i in items if i.split == "train" and i.label is not None})
    return Listing(uri, "folder", items, storage, classes, rejected)


def _open_table(storage: Storage, name: str, uri: str) -> tuple[pa.Table | None, pq.ParquetFile | None]:
    """A CSV whole (it holds paths, not images), or a Parquet file to read a batch at a time:
    a table of encoded images can be larger than memory."""
    try:
        if name.lower().endswith(".csv"):
            from pyarrow import csv

            return csv.read_csv(pa.BufferReader(storage.read_bytes(name))), None
        f = storage.open_file(name)
    except NotFound:
        raise SourceError(f"{uri}: the table does not exist") from None
    try:
        # pre_buffer off, a small buffer: one column chunk (a whole row group, often the whole
        # table) is never read at once, only pages as the batches need them.
        return None, pq.ParquetFile(f, pre_buffer=False, buffer_size=2**20)
    except (pa.ArrowInvalid, OSError) as err:
        f.close()
        raise SourceError(f"{uri}: not a readable {name.rsplit('.', 1)[-1]} table ({err})") from None


def _table_schema(schema: pa.Schema, uri: str) -> tuple[bool, bool]:
    """Check the columns a table source needs; (images inline as bytes, has a split column)."""
    columns = set(schema.names)
    missing = {"image", "label"} - columns
    if missing:
        raise SourceError(
            f"{uri}: missing column(s) {sorted(missing)}; a table needs 'image' (bytes or a path "
            "relative to the table) and 'label' (class name or index, null = unlabelled); "
            f"it has {sorted(columns)}"
        )
    image_type = schema.field("image").type
    inline = pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
    if not inline and not (pa.types.is_string(image_type) or pa.types.is_large_string(image_type)):
        raise SourceError(f"{uri}: column 'image' has type {image_type}; it must hold bytes or path strings")
    label_type = schema.field("label").type
    if not (
        pa.types.is_integer(label_type)
        or pa.types.is_string(label_type)
        or pa.types.is_large_string(label_type)
        or pa.types.is_null(label_type)
    ):
        raise SourceError(f"{uri}: column 'label' has type {label_type}; it must hold class names or indices")
    has_split = "split" in columns
    split_type = schema.field("split").type if has_split else pa.string()
    if not (
        pa.types.is_string(split_type) or pa.types.is_large_string(split_type) or pa.types.is_null(split_type)
    ):
        raise SourceError(f"{uri}: column 'split' has type {schema.field('split').type}; it must be text")
    return inline, has_split


def _list_table(storage: Storage, name: str, uri: str) -> Listing:
    table, parquet = _open_table(storage, name, uri)
    schema = table.schema if table is not None else parquet.schema_arrow
    inline, has_split = _table_schema(schema, uri)
    columns = ["image", "label"] + (["split"] if has_split else [])
    batches = (
        table.to_batches(TABLE_BATCH)
        if table is not None
        else parquet.iter_batches(TABLE_BATCH, columns=columns)
    )
    items, rejected, row = [], [], 0
    for batch in batches:
        images = batch.column(0)  # a cell at a time: a batch of encoded images is never copied whole
        labels = batch.column(1).to_pylist()
        splits = batch.column(2).to_pylist() if has_split else [None] * batch.num_rows
        for i, (label, split) in enumerate(zip(labels, splits)):
            _table_item(row, images[i].as_py(), label, split, inline, items, rejected)
            row += 1
    # Integer labels sort numerically (index order); names alphabetically.
    train_labels = {i.label for i in items if i.split == "train"}
    numeric = all(lbl.lstrip("-").isdigit() for lbl in train_labels)
    classes = sorted(train_labels, key=int if numeric else str)
    if any(i.key for i in items):
        items = _stat_referenced(storage, items, uri, rejected)
    cells = TableCells(parquet) if inline and parquet is not None else None
    return Listing(uri, "table", items, storage, classes, rejected, cells)


def _table_item(row: int, image, label, split, inline: bool, items: list, rejected: list) -> None:
    """Row `row` as an Item (its image cell left in the table: `TableCells` reads it again), or
    its reason in `rejected`."""
    path = f"row {row}"
    label = None if label is None else clean_label(str(label)) or None  # an empty cell: unlabelled
    split = split or ("train" if label is not None else "unlabeled")
    if image is None or image == "" or image == b"":  # CSV reads an empty cell as ""
        rejected.append((path, "empty 'image' cell"))
        return
    if not inline and (image.startswith("/") or ".." in image.split("/")):
        rejected.append(
            (f"{path} ({image})", "image path outside the table's folder: paths are relative to it")
        )
        return
    if split not in SPLITS:
        rejected.append((path, f"split {split!r} is not one of {list(SPLITS)}"))
        return
    if split == "unlabeled":
        label = None
    elif label is None:
        rejected.append((path, f"a {split} image needs a label"))
        return
    if inline:
        digest = hashlib.blake2b(image, digest_size=16).hexdigest()
        items.append(Item(_sid(digest, split, label), path, split, label, row=row))
    else:
        items.append(Item(_sid("ref", image, split, label), f"row {row} ({image})", split, label, key=image))


class TableCells:
    """The image cells of a Parquet table, read again a batch at a time in row order: a decode
    holds a batch of encoded images, never the table."""

    def __init__(self, parquet: pq.ParquetFile):
        self.parquet = parquet

    def read(self, rows: list[int]) -> Iterator[tuple[int, bytes]]:
        """(row, image bytes) for each of `rows` (ascending), in that order."""
        wanted, at, first = np.asarray(rows, dtype=np.int64), 0, 0
        for batch in self.parquet.iter_batches(TABLE_BATCH, columns=["image"]):
            last = first + batch.num_rows
            column = batch.column(0)
            while at < len(wanted) and wanted[at] < last:
                yield int(wanted[at]), column[int(wanted[at]) - first].as_py()
                at += 1
            if at == len(wanted):
                return
            first = last

    def close(self) -> None:
        self.parquet.close()


def _stat_referenced(storage: Storage, items: list[Item], uri: str, rejected: list) -> list[Item]:
    """Fold each referenced file's size and mtime/ETag into its source_id (no reads, and only
    the files the rows name: never a walk of the table's folder)."""
    refused: list[tuple[str, str]] = []
    try:
        info = storage.stat(sorted({i.key for i in items if i.key is not None}), refused)
    except StorageError as err:
        raise SourceError(f"{uri}: cannot list the files the table refers to ({err})") from None
    why = dict(refused)
    out = []
    for item in items:
        if item.key in why:
            rejected.append((item.path, why[item.key]))
            continue
        o = info.get(item.key) if item.key is not None else None
        out.append(item._replace(source_id=_sid(item.source_id, o.size, o.tag)) if o else item)
    return out


@functools.lru_cache(maxsize=4096)  # a listing asks once per file, for a handful of class names
def clean_label(label: str) -> str:
    """A label as stored: control characters (newlines, escapes, NUL) dropped, spaces trimmed."""
    kept = (ch for ch in label if unicodedata.category(ch) not in ("Cc", "Cs") and ch not in _BIDI)
    return "".join(kept).strip()
