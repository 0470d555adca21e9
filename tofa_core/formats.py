"""The registry of export formats: one entry each, read by every stage that handles files.

An entry names the format (as a target's `formats` lists it), its file in the export folder,
the numbers it holds, the runtime that runs it, how it is written and how verification judges
it: a float file must compute what PyTorch computes (within `tolerance`); a quantized one must
agree with the float model on top-1 (the target's `min_int8_agreement`). The target schema,
the exporter, the verifier, the MLflow metric keys and the summary derive from it. Adding a
format is one entry here (with its writer and runner) and its test. The table itself imports
nothing heavy (targets are validated without torch); writers and runners import their runtimes.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tofa_core.arch import Arch

Runner = Callable[[np.ndarray], np.ndarray]  # images (N, C, H, W) float32 -> logits


@dataclass(frozen=True)
class Job:
    """What a writer writes from: the subnet, its arch, its calibration images, the folder."""

    model: nn.Module
    arch: Arch
    calib: torch.Tensor  # normalised training images at any side (resized here)
    folder: Path
    requested: tuple[str, ...]  # every format asked for (a writer may reuse another's file)

    def path(self, name: str) -> Path:
        return self.folder / BY_NAME[name].file

    def images(self, n: int | None = None) -> torch.Tensor:
        from tofa_core.supernet.static import at_resolution

        return at_resolution(self.calib[:n], self.arch.resolution)


@dataclass(frozen=True)
class Format:
    name: str  # as targets list it: "onnx-int8"
    file: str  # in the export folder: "model.int8.onnx"
    precision: str  # the numbers it holds: "fp32", "fp16" or "int8"
    runtime: str  # what runs it, for people: "ONNX Runtime"
    key: str  # its verification value: <key>_max_abs_diff (float) or <key>_agreement (quantized)
    accuracy: str | None  # its test accuracy is test_acc_<accuracy>; None: a copy of another's
    # Writes the files of the requested formats that share this writer (one LiteRT conversion
    # makes both LiteRT files), given the job and their names, after every earlier entry's.
    write: Callable[[Job, tuple[str, ...]], None]
    runner: Callable[[Path], Runner]
    tolerance: float | None = None  # largest |logit - PyTorch's logit|; None: judged by agreement
    relative: bool = False  # tolerance is a share of the largest |logit| (at least 1): half floats

    def allowed(self, reference: np.ndarray) -> float:
        """The largest difference from PyTorch's logits `reference` this file may have."""
        scale = max(1.0, float(np.abs(reference).max())) if self.relative and reference.size else 1.0
        return self.tolerance * scale

    @property
    def check(self) -> str:
        """The verification check that rejects this file (VerificationError.check)."""
        return f"{self.name}-matches-pytorch" if self.tolerance is not None else "int8-agreement"

    @property
    def measured(self) -> str:
        """The key of what verification measured on this file."""
        return f"{self.key}_max_abs_diff" if self.tolerance is not None else f"{self.key}_agreement"


MAX_ABS_DIFF = 1e-4  # a float file of the same graph differs from PyTorch by rounding alone


def _write_onnx(job: Job, names: tuple[str, ...]) -> None:
    from tofa_core import onnx_runtime

    job.path("onnx").write_bytes(onnx_runtime.onnx_bytes(job.model, job.images(1)))


def _write_onnx_int8(job: Job, names: tuple[str, ...]) -> None:
    from tofa_core.quantize import quantize_int8

    calibration = job.images().numpy()
    job.path("onnx-int8").write_bytes(quantize_int8(job.path("onnx").read_bytes(), calibration))


def _write_onnx_fp16(job: Job, names: tuple[str, ...]) -> None:
    """The ONNX file's weights and arithmetic in float16, its input and output float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(onnx.load_from_string(job.path("onnx").read_bytes()), keep_io_types=True)
    job.path("onnx-fp16").write_bytes(half.SerializeToString())


def _write_torchscript(job: Job, names: tuple[str, ...]) -> None:
    """Traced, not scripted: 2-3x faster, and like the ONNX file it takes input at the subnet's
    own resolution (any batch size); model.json says how to resize to it."""
    import torch

    from tofa_core import onnx_runtime

    with onnx_runtime.EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript is deprecated in 2.13; tracer notes
        scripted = torch.jit.trace(job.model, job.images(1), check_trace=False)
    scripted.save(str(job.path("torchscript")))


def _write_pt2(job: Job, names: tuple[str, ...]) -> None:
    save_pt2(job.model, job.images(2), job.path("pt2"))


def save_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export's ExportedProgram with a dynamic batch dimension (the example has 2 images:
    torch.export fixes a dimension of size 1)."""
    import torch

    from tofa_core import onnx_runtime

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with onnx_runtime.EXPORT_LOCK, torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))


