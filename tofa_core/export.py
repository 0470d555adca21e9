"""Export a chosen subnet (ONNX + TorchScript + model.json) and verify the files themselves.

Verification measures the exported artefacts, not the search's own numbers: ONNX Runtime's
outputs against PyTorch's on real images, MACs counted on the ONNX graph, parameters counted
on the TorchScript model, latency timed with ONNX Runtime when the target's device is this
machine, and test accuracy of the ONNX model. A failed check raises `VerificationError`
naming the check; nothing is published for that export.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tofa_core import onnx_runtime
from tofa_core.arch import Arch, SearchSpace
from tofa_core.constraints import BY_FIELD, KB
from tofa_core.costs import count_macs, count_params, folded_params
from tofa_core.quantize import peak_activation_bytes, quantize_int8
from tofa_core.search.targets import HOST_DEVICE, Target
from tofa_core.supernet.static import at_resolution
from tofa_core.training.evaluate import EvalData

MAX_ABS_DIFF = 1e-4
FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "torchscript": "model.pt", "pt2": "model.pt2"}
# What model.json says about an int8 file: how it was made, so a runtime knows what it gets.
INT8_SCHEME = {
    "format": "ONNX QDQ (QuantizeLinear/DequantizeLinear around each op)",
    "weights": "int8, symmetric, per output channel",
    "activations": "int8, asymmetric, per tensor",
    "calibration": "min-max over the training images of `calibration_images`",
    "tool": "onnxruntime.quantization.quantize_static",
}


class VerificationError(RuntimeError):
    """An exported model failed a check; `check` names which one."""

    def __init__(self, check: str, message: str):
        super().__init__(f"verification failed ({check}): {message}")
        self.check = check


@dataclass
class Exported:
    folder: Path
    files: dict[str, Path]  # model.onnx, model.pt, model.json
    about: dict  # the content of model.json


def export_subnet(
    model: nn.Module,
    arch: Arch,
    data: EvalData,
    folder: str | Path,
    *,
    classes: list[str],
    formats: tuple[str, ...] = ("onnx", "torchscript"),
    about: dict | None = None,
    precision: str = "fp32",
) -> Exported:
    """Write `model` (a BN-recalibrated extracted subnet) into `folder`: its `formats`, and
    model.json naming the file deployed at `precision` (model.int8.onnx for int8)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval().to(memory_format=torch.contiguous_format)  # the layout ONNX describes
    example = at_resolution(data.calib[:1], arch.resolution)
    files = {}
    if "onnx" in formats:
        files["model.onnx"] = folder / FILES["onnx"]
        files["model.onnx"].write_bytes(onnx_runtime.onnx_bytes(model, example))
    if "onnx-int8" in formats:
        calibration = at_resolution(data.calib, arch.resolution).numpy()
        files["model.int8.onnx"] = folder / FILES["onnx-int8"]
        files["model.int8.onnx"].write_bytes(quantize_int8(files["model.onnx"].read_bytes(), calibration))
        about = {"quantization": INT8_SCHEME | {"calibration_images": len(calibration)}} | (about or {})
    if "torchscript" in formats:
        # Traced, not scripted: 2-3x faster, and like the ONNX file it takes input at the
        # subnet's own resolution (any batch size); model.json says how to resize to it.
        with onnx_runtime.EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript is deprecated in 2.13; tracer notes
            scripted = torch.jit.trace(model, example, check_trace=False)
        files["model.pt"] = folder / FILES["torchscript"]
        scripted.save(str(files["model.pt"]))
    if "pt2" in formats:
        files["model.pt2"] = folder / FILES["pt2"]
        _save_pt2(model, at_resolution(data.calib[:2], arch.resolution), files["model.pt2"])
    description = {
        "arch": arch.to_dict(),
        "input": {
            "name": "input",
            "layout": "NCHW",
            "dtype": "float32",
            "channels": data.channels,
            "resolution": arch.resolution,
            "resize": "bilinear (align_corners=False) from the image to resolution x resolution",
        },
        "normalisation": {"scale": 1 / 255, "mean": data.mean, "std": data.std},
        "output": {"name": "logits", "classes": list(classes)},
        "precision": precision,
        "deployed": FILES["onnx-int8" if precision == "int8" else "onnx"],
        **(about or {}),
    }
    files["model.json"] = folder / "model.json"
    files["model.json"].write_text(json.dumps(description, indent=2))
    return Exported(folder, files, description)


def _save_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export's ExportedProgram with a dynamic batch dimension (the example has 2 images:
    torch.export fixes a dimension of size 1)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with onnx_runtime.EXPORT_LOCK, torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))


