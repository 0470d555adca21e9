"""What quantization-aware training costs: one sandwich step with fake quantization on against off.

The step is the pipeline's own (`train_step`, default TrainConfig: the largest, the smallest and
one random subnet, 32 labelled + 2 x 96 unlabelled images) on the space a data set gets: tiny-fused
for 8 px (digits), small-fused for 28 px (Fashion-MNIST). Steps alternate between the two modes so
that machine noise hits both alike. Prints the median seconds of each, their ratio, and what the
ratio makes of a whole training run whose last `qat_fraction` of epochs are quantization-aware.

    .venv/bin/python benchmarks/bench_qat_step.py [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from tofa_core.arch import SearchSpace
from tofa_core.supernet import Supernet
from tofa_core.supernet.quant import set_fake_quant
from tofa_core.training.config import TrainConfig
from tofa_core.training.step import sandwich, train_step


def one_space(preset: str, side: int, steps: int, cfg: TrainConfig) -> dict:
    space = SearchSpace.preset(preset, num_classes=10, in_channels=1, resolutions=(side,))
    net = Supernet(space).train()
    rng = random.Random(0)
    x, y = torch.rand(cfg.batch_size, 1, side, side), torch.randint(0, 10, (cfg.batch_size,))
    u = torch.rand(cfg.batch_size * cfg.mu, 1, side, side)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * (steps + 2)):
        on = bool(i % 2)
        set_fake_quant(net, on)
        archs = sandwich(space, rng, cfg.k_random)
        started = time.perf_counter()
        train_step(net, archs, x, y, u, u, cfg)
        net.zero_grad(set_to_none=True)
        if i >= 4:  # the first two of each warm up
            times[on].append(time.perf_counter() - started)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    ratio = on / off
    return {
        "space": preset,
        "side": side,
        "float_step_s": round(off, 4),
        "fake_quant_step_s": round(on, 4),
        "ratio": round(ratio, 2),
        "run_cost_vs_float": round(1 + cfg.qat_fraction * (ratio - 1), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Ray worker's share)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TrainConfig()
    for preset, side in (("tiny-fused", 8), ("small-fused", 28)):
        print(json.dumps(one_space(preset, side, args.steps, cfg)), flush=True)


if __name__ == "__main__":
    main()
