"""Export a chosen subnet (ONNX + TorchScript + model.json) and verify the files themselves.

Verification measures the exported artefacts, not the search's own numbers: ONNX Runtime's
outputs against PyTorch's on real images, MACs counted on the ONNX graph, parameters counted
on the TorchScript model, latency timed with ONNX Runtime when the target's device is this
machine, and test accuracy of the ONNX model. A failed check raises `VerificationError`
naming the check; nothing is published for that export.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tofa_core import litert, onnx_runtime
from tofa_core.arch import Arch, SearchSpace
from tofa_core.constraints import BY_FIELD, KB
from tofa_core.costs import count_macs, count_params, folded_params
from tofa_core.data.normalise import PIXEL_SCALE, normalise
from tofa_core.quantize import peak_activation_bytes, quantize_int8
from tofa_core.search.targets import HOST_DEVICE, LITERT_FORMATS, Target
from tofa_core.supernet.static import at_resolution
from tofa_core.training.evaluate import EvalData

MAX_ABS_DIFF = 1e-4
FILES = {
    "onnx": "model.onnx",
    "onnx-int8": "model.int8.onnx",
    "torchscript": "model.pt",
    "pt2": "model.pt2",
    "tflite": "model.tflite",
    "tflite-int8": "model.int8.tflite",
}
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

    def __reduce__(self):
        # Raised in Ray workers and unpickled by the driver: rebuilt from its check and its
        # message as it stands (callers prefix the candidate to it), not from __init__'s args.
        return _rebuilt_verification_error, (self.check, self.args)


def _rebuilt_verification_error(check: str, args: tuple) -> VerificationError:
    err = VerificationError.__new__(VerificationError)
    RuntimeError.__init__(err, *args)
    err.check = check
    return err


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
    files = _write_formats(model, arch, data, folder, formats)
    if "model.int8.onnx" in files:
        scheme = INT8_SCHEME | {"calibration_images": len(data.calib)}
        about = {"quantization": scheme} | (about or {})
    litert_files = [FILES[f] for f in LITERT_FORMATS if f in formats]
    if litert_files:
        described = {name: litert.io_description(files[name]) for name in litert_files}
        about = {"litert": described} | (about or {})
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
        "normalisation": {"scale": PIXEL_SCALE, "mean": data.mean, "std": data.std},
        "output": {"name": "logits", "classes": list(classes)},
        "precision": precision,
        "deployed": FILES["onnx-int8" if precision == "int8" else "onnx"],
        **(about or {}),
    }
    files["model.json"] = folder / "model.json"
    files["model.json"].write_text(json.dumps(description, indent=2))
    return Exported(folder, files, description)


def _write_formats(
    model: nn.Module, arch: Arch, data: EvalData, folder: Path, formats: tuple[str, ...]
) -> dict[str, Path]:
    """Each format's file in `folder`, by file name."""
    example = at_resolution(data.calib[:1], arch.resolution)
    files = {FILES[f]: folder / FILES[f] for f in formats}
    if "onnx" in formats:
        files["model.onnx"].write_bytes(onnx_runtime.onnx_bytes(model, example))
    if "onnx-int8" in formats:
        calibration = at_resolution(data.calib, arch.resolution).numpy()
        files["model.int8.onnx"].write_bytes(quantize_int8(files["model.onnx"].read_bytes(), calibration))
    if "torchscript" in formats:
        _save_torchscript(model, example, files["model.pt"])
    if "pt2" in formats:
        _save_pt2(model, at_resolution(data.calib[:2], arch.resolution), files["model.pt2"])
    if any(f in formats for f in LITERT_FORMATS):
        _save_litert(model, arch, data, files)
    return files


