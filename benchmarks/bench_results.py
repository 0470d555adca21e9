"""TOFA against the per-target baseline, end to end: accuracy per target, cost vs number of
targets, and the Pareto front (docs/results/cost.md, experiments 1, 2 and 4).

For each data set and seed, in this one process on this machine:
  TOFA      one supernet (TrainConfig's defaults, what `tofa train` runs) + the accuracy
            predictor + this host's latency table + one specialization per default target
            (search, export, verify; no fine-tuning);
  baseline  each target's chosen architecture trained alone from scratch (`tofa baseline`:
            the same data version, labels, semi-supervised recipe restricted to the one
            network, epochs, steps and evaluation).
Cost for N targets: TOFA = training + predictor + table + N x (mean seconds per target);
baseline = N x (mean seconds per training). Both are extrapolated from the measured targets
beyond their number (said in the output). Wall seconds and this process's CPU seconds.

    .venv/bin/python benchmarks/bench_results.py [--datasets digits] [--seeds 3] [--quick]
    .venv/bin/python benchmarks/bench_results.py --datasets mnist5k --seeds 1 \
        --config benchmarks/configs/mnist5k.yaml
    # one seed per process, side by side (accuracy does not depend on the load), then merged:
    .venv/bin/python benchmarks/bench_results.py --seeds 1 --first-seed 1 --threads 1 --out /tmp/s1
    .venv/bin/python benchmarks/bench_results.py --merge /tmp/s0/runs-digits.json /tmp/s1/runs-digits.json

--quick (also TOFA_BENCH_QUICK=1, what `make bench` sets): digits, 1 seed, 2 epochs x 5 steps,
3 targets; minutes, for CI. Writes results JSON and PNGs to --out (default docs/results/)
and logs them to MLflow (experiment tofa-results; MLFLOW_TRACKING_URI or .tofa/mlflow.db).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _plots  # noqa: E402
from _datasets import ingest_dataset  # noqa: E402
from _report import log_to_mlflow  # noqa: E402

from flows import plots  # noqa: E402
from flows.settings import state_dir  # noqa: E402
from tofa_core import profiler  # noqa: E402
from tofa_core.arch import Arch  # noqa: E402
from tofa_core.costs import LatencyTable  # noqa: E402
from tofa_core.data.store import DatasetStore  # noqa: E402
from tofa_core.export import VerificationError  # noqa: E402
from tofa_core.search.evolution import CostModel, InfeasibleTarget  # noqa: E402
from tofa_core.search.pareto import subnet_points  # noqa: E402
from tofa_core.search.predictor import build_predictor  # noqa: E402
from tofa_core.search.targets import HOST_DEVICE, load_targets  # noqa: E402
from tofa_core.specialize import load_trained, specialize  # noqa: E402
from tofa_core.storage import open_storage  # noqa: E402
from tofa_core.training.config import TrainConfig  # noqa: E402
from tofa_core.training.loop import train_supernet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COUNTS = (1, 8, 32)


class Clock:
    """Wall and CPU seconds (all threads of this process) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def host_table(space) -> tuple[LatencyTable, float]:
    """This host's latency table for `space`, measured once and cached (seconds it took)."""
    with Clock() as c:
        table, measured = profiler.host_table(
            space, state_dir() / "latency" / f"{HOST_DEVICE}.json", HOST_DEVICE
        )
    return table, c.wall if measured else 0.0


