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

import atexit
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
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


class Converter:
    """One litert-torch process (`litert_convert.py --serve`), started on first use and kept for
    every conversion after it: importing litert-torch and jax costs seconds, a small subnet's
    conversion less. A subnet already converted (the same `key`) is copied, not converted again.
    Thread-safe: requests are answered one at a time."""

    def __init__(self, python: Path | None = None, timeout_s: float = CONVERT_TIMEOUT_S):
        self.python, self.timeout_s = python, timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._dir = tempfile.TemporaryDirectory(prefix="tofa-litert-")
        self._log = Path(self._dir.name) / "converter.log"  # the process's stderr, appended to
        self._done: dict[str, dict[str, Path]] = {}  # key -> kept copies by kind ("float", "int8")
        self.conversions = 0  # requests the process answered (cache hits are not conversions)

    def convert(
        self,
        program: Path,
        calibration: np.ndarray,
        *,
        float_out: Path | None,
        int8_out: Path | None,
        key: str | None = None,
    ) -> None:
        """Write `program` (a torch.export file) as float and/or int8 .tflite; int8 is calibrated
        on `calibration` (preprocessed images, N x C x H x W). `key` names the model and its
        calibration: a key converted before is copied from that conversion."""
        wanted = {kind: out for kind, out in (("float", float_out), ("int8", int8_out)) if out}
        with self._lock:
            if key and self._copied(key, wanted):
                return
            with tempfile.TemporaryDirectory(dir=self._dir.name) as tmp:
                images = Path(tmp) / "calibration.npy"
                np.save(images, calibration.astype(np.float32))
                request = {"program": str(program), "calibration": str(images)} | {
                    kind: str(out) for kind, out in wanted.items()
                }
                self._ask(request)
            if key:
                self._keep(key, wanted)

    def copy_converted(self, key: str, *, float_out: Path | None, int8_out: Path | None) -> bool:
        """Write the files of an earlier conversion of `key`; False (nothing written) when there
        was none with every file asked for."""
        wanted = {kind: out for kind, out in (("float", float_out), ("int8", int8_out)) if out}
        with self._lock:
            return self._copied(key, wanted)

    def _copied(self, key: str, wanted: dict[str, Path]) -> bool:
        kept = self._done.get(key, {})
        if not all(kind in kept for kind in wanted):
            return False
        for kind, out in wanted.items():
            shutil.copyfile(kept[kind], out)
        return True

    def _keep(self, key: str, files: dict[str, Path]) -> None:
        folder = Path(self._dir.name) / hashlib.sha256(key.encode()).hexdigest()[:32]
        folder.mkdir(exist_ok=True)
        for kind, out in files.items():
            shutil.copyfile(out, folder / kind)
            self._done.setdefault(key, {})[kind] = folder / kind

    def _ask(self, request: dict) -> None:
        proc = self._started()
        start = self._log.stat().st_size
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], self.timeout_s)
        line = proc.stdout.readline() if ready else ""
        if not line:
            timed_out = not ready
            self._stop()
            what = f"did not answer within {self.timeout_s:g} s" if timed_out else "exited"
            raise ConversionError(f"litert-torch {what}:\n{self._output(start)}")
        self.conversions += 1
        reply = json.loads(line)
        if not reply["ok"]:
            raise ConversionError(f"litert-torch failed: {reply['error']}\n{self._output(start)}")

    def _started(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            python = self.python or converter_python()
            with open(self._log, "ab") as log:  # the child keeps its own (appending) descriptor
                self._proc = subprocess.Popen(
                    [str(python), "-I", str(CONVERTER), "--serve"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
        return self._proc

    def _output(self, start: int) -> str:
        """What the process wrote to stderr since `start` (bytes), its last ERROR_TAIL characters."""
        with open(self._log, "rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")[-ERROR_TAIL:]

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """End the process (closing its stdin ends it cleanly) and remove the kept files."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._stop()
            self._proc = None
            self._dir.cleanup()

    def __enter__(self) -> Converter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHARED: dict[str, Converter] = {}
_SHARED_LOCK = threading.Lock()


def shared_converter() -> Converter:
    """This process's converter for the configured Python, started on first use and closed at
    exit: a specialization worker (a Ray worker process, or the driver's threads) handles many
    targets and candidates, and each would otherwise pay for importing litert-torch again.
    Like a connection pool, it holds a process, not state a caller can observe."""
    python = converter_python()
    with _SHARED_LOCK:
        if str(python) not in _SHARED:
            _SHARED[str(python)] = converter = Converter(python)
            atexit.register(converter.close)
        return _SHARED[str(python)]


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
        x = quantize_input(x, *inp["quantization"])
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


def quantize_input(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float input as the int8 a device feeds the file: LiteRT's QUANTIZE kernel rule,
    `round(x / scale) + zero_point` in float32, halves rounded away from zero (std::round).
    Grey levels can sit on exact halves, so the rule matters (np.round rounds them to even)."""
    q = x.astype(np.float32) / np.float32(scale)
    q = np.sign(q) * np.floor(np.abs(q) + np.float32(0.5))
    return np.clip(q + zero_point, -128, 127).astype(np.int8)


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
