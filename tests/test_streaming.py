"""Training splits larger than memory: a StreamedSet is read a window of shards at a time by
ShardStream, never whole. It holds the same images as the in-memory split; the same seed draws
the same batches; a resumed stream continues exactly, so training on streamed splits resumes
after a crash to the same weights as an unbroken run."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from recompute import assert_reported

from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.loaders import ImageSet, ShardStream, StreamedSet, load_splits, take, worker_splits
from tofa_core.data.store import DatasetStore
from tofa_core.storage import open_storage
from tofa_core.training.checkpoint import load_checkpoint
from tofa_core.training.config import TrainConfig
from tofa_core.training.loop import train_supernet

SIDE, UNLABELLED, SHARD_ROWS = 12, 600, 40


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two classes of 20 labelled images, 600 unlabelled, 10 test; shards of 40 rows (17 shards)."""
    root = tmp_path_factory.mktemp("streaming")
    rng = np.random.default_rng(0)

    def save(path, cls: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 120, (SIDE, SIDE, 3), dtype=np.uint8)
        img[:, cls * 6 : cls * 6 + 6] += 120  # a learnable half
        Image.fromarray(img).save(path)

    for i in range(40):
        save(root / "src" / "train" / f"c{i % 2}" / f"{i}.png", i % 2)
    for i in range(10):
        save(root / "src" / "test" / f"c{i % 2}" / f"{i}.png", i % 2)
    for i in range(UNLABELLED):
        save(root / "src" / "unlabeled" / f"{i:04d}.png", i % 2)
    store = DatasetStore(open_storage(root / "store"))
    ingest(str(root / "src"), "big", store, IngestConfig(workers=1, shard_rows=SHARD_ROWS))
    return store


def digest(images: torch.Tensor) -> list[str]:
    return [hashlib.blake2b(x.numpy().tobytes(), digest_size=8).hexdigest() for x in images]


def test_large_training_splits_stream_and_hold_the_same_images(store):
    held = load_splits(store, "big")
    streamed = load_splits(store, "big", hold_training=False)
    assert isinstance(streamed.unlabeled, StreamedSet) and isinstance(streamed.train, StreamedSet)
    assert isinstance(streamed.val, ImageSet) and isinstance(streamed.test, ImageSet)  # labelled: held
    assert streamed.sizes() == held.sizes() == {"train": 36, "val": 4, "unlabeled": UNLABELLED, "test": 10}
    for name in ("train", "unlabeled"):
        s, h = getattr(streamed, name), getattr(held, name)
        everything = torch.arange(len(h))
        assert torch.equal(s.take(everything), h.images)
        assert torch.equal(torch.cat([torch.from_numpy(x) for x in s.labels]), h.labels)
    pick = torch.randperm(36 + UNLABELLED, generator=torch.Generator().manual_seed(3))[:50]
    both = torch.cat([held.train.images, held.unlabeled.images])[pick]
    assert torch.equal(take([streamed.train, streamed.unlabeled], pick), both)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_workers_strided_share_holds_what_shard_gives_it_read_from_the_places(store, world):
    held = load_splits(store, "big").unlabeled
    places = load_splits(store, "big", hold_training=False).unlabeled
    shares = [places.strided(rank, world, seed=5) for rank in range(world)]
    for rank, share in enumerate(shares):
        expect = held.shard(rank, world, seed=5)
        loaded = share.load()
        assert share.nbytes == expect.nbytes == len(expect) * 3 * SIDE * SIDE
        assert torch.equal(loaded.images, expect.images) and torch.equal(loaded.labels, expect.labels)
    assert sum(len(s) for s in shares) == UNLABELLED and max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_worker_holds_the_labelled_split_and_its_share_while_they_fit_and_streams_the_rest(store):
    places = load_splits(store, "big", hold_training=False)
    labelled, share = places.train.nbytes, places.unlabeled.strided(1, 2, seed=5).nbytes
    train, mine = worker_splits(places, 1, 2, 5, labelled + share)
    assert isinstance(train, ImageSet) and isinstance(mine, ImageSet) and mine.nbytes == share
    assert torch.equal(mine.images, places.unlabeled.strided(1, 2, seed=5).load().images)
    train, mine = worker_splits(places, 1, 2, 5, labelled + share - 1)  # one byte short: streamed
    assert isinstance(train, ImageSet) and isinstance(mine, StreamedSet)
    assert [s.path for s in mine.shards] == [s.path for s in places.unlabeled.shard(1, 2, seed=5).shards]
    train, mine = worker_splits(places, 1, 2, 5, labelled - 1)
    assert isinstance(train, StreamedSet) and isinstance(mine, StreamedSet)
    train, mine = worker_splits(places, 0, 2, 5, 0, unlabelled=False)
    assert isinstance(train, StreamedSet) and mine is None


