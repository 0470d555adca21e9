"""Splits and batches for training: a data set version as uint8 tensors, in memory or streamed.

Small data is the point of TOFA, so a split normally fits in memory (1,797 digits are
115 kB; 100k 32x32 RGB images are 300 MB). Batches are then index_select on those tensors:
microseconds, so a training step never waits on data. A `StreamedSet` is the places of a
split's rows in the store's shards, no pixels: `ShardStream` reads it a few shards at a time
with the next few read in the background, so memory is bounded by shards, not by the data
set. A training worker starts from those places and holds in memory only what it draws
(`worker_splits`): the labelled split and its own share of the unlabelled one, as uint8,
while they fit its `hold_bytes`; what does not fit is streamed. Augmentation (augment.py)
turns each batch to floats on whatever device the batches are moved to, so the bytes held
are the raw pixels.

Splits are deterministic and stable across versions: an image's place (validation or
training) follows from a hash of its content and the seed, not from its position, so an
image that was in validation stays there when new data arrives. Only the metadata columns
of the shards are read to decide them; pixels are read shard by shard into their split.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from tofa_core.data.store import (
    SHARD_SCHEMA,
    DatasetStore,
    Manifest,
    ShardRef,
    common_shape,
    images_array,
    read_shard,
)
from tofa_core.storage import Storage

log = logging.getLogger(__name__)
META_COLUMNS = ["content_hash", "split", "label", "height", "width", "channels"]
# Shards a ShardStream shuffles together; it holds this many and reads as many ahead.
WINDOW_SHARDS = 2


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64; -1 where unlabelled

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def shard(self, rank: int, world_size: int, seed: int = 0) -> ImageSet:
        """This worker's share: a seeded permutation cut into `world_size` near-equal parts
        (the whole set for every worker when there are fewer images than workers)."""
        _check_rank(rank, world_size)
        if len(self) < world_size:
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        mine = order[rank::world_size].sort().values
        return ImageSet(self.images[mine], self.labels[mine])

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The images at `idx`, in that order."""
        return self.images.index_select(0, idx)


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")