def _save_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Traced, not scripted: 2-3x faster, and like the ONNX file it takes input at the subnet's
    own resolution (any batch size); model.json says how to resize to it."""
    with onnx_runtime.EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in 2.13; tracer notes
        scripted = torch.jit.trace(model, example, check_trace=False)
    scripted.save(str(path))


def _save_litert(model: nn.Module, arch: Arch, data: EvalData, files: dict[str, Path]) -> None:
    """model.tflite / model.int8.tflite, converted from the model's torch.export program (the
    pt2 file when it is one of the formats) by this process's LiteRT converter. A subnet that
    another target or candidate already converted (the same weights and calibration images)
    is copied from that conversion."""
    calibration = at_resolution(data.calib, arch.resolution).numpy()
    converter = litert.shared_converter()
    outputs = {"float_out": files.get("model.tflite"), "int8_out": files.get("model.int8.tflite")}
    key = _content_key(model, calibration)
    if converter.copy_converted(key, **outputs):
        return
    with tempfile.TemporaryDirectory(prefix="tofa-pt2-") as tmp:
        program = files.get("model.pt2") or Path(tmp) / "model.pt2"
        if not program.exists():
            _save_pt2(model, at_resolution(data.calib[:2], arch.resolution), program)
        converter.convert(program, calibration, **outputs, key=key)


def _content_key(model: nn.Module, calibration: np.ndarray) -> str:
    """A digest of what a conversion depends on: the model's structure and numbers, its
    calibration images."""
    digest = hashlib.sha256(repr(model).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    digest.update(np.ascontiguousarray(calibration).tobytes())
    return digest.hexdigest()


def _save_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export's ExportedProgram with a dynamic batch dimension (the example has 2 images:
    torch.export fixes a dimension of size 1)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with onnx_runtime.EXPORT_LOCK, torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))


def _check_torchscript(path: Path, x: torch.Tensor, reference: np.ndarray) -> tuple[float, int]:
    """Largest difference between the TorchScript file's outputs and PyTorch's; its parameters."""
    scripted = torch.jit.load(str(path))
    with torch.no_grad():
        diff = float((scripted(x) - torch.from_numpy(reference)).abs().max()) if len(x) else 0.0
    if not diff <= MAX_ABS_DIFF:
        raise VerificationError("torchscript-matches-pytorch", f"TorchScript differs by {diff:.2e}")
    return diff, sum(p.numel() for p in scripted.parameters())


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
        ts_diff, params = _check_torchscript(exported.files["model.pt"], x, reference)
        measured["torchscript_max_abs_diff"] = ts_diff
    else:
        params = sum(p.numel() for p in model.parameters())
    if "model.pt2" in exported.files:
        measured["pt2_max_abs_diff"] = _check_pt2(exported.files["model.pt2"], x, reference)
    measured |= _check_costs(onnx_file, params, arch, space, target)
    gate = _Gate.of(model, data, arch, x, reference)
    deployed, logits = onnx_file, {"fp32": logits}
    if "model.int8.onnx" in exported.files:
        int8 = onnx_runtime.session(str(exported.files["model.int8.onnx"]))
        run_int8 = lambda g: onnx_runtime.run(int8, g)  # noqa: E731
        measured["int8_agreement"] = gate.check("model.int8.onnx", run_int8, target)
        logits["int8"] = onnx_runtime.run(int8, x.numpy().astype(np.float32))
        deployed = exported.files["model.int8.onnx"] if target.precision == "int8" else onnx_file
    measured |= _check_memory(deployed, target)
    litert_measured, logits_litert = _check_litert(exported.files, x, reference, target, gate)
    measured |= litert_measured
    logits |= logits_litert
    if target.device == HOST_DEVICE:
        measured["latency_ms"] = _check_latency(deployed, data, arch, target, latency_threads)
    _accuracies(measured, logits, target.precision, deployed, data, arch)
    return measured


@dataclass(frozen=True)
class _Gate:
    """The images an int8 file's top-1 agreement with the float model is measured on: the
    unlabelled pool (never the test split, on which accuracy is reported, so a candidate is
    not in effect chosen on it), and the float model's picks there."""

    images: np.ndarray
    picks: np.ndarray

    @classmethod
    def of(cls, model: nn.Module, data: EvalData, arch: Arch, x: torch.Tensor, reference: np.ndarray):
        if not len(data.pool):  # no training images at all: the images verification has
            return cls(x.numpy().astype(np.float32), reference.argmax(1))
        images = at_resolution(data.pool, arch.resolution)
        with torch.no_grad():
            picks = model(images).numpy().argmax(1)
        return cls(images.numpy().astype(np.float32), picks)

    def check(self, name: str, run, target: Target) -> float:
        """Agreement of `run`'s logits with the float model's; VerificationError under the gate."""
        agreement = float((run(self.images).argmax(1) == self.picks).mean()) if len(self.picks) else 1.0
        if agreement < target.min_int8_agreement:
            raise VerificationError(
                "int8-agreement",
                f"{name} agrees with the float model on {agreement:.1%} of {len(self.picks)} held-out "
                f"unlabelled images < {target.min_int8_agreement:.0%} (min_int8_agreement)",
            )
        return agreement


def _check_memory(deployed: Path, target: Target) -> dict:
    """RAM (graph liveness at the target's precision) and flash (file bytes) of the deployed file."""
    content = deployed.read_bytes()
    ram_kb, flash_kb = peak_activation_bytes(content, target.precision) / KB, len(content) / KB
    _check_fits(deployed.name, ram_kb, flash_kb, target)
    return {"ram_kb": ram_kb, "flash_kb": flash_kb}


def _check_fits(name: str, ram_kb: float, flash_kb: float, target: Target) -> None:
    for value, field in ((ram_kb, "max_ram_kb"), (flash_kb, "max_flash_kb")):
        budget = getattr(target, field)
        if budget is not None and value > budget:
            shown = BY_FIELD[field]
            raise VerificationError(field, f"{name} needs {shown.show(value)} > {budget:g} {shown.unit}")


def _check_litert(
    files: dict[str, Path], x: torch.Tensor, reference: np.ndarray, target: Target, gate: _Gate
) -> tuple[dict, dict]:
    """The LiteRT files run by LiteRT's interpreter: the float one matches PyTorch, the int8 one
    agrees with it on top-1 (>= min_int8_agreement, on the gate's images); the one at the
    target's precision fits its RAM (op-order liveness) and flash (file bytes) budgets.
    Returns (measured, logits on `x`)."""
    measured, logits = {}, {}
    if "model.tflite" in files:
        logits["tflite"] = litert.run(files["model.tflite"], x.numpy())
        diff = float(np.abs(logits["tflite"] - reference).max()) if len(x) else 0.0
        if not diff <= MAX_ABS_DIFF:
            raise VerificationError("tflite-matches-pytorch", f"LiteRT differs from PyTorch by {diff:.2e}")
        measured["tflite_max_abs_diff"] = diff
    if "model.int8.tflite" in files:
        int8 = files["model.int8.tflite"]
        measured["tflite_int8_agreement"] = gate.check(int8.name, lambda g: litert.run(int8, g), target)
        logits["tflite_int8"] = litert.run(int8, x.numpy())
    if target.litert_file:
        deployed = files[FILES[target.litert_file]]
        ram_kb, flash_kb = litert.peak_activation_bytes(deployed) / KB, deployed.stat().st_size / KB
        _check_fits(deployed.name, ram_kb, flash_kb, target)
        measured |= {"tflite_ram_kb": ram_kb, "tflite_flash_kb": flash_kb}
    return measured, logits


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
    if norm["scale"] != PIXEL_SCALE:
        raise ValueError(f"model.json's normalisation.scale is {norm['scale']}, not 1/255: not a TOFA export")
    x = normalise(images, norm["mean"], norm["std"])
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
