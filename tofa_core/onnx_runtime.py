"""ONNX in and out: export a module, open an ONNX Runtime session, time it, count its MACs.

Shared by the latency profiler (per block) and the exporter/verifier (per subnet), so the
latency a table predicts and the latency verification measures come from the same code.
"""

from __future__ import annotations

import io
import statistics
import threading
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper, shape_inference
from torch import nn

OPSET = 17

# torch's TorchScript-based ONNX exporter and torch.jit.script keep process-wide state (an
# "exporting now" flag, the script compiler's caches): two threads exporting at once fail.
# Specialization runs targets in threads, so exports take turns; search and scoring do not.
EXPORT_LOCK = threading.Lock()
# Latency is timed one model at a time: another timing in parallel would be measured too.
TIMING_LOCK = threading.Lock()


def onnx_bytes(module: nn.Module, example: torch.Tensor, dynamic_batch: bool = True) -> bytes:
    """The module (eval mode) as an ONNX model with input `input` and output `logits`.

    Uses torch's TorchScript-based exporter: the torch.export-based one takes ~6 s per small
    subnet here against ~0.1 s, and per-target seconds are the point of this stage.
    """
    module = module.eval()
    buffer = io.BytesIO()
    with EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer notes
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
        )
    return buffer.getvalue()


def session(model: bytes | str, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session; `threads` intra-op threads (1 = a small edge core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def latency_ms(sess: ort.InferenceSession, x: np.ndarray, warmup: int = 10, repeats: int = 50) -> float:
    """Median wall time of one `sess.run` on `x` (batch 1 for device latency)."""
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def model_latency_ms(
    model: bytes | str, x: np.ndarray, threads: int = 1, sessions: int = 5, repeats: int = 30
) -> float:
    """Median over `sessions` fresh sessions of each one's median run time.

    At a fraction of a millisecond a session's time depends on where its buffers landed: the
    same model measures 0.22 or 0.34 ms from one session to the next on a small VM, while runs
    within one session agree; so sessions are the unit to repeat, and the median is kept.
    """
    with TIMING_LOCK:
        return statistics.median(
            latency_ms(session(model, threads), x, repeats=repeats) for _ in range(sessions)
        )


def trivial_model(shape: tuple[int, ...]) -> bytes:
    """The smallest real model (one Add): what one inference call costs beyond its layers."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["input", "one"], ["logits"])],
        "overhead",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, list(shape))],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, list(shape))],
        [numpy_helper.from_array(np.ones((1,), np.float32), "one")],
    )
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)]
    ).SerializeToString()


def _dims(value_info) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else 1 for d in value_info.type.tensor_type.shape.dim]


def onnx_costs(model: bytes, batch: int = 1) -> tuple[int, int]:
    """(MACs per image, parameters) measured on an exported ONNX graph itself.

    MACs: every Conv (output elements x input channels per group x kernel area) and every
    Gemm/MatMul (M x K x N), with shapes from ONNX shape inference at batch 1. Parameters:
    the elements of the Conv/Gemm/MatMul weights and biases. The exporter folds BatchNorm
    into the convolutions, so this is a little below the PyTorch model's count (one bias
    per channel instead of BN's weight and bias).
    """
    proto = onnx.load_from_string(model)
    # Pin the batch dimension so every inferred shape is concrete.
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[:1]:
        dim.Clear()
        dim.dim_value = batch
    proto = shape_inference.infer_shapes(proto)
    shapes = {v.name: _dims(v) for v in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]}
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    shapes.update(inits)
    macs = 0
    weights: set[str] = set()
    for node in proto.graph.node:
        if node.op_type == "Conv":
            w = shapes[node.input[1]]  # (cout, cin/groups, kh, kw)
            out = shapes[node.output[0]]
            macs += int(np.prod(out)) * w[1] * w[2] * w[3]
        elif node.op_type in ("Gemm", "MatMul"):
            a, b = shapes[node.input[0]], shapes[node.input[1]]
            trans_b = any(at.name == "transB" and at.i for at in node.attribute)
            n = b[-2] if trans_b else b[-1]
            macs += int(np.prod(a)) * n
        else:
            continue
        weights.update(name for name in node.input[1:] if name in inits)
    params = sum(int(np.prod(inits[name])) for name in weights)
    return macs // batch, params
