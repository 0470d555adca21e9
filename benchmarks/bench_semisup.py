"""Label efficiency: the unified semi-supervised loss against supervised-only sandwich training.

digits with a share of the non-test images labelled (the rest unlabelled); for each share and
seed, the default supernet schedule (TrainConfig's defaults, what `tofa train` runs) is trained
twice: the unified loss and supervised-only (lambda_u = lambda_kd = 0), equal epochs and steps.
Prints test accuracy of the largest and smallest subnet (after BN recalibration): per run, then
mean ± std per share, and the gaps; draws docs/results/labels-digits.png and logs to MLflow.

    .venv/bin/python benchmarks/bench_semisup.py [--labelled 0.02,0.05,0.1,0.25,1.0] [--seeds 3]
        [--first-seed 0] [--epochs N] [--steps N] [--threads 2] [--out DIR] [--quick]
    .venv/bin/python benchmarks/bench_semisup.py --merge A/labels-digits.json B/labels-digits.json

Seeds can run in separate processes (`--seeds 1 --first-seed 2 --threads 1 --out /tmp/s2`, side by
side on a 2-core machine); `--merge` joins their runs into one table and figure.

At 100% labels there are no unlabelled images: the two losses differ only by distillation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _plots import label_curves  # noqa: E402
from _report import log_to_mlflow  # noqa: E402

from tofa_core.data.ingest import IngestConfig, ingest  # noqa: E402
from tofa_core.data.store import DatasetStore  # noqa: E402
from tofa_core.storage import open_storage  # noqa: E402
from tofa_core.training.config import TrainConfig  # noqa: E402
from tofa_core.training.loop import train_supernet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOSSES = (("unified", {}), ("supervised", {"lambda_u": 0.0, "lambda_kd": 0.0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--labelled", default="0.02,0.05,0.1,0.25,1.0", help="labelled shares, comma-separated"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed to run")
    parser.add_argument("--epochs", type=int, default=20, help="the published figures: 20 x 20 steps")
    parser.add_argument(
        "--steps", type=int, default=20, help="steps per epoch, fixed so both losses train equally long"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a busy machine)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"))
    parser.add_argument("--quick", action="store_true", default=os.environ.get("TOFA_BENCH_QUICK") == "1")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="join earlier runs' labels-digits.json")
    args = parser.parse_args()
    if args.merge:
        runs = [json.loads(Path(path).read_text()) for path in args.merge]
        rows = [row for run in runs for row in run["runs"]]
        report(rows, runs[0]["summary"]["steps"], Path(args.out), {"merged": len(args.merge)})
        return
    shares = [float(s) for s in args.labelled.split(",")]
    if args.quick:
        shares, args.seeds, args.epochs, args.steps = [0.05, 1.0], 1, 2, 5
        args.out = str(Path(tempfile.gettempdir()) / "tofa-bench-quick")
    torch.set_num_threads(args.threads)
    schedule = {"epochs": args.epochs, "steps_per_epoch": args.steps}
    base = TrainConfig(**{k: v for k, v in schedule.items() if v is not None})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for share in shares:
            store = DatasetStore(open_storage(f"{tmp}/store-{share}"))
            ingest("digits", "digits", store, IngestConfig(labelled_fraction=share))
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                for name, update in LOSSES:
                    cfg = base.model_copy(update={"seed": seed, **update})
                    start = time.perf_counter()
                    result = train_supernet(
                        cfg, store, "digits", open_storage(f"{tmp}/run-{share}-{name}-{seed}")
                    )
                    row = {"labelled": share, "seed": seed, "loss": name}
                    row |= {k: round(v, 4) for k, v in result.final.items()}
                    row["seconds"] = round(time.perf_counter() - start, 1)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    params = {"labelled": args.labelled, "seeds": args.seeds, "first_seed": args.first_seed}
    report(rows, base.epochs * base.steps_per_epoch, Path(args.out), params | {"quick": args.quick})


def report(rows: list[dict], steps: int, out: Path, params: dict) -> None:
    """Print the table of mean ± std per share, write the JSON and the figure, log to MLflow."""
    shares = sorted({r["labelled"] for r in rows})
    seeds = len({r["seed"] for r in rows})
    summary: dict = {"steps": steps, "seeds": seeds, "by_share": {}}
    print(f"\n{seeds} seed(s), {steps} steps per training; test accuracy mean ± std")
    print("| labelled | unified max | supervised max | gap | unified min | supervised min | gap |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for share in shares:
        cell = {}
        for name, _ in LOSSES:
            for net in ("max", "min"):
                accs = [r[f"test_acc/{net}"] for r in rows if r["labelled"] == share and r["loss"] == name]
                cell[f"{name}/{net}"] = (statistics.mean(accs), statistics.pstdev(accs))
        for net in ("max", "min"):
            cell[f"gap/{net}"] = cell[f"unified/{net}"][0] - cell[f"supervised/{net}"][0]
        summary["by_share"][str(share)] = cell
        fmt = lambda v: f"{v[0]:.1%} ± {v[1]:.1%}"  # noqa: E731
        print(
            f"| {share:.0%} | {fmt(cell['unified/max'])} | {fmt(cell['supervised/max'])} | "
            f"{100 * cell['gap/max']:+.1f} | {fmt(cell['unified/min'])} | {fmt(cell['supervised/min'])} | "
            f"{100 * cell['gap/min']:+.1f} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "labels-digits.json").write_text(json.dumps({"summary": summary, "runs": rows}, indent=2))
    figure = label_curves(summary["by_share"], out / "labels-digits.png", "digits", seeds)
    log_to_mlflow("labels", params, summary, [figure])
    print("wrote", out / "labels-digits.json", figure)


if __name__ == "__main__":
    main()
