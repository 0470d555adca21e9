"""Does a training step ever wait on data? Batch + augmentation time vs. a training step.

Ingests digits into a temporary store, loads the splits, then measures (median of
alternating repeats, 2 threads): drawing one semi-supervised batch (64 labelled + 448
unlabelled, uint8 from memory) with weak augmentation of both and strong augmentation of
the unlabelled part, against one sandwich training step of the `tiny` supernet on such a
batch (4 subnets, forward + backward + SGD). Prints both and the ratio data / step.

    .venv/bin/python benchmarks/bench_loader.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from tofa_core.arch import SearchSpace
from tofa_core.data.augment import AugmentConfig, Augmenter
from tofa_core.data.ingest import ingest
from tofa_core.data.loaders import BatchStream, load_splits
from tofa_core.data.store import DatasetStore
from tofa_core.storage import open_storage
from tofa_core.supernet import Supernet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(open_storage(tmp))
        ingest("digits", "digits", store)
        splits = load_splits(store, "digits")
    labelled, unlabelled = BatchStream(splits.train, 64, seed=0), BatchStream(splits.unlabeled, 448, seed=1)
    aug = Augmenter(AugmentConfig(hflip=False), channels=splits.channels)
    space = SearchSpace.preset("tiny", num_classes=10, in_channels=1, resolutions=(16,))
    net = Supernet(space).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    rng = random.Random(0)

    def data():
        (xl, yl), (xu, _) = next(labelled), next(unlabelled)
        return aug.weak(xl), yl, aug.weak(xu), aug.strong(xu)

    def step(batch):
        xl, yl, xw, xs = batch
        opt.zero_grad(set_to_none=True)
        for arch in (space.max_arch(), space.min_arch(), space.sample(rng), space.sample(rng)):
            F.cross_entropy(net(torch.cat([xl, xw[:64], xs[:64]]), arch)[: len(yl)], yl).backward()
        opt.step()

    t_data, t_step = [], []
    for i in range(args.steps + 3):
        start = time.perf_counter()
        batch = data()
        mid = time.perf_counter()
        step(batch)
        end = time.perf_counter()
        if i >= 3:
            t_data.append(mid - start)
            t_step.append(end - mid)
    d, s = statistics.median(t_data), statistics.median(t_step)
    result = {"data_ms": round(d * 1e3, 2), "step_ms": round(s * 1e3, 1), "data_over_step": round(d / s, 4)}
    print(f"batch (64 + 448 images, weak + strong aug): {d * 1e3:.1f} ms; training step: {s * 1e3:.0f} ms")
    print(
        f"data / step = {d / s:.1%}: data is ready long before the step needs it"
        if d < s
        else "data is slower!"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