def test_a_pass_draws_every_image_once_reading_each_shard_once(store, monkeypatch):
    data = load_splits(store, "big", hold_training=False).unlabeled
    reads = []
    original = StreamedSet.read
    monkeypatch.setattr(StreamedSet, "read", lambda self, i: reads.append(i) or original(self, i))
    stream = ShardStream(data, 64, seed=1, window=2)
    seen, held = [], 0
    while len(seen) < UNLABELLED:
        x, y = next(stream)
        assert x.shape == (64, 3, SIDE, SIDE) and (y == -1).all()
        seen += digest(x)
        held = max(held, len(stream._x))
    first_pass = seen[:UNLABELLED]
    assert sorted(first_pass) == sorted(digest(data.take(torch.arange(UNLABELLED))))
    assert held <= 2 * SHARD_ROWS  # a window of two shards, never the split
    assert sorted(reads[: len(data.shards)]) == list(range(len(data.shards)))  # each shard once a pass


def test_same_seed_same_batches_and_a_resumed_stream_continues_exactly(store):
    data = load_splits(store, "big", hold_training=False).unlabeled
    a, b = ShardStream(data, 48, seed=5), ShardStream(data, 48, seed=5)
    for _ in range(20):  # across a pass boundary
        assert torch.equal(next(a)[0], next(b)[0])
    assert a.passes == 2
    state = a.state_dict()
    expected = [next(a)[0] for _ in range(15)]
    resumed = ShardStream(data, 48, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)[0], x) for x in expected)
    assert not torch.equal(next(ShardStream(data, 48, seed=6))[0], next(ShardStream(data, 48, seed=5))[0])


@pytest.mark.parametrize("world", [2, 3, 40])
def test_workers_share_the_rows_without_overlap(store, world):
    data = load_splits(store, "big", hold_training=False).unlabeled
    shares = [data.shard(rank, world, seed=0) for rank in range(world)]
    rows = [digest(s.take(torch.arange(len(s)))) for s in shares]
    assert sorted(sum(rows, [])) == sorted(digest(data.take(torch.arange(len(data)))))
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= (SHARD_ROWS if world <= len(data.shards) else 1)
    with pytest.raises(ValueError, match="rank"):
        data.shard(world, world)


@pytest.mark.slow
def test_training_on_streamed_splits_resumes_exactly(store, tmp_path):
    cfg = TrainConfig(
        epochs=2, steps_per_epoch=3, batch_size=8, mu=4, k_random=1, resolutions=(8,), calib_images=32,
        threads=1, in_memory_mb=0,
    )  # fmt: skip
    straight = train_supernet(cfg, store, "big", open_storage(tmp_path / "a"))
    assert len(straight.history) == 2
    assert_reported(straight.final, store, str(tmp_path / "a"))

    def crash(metrics):
        if metrics["epoch"] == 1:
            raise RuntimeError("killed")

    run_b = open_storage(tmp_path / "b")
    with pytest.raises(RuntimeError, match="killed"):
        train_supernet(cfg, store, "big", run_b, report=crash)
    resumed = train_supernet(cfg, store, "big", run_b)
    a = load_checkpoint(open_storage(tmp_path / "a"), "supernet.pt")["model"]
    b = load_checkpoint(run_b, "supernet.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert resumed.final == straight.final


def test_a_checkpoint_of_another_kind_of_stream_restarts_it_with_a_warning(store, caplog):
    """The split switched between in memory and streamed (in_memory_mb changed), or the worker
    count changed its size: the stream starts afresh instead of failing the resume."""
    from tofa_core.data.loaders import BatchStream

    held = load_splits(store, "big").unlabeled
    streamed = load_splits(store, "big", hold_training=False).unlabeled
    memory_state = BatchStream(held, 16, seed=1).state_dict()
    fresh = ShardStream(streamed, 16, seed=1)
    fresh.load_state_dict(memory_state)
    assert torch.equal(next(fresh)[0], next(ShardStream(streamed, 16, seed=1))[0])
    other = BatchStream(held, 16, seed=1)
    other.load_state_dict(ShardStream(streamed, 16, seed=1).state_dict())
    half = ShardStream(streamed.shard(0, 2), 16, seed=1)
    half.load_state_dict(ShardStream(streamed, 16, seed=1).state_dict())
    assert half.passes == 0 and "starts afresh" in caplog.text
    half.close()
    assert half._x is None


def test_fewer_images_than_workers_leave_no_worker_empty(store):
    streamed = load_splits(store, "big", hold_training=False)
    few = streamed.train.shard(0, 20)  # 36 labelled training images over 20 workers: 1-2 each
    assert len(few) in (1, 2)
    tiny = few.shard(1, 4)  # fewer images than workers: every worker gets them all
    assert len(tiny) == len(few) and next(ShardStream(tiny, 4))[0].shape[0] == 4
    held = load_splits(store, "big").train
    assert len(ImageSet(held.images[:3], held.labels[:3]).shard(2, 8)) == 3
