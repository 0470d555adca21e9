"""Training recipe screen: which TrainConfig changes move supernet accuracy, over seeds.

For each variant (a name and TrainConfig overrides on top of the defaults) and seed, train the
supernet on a data set (digits, 10% labels unless said) and report test accuracy of the largest
and smallest subnet, the mean and the worst of 16 random subnets (each after BN
recalibration, the same 16 archs for every run), and seconds. Then mean ± std per variant.

    .venv/bin/python benchmarks/bench_recipe.py --variant default={} \
        --variant k2='{"k_random": 2}' [--seeds 3] [--first-seed 0] [--data digits|mnist5k] [--threads 1]

One process; runs follow each other. Start two of these side by side with --threads 1 on a
2-core machine to screen twice as many variants (accuracy does not depend on the load;
seconds do). Seeds matter: on digits one seed's result moves 2-5 points with the seed or the
thread count (a run is chaotic over 400 steps), so compare means over 3 or more seeds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _datasets import ingest_dataset  # noqa: E402

from tofa_core.data.store import DatasetStore  # noqa: E402
from tofa_core.specialize import load_trained  # noqa: E402
from tofa_core.storage import open_storage  # noqa: E402
from tofa_core.training.config import TrainConfig  # noqa: E402
from tofa_core.training.evaluate import accuracy, calibrated_subnet  # noqa: E402
from tofa_core.training.loop import train_supernet  # noqa: E402

KEYS = ("max", "min", "mid", "worst", "seconds")
# Without --variant (as `make bench-full` runs it): docs/results/recipe.md's default and best rows.
DEFAULT_VARIANTS = [("default", {}), ("e40k2", {"epochs": 40, "k_random": 2})]


def variant(text: str) -> tuple[str, dict]:
    name, _, overrides = text.partition("=")
    try:
        update = json.loads(overrides or "{}")
        TrainConfig(**update)
    except ValueError as err:  # JSONDecodeError and pydantic's ValidationError are ValueErrors
        raise argparse.ArgumentTypeError(f"variant {name!r}: {err}") from None
    return name, update


def judge(store: DatasetStore, run_dir, mids: int = 16) -> dict:
    trained = load_trained(store, run_dir)
    net, data = trained.net, trained.data
    rng = random.Random(123)  # the same archs for every run of one search space
    scores = [
        accuracy(calibrated_subnet(net, net.space.sample(rng), data.calib), data.test_x, data.test_y)
        for _ in range(mids)
    ]
    return {"mid": statistics.mean(scores), "worst": min(scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant", type=variant, action="append", help="NAME=JSON [default: the default and e40k2]"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1")
    parser.add_argument("--data", default="digits", choices=["digits", "mnist5k", "fmnist"])
    parser.add_argument("--labelled", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.variant = args.variant or DEFAULT_VARIANTS
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = DatasetStore(open_storage(f"{tmp}/store"))
        ingest_dataset(args.data, store, Path(tmp), labelled=args.labelled)
        for name, update in args.variant:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                cfg = TrainConfig(**{**update, "seed": seed})
                run_dir = open_storage(f"{tmp}/store").child(f"runs/{name}-{seed}")
                start = time.perf_counter()
                result = train_supernet(cfg, store, args.data, run_dir)
                row = {"variant": name, "seed": seed, "seconds": time.perf_counter() - start}
                row |= {"max": result.final["test_acc/max"], "min": result.final["test_acc/min"]}
                row |= judge(store, run_dir)
                rows.append(row)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    seeds = f"seeds {args.first_seed}-{args.first_seed + args.seeds - 1}"
    print(f"\n{args.data}, {args.labelled:.0%} labels, {seeds}; test accuracy mean ± std")
    print("| variant | overrides | largest | smallest | 16 random: mean | 16 random: worst | seconds |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, update in args.variant:
        mine = [r for r in rows if r["variant"] == name]
        cells = []
        for key in KEYS:
            values = [r[key] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            scale = 1 if key == "seconds" else 100
            cells.append(f"{statistics.mean(values) * scale:.1f} ± {spread * scale:.1f}")
        print(f"| {name} | `{json.dumps(update)}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