def _check_pt2(path: Path, x: torch.Tensor, reference: np.ndarray) -> float:
    """Largest difference between the saved ExportedProgram's outputs and PyTorch's."""
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        diff = float((program(x) - torch.from_numpy(reference)).abs().max()) if len(x) else 0.0
    if not diff <= MAX_ABS_DIFF:
        raise VerificationError("pt2-matches-pytorch", f"the torch.export program differs by {diff:.2e}")
    return diff


def verify(
    exported: Exported,
    model: nn.Module,
    arch: Arch,
    space: SearchSpace,
    target: Target,
    data: EvalData,
    *,
    latency_threads: int = 1,
) -> dict:
    """Check the exported files against PyTorch and the target's budget; return what was measured.

    Accuracy, RAM, flash and latency are measured on the deployed file (model.int8.onnx for an
    int8 target, else model.onnx); `test_acc` is the deployed file's, `test_acc_fp32` the float's."""
    model = model.eval().to(memory_format=torch.contiguous_format)
    x = at_resolution(data.test_x if len(data.test_y) else data.val_x, arch.resolution)
    if len(x) == 0:
        x = at_resolution(data.calib[:64], arch.resolution)
    with torch.no_grad():
        reference = model(x).numpy()
    onnx_file = exported.files["model.onnx"]
    logits = onnx_runtime.run(onnx_runtime.session(str(onnx_file)), x.numpy().astype(np.float32))
    diff = float(np.abs(logits - reference).max()) if len(x) else 0.0
    if not diff <= MAX_ABS_DIFF:
        raise VerificationError(
            "onnx-matches-pytorch", f"ONNX Runtime differs from PyTorch by {diff:.2e} > {MAX_ABS_DIFF}"
        )
    measured: dict = {"onnx_max_abs_diff": diff}
    if "model.pt" in exported.files:
        scripted = torch.jit.load(str(exported.files["model.pt"]))
        with torch.no_grad():
            ts_diff = float((scripted(x) - torch.from_numpy(reference)).abs().max()) if len(x) else 0.0
        if not ts_diff <= MAX_ABS_DIFF:
            raise VerificationError("torchscript-matches-pytorch", f"TorchScript differs by {ts_diff:.2e}")
        measured["torchscript_max_abs_diff"] = ts_diff
        params = sum(p.numel() for p in scripted.parameters())
    else:
        params = sum(p.numel() for p in model.parameters())
    if "model.pt2" in exported.files:
        measured["pt2_max_abs_diff"] = _check_pt2(exported.files["model.pt2"], x, reference)
    measured |= _check_costs(onnx_file, params, arch, space, target)
    deployed, logits = onnx_file, {"fp32": logits}
    if "model.int8.onnx" in exported.files:
        int8_file = exported.files["model.int8.onnx"]
        logits["int8"], agreement = _check_int8(int8_file, x, logits["fp32"], target.min_int8_agreement)
        measured["int8_agreement"] = agreement
        deployed = exported.files["model.int8.onnx"] if target.precision == "int8" else onnx_file
    measured |= _check_memory(deployed, target)
    if target.device == HOST_DEVICE:
        measured["latency_ms"] = _check_latency(deployed, data, arch, target, latency_threads)
    _accuracies(measured, logits, target.precision, deployed, data, arch)
    return measured


def _check_int8(
    int8_file: Path, x: torch.Tensor, float_logits: np.ndarray, least: float
) -> tuple[np.ndarray, float]:
    """The int8 file's logits on `x`, and its top-1 agreement with the float model's (>= least)."""
    logits = onnx_runtime.run(onnx_runtime.session(str(int8_file)), x.numpy().astype(np.float32))
    agreement = float((logits.argmax(1) == float_logits.argmax(1)).mean()) if len(x) else 1.0
    if agreement < least:
        raise VerificationError(
            "int8-agreement",
            f"the int8 model agrees with the float one on {agreement:.1%} of the images < {least:.0%} "
            "(min_int8_agreement)",
        )
    return logits, agreement


def _check_memory(deployed: Path, target: Target) -> dict:
    """RAM (graph liveness at the target's precision) and flash (file bytes) of the deployed file."""
    content = deployed.read_bytes()
    measured = {
        "ram_kb": peak_activation_bytes(content, target.precision) / KB,
        "flash_kb": len(content) / KB,
    }
    for key, field in (("ram_kb", "max_ram_kb"), ("flash_kb", "max_flash_kb")):
        budget = getattr(target, field)
        if budget is not None and measured[key] > budget:
            shown = BY_FIELD[field]
            raise VerificationError(
                field, f"{deployed.name} needs {shown.show(measured[key])} > {budget:g} {shown.unit}"
            )
    return measured