def run_seed(
    dataset: str, seed: int, cfg: TrainConfig, targets, tmp: Path, pareto: int, samples: int = 300
) -> dict:
    store = DatasetStore(open_storage(tmp / f"store-{dataset}"))
    version = ingest_dataset(dataset, store, tmp)
    root = open_storage(tmp / f"store-{dataset}")
    run_dir = root.child(f"runs/tofa-{seed}")
    cfg = cfg.model_copy(update={"seed": seed})
    with Clock() as train:
        train_supernet(cfg, store, dataset, run_dir, version=version)
    trained = load_trained(store, run_dir)
    net, data = trained.net, trained.data
    with Clock() as pred:
        predictor, report = build_predictor(net, data, samples=samples, seed=seed)
    table, table_s = host_table(net.space) if any(t.device == HOST_DEVICE for t in targets) else (None, 0.0)
    rows, failed = [], []
    for target in targets:
        try:
            with Clock() as one, tempfile.TemporaryDirectory() as out:
                done = specialize(
                    net, target, predictor, data, CostModel(net.space, table if target.device else None), out,
                    classes=list(trained.state["classes"]), seed=seed, reference=trained.reference,
                    measured=report.scored,
                )  # fmt: skip
        except (InfeasibleTarget, VerificationError) as err:  # as in the pipeline: reported, not fatal
            failed.append({"target": target.name, "error": str(err)[:300]})
            print(
                json.dumps({"dataset": dataset, "seed": seed, "failed": target.name, "error": str(err)[:300]})
            )
            continue
        rows.append(
            {
                "target": target.name,
                "arch": done.arch.to_dict(),
                "macs": done.measured["macs"],
                "params": done.measured["params"],
                "tofa_test_acc": done.measured["test_acc"],
                "tofa_wall": one.wall,
                "tofa_cpu": one.cpu,
            }
        )
        print(json.dumps({"dataset": dataset, "seed": seed, **rows[-1]}), flush=True)
    trained_alone: dict[str, dict] = {}  # two targets may choose the same arch: train it once
    for row in rows:
        key = json.dumps(row["arch"], sort_keys=True)
        if key not in trained_alone:
            with Clock() as alone:
                result = train_supernet(
                    cfg, store, dataset, root.child(f"runs/alone-{seed}-{row['target']}"), version=version,
                    fixed=Arch.from_dict(row["arch"]),
                )  # fmt: skip
            trained_alone[key] = {"acc": result.final["test_acc/arch"], "wall": alone.wall, "cpu": alone.cpu}
        base = trained_alone[key]
        row |= {"baseline_test_acc": base["acc"], "baseline_wall": base["wall"], "baseline_cpu": base["cpu"]}
        print(json.dumps({"dataset": dataset, "seed": seed, "baseline": row["target"], **base}), flush=True)
    subnets = []
    if pareto:
        archs = [s.arch for s in report.scored]
        picked = archs[:2] + random.Random(seed).sample(archs[2:], min(pareto, len(archs) - 2))
        subnets = subnet_points(net, picked, data)
    return {
        "dataset": dataset,
        "seed": seed,
        "data_version": version,
        "train_wall": train.wall,
        "train_cpu": train.cpu,
        "predictor_wall": pred.wall,
        "predictor_cpu": pred.cpu,
        "table_wall": table_s,
        "supernet_test_acc": {k: trained.state["final"][k] for k in ("test_acc/max", "test_acc/min")},
        "targets": rows,
        "failed": failed,
        "pareto": subnets,
        "budgets": {t.name: t.max_macs for t in targets},
    }


def summarize(runs: list[dict]) -> dict:
    """Per data set: per-target mean/std over seeds, the average gap, and the cost curves."""
    out = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        mine = [r for r in runs if r["dataset"] == dataset]
        names = [t["target"] for t in mine[0]["targets"]]
        names = [n for n in names if all(any(t["target"] == n for t in r["targets"]) for r in mine)]
        per_target = []
        for name in names:
            rows = [t for r in mine for t in r["targets"] if t["target"] == name]
            tofa = [t["tofa_test_acc"] for t in rows]
            base = [t["baseline_test_acc"] for t in rows]
            per_target.append(
                {
                    "target": name,
                    "macs": statistics.mean(t["macs"] for t in rows),
                    "tofa": (statistics.mean(tofa), statistics.pstdev(tofa)),
                    "baseline": (statistics.mean(base), statistics.pstdev(base)),
                    "gap": statistics.mean(a - b for a, b in zip(tofa, base, strict=True)),
                }
            )
        fixed = statistics.mean(r["train_wall"] + r["predictor_wall"] for r in mine)
        fixed_cpu = statistics.mean(r["train_cpu"] + r["predictor_cpu"] for r in mine)
        table = statistics.mean(r["table_wall"] for r in mine)
        per = statistics.mean(t["tofa_wall"] for r in mine for t in r["targets"])
        per_cpu = statistics.mean(t["tofa_cpu"] for r in mine for t in r["targets"])
        base = statistics.mean(t["baseline_wall"] for r in mine for t in r["targets"])
        base_cpu = statistics.mean(t["baseline_cpu"] for r in mine for t in r["targets"])
        cost = {
            n: {
                "tofa_wall": fixed + table + n * per,
                "baseline_wall": n * base,
                "tofa_cpu": fixed_cpu + table + n * per_cpu,
                "baseline_cpu": n * base_cpu,
            }
            for n in COUNTS
        }
        out[dataset] = {
            "seeds": len(mine),
            "targets_measured": len(names),
            "failed": sorted({f["target"] for r in mine for f in r["failed"]}),
            "per_target": per_target,
            "mean_gap": statistics.mean(p["gap"] for p in per_target),
            "supernet_max_min": [
                statistics.mean(r["supernet_test_acc"][k] for r in mine)
                for k in ("test_acc/max", "test_acc/min")
            ],
            "seconds": {
                "supernet+predictor": fixed,
                "host_table": table,
                "per_target": per,
                "per_baseline": base,
            },
            "cost": cost,
            "ratio_at_32": cost[32]["baseline_wall"] / cost[32]["tofa_wall"],
            "ratio_at_32_cpu": cost[32]["baseline_cpu"] / cost[32]["tofa_cpu"],
        }
    return out


