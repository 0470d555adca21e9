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
import io
import unicodedata
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from tofa_core.storage import LocalStorage, NotFound, Storage, StorageError, open_storage

SPLITS = ("train", "test", "unlabeled")
# Bidirectional overrides: they make a label print as another (U+202A-202E, U+2066-2069).
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
TABLE_SUFFIXES = (".parquet", ".csv")


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


@dataclass
class Listing:
    uri: str
    kind: str  # digits | folder | table
    items: list[Item]
    storage: Storage | None = None
    classes: list[str] = field(default_factory=list)  # the source's own class order, if it has one
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while listing


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


def _read_table(storage: Storage, name: str, uri: str) -> pa.Table:
    try:
        data = storage.read_bytes(name)
    except NotFound:
        raise SourceError(f"{uri}: the table does not exist") from None
    try:
        if name.lower().endswith(".csv"):
            from pyarrow import csv

            return csv.read_csv(pa.BufferReader(data))
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise SourceError(f"{uri}: not a readable {name.rsplit('.', 1)[-1]} table ({err})") from None


def _table_schema(table: pa.Table, uri: str) -> tuple[bool, bool]:
    """Check the columns a table source needs; (images inline as bytes, has a split column)."""
    columns = set(table.column_names)
    missing = {"image", "label"} - columns
    if missing:
        raise SourceError(
            f"{uri}: missing column(s) {sorted(missing)}; a table needs 'image' (bytes or a path "
            "relative to the table) and 'label' (class name or index, null = unlabelled); "
            f"it has {sorted(columns)}"
        )
    image_type = table.schema.field("image").type
    inline = pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
    if not inline and not (pa.types.is_string(image_type) or pa.types.is_large_string(image_type)):
        raise SourceError(f"{uri}: column 'image' has type {image_type}; it must hold bytes or path strings")
    label_type = table.schema.field("label").type
    if not (
        pa.types.is_integer(label_type)
        or pa.types.is_string(label_type)
        or pa.types.is_large_string(label_type)
        or pa.types.is_null(label_type)
    ):
        raise SourceError(f"{uri}: column 'label' has type {label_type}; it must hold class names or indices")
    has_split = "split" in columns
    split_type = table.schema.field("split").type if has_split else pa.string()
    if not (
        pa.types.is_string(split_type) or pa.types.is_large_string(split_type) or pa.types.is_null(split_type)
    ):
        raise SourceError(
            f"{uri}: column 'split' has type {table.schema.field('split').type}; it must be text"
        )
    return inline, has_split


def _list_table(storage: Storage, name: str, uri: str) -> Listing:
    table = _read_table(storage, name, uri)
    inline, has_split = _table_schema(table, uri)
    images = table.column("image").to_pylist()
    labels = table.column("label").to_pylist()
    splits = table.column("split").to_pylist() if has_split else [None] * len(images)
    items, rejected = [], []
    for row, (image, label, split) in enumerate(zip(images, labels, splits)):
        path = f"row {row}"
        label = None if label is None else clean_label(str(label)) or None  # an empty cell: unlabelled
        split = split or ("train" if label is not None else "unlabeled")
        if image is None or image == "" or image == b"":  # CSV reads an empty cell as ""
            rejected.append((path, "empty 'image' cell"))
            continue
        if not inline and (image.startswith("/") or ".." in image.split("/")):
            rejected.append(
                (f"{path} ({image})", "image path outside the table's folder: paths are relative to it")
            )
            continue
        if split not in SPLITS:
            rejected.append((path, f"split {split!r} is not one of {list(SPLITS)}"))
            continue
        if split == "unlabeled":
            label = None
        elif label is None:
            rejected.append((path, f"a {split} image needs a label"))
            continue
        if inline:
            digest = hashlib.blake2b(image, digest_size=16).hexdigest()
            items.append(Item(_sid(digest, split, label), path, split, label, data=image))
        else:
            path = f"row {row} ({image})"
            items.append(Item(_sid("ref", image, split, label), path, split, label, key=image))
    # Integer labels sort numerically (index order); names alphabetically.
    train_labels = {i.label for i in items if i.split == "train"}
    numeric = all(lbl.lstrip("-").isdigit() for lbl in train_labels)
    classes = sorted(train_labels, key=int if numeric else str)
    if any(i.key for i in items):
        items = _stat_referenced(storage, items, uri, rejected)
    return Listing(uri, "table", items, storage, classes, rejected)


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
