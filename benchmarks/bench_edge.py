"""Models a device can run: float against int8 per default target, RAM and flash model against
the files, ONNX Runtime latency float against int8 on this host.

Runs the real `tofa run` (digits, `infra/targets/default.yaml`, defaults, 2 Ray workers, all in a
fresh folder), then for every exported target reads its files:
  - test accuracy of model.onnx (fp32) and, for int8 targets, model.int8.onnx, and their top-1
    agreement; fp32 targets are also quantized here (the same quantizer and calibration
    images) to show what int8 would cost them
  - RAM: `costs.peak_ram_bytes` (from the Arch) against `quantize.peak_activation_bytes`
    (liveness on the deployed graph); flash: `costs.flash_bytes` against the file's bytes
  - latency at batch 1, one ONNX Runtime thread, float file against int8 file
  - the LiteRT file (model.int8.tflite, where the target has one): its accuracy and agreement
    with the float model in LiteRT's interpreter, RAM (op-order liveness), flash (file bytes)
    and latency (batch 1, one thread)
and, to check the RAM and flash models beyond the picks, 30 random subnets of the space
(`--random-litert` of them also converted to int8 LiteRT: the RAM and LiteRT flash models against them).

    .venv/bin/python benchmarks/bench_edge.py [--out docs/results/edge] [--random 30]
        [--random-litert 10] [--summary FILE]

`--summary` reuses the summary of an earlier `tofa run` (its store must still exist).

`--seeds N` instead trains 2N supernets, for `train.seed` 0..N-1 one float and one
quantization-aware (`train.quantization_aware` false / true; each kept in its own store under
`--stores`, trained once: a later call reuses them), specializes each (`tofa specialize`, timed),
and prints per target and training, the mean over seeds: float, ONNX int8 and LiteRT int8 test
accuracy, both int8 files' agreement with float on the held-out unlabelled images (the gate), the
LiteRT file's loss against float, rejected candidates and seconds; then each training's time.
`--data digits` (default): the built-in digits and the default targets; `--data fmnist`:
Fashion-MNIST as bench_quality.py builds it (1,000 labels, 28 px) and infra/targets/fmnist.yaml.

    .venv/bin/python benchmarks/bench_edge.py --seeds 3 [--data fmnist] [--stores DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tofa_core import litert, onnx_runtime
from tofa_core.arch import Arch
from tofa_core.constraints import KB
from tofa_core.costs import flash_bytes, peak_ram_bytes
from tofa_core.data.store import DatasetStore
from tofa_core.quantize import peak_activation_bytes, quantize_int8
from tofa_core.specialize import load_trained
from tofa_core.storage import open_storage
from tofa_core.supernet.static import at_resolution
from tofa_core.training.evaluate import calibrated_subnet

ROOT = Path(__file__).resolve().parents[1]
TOFA = ROOT / ".venv" / "bin" / "tofa"


def run_tofa(work: Path) -> dict:
    summary = work / "summary.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TOFA_STORE", "MLFLOW_TRACKING_URI")}
    start = time.perf_counter()
    with open(work / "tofa.log", "w") as log:
        subprocess.run(
            [str(TOFA), "run", "--summary-out", str(summary)],
            check=True, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return json.loads(summary.read_text()) | {"wall_seconds": time.perf_counter() - start}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def one_target(row: dict, trained, folder: Path) -> dict:
    about = json.loads((folder / "model.json").read_text())
    precision = about.get("precision", "fp32")
    space, data = trained.net.space, trained.data
    arch = Arch.from_dict(about["arch"])
    x = at_resolution(data.test_x, arch.resolution).numpy()
    labels = data.test_y.numpy()
    fp32 = (folder / "model.onnx").read_bytes()
    if (folder / "model.int8.onnx").exists():
        int8 = (folder / "model.int8.onnx").read_bytes()
    else:  # what int8 would cost an fp32 target: the same quantizer and calibration images
        int8 = quantize_int8(fp32, at_resolution(data.calib, arch.resolution).numpy())
    f = onnx_runtime.run(onnx_runtime.session(fp32), x)
    q = onnx_runtime.run(onnx_runtime.session(int8), x)
    deployed = int8 if precision == "int8" else fp32
    one = x[:1]
    tflite = folder / "model.int8.tflite"
    return {
        "target": row["target"],
        "precision": precision,
        "macs": row["macs"],
        "fp32_acc": accuracy(f, labels),
        "int8_acc": accuracy(q, labels),
        "agreement": float((f.argmax(1) == q.argmax(1)).mean()),
        "ram_model_kb": peak_ram_bytes(arch, space, precision) / KB,
        "ram_graph_kb": peak_activation_bytes(deployed, precision) / KB,
        "flash_model_kb": flash_bytes(arch, space, precision) / KB,
        "flash_file_kb": len(deployed) / KB,
        "budget": row["constraints"],
        "latency_fp32_ms": onnx_runtime.model_latency_ms(fp32, one, 1),
        "latency_int8_ms": onnx_runtime.model_latency_ms(int8, one, 1),
        **(litert_numbers(tflite, x, labels, f) if tflite.exists() else {}),
    }


def litert_numbers(tflite: Path, x: np.ndarray, labels: np.ndarray, float_logits: np.ndarray) -> dict:
    """The int8 LiteRT file in LiteRT's interpreter: accuracy, agreement, RAM, flash, latency."""
    logits = litert.run(tflite, x)
    repeats = np.repeat(x[:1], LATENCY_RUNS, axis=0)
    start = time.perf_counter()
    litert.run(tflite, repeats)
    return {
        "tflite_int8_acc": accuracy(logits, labels),
        "tflite_agreement": float((logits.argmax(1) == float_logits.argmax(1)).mean()),
        "tflite_ram_kb": litert.peak_activation_bytes(tflite) / KB,
        "tflite_flash_kb": tflite.stat().st_size / KB,
        "tflite_latency_ms": (time.perf_counter() - start) * 1000 / LATENCY_RUNS,
    }


