"""The LiteRT RAM model against converted files: `costs.peak_ram_bytes(arch, space, "tflite")` and
`"tflite-int8"` (from the Arch alone) against `litert.peak_activation_bytes` (op-order liveness
on the file), for random subnets of tiny-fused (8 px), small-fused (28 px) and tiny (16, 32 px),
each converted to float and int8 LiteRT by the exporter's converter.

    nice -n 10 .venv/bin/python benchmarks/bench_litert_ram.py [--subnets 20] [--out FILE]

Prints model and file bytes per subnet and file, then the worst error; writes them as JSON to
`--out` (default docs/results/edge/litert_ram.json). About 8 s a subnet on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from tofa_core import litert
from tofa_core.arch import Arch, SearchSpace
from tofa_core.costs import peak_ram_bytes
from tofa_core.formats import save_pt2
from tofa_core.supernet import Supernet

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"tiny-fused": (8,), "small-fused": (28,), "tiny": (16, 32)}
FILES = {"tflite": "model.tflite", "tflite-int8": "model.int8.tflite"}


def converted(net: Supernet, arch: Arch, folder: Path) -> dict[str, Path]:
    """`arch`'s subnet as float and int8 LiteRT files, made as export makes them: its torch.export
    program converted by the shared converter, int8 calibrated on 16 images."""
    folder.mkdir(parents=True, exist_ok=True)
    images = torch.randn(16, net.space.in_channels, arch.resolution, arch.resolution)
    save_pt2(net.extract(arch).eval(), images[:2], folder / "model.pt2")
    files = {kind: folder / name for kind, name in FILES.items()}
    litert.shared_converter().convert(
        folder / "model.pt2", images.numpy(), float_out=files["tflite"], int8_out=files["tflite-int8"]
    )
    return files


def one_preset(preset: str, count: int, tmp: Path) -> list[dict]:
    space = SearchSpace.preset(preset, num_classes=10, in_channels=1, resolutions=PRESETS[preset])
    torch.manual_seed(0)
    net, rng, rows = Supernet(space).eval(), random.Random(0), []
    for i in range(count):
        arch = space.sample(rng)
        files = converted(net, arch, tmp / f"{preset}-{i}")
        for kind, file in files.items():
            onnx = peak_ram_bytes(arch, space, "fp32" if kind == "tflite" else "int8")
            row = {"preset": preset, "arch": arch.to_dict(), "file": kind, "onnx_model": onnx}
            row |= {
                "model": peak_ram_bytes(arch, space, kind),
                "measured": litert.peak_activation_bytes(file),
            }
            rows.append(row)
            print(
                f"{preset} {i:2d} {arch.resolution} px {kind:11s} model {row['model']:8,d} B  "
                f"file {row['measured']:8,d} B  ({row['measured'] / row['onnx_model']:.2f}x the ONNX graph)",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subnets", type=int, default=20, help="random subnets per preset")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "edge" / "litert_ram.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-litert-ram-") as tmp:
        rows = [row for preset in PRESETS for row in one_preset(preset, args.subnets, Path(tmp))]
    worst = max(abs(r["model"] - r["measured"]) for r in rows)
    ratio = [r["measured"] / r["onnx_model"] for r in rows]
    seconds = time.perf_counter() - start
    print(
        f"{len(rows)} files ({args.subnets} subnets x {len(PRESETS)} presets, float and int8) in "
        f"{seconds:.0f} s: worst |model - file| = {worst} B; the files need "
        f"{min(ratio):.2f}-{max(ratio):.2f}x the ONNX graph"
    )
    summary = {"worst_error_bytes": worst, "files": len(rows), "seconds": round(seconds), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