@dataclass
class StreamedSet:
    """A split too large to hold: where its rows are in the store's shards. Read a few shards
    at a time (`ShardStream`) or by index (`take`); never whole."""

    ds: Storage
    shards: list[ShardRef]  # only shards holding rows of this split
    rows: list[np.ndarray]  # per shard: this split's row numbers in it
    labels: list[np.ndarray]  # per shard: their labels (-1: unlabelled)
    hw: tuple[int, int]
    channels: int

    def __len__(self) -> int:
        return int(sum(len(r) for r in self.rows))

    @property
    def nbytes(self) -> int:
        """The pixel bytes of its rows as uint8: what holding it in memory costs."""
        return len(self) * self.channels * self.hw[0] * self.hw[1]

    def load(self) -> ImageSet:
        """Every row in memory, in order, filled shard by shard (one shard's table at a time)."""
        images = np.empty((len(self), self.channels, *self.hw), dtype=np.uint8)
        at = 0
        for i, rows in enumerate(self.rows):
            images[at : at + len(rows)] = _rows_of(
                read_shard(self.ds, self.shards[i]), rows, self.channels, self.hw
            )
            at += len(rows)
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, dtype=np.int64)
        return ImageSet(torch.from_numpy(images), torch.from_numpy(labels))

    def strided(self, rank: int, world_size: int, seed: int = 0) -> StreamedSet:
        """The rows `ImageSet.shard` gives this worker (a seeded permutation cut into
        `world_size` parts), still as places: a share to load, balanced to one row."""
        _check_rank(rank, world_size)
        if len(self) < world_size:
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        mine = order[rank::world_size].sort().values.numpy()
        offsets = np.cumsum([0] + [len(r) for r in self.rows])
        which = np.searchsorted(offsets, mine, side="right") - 1
        local = [mine[which == s] - offsets[s] for s in range(len(self.rows))]
        rows = [r[at] for r, at in zip(self.rows, local)]
        labels = [lbl[at] for lbl, at in zip(self.labels, local)]
        return self._subset([i for i, r in enumerate(rows) if len(r)], rows, labels)

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shard i's rows of this split: (images (n, C, H, W) uint8, labels)."""
        images = _rows_of(read_shard(self.ds, self.shards[i]), self.rows[i], self.channels, self.hw)
        return torch.from_numpy(images), torch.from_numpy(self.labels[i])

    def shard(self, rank: int, world_size: int, seed: int = 0) -> StreamedSet:
        """This worker's share: whole shards, balanced by rows over a seeded order; with fewer
        shards than workers, every worker reads every shard and keeps its stride of rows (and
        with fewer rows than workers, every worker streams them all)."""
        _check_rank(rank, world_size)
        if len(self) < world_size:
            return self
        if len(self.shards) < world_size:
            starts = np.cumsum([0] + [len(r) for r in self.rows])
            first = [(rank - start) % world_size for start in starts[:-1]]  # a stride over all rows
            rows = [r[f::world_size] for r, f in zip(self.rows, first)]
            labels = [lbl[f::world_size] for lbl, f in zip(self.labels, first)]
            keep = [i for i, r in enumerate(rows) if len(r)]
            return self._subset(keep, rows, labels)
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(seed)).tolist()
        load, mine = [0] * world_size, []
        for i in sorted(order, key=lambda i: -len(self.rows[i])):  # stable: ties keep the seeded order
            r = min(range(world_size), key=lambda r: (load[r], r))
            load[r] += len(self.rows[i])
            if r == rank:
                mine.append(i)
        return self._subset(sorted(mine), self.rows, self.labels)

    def _subset(self, keep: list[int], rows, labels) -> StreamedSet:
        return StreamedSet(
            self.ds,
            [self.shards[i] for i in keep],
            [rows[i] for i in keep],
            [labels[i] for i in keep],
            self.hw,
            self.channels,
        )

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The images at `idx` (positions in this split), in that order; one shard read at a time."""
        offsets = np.cumsum([0] + [len(r) for r in self.rows])
        wanted = idx.numpy()
        which = np.searchsorted(offsets, wanted, side="right") - 1
        out = torch.empty((len(wanted), self.channels, *self.hw), dtype=torch.uint8)
        for s in np.unique(which):
            at = np.flatnonzero(which == s)
            rows = self.rows[s][wanted[at] - offsets[s]]
            images = _rows_of(read_shard(self.ds, self.shards[s]), rows, self.channels, self.hw)
            out[torch.from_numpy(at)] = torch.from_numpy(images)
        return out


def _rows_of(table: pa.Table, rows: np.ndarray, channels: int, hw: tuple[int, int]) -> np.ndarray:
    """`rows` of a shard's table as one (n, C, H, W) uint8 array; Arrow's buffers are given
    back at once, so a stream's memory stays at its windows."""
    if len(rows) != table.num_rows or not np.array_equal(rows, np.arange(table.num_rows)):
        table = table.take(pa.array(rows))
    images = images_array(table, channels=channels, hw=hw)
    del table
    pa.default_memory_pool().release_unused()
    return images


def take(parts: list, idx: torch.Tensor) -> torch.Tensor:
    """Images at `idx` of the parts (ImageSet or StreamedSet) laid end to end."""
    offsets = np.cumsum([0] + [len(p) for p in parts])
    which = np.searchsorted(offsets, idx.numpy(), side="right") - 1
    out = None
    for k, part in enumerate(parts):
        at = torch.from_numpy(np.flatnonzero(which == k))
        if len(at) == 0:
            continue
        images = part.take(idx[at] - int(offsets[k]))
        if out is None:
            out = torch.empty((len(idx), *images.shape[1:]), dtype=torch.uint8)
        out[at] = images
    return out if out is not None else torch.empty(0, dtype=torch.uint8)


@dataclass
class DataSplits:
    dataset: str
    version: str
    classes: list[str]
    channels: int
    size: int
    train: ImageSet | StreamedSet  # labelled, for the supervised loss
    val: ImageSet  # labelled, held out from train: model and subnet selection
    unlabeled: ImageSet | StreamedSet
    test: ImageSet  # reported only

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "val", "unlabeled", "test")}


