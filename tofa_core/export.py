"""Export a chosen subnet (ONNX + TorchScript + model.json) and verify the files themselves.

Verification measures the exported artefacts, not the search's own numbers: ONNX Runtime's
outputs against PyTorch's on real images, MACs counted on the ONNX graph, parameters counted
on the TorchScript model, latency timed with ONNX Runtime when the target's device is this
machine, and test accuracy of the ONNX model. A failed check raises `VerificationError`
naming the check; nothing is published for that export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tofa_core import litert, onnx_runtime
from tofa_core.arch import Arch, SearchSpace
from tofa_core.constraints import CONSTRAINTS, KB
from tofa_core.costs import count_macs, count_params, folded_params
from tofa_core.data.normalise import PIXEL_SCALE, normalise
from tofa_core.formats import BY_NAME, DEFAULT, FORMATS, Job, by_runtime, deployed, metric_keys, write_files
from tofa_core.quantize import peak_activation_bytes
from tofa_core.search.targets import HOST_DEVICE, Target
from tofa_core.supernet.static import at_resolution
from tofa_core.training.evaluate import EvalData

FILES = {f.name: f.file for f in FORMATS}
# What `verify` reports, derived from the two registries: accuracies, agreements, the
# constraints' measured values (and the shipped LiteRT file's RAM and flash).
MEASURED_KEYS = (
    "test_acc",
    "val_acc",
    *metric_keys(),
    *(c.key for c in CONSTRAINTS),
    "tflite_ram_kb",
    "tflite_flash_kb",
)


@dataclass(frozen=True)
class Verification:
    """What verification measured on a target's exported files, by registry entry.

    `costs`: by constraint key (tofa_core.constraints: macs, params, ram_kb, flash_kb,
    latency_ms, energy_uj, ...), plus the ONNX graph's parameters after BN folding and the
    shipped LiteRT file's RAM and flash; `files`: by format (tofa_core.formats, its
    `measured` key), each file's check: max abs diff from PyTorch for a float file, top-1
    agreement for a quantized one; `accuracy`: `test_acc` (the deployed file's),
    `test_acc_<format>` per file and `val_acc` (the deployed file's)."""

    costs: dict[str, float]
    files: dict[str, float]
    accuracy: dict[str, float]

    def as_dict(self) -> dict[str, float]:
        """One flat mapping: model.json's `verified`, a summary row."""
        return {**self.costs, **self.files, **self.accuracy}


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
    formats: tuple[str, ...] = DEFAULT,
    about: dict | None = None,
    precision: str = "fp32",
) -> Exported:
    """Write `model` (a BN-recalibrated extracted subnet) into `folder`: its `formats`, and
    model.json naming the file deployed at `precision` (model.int8.onnx for int8)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval().to(memory_format=torch.contiguous_format)  # the layout ONNX describes
    files = write_files(Job(model, arch, data.calib, folder, tuple(formats)))
    if "model.int8.onnx" in files:
        scheme = INT8_SCHEME | {"calibration_images": len(data.calib)}
        about = {"quantization": scheme} | (about or {})
    litert_files = [FILES[f] for f in by_runtime("LiteRT") if f in formats]
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
        "deployed": FILES[deployed("ONNX Runtime", precision)],
        **(about or {}),
    }
    files["model.json"] = folder / "model.json"
    files["model.json"].write_text(json.dumps(description, indent=2))
    return Exported(folder, files, description)


def verify(
    exported: Exported,
    model: nn.Module,
    arch: Arch,
    space: SearchSpace,
    target: Target,
    data: EvalData,
    *,
    latency_threads: int = 1,
) -> Verification:
    """Check the exported files against PyTorch and the target's budget; return what was measured.

    Each file is judged as its format's entry says (tofa_core.formats). Accuracy, RAM, flash and
    latency are measured on the deployed file (model.int8.onnx for an int8 target, else
    model.onnx); `test_acc` is the deployed file's, `test_acc_<format>` each file's."""
    model = model.eval().to(memory_format=torch.contiguous_format)
    x = at_resolution(data.test_x if len(data.test_y) else data.val_x, arch.resolution)
    if len(x) == 0:
        x = at_resolution(data.calib[:64], arch.resolution)
    with torch.no_grad():
        reference = model(x).numpy()
    files, onnx_file = exported.files, exported.files["model.onnx"]
    gate = _Gate.of(model, data, arch, x, reference)
    checking = _FileChecks(files, x.numpy().astype(np.float32), reference, gate, target)
    # The order decides which check rejects a candidate that fails several, and specialization
    # treats them differently (NEXT_CANDIDATE): the float files, what the arch implies, the
    # int8 ONNX file, its memory, then the LiteRT files (the slowest runtime) and theirs.
    checking.run(lambda f: f.runtime != "LiteRT" and f.tolerance is not None)
    costs = _check_costs(onnx_file, _file_params(files, model), arch, space, target)
    checking.run(lambda f: f.runtime != "LiteRT" and f.tolerance is None)
    deployed_file = files[FILES[deployed("ONNX Runtime", target.precision)]]
    costs |= _check_memory(deployed_file, target)
    checking.run(lambda f: f.runtime == "LiteRT")
    costs |= _check_litert_memory(files, target)
    if target.device == HOST_DEVICE:
        costs["latency_ms"] = _check_latency(deployed_file, data, arch, target, latency_threads)
    costs |= _check_analytic(costs, arch, space, target)
    accuracy = _accuracies(checking.logits, target.precision, deployed_file, data, arch)
    return Verification(costs, checking.measured, accuracy)


@dataclass
class _FileChecks:
    """Exported files run by their runtimes on the verification images `x`: a float file must
    match PyTorch's logits within its tolerance, a quantized one agree with the float model
    on the gate's images. Collects what was measured and each file's logits by accuracy name."""

    files: dict[str, Path]
    x: np.ndarray
    reference: np.ndarray
    gate: _Gate
    target: Target
    measured: dict = field(default_factory=dict)
    logits: dict = field(default_factory=dict)

    def run(self, which) -> None:
        """Check the files of the formats `which` selects, in registry order."""
        for fmt in (f for f in FORMATS if f.file in self.files and which(f)):
            run = fmt.runner(self.files[fmt.file])
            out = run(self.x)
            if fmt.accuracy:
                self.logits[fmt.accuracy] = out
            if fmt.tolerance is None:
                self.measured[fmt.measured] = self.gate.check(fmt.file, run, self.target)
                continue
            diff = float(np.abs(out - self.reference).max()) if out.size else 0.0
            if not diff <= (allowed := fmt.allowed(self.reference)):
                shown = f"{fmt.runtime} ({fmt.file}) differs from PyTorch by {diff:.2e} > {allowed:.2e}"
                raise VerificationError(fmt.check, shown)
            self.measured[fmt.measured] = diff


def _file_params(files: dict[str, Path], model: nn.Module) -> int:
    """Parameters counted on the TorchScript file when there is one, else on the model."""
    if BY_NAME["torchscript"].file in files:
        return sum(p.numel() for p in torch.jit.load(str(files[BY_NAME["torchscript"].file])).parameters())
    return sum(p.numel() for p in model.parameters())


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
    _within(target, {"ram_kb": ram_kb, "flash_kb": flash_kb}, name)


def _within(target: Target, values: dict[str, float], where: str, after: str = "") -> None:
    """Each value (by constraint key) within the target's budget for it, in registry order;
    else the VerificationError of the first one over, named by its budget field."""
    for c in CONSTRAINTS:
        if c.key in values and (over := c.excess(values[c.key], getattr(target, c.field))):
            raise VerificationError(c.field, f"{where} needs {over}{after}")


def _check_analytic(measured: dict, arch: Arch, space: SearchSpace, target: Target) -> dict:
    """The budgets no file shows (an analytic cost such as energy), computed from the arch."""
    values = {
        c.key: c.price(arch, space, target.priced_as, None)
        for c in CONSTRAINTS
        if c.source == "analytic" and c.key not in measured and getattr(target, c.field) is not None
    }
    _within(target, values, "the exported model")
    return values


def _check_litert_memory(files: dict[str, Path], target: Target) -> dict:
    """The LiteRT file at the target's precision, when it ships one, fits its RAM (op-order
    liveness) and flash (file bytes) budgets: that file is what a LiteRT device runs."""
    if not target.litert_file:
        return {}
    shipped = files[FILES[target.litert_file]]
    ram_kb, flash_kb = litert.peak_activation_bytes(shipped) / KB, shipped.stat().st_size / KB
    _check_fits(shipped.name, ram_kb, flash_kb, target)
    return {"tflite_ram_kb": ram_kb, "tflite_flash_kb": flash_kb}


def _check_latency(deployed: Path, data: EvalData, arch: Arch, target: Target, threads: int) -> float:
    one = at_resolution(data.calib[:1], arch.resolution).numpy()
    latency = onnx_runtime.model_latency_ms(str(deployed), one, threads)
    _within(target, {"latency_ms": latency}, f"{deployed.name} (measured)", after=" on this host")
    return latency


def _accuracies(logits: dict, precision: str, deployed: Path, data, arch) -> dict[str, float]:
    """test_acc (the deployed file's), test_acc_<precision> per file, val_acc (deployed file)."""
    measured = {}
    if len(data.test_y):
        truth = data.test_y.numpy()
        for name, values in logits.items():
            measured[f"test_acc_{name}"] = float((values.argmax(1) == truth).mean())
        measured["test_acc"] = measured[f"test_acc_{precision}"]
    if len(data.val_y):
        sess = onnx_runtime.session(str(deployed))
        val = onnx_runtime.run(sess, at_resolution(data.val_x, arch.resolution).numpy())
        measured["val_acc"] = float((val.argmax(1) == data.val_y.numpy()).mean())
    return measured


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
    _within(target, {"macs": macs, "params": max(params, onnx_params)}, onnx_file.name)
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
