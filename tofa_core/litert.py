"""LiteRT (.tflite) files: converted by litert-torch in a Python of its own, run here by LiteRT's
interpreter.

litert-torch cannot be installed beside the pipeline (its converter pins typing-extensions
below what Prefect's and MLflow's pydantic needs), so `convert` runs `litert_convert.py` in the
converter's venv: `make litert` builds .venv-litert beside the pipeline's venv, or
TOFA_LITERT_PYTHON names another Python with litert-torch (on a cluster: the same path on
every worker). The interpreter, ai-edge-litert (the `edge` extra), does install beside it:
every file is verified and scored here, by the runtime that deploys it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CONVERTER = Path(__file__).with_name("litert_convert.py")
PYTHON_ENV = "TOFA_LITERT_PYTHON"
CONVERT_TIMEOUT_S = 900  # a conversion that hangs fails the export instead of the pipeline run
ERROR_TAIL = 2000  # characters of the converter's output kept in an error


class LiteRTUnavailable(RuntimeError):
    """A tflite format was asked for where the converter or the interpreter is missing."""


class ConversionError(RuntimeError):
    """litert-torch failed on a model."""


def converter_python() -> Path:
    """The Python that runs litert-torch: $TOFA_LITERT_PYTHON, else .venv-litert beside this venv."""
    configured = os.environ.get(PYTHON_ENV)
    python = Path(configured) if configured else Path(sys.prefix).parent / ".venv-litert" / "bin" / "python"
    if not python.is_file():
        raise LiteRTUnavailable(
            f"the tflite formats need the LiteRT converter, a Python with litert-torch, and {python} "
            f"does not exist: run `make litert` (it builds .venv-litert beside .venv) or set "
            f"{PYTHON_ENV} to such a Python"
        )
    return python


def require() -> None:
    """Fail now, before any search, when a tflite file could not be made or verified here."""
    converter_python()
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError as err:
        raise LiteRTUnavailable(
            f"the tflite formats are verified by LiteRT's interpreter, which is not installed ({err}): "
            "pip install 'tofa[edge]'"
        ) from err


def require_for(targets) -> None:
    """`require`, when any of `targets` asks for a LiteRT format: before training or search."""
    if any(f.startswith("tflite") for t in targets for f in t.formats):
        require()


def convert(program: Path, calibration: np.ndarray, *, float_out: Path | None, int8_out: Path | None) -> None:
    """Write `program` (a torch.export file) as float and/or int8 .tflite; int8 is calibrated
    on `calibration` (preprocessed images, N x C x H x W)."""
    with tempfile.TemporaryDirectory(prefix="tofa-litert-") as tmp:
        images = Path(tmp) / "calibration.npy"
        np.save(images, calibration.astype(np.float32))
        command = [str(converter_python()), "-I", str(CONVERTER), str(program), str(images)]
        command += ["--float", str(float_out)] if float_out else []
        command += ["--int8", str(int8_out)] if int8_out else []
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
        except subprocess.TimeoutExpired as err:
            raise ConversionError(f"litert-torch did not finish within {CONVERT_TIMEOUT_S} s") from err
    if done.returncode:
        output = (done.stdout + done.stderr)[-ERROR_TAIL:]
        raise ConversionError(f"litert-torch failed (exit {done.returncode}):\n{output}")


def _interpreter(path: Path):
    """LiteRT's own kernels, without the XNNPACK delegate it applies by default: a delegate
    rewrites the graph into nodes no microcontroller runtime has (and would skew the op-order
    liveness), and its float kernels differ from the builtin ones in the last bits."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(
        model_path=str(path),
        num_threads=1,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    return interpreter


def run(path: Path, x: np.ndarray) -> np.ndarray:
    """Float logits of the .tflite file on `x` (N x C x H x W float), one image at a time (files
    are converted at batch 1); int8 input is quantized and int8 output dequantized with the
    file's own scales, as a device would."""
    interpreter = _interpreter(path)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    if inp["dtype"] == np.int8:
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale + zero), -128, 127).astype(np.int8)
    logits = []
    for image in x.astype(inp["dtype"]):
        interpreter.set_tensor(inp["index"], image[None])
        interpreter.invoke()
        logits.append(interpreter.get_tensor(out["index"])[0])
    result = np.stack(logits) if logits else np.zeros((0, *out["shape"][1:]))
    if out["dtype"] == np.int8:
        scale, zero = out["quantization"]
        result = (result.astype(np.float32) - zero) * scale
    return result.astype(np.float32)


def io_description(path: Path) -> dict:
    """What a runtime must know of the file's input and output: dtype, shape, and for int8 the
    scale and zero point (real = scale * (q - zero_point))."""
    interpreter = _interpreter(path)

    def described(detail: dict) -> dict:
        shown = {"dtype": np.dtype(detail["dtype"]).name, "shape": [int(d) for d in detail["shape"]]}
        if detail["dtype"] == np.int8:
            scale, zero = detail["quantization"]
            shown |= {"scale": float(scale), "zero_point": int(zero)}
        return shown

    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    return {"input": described(inp), "output": described(out)}


def peak_activation_bytes(path: Path) -> int:
    """Largest sum of tensors alive at once when the file's ops run in their order: the input and
    every op output, each alive from its producer to its last reader. A runtime's planned arena
    is at least this (TFLite Micro's greedy planner packs into close to it)."""
    interpreter = _interpreter(path)
    ops = interpreter._get_ops_details()  # noqa: SLF001  the only way to read the op order
    if any(op["op_name"] == "DELEGATE" for op in ops):
        raise ValueError(f"{path}: a delegate replaced the graph's ops; the op order is not the file's")
    sizes = {t["index"]: _nbytes(t) for t in interpreter.get_tensor_details()}
    (inp,) = interpreter.get_input_details()
    born = {int(inp["index"]): 0}
    for step, op in enumerate(ops):
        born |= {int(t): step for t in op["outputs"] if t >= 0}
    last = dict(born)
    for step, op in enumerate(ops):
        last |= {int(t): step for t in op["inputs"] if int(t) in born}
    return max(sum(sizes[t] for t in born if born[t] <= step <= last[t]) for step in range(len(ops)))


def _nbytes(detail: dict) -> int:
    return int(np.prod(detail["shape"])) * np.dtype(detail["dtype"]).itemsize