LATENCY_RUNS = 500  # batch-1 invocations timed (one interpreter, after its first run)


def random_litert(trained, count: int) -> dict:
    """Range of (file / model) over `count` random subnets converted to int8 LiteRT: RAM and
    flash against the LiteRT RAM and flash models."""
    net, space, calib = trained.net, trained.net.space, trained.data.calib
    rng, ratios = random.Random(1), {"ram": [], "flash": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            arch = space.sample(rng)
            program, out = Path(tmp) / f"{i}.pt2", Path(tmp) / f"{i}.tflite"
            model = calibrated_subnet(net, arch, calib[:64]).eval()
            example = at_resolution(calib[:2], arch.resolution)
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            torch.export.save(
                torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}), program
            )
            litert.shared_converter().convert(
                program, at_resolution(calib[:128], arch.resolution).numpy(), float_out=None, int8_out=out
            )
            ram = litert.peak_activation_bytes(out)
            ratios["ram"].append(ram / peak_ram_bytes(arch, space, "tflite-int8"))
            ratios["flash"].append(out.stat().st_size / flash_bytes(arch, space, "tflite-int8"))
    return {"subnets": count} | {
        f"{k}_ratio": [round(min(v), 3), round(max(v), 3)] for k, v in ratios.items()
    }


def random_subnets(trained, count: int) -> dict:
    """Worst relative error of the RAM and flash models over `count` random subnets."""
    net, space = trained.net, trained.net.space
    rng, worst = random.Random(0), {"ram": 0.0, "flash_fp32": 0.0, "flash_int8": 0.0}
    for _ in range(count):
        arch = space.sample(rng)
        model = calibrated_subnet(net, arch, trained.data.calib[:64])
        example = at_resolution(trained.data.calib[:1], arch.resolution)
        fp32 = onnx_runtime.onnx_bytes(model, example)
        int8 = quantize_int8(fp32, at_resolution(trained.data.calib[:128], arch.resolution).numpy())
        for precision, content in (("fp32", fp32), ("int8", int8)):
            ram = peak_ram_bytes(arch, space, precision) / peak_activation_bytes(content, precision)
            flash = flash_bytes(arch, space, precision) / len(content)
            worst["ram"] = max(worst["ram"], abs(ram - 1))
            worst[f"flash_{precision}"] = max(worst[f"flash_{precision}"], abs(flash - 1))
    return {"subnets": count, **{k: round(v, 4) for k, v in worst.items()}}