def _write_litert(job: Job, names: tuple[str, ...]) -> None:
    """model.tflite / model.int8.tflite, converted from the model's torch.export program (the
    pt2 file when it was written) by this process's LiteRT converter. A subnet that another
    target or candidate already converted (the same weights and calibration images) is copied
    from that conversion."""
    from tofa_core import litert

    calibration = job.images().numpy()
    converter = litert.shared_converter()
    outputs = {
        "float_out": job.path("tflite") if "tflite" in names else None,
        "int8_out": job.path("tflite-int8") if "tflite-int8" in names else None,
    }
    key = _content_key(job.model, calibration)
    if converter.copy_converted(key, **outputs):
        return
    with tempfile.TemporaryDirectory(prefix="tofa-pt2-") as tmp:
        program = job.path("pt2") if "pt2" in job.requested else Path(tmp) / "model.pt2"
        if not program.exists():
            save_pt2(job.model, job.images(2), program)
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


def _onnx_runner(path: Path) -> Runner:
    from tofa_core import onnx_runtime

    sess = onnx_runtime.session(str(path))
    return lambda x: onnx_runtime.run(sess, x)


def _torch_runner(module) -> Runner:
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def _torchscript_runner(path: Path) -> Runner:
    import torch

    return _torch_runner(torch.jit.load(str(path)))


def _pt2_runner(path: Path) -> Runner:
    import torch

    return _torch_runner(torch.export.load(str(path)).module())


def _litert_runner(path: Path) -> Runner:
    from tofa_core import litert

    return lambda x: litert.run(path, x)


# In the order they are written and verified: the files derived from model.onnx after it, the
# float files before the quantized ones (a float file that differs is a bug, not a candidate
# to pass over), LiteRT last (its conversion reuses model.pt2).
FORMATS = (
    Format(
        name="onnx",
        file="model.onnx",
        precision="fp32",
        runtime="ONNX Runtime",
        key="onnx",
        accuracy="fp32",
        write=_write_onnx,
        runner=_onnx_runner,
        tolerance=MAX_ABS_DIFF,
    ),
    Format(
        name="onnx-fp16",
        file="model.fp16.onnx",
        precision="fp16",
        runtime="ONNX Runtime",
        key="fp16",
        accuracy="fp16",
        write=_write_onnx_fp16,
        runner=_onnx_runner,
        tolerance=1e-2,  # float16 keeps ~3 significant digits: 1e-3 of the largest logit measured
        relative=True,
    ),
    Format(
        name="torchscript",
        file="model.pt",
        precision="fp32",
        runtime="PyTorch (TorchScript)",
        key="torchscript",
        accuracy=None,
        write=_write_torchscript,
        runner=_torchscript_runner,
        tolerance=MAX_ABS_DIFF,
    ),
    Format(
        name="pt2",
        file="model.pt2",
        precision="fp32",
        runtime="PyTorch (torch.export)",
        key="pt2",
        accuracy=None,
        write=_write_pt2,
        runner=_pt2_runner,
        tolerance=MAX_ABS_DIFF,
    ),
    Format(
        name="onnx-int8",
        file="model.int8.onnx",
        precision="int8",
        runtime="ONNX Runtime",
        key="int8",
        accuracy="int8",
        write=_write_onnx_int8,
        runner=_onnx_runner,
    ),
    Format(
        name="tflite",
        file="model.tflite",
        precision="fp32",
        runtime="LiteRT",
        key="tflite",
        accuracy="tflite",
        write=_write_litert,
        runner=_litert_runner,
        tolerance=MAX_ABS_DIFF,
    ),
    Format(
        name="tflite-int8",
        file="model.int8.tflite",
        precision="int8",
        runtime="LiteRT",
        key="tflite_int8",
        accuracy="tflite_int8",
        write=_write_litert,
        runner=_litert_runner,
    ),
)
BY_NAME = {f.name: f for f in FORMATS}
NAMES = tuple(BY_NAME)
DEFAULT = ("onnx", "torchscript")


def by_runtime(runtime: str) -> tuple[str, ...]:
    """The names of the formats that `runtime` runs."""
    return tuple(f.name for f in FORMATS if f.runtime == runtime)


def deployed(runtime: str, precision: str) -> str | None:
    """The format `runtime` runs at `precision`, if it has one."""
    return next((f.name for f in FORMATS if f.runtime == runtime and f.precision == precision), None)


def write_files(job: Job) -> dict[str, Path]:
    """Write the files of job.requested into job.folder, in registry order; their paths by file name."""
    unknown = set(job.requested) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}: the formats are {', '.join(NAMES)}")
    done = set()
    for fmt in FORMATS:
        if fmt.name in job.requested and fmt.write not in done:
            fmt.write(job, tuple(f.name for f in FORMATS if f.write is fmt.write and f.name in job.requested))
            done.add(fmt.write)
    return {f.file: job.path(f.name) for f in FORMATS if f.name in job.requested}


def metric_keys() -> tuple[str, ...]:
    """What verification reports per file, for MLflow and the summary: each format's test
    accuracy and each quantized format's agreement (float files pass within their tolerance)."""
    accuracies = tuple(f"test_acc_{f.accuracy}" for f in FORMATS if f.accuracy)
    return accuracies + tuple(f.measured for f in FORMATS if f.tolerance is None)
