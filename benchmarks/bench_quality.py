"""Accuracy on real small data: TOFA's exported models against networks trained on the same labels.

Data: Fashion-MNIST (28 px clothing, 10 classes; `apt-get install dataset-fashion-mnist`) as an
image folder: 100 labelled images per class, 9,000 unlabelled, 2,000 test (see _datasets.py).
Per seed:
  tofa   the real `tofa run --data FOLDER --targets infra/targets/fmnist.yaml` (Prefect, 2 Ray
         workers, MLflow in a local file, the store on disk, all in a fresh folder), with only
         `train.seed` set; per target the accuracy of its exported ONNX file on the test images
  plain  (a) a plain 5-layer CNN (3x3 convs 32-32-64-64-128, BN, ReLU, two max-pools, ~22M MACs at
         28 px), supervised only, flips and crops, trained for as long as TOFA's training took
  semi   (b) the same CNN with the FixMatch-style loss (pseudo-labels on the unlabelled images),
         for the same time
  alone  (c, with --alone) each target's chosen architecture trained alone on TOFA's schedule
         (`train_supernet(fixed=...)`, what `tofa baseline` runs)
The references train in this process on `--threads` threads, on the splits TOFA trained on (the
same labelled, validation and test images). Prints per target: MACs, parameters, TOFA's ONNX
test accuracy and the references' (mean ± std over seeds), the gap to (a), and each seed's
training images/s per epoch (the last against the first); writes the rows as JSON and a plot
to --out.

    .venv/bin/python benchmarks/bench_quality.py [--seeds 3] [--first-seed 0] [--alone] \
        [--alone-targets fm-3m fm-8m-300k ...] \
        [--ref-seconds N] [--threads 2] [--out docs/results/quality] [--refs-from FILE] [--quick] \
        [--train '{"epochs": 40}']

Run it alone: `tofa run` uses both cores, the references use --threads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _datasets import fmnist_folder  # noqa: E402
from bench_ceiling import macs, plain_cnn, plain_run, plain_step, plain_test_accuracy  # noqa: E402

from tofa_core.arch import Arch  # noqa: E402
from tofa_core.data.loaders import DataSplits, load_splits  # noqa: E402
from tofa_core.data.store import DatasetStore  # noqa: E402
from tofa_core.storage import open_storage  # noqa: E402
from tofa_core.training.config import TrainConfig  # noqa: E402
from tofa_core.training.loop import train_supernet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ROOT / "infra" / "targets" / "fmnist.yaml"
TOFA = ROOT / ".venv" / "bin" / "tofa"
# What references() measures; it depends only on the seed's split and the time budget.
REF_KEYS = ("ref_seconds", "plain", "semi", "plain_macs")


def run_tofa(folder: Path, work: Path, seed: int, quick: bool, train: dict | None = None) -> dict:
    """`tofa run` in its own folder (store, MLflow file, Prefect state); its summary and wall time."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    settings = {"seed": seed} | (train or {}) | ({"epochs": 1, "steps_per_epoch": 3} if quick else {})
    config.write_text(json.dumps({"train": settings}))  # JSON is YAML
    summary = work / "summary.json"
    command = [str(TOFA), "run", "--data", str(folder), "--targets", str(TARGETS)]
    command += ["--config", str(config), "--summary-out", str(summary)]
    env = {k: v for k, v in os.environ.items() if k not in ("TOFA_STORE", "MLFLOW_TRACKING_URI")}
    start = time.perf_counter()
    with open(work / "tofa.log", "w") as log:  # Prefect's and Ray's logs: read it when a run fails
        subprocess.run(command, check=True, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(summary.read_text()) | {"wall_seconds": time.perf_counter() - start}


def train_cnn(splits: DataSplits, cfg: TrainConfig, seconds: float) -> float:
    """The plain CNN for `seconds` of training: its cosine schedule runs on the clock, so it
    trains for the time given whatever its pace (a schedule planned from the first steps'
    pace ended a reference after 2 minutes of 30 when those steps ran slow)."""
    run = plain_run(cfg, splits)
    start, share = time.perf_counter(), 0.0
    while share < 1.0:
        for group in run.optimizer.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * share))
        plain_step(run, cfg, min(1.0, share / cfg.warmup) if cfg.warmup > 0 else 1.0)
        share = (time.perf_counter() - start) / seconds
    return plain_test_accuracy(run, cfg, splits)