def _check_latency(deployed: Path, data: EvalData, arch: Arch, target: Target, threads: int) -> float:
    one = at_resolution(data.calib[:1], arch.resolution).numpy()
    latency = onnx_runtime.model_latency_ms(str(deployed), one, threads)
    if latency > target.max_latency_ms:
        raise VerificationError(
            "max_latency_ms", f"measured {latency:.4f} ms > {target.max_latency_ms:g} ms on this host"
        )
    return latency


def _accuracies(measured: dict, logits: dict, precision: str, deployed: Path, data, arch) -> None:
    """test_acc (the deployed file's), test_acc_<precision> per file, val_acc (deployed file)."""
    if len(data.test_y):
        truth = data.test_y.numpy()
        for name, values in logits.items():
            measured[f"test_acc_{name}"] = float((values.argmax(1) == truth).mean())
        measured["test_acc"] = measured[f"test_acc_{precision}"]
    if len(data.val_y):
        sess = onnx_runtime.session(str(deployed))
        val = onnx_runtime.run(sess, at_resolution(data.val_x, arch.resolution).numpy())
        measured["val_acc"] = float((val.argmax(1) == data.val_y.numpy()).mean())


def _check_costs(onnx_file: Path, params: int, arch: Arch, space: SearchSpace, target: Target) -> dict:
    """The file's MACs and parameters: equal to what the arch implies, and within the budget."""
    macs, onnx_params = onnx_runtime.onnx_costs(onnx_file.read_bytes())
    expected = (count_macs(arch, space), count_params(arch, space), folded_params(arch, space))
    if (macs, params, onnx_params) != expected:
        raise VerificationError(
            "costs-match-arch",
            f"exported model has {macs:,} MACs / {params:,} params ({onnx_params:,} in ONNX); its arch "
            f"implies {expected[0]:,} / {expected[1]:,} ({expected[2]:,})",
        )
    if target.max_macs is not None and macs > target.max_macs:
        raise VerificationError("max_macs", f"exported model has {macs:,} MACs > {target.max_macs:,}")
    if target.max_params is not None and max(params, onnx_params) > target.max_params:
        raise VerificationError(
            "max_params", f"exported model has {params:,} parameters > {target.max_params:,}"
        )
    return {"macs": macs, "params": params, "onnx_params": onnx_params}


def preprocess(images: torch.Tensor, about: dict) -> np.ndarray:
    """uint8 images (N, C, H, W) -> the float input an exported model takes, as its model.json
    says: scale, normalise with its mean/std, resize to its resolution."""
    norm = about["normalisation"]
    mean = torch.tensor(norm["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], dtype=torch.float32).view(1, -1, 1, 1)
    x = (images.float() * float(norm["scale"]) - mean) / std
    return at_resolution(x, int(about["input"]["resolution"])).numpy().astype(np.float32)


@dataclass(frozen=True)
class Evaluation:
    """The labelled images every exported model of a run is judged on, champions included."""

    label: str  # what they are, for reasons and MLflow: "test split of v-... (360 images)"
    images: torch.Tensor
    labels: torch.Tensor  # indices into `classes`
    classes: tuple[str, ...]

    def accuracy(self, model_file: str | Path, about: dict, only=None) -> float:
        """`export_accuracy` on these images (only those of the classes `only`, when given)."""
        return export_accuracy(model_file, about, self.images, self.labels, list(self.classes), only)


def export_accuracy(
    onnx_file: str | Path, about: dict, images: torch.Tensor, labels, classes: list[str], only=None
) -> float:
    """Accuracy of an exported ONNX model on labelled images whose label indices refer to
    `classes`. Outputs map to classes by name (model.json), so a model exported from another
    data version is judged on the same images, right or wrong, as the current one. `only`:
    judge on the images of these classes, the model choosing among them alone (how two models
    that know different classes are compared on the classes both know)."""
    truth = np.array([classes[int(i)] for i in labels])
    names = np.asarray(about["output"]["classes"])
    if only is not None:
        keep = np.isin(truth, list(only))
        images, truth = images[torch.from_numpy(keep)], truth[keep]
    if len(images) == 0:
        raise ValueError("no labelled images to evaluate an exported model on")
    logits = onnx_runtime.run(onnx_runtime.session(str(onnx_file)), preprocess(images, about))
    if only is not None:
        logits = np.where(np.isin(names, list(only)), logits, -np.inf)
    return float((names[logits.argmax(1)] == truth).mean())
