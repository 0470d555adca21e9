"""Splits and batches for training: a data set version held in memory as uint8 tensors.

Small data is the point of TOFA, so a whole version fits in memory (1,797 digits are
115 kB; 100k 32x32 RGB images are 300 MB). Batches are index_select on those tensors:
microseconds, so a training step never waits on data. Augmentation (augment.py) then runs
batched on the same tensors, on whatever device they are moved to.

Splits are deterministic and stable across versions: an image's place (validation or
training) follows from a hash of its content and the seed, not from its position, so an
image that was in validation stays there when new data arrives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from tofa_core.data.store import DatasetStore, Manifest, images_array


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64; -1 where unlabelled

    def __len__(self) -> int:
        return self.images.shape[0]

    def shard(self, rank: int, world_size: int, seed: int = 0) -> ImageSet:
        """This worker's share: a seeded permutation cut into `world_size` near-equal parts."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        mine = order[rank::world_size].sort().values
        return ImageSet(self.images[mine], self.labels[mine])


@dataclass
class DataSplits:
    dataset: str
    version: str
    classes: list[str]
    channels: int
    size: int
    train: ImageSet  # labelled, for the supervised loss
    val: ImageSet  # labelled, held out from train: model and subnet selection
    unlabeled: ImageSet
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
) -> DataSplits:
    """Load a version (default: the latest) and split it into train / val / unlabeled / test.

    Validation takes `val_fraction` of each class's labelled training images (at least one
    where the class has two or more), so every class is seen in both.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    manifest: Manifest = store.manifest(dataset, version)
    table = store.read_shards(manifest)
    images = images_array(table, size=size, channels=channels or manifest.channels)
    labels = table.column("label").to_numpy(zero_copy_only=False)
    labels = np.where(np.isnan(labels.astype(float)), -1, labels).astype(np.int64)
    split = np.array(table.column("split").to_pylist())
    hashes = table.column("content_hash").to_pylist()

    train_idx = np.flatnonzero(split == "train")
    val_mask = np.zeros(len(split), dtype=bool)
    for c in range(len(manifest.classes)):
        members = train_idx[labels[train_idx] == c]
        n_val = int(round(len(members) * val_fraction))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        order = _stable_rank([hashes[i] for i in members], seed)
        val_mask[members[order[:n_val]]] = True

    def subset(mask: np.ndarray) -> ImageSet:
        idx = np.flatnonzero(mask)
        return ImageSet(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]))

    return DataSplits(
        dataset=dataset,
        version=manifest.version,
        classes=list(manifest.classes),
        channels=images.shape[1],
        size=images.shape[2],
        train=subset((split == "train") & ~val_mask),
        val=subset(val_mask),
        unlabeled=subset(split == "unlabeled"),
        test=subset(split == "test"),
    )


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
        return {"gen": self.generator.get_state(), "order": self._order.clone(), "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["gen"])
        self._order, self.passes = state["order"], state["passes"]

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