def _stable_rank(hashes: list[str], seed: int) -> np.ndarray:
    keys = [hashlib.blake2b(f"{seed}:{h}".encode(), digest_size=8).digest() for h in hashes]
    return np.argsort(np.array(keys, dtype="S8"), kind="stable")


def load_splits(
    store: DatasetStore,
    dataset: str,
    version: str | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    size: int | None = None,
    channels: int | None = None,
    hold_training: bool = True,
) -> DataSplits:
    """Load a version (default: the latest) and split it into train / val / unlabeled / test.

    Validation takes `val_fraction` of each class's labelled training images (at least one
    where the class has two or more), so every class is seen in both. Val and test are held
    in memory; train and unlabeled too, or, with `hold_training` False, only their places
    (StreamedSets): no pixels are read, and a worker then holds what `worker_splits` gives it.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    manifest: Manifest = store.manifest(dataset, version)
    ds = store.dataset(dataset)
    meta = _Meta.read(ds, manifest)
    labels, split = meta.labels, meta.split
    train_idx = np.flatnonzero(split == "train")
    val_mask = np.zeros(len(split), dtype=bool)
    for c in range(len(manifest.classes)):
        members = train_idx[labels[train_idx] == c]
        n_val = int(round(len(members) * val_fraction))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        order = _stable_rank([meta.hashes[i] for i in members], seed)
        val_mask[members[order[:n_val]]] = True
    c = channels or manifest.channels
    hw = (size, size) if size else common_shape(meta.heights, meta.widths) if len(split) else (1, 1)

    def part(mask: np.ndarray, may_stream: bool) -> ImageSet | StreamedSet:
        idx = np.flatnonzero(mask)
        if may_stream and not hold_training:
            return meta.streamed(ds, manifest.shards, idx, hw, c)
        return meta.in_memory(ds, manifest.shards, idx, hw, c)

    return DataSplits(
        dataset=dataset,
        version=manifest.version,
        classes=list(manifest.classes),
        channels=c,
        size=hw[0],
        train=part((split == "train") & ~val_mask, True),
        val=part(val_mask, False),
        unlabeled=part(split == "unlabeled", True),
        test=part(split == "test", False),
    )


def worker_splits(
    splits: DataSplits,
    rank: int,
    world_size: int,
    seed: int,
    hold_bytes: float | None,
    unlabelled: bool = True,
) -> tuple[ImageSet | StreamedSet, ImageSet | StreamedSet | None]:
    """What training worker `rank` of `world_size` draws from: the labelled split whole and its
    own share of the unlabelled split (None where `unlabelled` is False). Each is held in
    memory (uint8, its raw pixel bytes) while the two together fit `hold_bytes` (None: no
    limit), labelled first since every step draws from it; what does not fit is streamed.
    Only the share is read, never the whole split."""
    budget = float("inf") if hold_bytes is None else hold_bytes
    train = splits.train
    if isinstance(train, StreamedSet) and train.nbytes <= budget:
        train = train.load()
    budget -= train.nbytes if isinstance(train, ImageSet) else 0
    rest = splits.unlabeled
    if not unlabelled:
        return train, None
    if isinstance(rest, ImageSet):
        return train, rest.shard(rank, world_size, seed)
    share = rest.strided(rank, world_size, seed)
    if share.nbytes <= budget:
        return train, share.load()
    return train, rest.shard(rank, world_size, seed)  # whole shards: each read by one worker


@dataclass
class _Meta:
    """Every row's metadata (no pixels) and its place: shard number and row within it."""

    shard: np.ndarray
    row: np.ndarray
    labels: np.ndarray  # -1: unlabelled
    split: np.ndarray
    hashes: list[str]
    heights: np.ndarray
    widths: np.ndarray

    @classmethod
    def read(cls, ds: Storage, manifest: Manifest) -> _Meta:
        # Column reads: the pixel pages are never read here.
        tables = [ds.read_table(ref.path, META_COLUMNS) for ref in manifest.shards]
        sizes = [t.num_rows for t in tables]
        table = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table().select(META_COLUMNS)
        labels = table.column("label").to_numpy(zero_copy_only=False)
        return cls(
            shard=np.repeat(np.arange(len(sizes)), sizes),
            row=np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, dtype=np.int64),
            labels=np.where(np.isnan(labels.astype(float)), -1, labels).astype(np.int64),
            split=np.array(table.column("split").to_pylist()),
            hashes=table.column("content_hash").to_pylist(),
            heights=table.column("height").to_numpy(),
            widths=table.column("width").to_numpy(),
        )

    def in_memory(self, ds, shards: list[ShardRef], idx: np.ndarray, hw, channels: int) -> ImageSet:
        """The rows `idx` as tensors, filled shard by shard (no copy of the whole version)."""
        images = np.empty((len(idx), channels, *hw), dtype=np.uint8)
        for s in np.unique(self.shard[idx]):
            at = np.flatnonzero(self.shard[idx] == s)
            images[at] = _rows_of(read_shard(ds, shards[s]), self.row[idx[at]], channels, hw)
        return ImageSet(torch.from_numpy(images), torch.from_numpy(self.labels[idx]))

    def streamed(self, ds, shards: list[ShardRef], idx: np.ndarray, hw, channels: int) -> StreamedSet:
        held = np.unique(self.shard[idx])
        rows = [self.row[idx[self.shard[idx] == s]] for s in held]
        labels = [self.labels[idx[self.shard[idx] == s]] for s in held]
        return StreamedSet(ds, [shards[s] for s in held], rows, labels, hw, channels)