def report_litert(rows: list[dict], models: dict) -> None:
    rows = [r for r in rows if "tflite_int8_acc" in r]
    print("\n| target | LiteRT int8 acc | agree | RAM KB | flash KB | latency ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['target']} | {100 * r['tflite_int8_acc']:.1f} | {100 * r['tflite_agreement']:.1f} "
            f"| {r['tflite_ram_kb']:.1f} | {r['tflite_flash_kb']:.0f} | {r['tflite_latency_ms']:.3f} |"
        )
    if models.get("subnets"):
        print(
            f"int8 LiteRT file / model over {models['subnets']} random subnets: RAM "
            f"{models['ram_ratio'][0]:.2f}-{models['ram_ratio'][1]:.2f}x, flash "
            f"{models['flash_ratio'][0]:.2f}-{models['flash_ratio'][1]:.2f}x"
        )


def report(rows: list[dict], models: dict, wall: float | None) -> None:
    print(f"tofa run (digits, default targets): {wall:.0f} s" if wall else "")
    print("| target | precision | MACs | fp32 acc | int8 acc | agree | RAM KB model / graph | "
          "flash KB model / file | latency ms fp32 / int8 |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['target']} | {r['precision']} | {r['macs'] / 1e6:.2f}M | {100 * r['fp32_acc']:.1f} "
            f"| {100 * r['int8_acc']:.1f} | {100 * r['agreement']:.1f} "
            f"| {r['ram_model_kb']:.1f} / {r['ram_graph_kb']:.1f} "
            f"| {r['flash_model_kb']:.0f} / {r['flash_file_kb']:.0f} "
            f"| {r['latency_fp32_ms']:.3f} / {r['latency_int8_ms']:.3f} |"
        )
    print(
        f"RAM and flash models over {models['subnets']} random subnets, worst relative error: RAM "
        f"{100 * models['ram']:.2f}%, flash fp32 {100 * models['flash_fp32']:.2f}%, "
        f"int8 {100 * models['flash_int8']:.2f}%"
    )