def references(summary: dict, work: Path, seed: int, args) -> dict:
    store = DatasetStore(open_storage(str(work / ".tofa" / "store")))
    cfg = TrainConfig(**(args.train | {"seed": seed}))  # (c) trains on TOFA's schedule
    # Clothing stays clothing when mirrored: the references get flips whatever TOFA's default.
    ref_cfg = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"hflip": True})})
    splits = load_splits(
        store, summary["dataset"], summary["data_version"], val_fraction=cfg.val_fraction, seed=seed
    )
    seconds = args.ref_seconds or summary["training_seconds"]
    out = {"ref_seconds": seconds}
    out["plain"] = train_cnn(splits, ref_cfg.model_copy(update={"lambda_u": 0.0, "lambda_kd": 0.0}), seconds)
    out["semi"] = train_cnn(splits, ref_cfg, seconds)
    x = torch.zeros(1, splits.channels, splits.size, splits.size)
    out["plain_macs"] = macs(plain_cnn(splits.channels, len(splits.classes)), x)
    if args.alone:
        out["alone"] = {}
        for row in summary["targets"]:
            if args.alone_targets and row["target"] not in args.alone_targets:
                continue
            arch = Arch.from_dict(row["arch"])
            run_dir = open_storage(str(work / "alone" / row["target"]))
            result = train_supernet(cfg, store, summary["dataset"], run_dir, fixed=arch)
            out["alone"][row["target"]] = result.final["test_acc/arch"]
            print(
                json.dumps({"seed": seed, "alone": row["target"], "acc": out["alone"][row["target"]]}),
                flush=True,
            )
    return out


def one_seed(folder: Path, tmp: Path, seed: int, args) -> dict:
    work = tmp / f"seed-{seed}"
    summary = run_tofa(folder, work, seed, args.quick, args.train)
    row = {
        "seed": seed,
        "train": args.train,
        "wall_seconds": round(summary["wall_seconds"], 1),
        "training_seconds": round(summary["training_seconds"], 1),
        "pace": _pace(work),
        "targets": {
            t["target"]: {
                "macs": t["macs"],
                "params": t["params"],
                "test_acc": t["test_acc"],
                "arch": t["arch"],
            }
            for t in summary["targets"]
        },
    }
    print(
        json.dumps(
            {"seed": seed, "wall_seconds": row["wall_seconds"], "training_seconds": row["training_seconds"]}
        )
    )
    earlier = args.refs_from.get(seed) if args.refs_from else None
    row |= {k: earlier[k] for k in REF_KEYS} if earlier else references(summary, work, seed, args)
    print(json.dumps({k: v for k, v in row.items() if k != "targets"}), flush=True)
    return row


def _pace(work: Path) -> list[float]:
    """Training images/s per epoch of the run in `work` (its progress.json), both workers."""
    found = sorted((work / ".tofa" / "store" / "runs").glob("*/progress.json"))
    return [round(r["images_per_s"], 1) for r in json.loads(found[-1].read_text())] if found else []