def draw(runs: list[dict], summary: dict, out: Path) -> list[Path]:
    files = []
    for dataset, s in summary.items():
        first = next(r for r in runs if r["dataset"] == dataset)
        if first["pareto"]:
            chosen = [
                {"target": t["target"], "macs": t["macs"], "test_acc": t["tofa_test_acc"],
                 "max_macs": first["budgets"].get(t["target"])}
                for t in first["targets"]
            ]  # fmt: skip
            files.append(
                plots.pareto(
                    first["pareto"],
                    chosen,
                    out / f"pareto-{dataset}.png",
                    f"{dataset}: {len(first['pareto'])} sampled subnets of one supernet "
                    f"(seed {first['seed']}), chosen per target",
                )  # fmt: skip
            )
        files.append(_plots.target_bars(s["per_target"], out / f"targets-{dataset}.png", dataset, s["seeds"]))
        files.append(_plots.cost_curves(s["cost"], out / f"cost-{dataset}.png", dataset))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits", help="digits, mnist5k (comma-separated)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed to run")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="RUNS_JSON",
        help="train nothing: summarize, plot and log the runs-*.json files of earlier invocations "
        "(e.g. one seed per process, side by side) into --out",
    )
    parser.add_argument("--targets", default=str(ROOT / "infra" / "targets" / "default.yaml"))
    parser.add_argument("--config", default=None, help="a YAML 'train:' section [default: TrainConfig's]")
    parser.add_argument(
        "--pareto", type=int, default=100, help="sampled subnets in the Pareto plot (0: none)"
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--samples", type=int, default=300, help="subnets scored for the predictor (the pipeline's default)"
    )
    parser.add_argument("--quick", action="store_true", default=os.environ.get("TOFA_BENCH_QUICK") == "1")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    targets = load_targets(args.targets)
    cfg = TrainConfig.load(args.config)
    datasets = args.datasets.split(",")
    if args.quick:
        datasets, args.seeds, targets = ["digits"], 1, targets[:3]
        cfg = cfg.model_copy(update={"epochs": 2, "steps_per_epoch": 5, "calib_images": 128})
        args.pareto, args.samples = 10, 40
        args.out = str(Path(tempfile.gettempdir()) / "tofa-bench-quick")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    if args.merge:
        runs = [r for f in args.merge for r in json.loads(Path(f).read_text())]
        runs.sort(key=lambda r: (r["dataset"], r["seed"]))  # the Pareto plot is drawn from seed 0's run
        datasets = sorted({r["dataset"] for r in runs})
        args.seeds = len({r["seed"] for r in runs})
        (out / f"runs-{'-'.join(datasets)}.json").write_text(json.dumps(runs, indent=2))
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in datasets if not args.merge else []:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                pareto = args.pareto if seed == 0 else 0
                runs.append(run_seed(dataset, seed, cfg, targets, Path(tmp), pareto, args.samples))
                (out / f"runs-{'-'.join(datasets)}.json").write_text(json.dumps(runs, indent=2))
    summary = summarize(runs)
    (out / f"results-{'-'.join(datasets)}.json").write_text(json.dumps(summary, indent=2))
    files = draw(runs, summary, out)
    for dataset, s in summary.items():
        print(
            f"\n{dataset}: {s['seeds']} seed(s), supernet max/min "
            f"{s['supernet_max_min'][0]:.3f}/{s['supernet_max_min'][1]:.3f}"
        )
        print(f"{'target':<15}{'MACs':>10}  {'TOFA':>14}  {'alone':>14}  {'gap':>7}")
        for p in s["per_target"]:
            print(
                f"{p['target']:<15}{p['macs']:>10,.0f}  {p['tofa'][0]:.3f} ± {p['tofa'][1]:.3f}  "
                f"{p['baseline'][0]:.3f} ± {p['baseline'][1]:.3f}  {100 * p['gap']:+6.1f}"
            )
        print(f"mean gap (TOFA - alone): {100 * s['mean_gap']:+.2f} points")
        if s["failed"]:
            print(f"targets that failed in some seed (left out): {', '.join(s['failed'])}")
        print(f"seconds: {json.dumps({k: round(v, 1) for k, v in s['seconds'].items()})}")
        for n, c in s["cost"].items():
            print(
                f"N={n:>2}: TOFA {c['tofa_wall']:7.0f} s wall / {c['tofa_cpu']:7.0f} s CPU; "
                f"baseline {c['baseline_wall']:7.0f} / {c['baseline_cpu']:7.0f}"
            )
        print(
            f"baseline / TOFA at N=32: {s['ratio_at_32']:.1f}x wall, {s['ratio_at_32_cpu']:.1f}x CPU "
            f"(extrapolated from {s['targets_measured']} measured targets and trainings per seed)"
        )
    log_to_mlflow(
        "results", {"datasets": ",".join(datasets), "seeds": args.seeds, "quick": args.quick}, summary, files
    )
    print("\nwrote", ", ".join(str(f) for f in [out / f"results-{'-'.join(datasets)}.json", *files]))


if __name__ == "__main__":
    main()
