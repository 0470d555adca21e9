"""GPU check: the supernet's sandwich step on a CUDA device, fp32 against bf16, in minutes.

For a machine that has a CUDA build of torch and little else: it imports only torch and
tofa_core's search space, supernet and cost model (no Ray, Prefect, MLflow, pydantic or
kornia). For each case (space, resolution, batch) and precision it trains a fresh supernet for
`--steps` sandwich steps (largest, smallest and 2 random subnets: cross-entropy for the
largest, cross-entropy plus distillation from it for the others, one SGD update) on synthetic
images a network can learn (a fixed pattern per class plus noise), checks that the loss fell,
and prints images/s and the share of the device's bf16 peak that the step's FLOPs reach
(2 x 3 x MACs per image per subnet: forward and backward).

    python benchmarks/gpu_check.py [--device cuda] [--steps 40] [--peak-tflops 989] [--out FILE]

`--device cpu` runs the same on the CPU (with --steps 4, to check the script itself).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tofa_core.arch import SearchSpace  # noqa: E402
from tofa_core.costs import count_macs  # noqa: E402
from tofa_core.supernet import Supernet  # noqa: E402

CASES = [("ofa-mbv3", 32, 256), ("ofa-mbv3", 64, 128), ("tiny", 28, 256)]
# Dense bf16 tensor-core peaks (TFLOP/s) by device name; --peak-tflops for others.
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def synthetic(classes: int, side: int, batch: int, device: torch.device, seed: int):
    """A batch maker: class c's images are its fixed random pattern plus noise."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    patterns = torch.randn(classes, 3, side, side, generator=g).to(device)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (batch,), device=device)
        x = patterns[y] + 0.8 * torch.randn(batch, 3, side, side, device=device)
        return x.contiguous(memory_format=torch.channels_last), y

    return draw


def sandwich_step(
    net, space, rng, x, y, optimizer, precision: str, device: torch.device
) -> tuple[float, int]:
    """One update over 4 subnets; the loss of the largest and the MACs per image of all four."""
    archs = [space.max_arch(), space.min_arch(), space.sample(rng), space.sample(rng)]
    cast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    optimizer.zero_grad(set_to_none=True)
    with cast:
        logits = net(x, archs[0]).float()
    loss = F.cross_entropy(logits, y)
    loss.backward()
    teacher = logits.detach().softmax(dim=1)
    for arch in archs[1:]:
        with cast:
            out = net(x, arch).float()
        (
            F.cross_entropy(out, y) + F.kl_div(out.log_softmax(dim=1), teacher, reduction="batchmean")
        ).backward()
    optimizer.step()
    return loss.item(), sum(count_macs(a, space) for a in archs)


def one_case(name: str, side: int, batch: int, precision: str, steps: int, device: torch.device) -> dict:
    space = SearchSpace.preset(name, num_classes=10, in_channels=3, resolutions=(side,))
    torch.manual_seed(0)
    net = Supernet(space).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    draw, rng = synthetic(10, side, batch, device, 0), random.Random(0)
    losses, macs, warmup = [], 0, min(3, steps // 2)
    for i in range(steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started, macs = time.perf_counter(), 0
        x, y = draw()
        loss, step_macs = sandwich_step(net, space, rng, x, y, optimizer, precision, device)
        losses.append(loss)
        macs += step_macs
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    timed = steps - warmup
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    return {
        "space": name, "side": side, "batch": batch, "precision": precision, "steps": steps,
        "loss_first": round(head, 4), "loss_last": round(tail, 4), "loss_fell": tail < head,
        "images_per_s": round(batch * timed / seconds, 1),
        "tflops": round(2 * 3 * macs * batch / seconds / 1e12, 3),
    }  # fmt: skip


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: torch.cuda.is_available() is False (use --device cpu to check the script)")
    peak = peak_tflops(device, args.peak_tflops)
    about = {"torch": torch.__version__, "device": str(device), "peak_bf16_tflops": peak}
    if device.type == "cuda":
        about["name"] = torch.cuda.get_device_name(device)
    print(json.dumps(about), flush=True)
    rows = []
    for name, side, batch in CASES:
        for precision in ("fp32", "bf16"):
            row = one_case(name, side, batch, precision, args.steps, device)
            row["share_of_bf16_peak"] = round(row["tflops"] / peak, 4) if peak else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"about": about, "rows": rows}, indent=1))
    if not all(r["loss_fell"] for r in rows):
        sys.exit("the loss did not fall in every case")


if __name__ == "__main__":
    main()
