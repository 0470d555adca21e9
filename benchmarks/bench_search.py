"""Does specialization pick the best subnet that fits each target? (docs/results/cost.md, the search study).

Per seed: train the default supernet on digits (10% labels; or use --store/--run), build the
accuracy predictor as the pipeline does (300 subnets scored by agreement), measure the test
accuracy of every scored subnet, then for each default target run the search and compare the
test accuracy of
  search     the best of search's 3 candidates by measured score (the re-rank before);
  + measured the same, competing with the 3 best already-measured subnets that fit
             (`specialize(measured=...)`, what the pipeline does now);
  best seen  the best test accuracy among all of those (an oracle: it uses the test labels);
  smallest   the smallest subnet, which fits every target.

    .venv/bin/python benchmarks/bench_search.py [--seeds 3] [--first-seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _trained import default_supernet  # noqa: E402
from bench_results import host_table  # noqa: E402

from tofa_core.search.evolution import CostModel, evolve  # noqa: E402
from tofa_core.search.predictor import build_predictor  # noqa: E402
from tofa_core.search.targets import HOST_DEVICE, load_targets  # noqa: E402
from tofa_core.specialize import load_trained, rank_candidates  # noqa: E402
from tofa_core.training.evaluate import accuracy, calibrated_subnet, fuse_bn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WAYS = ("search", "measured", "best_seen", "smallest")


def run_seed(seed: int, targets, tmp: str, store_root: str | None, run: str | None) -> list[dict]:
    store, run_dir = default_supernet(store_root, run, tmp, seed=seed)
    trained = load_trained(store, run_dir)
    net, data = trained.net, trained.data
    predictor, report = build_predictor(net, data, samples=300, seed=seed)
    test: dict = {}

    def test_acc(arch) -> float:
        if arch not in test:
            test[arch] = accuracy(fuse_bn(calibrated_subnet(net, arch, data.calib)), data.test_x, data.test_y)
        return test[arch]

    table = None
    if any(t.device == HOST_DEVICE for t in targets):
        table, _ = host_table(net.space)
    rows = []
    for target in targets:
        costs = CostModel(net.space, table if target.device else None)
        found = evolve(target, costs, predictor.predict, seed=seed)
        plain = rank_candidates(net, target, found, costs, data, reference=trained.reference)
        both = rank_candidates(
            net, target, found, costs, data, reference=trained.reference, measured=report.scored
        )
        seen = {s.arch for s in both} | {s.arch for s in report.scored if costs.fits(s.arch, target)}
        row = {
            "seed": seed,
            "target": target.name,
            "search": test_acc(plain[0].arch),
            "measured": test_acc(both[0].arch),
            "best_seen": max(test_acc(a) for a in seen),
            "smallest": test_acc(net.space.min_arch()),
            "picked_measured": both[0].arch not in dict(found.candidates),
            "macs": {
                "search": costs.costs(plain[0].arch)["macs"],
                "measured": costs.costs(both[0].arch)["macs"],
            },
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    names = list(dict.fromkeys(r["target"] for r in rows))
    lines = [
        "| target | " + " | ".join(WAYS) + " | picked a measured subnet |",
        "|---" * (len(WAYS) + 2) + "|",
    ]
    for name in [*names, "mean"]:
        mine = rows if name == "mean" else [r for r in rows if r["target"] == name]
        cells = [f"{100 * statistics.mean(r[w] for r in mine):.1f}" for w in WAYS]
        took = sum(r["picked_measured"] for r in mine)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {took}/{len(mine)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--targets", default=str(ROOT / "infra" / "targets" / "default.yaml"))
    parser.add_argument("--store")
    parser.add_argument("--run", help="run folder name under <store>/runs (one seed)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--merge", nargs="+", help="only print the table of these JSON files' rows")
    args = parser.parse_args()
    if args.merge:
        rows = [r for f in args.merge for r in json.loads(Path(f).read_text())]
    else:
        torch.set_num_threads(args.threads)
        targets = load_targets(args.targets)
        rows = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                rows += run_seed(seed, targets, tmp, args.store, args.run)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"test accuracy %, mean over {len({r['seed'] for r in rows})} seeds")
    print(table(rows))


if __name__ == "__main__":
    main()