class BatchStream:
    """Endless shuffled batches of one ImageSet: a new seeded permutation every pass.

    Labelled and unlabelled sets differ in size by orders of magnitude, so training draws
    from two streams at its own pace instead of zipping epochs.
    """

    def __init__(
        self, data: ImageSet, batch_size: int, seed: int = 0, device: torch.device | str | None = None
    ):
        if len(data) == 0:
            raise ValueError("cannot draw batches from an empty set")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data, self.batch_size = data, batch_size
        self.device = torch.device(device) if device is not None else data.images.device
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self.passes = 0

    def state_dict(self) -> dict:
        """Where the stream is: resuming from it draws the same batches an unbroken run would."""
        return {
            "gen": self.generator.get_state(),
            "order": self._order.clone(),
            "passes": self.passes,
            "size": len(self.data),
        }

    def load_state_dict(self, state: dict) -> None:
        if "gen" not in state or state.get("size", len(self.data)) != len(self.data):
            _restart_warning(state, len(self.data))
            return
        self.generator.set_state(state["gen"])
        self._order, self.passes = state["order"], state["passes"]

    def close(self) -> None:
        pass

    def _indices(self) -> torch.Tensor:
        out = []
        need = self.batch_size
        while need > 0:
            if len(self._order) == 0:
                self._order = torch.randperm(len(self.data), generator=self.generator)
                self.passes += 1
            take, self._order = self._order[:need], self._order[need:]
            out.append(take)
            need -= len(take)
        return torch.cat(out) if len(out) > 1 else out[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._indices()
        x = self.data.images.index_select(0, idx)
        y = self.data.labels.index_select(0, idx)
        if x.device != self.device:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y


class ShardStream:
    """Endless shuffled batches of a StreamedSet, holding a bounded window of shards.

    Every pass visits the set's shards in a new seeded order, WINDOW_SHARDS at a time,
    shuffles each window's rows, and reads the next window in a background thread while
    this one is drawn: memory is two windows, whatever the set's size. The same seed draws
    the same batches; `state_dict` (the pass and how many rows of it were drawn) resumes
    exactly, re-reading only the window it stopped in.
    """

    def __init__(
        self,
        data: StreamedSet,
        batch_size: int,
        seed: int = 0,
        device: torch.device | str | None = None,
        window: int = WINDOW_SHARDS,
    ):
        if len(data) == 0:
            raise ValueError("cannot draw batches from an empty set")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data, self.batch_size, self.seed, self.window = data, batch_size, seed, window
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.passes, self.drawn = 0, 0
        self._gen = torch.Generator()
        self._plan: list[list[int]] = []  # this pass's windows not yet loaded
        self._x = self._y = self._perm = None
        self._pos = 0
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="shard-stream")
        self._ahead = None  # (window, future) being read

    def state_dict(self) -> dict:
        return {"passes": self.passes, "drawn": self.drawn, "size": len(self.data)}

    def load_state_dict(self, state: dict) -> None:
        if "drawn" not in state or state.get("size") != len(self.data):
            _restart_warning(state, len(self.data))
            return
        self._x = self._perm = self._ahead = None
        self._plan, self.passes = [], state["passes"] - 1
        if state["passes"] == 0:
            self.passes = 0
            return
        self._begin_pass()
        skip = state["drawn"]
        while self._plan and self._rows(self._plan[0]) <= skip:  # whole windows: no need to read them
            n = self._rows(self._plan.pop(0))
            torch.randperm(n, generator=self._gen)  # keeps the generator where the run had it
            skip, self.drawn = skip - n, self.drawn + n
        if skip:
            self._load_window()
            self._pos, self.drawn = skip, self.drawn + skip

    def close(self) -> None:
        """Stop reading ahead and let go of the windows."""
        self._reader.shutdown(wait=True, cancel_futures=True)
        self._x = self._y = self._perm = self._ahead = None

    def _rows(self, shard_ids: list[int]) -> int:
        return int(sum(len(self.data.rows[i]) for i in shard_ids))

    def _begin_pass(self) -> None:
        self.passes, self.drawn = self.passes + 1, 0
        self._gen.manual_seed(self.seed * 1_000_003 + self.passes)
        order = torch.randperm(len(self.data.shards), generator=self._gen).tolist()
        self._plan = [order[i : i + self.window] for i in range(0, len(order), self.window)]

    def _read(self, shard_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A window's rows, each shard copied into place as it is read (one shard in flight)."""
        n, data = self._rows(shard_ids), self.data
        x, y = torch.empty((n, data.channels, *data.hw), dtype=torch.uint8), torch.empty(n, dtype=torch.long)
        at = 0
        for i in shard_ids:
            xi, yi = data.read(i)
            x[at : at + len(xi)], y[at : at + len(yi)] = xi, yi
            at += len(xi)
        return x, y

    def _load_window(self) -> None:
        if not self._plan:
            self._begin_pass()
        ids = self._plan.pop(0)
        ahead, self._ahead = self._ahead, None
        self._x, self._y = ahead[1].result() if ahead and ahead[0] == ids else self._read(ids)
        self._perm, self._pos = torch.randperm(len(self._x), generator=self._gen), 0
        if self._plan:
            self._ahead = (self._plan[0], self._reader.submit(self._read, self._plan[0]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys, need = [], [], self.batch_size
        while need > 0:
            if self._perm is None or self._pos >= len(self._perm):
                self._load_window()
            take = self._perm[self._pos : self._pos + need]
            self._pos, self.drawn, need = self._pos + len(take), self.drawn + len(take), need - len(take)
            xs.append(self._x.index_select(0, take))
            ys.append(self._y.index_select(0, take))
        x, y = (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))
        if x.device != self.device:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y


def _restart_warning(state: dict, size: int) -> None:
    log.warning(
        "a checkpointed batch stream (%s, %s images) does not fit this one (%d images): it "
        "starts afresh; the resumed run draws other batches than an unbroken one would",
        "streamed" if "drawn" in state else "in memory",
        state.get("size", "?"),
        size,
    )


def stream_of(data: ImageSet | StreamedSet, batch_size: int, seed: int = 0, device=None):
    """Endless shuffled batches of a split, in memory or streamed."""
    if isinstance(data, StreamedSet):
        return ShardStream(data, batch_size, seed=seed, device=device)
    return BatchStream(data, batch_size, seed=seed, device=device)
