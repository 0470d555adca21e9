"""Specialization cost per target, and TOFA's constant-cost claim: pipeline time at 32 targets
over pipeline time at 1 target (issue: <= 1.3; seconds per target: aim <= 5 s here).

One supernet (trained here with the default config on digits, unless --store/--run name one)
and one accuracy predictor serve every target. For N = 1, 8, 32, 128 generated targets
(budgets on MACs, parameters or both, log-uniform between the smallest and largest subnet),
each target is searched, exported (ONNX + TorchScript) and verified, one after another.
Pipeline time(N) = training + predictor + specialization of N targets.

    .venv/bin/python benchmarks/bench_targets.py [--counts 1,8,32,128] [--store DIR --run RUN] \
        [--alone-seconds S]

With --alone-seconds (the mean time to train one target's architecture alone, (c) of
bench_quality.py), the table adds the cost claim: N x S against TOFA's pipeline time at N.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time

import torch
from _trained import default_supernet

from tofa_core.costs import count_macs, count_params
from tofa_core.search.evolution import CostModel
from tofa_core.search.predictor import build_predictor
from tofa_core.search.targets import Target
from tofa_core.specialize import load_trained, specialize


def generated_targets(space, n: int, seed: int = 0) -> list[Target]:
    rng = random.Random(seed)
    lo_m, hi_m = count_macs(space.min_arch(), space), count_macs(space.max_arch(), space)
    lo_p, hi_p = count_params(space.min_arch(), space), count_params(space.max_arch(), space)

    def between(lo, hi):
        return int(math.exp(rng.uniform(math.log(lo * 1.2), math.log(hi))))

    out = []
    for i in range(n):
        kind = i % 3
        budget = {}
        if kind in (0, 2):
            budget["max_macs"] = between(lo_m, hi_m)
        if kind in (1, 2):
            budget["max_params"] = between(lo_p, hi_p)
        out.append(Target(name=f"gen-{i:03d}", **budget))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,8,32,128")
    parser.add_argument("--samples", type=int, default=300, help="predictor samples (the flow's default)")
    parser.add_argument("--store")
    parser.add_argument("--run")
    parser.add_argument("--alone-seconds", type=float, help="mean training time of one target alone")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        store, run_dir = default_supernet(args.store, args.run, tmp)
        train_s = json.loads(run_dir.read_bytes("result.json"))["seconds"]
        start = time.perf_counter()
        trained = load_trained(store, run_dir)
        model, report = build_predictor(trained.net, trained.data, samples=args.samples)
        shared_s = time.perf_counter() - start
        costs = CostModel(trained.net.space)
        rows = {}
        for n in counts:
            targets = generated_targets(trained.net.space, n)
            start = time.perf_counter()
            for t in targets:
                specialize(
                    trained.net, t, model, trained.data, costs, f"{tmp}/exports/{n}/{t.name}",
                    classes=trained.splits.classes, reference=trained.reference,
                )  # fmt: skip
            spent = time.perf_counter() - start
            rows[n] = spent
            print(f"N={n}: {spent:.1f} s, {spent / n:.2f} s per target", flush=True)
    print(f"training {train_s:.0f} s; predictor ({len(report.scored)} subnets) {shared_s:.0f} s")
    alone = args.alone_seconds
    head = "| targets | specialization s | s per target | pipeline s | pipeline / pipeline(N=1) |"
    print(head + (" N x alone s | N x alone / pipeline |" if alone else ""))
    print("| --- | --- | --- | --- | --- |" + (" --- | --- |" if alone else ""))
    base = train_s + shared_s + rows.get(1, 0.0)
    for n, spent in rows.items():
        total = train_s + shared_s + spent
        cells = f"| {n} | {spent:.1f} | {spent / n:.2f} | {total:.0f} | {total / base:.3f} |"
        print(cells + (f" {n * alone:.0f} | {n * alone / total:.2f}x |" if alone else ""))
    print(json.dumps({"train_s": train_s, "predictor_s": shared_s, "specialize_s": rows}))


if __name__ == "__main__":
    main()