def _stat(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def report(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(rows, indent=2))
    seeds = len(rows)
    plain = [r["plain"] for r in rows]
    semi = [r["semi"] for r in rows]
    print(f"\nFashion-MNIST, 1,000 labels + 9,000 unlabelled, 2,000 test images; {seeds} seed(s)")
    print(
        f"tofa run wall {statistics.mean(r['wall_seconds'] for r in rows):.0f} s, training "
        f"{statistics.mean(r['training_seconds'] for r in rows):.0f} s; references trained "
        f"{statistics.mean(r['ref_seconds'] for r in rows):.0f} s each"
    )
    for r in rows:
        if r.get("pace"):
            pace = r["pace"]
            print(f"seed {r['seed']} images/s per epoch: {pace} (last / first {pace[-1] / pace[0]:.2f})")
    print(f"(a) plain CNN supervised ({rows[0]['plain_macs'] / 1e6:.1f}M MACs): {_stat(plain)}")
    print(f"(b) plain CNN semi-supervised: {_stat(semi)}")
    alone = "alone" in rows[0]
    head = "| target | MACs (mean) | params (mean) | TOFA (ONNX) | - (a) |" + (
        " (c) alone | - (c) |" if alone else ""
    )
    print(head)
    print("| --- |" + " ---: |" * (head.count("|") - 2))
    for name in rows[0]["targets"]:
        tofa = [r["targets"][name]["test_acc"] for r in rows]
        gap = [t - p for t, p in zip(tofa, plain)]
        # Each seed picks its own subnet: the mean cost of the picks.
        mean_macs = statistics.mean(r["targets"][name]["macs"] for r in rows)
        mean_params = statistics.mean(r["targets"][name]["params"] for r in rows)
        cells = [name, f"{mean_macs / 1e6:.1f}M", f"{mean_params / 1e3:.0f}k", _stat(tofa), _stat(gap)]
        if alone:  # (c) may be trained for some targets only (--alone-targets)
            pairs = [(r["targets"][name]["test_acc"], r["alone"][name]) for r in rows if name in r["alone"]]
            own = [o for _, o in pairs]
            cells += [_stat(own), _stat([t - o for t, o in pairs])] if pairs else ["-", "-"]
        print("| " + " | ".join(cells) + " |")
    plot(rows, out / "quality.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(rows[0]["targets"])
    for r in rows:
        ax.scatter(
            [r["targets"][n]["macs"] / 1e6 for n in names],
            [100 * r["targets"][n]["test_acc"] for n in names],
            color="C0",
            alpha=0.6,
            label="TOFA exported (ONNX)" if r is rows[0] else None,
        )
        if "alone" in r:
            ax.scatter(
                [r["targets"][n]["macs"] / 1e6 for n in names if n in r["alone"]],
                [100 * r["alone"][n] for n in names if n in r["alone"]],
                color="C2",
                marker="x",
                label="(c) trained alone" if r is rows[0] else None,
            )
    for key, color, label in (
        ("plain", "C3", "(a) plain CNN, supervised"),
        ("semi", "C1", "(b) plain CNN, semi-sup."),
    ):
        ax.axhline(100 * statistics.mean(r[key] for r in rows), color=color, ls="--", label=label)
    ax.set_xlabel("MACs (millions)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"Fashion-MNIST, 1,000 labels, {len(rows)} seed(s)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument(
        "--alone", action="store_true", help="also train each target's architecture alone (c)"
    )
    parser.add_argument(
        "--alone-targets",
        nargs="+",
        metavar="TARGET",
        help="with --alone: only these targets' (c) [default: all]",
    )
    parser.add_argument("--ref-seconds", type=float, default=None, help="[default: TOFA's training time]")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the references")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "quality"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: little data, 3 steps, refs 10 s")
    parser.add_argument("--merge", nargs="*", help="quality.json files of earlier runs: report them together")
    parser.add_argument(
        "--refs-from",
        help="a quality.json of an earlier run: reuse its references (a), (b) for the seeds it has "
        "(the same seed is the same split) instead of training them again",
    )
    parser.add_argument(
        "--train",
        type=json.loads,
        default={},
        help="train settings for `tofa run` besides the seed, as JSON, e.g. '{\"epochs\": 40}' "
        "(a candidate default measured before it becomes one)",
    )
    args = parser.parse_args()
    if args.refs_from:
        args.refs_from = {r["seed"]: r for r in json.loads(Path(args.refs_from).read_text())}
    if args.merge:
        report([row for path in args.merge for row in json.loads(Path(path).read_text())], Path(args.out))
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            args.seeds, args.ref_seconds, args.out = 1, 10, str(Path(tmp) / "out")
        sizes = {"per_class": 10, "unlabelled": 300, "test": 200} if args.quick else {}
        folder = fmnist_folder(Path(tmp) / "fmnist", **sizes)
        rows = [
            one_seed(folder, Path(tmp), seed, args)
            for seed in range(args.first_seed, args.first_seed + args.seeds)
        ]
    report(rows, Path(args.out))


if __name__ == "__main__":
    main()
