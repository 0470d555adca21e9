"""How well does a latency table predict whole subnets? (issue: median abs error <= 15%)

Profiles this machine's table for the `tiny` space (every block shape, ONNX Runtime, one
thread, batch 1), then exports 20 random subnets not used in the table's fit, times each end
to end with ONNX Runtime, and compares. Also prints the search speed: candidates priced by
cost model + accuracy predictor per second.

    .venv/bin/python benchmarks/bench_latency.py [--resolutions 8,12,16] [--archs 20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from tofa_core.arch import SearchSpace
from tofa_core.costs import count_macs
from tofa_core.profiler import measure_archs_latency, profile_latency
from tofa_core.search.evolution import CostModel
from tofa_core.search.predictor import AccuracyPredictor
from tofa_core.search.targets import Target
from tofa_core.supernet import Supernet


def search_speed(space: SearchSpace, table, n: int = 20000) -> float:
    """Candidates per second: budget check (MACs, params, table latency) + predictor, in batches."""
    rng = random.Random(0)
    archs = [space.sample(rng) for _ in range(300)]
    predictor = AccuracyPredictor(space).fit(archs, [count_macs(a, space) for a in archs], epochs=20)
    target = Target(name="x", max_macs=10**6, max_params=3 * 10**5, max_latency_ms=1.0, device=table.device)
    costs = CostModel(space, table)
    candidates = [space.mutate(space.sample(rng), rng, 0.3) for _ in range(n)]
    start = time.perf_counter()
    for i in range(0, n, 100):
        batch = candidates[i : i + 100]
        [costs.fits(a, target) for a in batch]
        predictor.predict(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="8,12,16")
    parser.add_argument("--archs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    resolutions = tuple(int(r) for r in args.resolutions.split(","))
    space = SearchSpace.preset("tiny", num_classes=10, in_channels=1, resolutions=resolutions)
    start = time.perf_counter()
    table = profile_latency(space, "host-cpu", repeats=args.repeats)
    profile_s = time.perf_counter() - start
    torch.manual_seed(0)
    net = Supernet(space, channels_last=False)
    rng = random.Random(2024)  # other archs than the table's fit (seed 12345)
    archs = [space.sample(rng) for _ in range(args.archs)]
    rows = []
    for arch, measured in zip(archs, measure_archs_latency(net, archs)):  # timed interleaved
        predicted = table.latency_ms(arch, space)
        rows.append((arch, measured, predicted, (predicted - measured) / measured))
    errors = [abs(r[3]) for r in rows]
    print(f"table: {len(table.entries)} blocks profiled in {profile_s:.1f} s; fit {table.meta['fit']}")
    print("| subnet | MACs | measured ms | predicted ms | error |")
    print("| --- | --- | --- | --- | --- |")
    for arch, m, p, e in rows:
        name = f"r{arch.resolution} w{arch.width} d{list(arch.depths)}"
        print(f"| {name} | {count_macs(arch, space):,} | {m:.3f} | {p:.3f} | {e:+.1%} |")
    summary = {
        "median_abs_error": round(statistics.median(errors), 4),
        "max_abs_error": round(max(errors), 4),
        "archs": len(rows),
        "profile_seconds": round(profile_s, 1),
        "candidates_per_s": round(search_speed(space, table)),
    }
    print(
        f"median abs error {summary['median_abs_error']:.1%} (aim <= 15%), max {summary['max_abs_error']:.1%}"
    )
    print(f"search speed: {summary['candidates_per_s']:,} candidates/s (aim >= 10,000)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