def tofa(args: list[str], log: Path, check: bool = True) -> float:
    """Run the `tofa` CLI (no MLflow or store from the environment); its wall seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("TOFA_STORE", "MLFLOW_TRACKING_URI")}
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run([str(TOFA), *args], check=check, env=env, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


MEASURED = (
    "test_acc_fp32",
    "test_acc_int8",
    "int8_agreement",
    "test_acc_tflite_int8",
    "tflite_int8_agreement",
)


TRAININGS = {"float": "false", "quantization-aware": "true"}


def data_args(data: str, stores: Path) -> tuple[list[str], list[str]]:
    """(train's, specialize's) extra arguments for the data set: digits and the default targets,
    or the Fashion-MNIST folder (written once beside the stores) and infra/targets/fmnist.yaml."""
    if data == "digits":
        return [], []
    folder = stores / "fmnist-data"
    if not (folder / "train").exists():
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _datasets import fmnist_folder

        fmnist_folder(folder)
    targets = str(ROOT / "infra" / "targets" / "fmnist.yaml")
    return ["--data", str(folder), "--dataset", "fmnist"], ["--dataset", "fmnist", "--targets", targets]


def one_seed(seed: int, training: str, store: Path, data: tuple[list[str], list[str]]) -> list[dict]:
    """Train (once) and specialize the `seed`-th supernet, float or quantization-aware; a row per
    target."""
    store.mkdir(parents=True, exist_ok=True)
    if not (store / "runs").exists():
        config = f"train:\n  seed: {seed}\n  quantization_aware: {TRAININGS[training]}\n"
        (store / "seed.yaml").write_text(config)
        args = ["train", "--config", str(store / "seed.yaml"), "--store", str(store), *data[0]]
        seconds = tofa(args, store / "train.log")
        (store / "train_seconds.json").write_text(json.dumps(seconds))
    summary_file = store / "specialize.json"
    summary_file.unlink(missing_ok=True)
    args = ["specialize", "--store", str(store), "--summary-out", str(summary_file), *data[1]]
    wall = tofa(args, store / "specialize.log", check=False)  # failed targets are listed, not fatal
    summary = json.loads(summary_file.read_text())
    about = {
        "seed": seed,
        "training": training,
        "train_seconds": json.loads((store / "train_seconds.json").read_text()),
    }
    rows = []
    for row in summary["targets"]:
        out = about | {"target": row["target"], "flow_seconds": summary["seconds"], "wall_seconds": wall}
        out |= {k: row.get(k) for k in (*MEASURED, "seconds", "rejected_candidates")}
        rows.append(out)
    return rows + [about | {"target": f["target"], "failed": f["error"]} for f in summary["failed"]]


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def report_seeds(rows: list[dict]) -> None:
    """Per target and training, the mean over seeds (and the worst seed's int8 loss)."""

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    for r in [r for r in rows if "failed" in r]:
        print(f"failed: seed {r['seed']} {r['training']} {r['target']}: {r['failed'][:200]}")
    rows = [r for r in rows if "failed" not in r]
    seeds = sorted({r["seed"] for r in rows})
    print(
        f"mean over seeds {seeds}; LiteRT loss = fp32 - LiteRT int8 test accuracy (points), worst seed in ()"
    )
    print(
        "| target | training | fp32 | ONNX int8 (agree) | LiteRT int8 (agree) | LiteRT loss (worst) "
        "| rejected | s |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for target in dict.fromkeys(r["target"] for r in rows):
        for training in TRAININGS:
            mine = [r for r in rows if r["target"] == target and r["training"] == training]
            if not mine:
                continue
            m = {k: _mean([r[k] for r in mine]) for k in (*MEASURED, "seconds", "rejected_candidates")}
            loss = [
                r["test_acc_fp32"] - r["test_acc_tflite_int8"]
                for r in mine
                if r["test_acc_tflite_int8"] is not None
            ]
            lost = f"{100 * _mean(loss):+.2f} ({100 * max(loss):+.2f})" if loss else "-"
            print(
                f"| {target} | {training} | {pct(m['test_acc_fp32'])} "
                f"| {pct(m['test_acc_int8'])} ({pct(m['int8_agreement'])}) "
                f"| {pct(m['test_acc_tflite_int8'])} ({pct(m['tflite_int8_agreement'])}) | {lost} "
                f"| {m['rejected_candidates']:.1f} | {m['seconds']:.1f} |"
            )
    for training in TRAININGS:
        mine = [r for r in rows if r["training"] == training]
        if mine:
            train = _mean([r["train_seconds"] for r in {r["seed"]: r for r in mine}.values()])
            spec = _mean([r["flow_seconds"] for r in {r["seed"]: r for r in mine}.values()])
            print(f"{training}: training {train:.0f} s, specialization {spec:.0f} s per seed (mean)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "edge"))
    parser.add_argument("--random", type=int, default=30, help="random subnets for the RAM/flash models")
    parser.add_argument("--random-litert", type=int, default=10, help="of them converted to LiteRT")
    parser.add_argument("--summary", help="the summary JSON of an earlier `tofa run` (with --store)")
    parser.add_argument("--store", help="that run's store folder [default: .tofa/store beside the summary]")
    parser.add_argument("--seeds", type=int, help="train and specialize this many seeds instead")
    parser.add_argument("--data", choices=("digits", "fmnist"), default="digits", help="with --seeds")
    parser.add_argument("--stores", help="their kept stores [default: .tofa/bench-seeds(-fmnist)]")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.seeds:
        name = "bench-seeds" + ("-fmnist" if args.data == "fmnist" else "")
        stores = Path(args.stores or ROOT / ".tofa" / name)
        data = data_args(args.data, stores)
        rows = [
            row
            for seed in range(args.seeds)
            for training in TRAININGS
            for row in one_seed(seed, training, stores / f"seed{seed}-{training}", data)
        ]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / ("seeds.json" if args.data == "digits" else f"seeds-{args.data}.json")).write_text(
            json.dumps(rows, indent=1)
        )
        report_seeds(rows)
        return
    with tempfile.TemporaryDirectory() as tmp:
        summary = json.loads(Path(args.summary).read_text()) if args.summary else run_tofa(Path(tmp))
        where = Path(args.summary).parent if args.summary else Path(tmp)
        store = DatasetStore(open_storage(args.store or str(where / ".tofa" / "store")))
        run_dir = open_storage(summary["supernet"].rpartition("/")[0])
        trained = load_trained(store, run_dir)
        rows = [one_target(r, trained, Path(r["files"]["model.json"]).parent) for r in summary["targets"]]
        models = random_subnets(trained, args.random)
        litert_models = random_litert(trained, args.random_litert)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"wall_seconds": summary.get("wall_seconds"), "targets": rows, "models": models}
    result["litert_models"] = litert_models
    (out / "edge.json").write_text(json.dumps(result, indent=1))
    report(rows, models, summary.get("wall_seconds"))
    report_litert(rows, litert_models)


if __name__ == "__main__":
    main()
