"""int8 models and what a device needs to hold them: quantization and graph liveness.

`quantize_int8` turns an exported float ONNX model into an int8 one with ONNX Runtime's
post-training static quantizer: QDQ format (QuantizeLinear/DequantizeLinear pairs around each
op, the form TensorRT, NPUs and ONNX Runtime's int8 kernels read), weights per output channel,
activations per tensor, calibrated on real images with the model's own preprocessing.
BatchNorm is already folded into the convolutions by the exporter.

`peak_activation_bytes` measures the RAM a runtime needs for activations by walking the graph
in node order (an independent check of `costs.peak_ram_bytes`, which works from the Arch).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

ELEMENT_BYTES = {"fp32": 4, "int8": 1}

# Ops a runtime computes in place or as a view: the output takes the input's buffer when
# nothing reads that input later (ReLU after a conv, the SE's scale, a residual add, Q/DQ).
_IN_PLACE = {
    "Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Identity", "Flatten", "Reshape",
    "Unsqueeze", "Squeeze", "QuantizeLinear", "DequantizeLinear", "Add", "Mul", "Dropout",
}  # fmt: skip


class QuantizationError(RuntimeError):
    """ONNX Runtime's quantizer refused a model; the message says which and why."""


class _QuantizerNotes(logging.Filter):
    """Drops the quantizer's advice on the root logger ("consider pre-processing"): the
    exporter's graph is already shape-inferred and BN-folded, and the notes would repeat once
    per exported target."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname


class _Images:
    """ONNX Runtime's calibration reader protocol over an (N, C, H, W) float32 array."""

    def __init__(self, images: np.ndarray, batch: int = 64):
        self.batches = [images[i : i + batch] for i in range(0, len(images), batch)]

    def get_next(self) -> dict | None:
        return {"input": self.batches.pop(0)} if self.batches else None

    def rewind(self) -> None:  # read once; never rewound by static calibration
        pass


def _inline_shared_weights(model: bytes) -> bytes:
    """The exporter shares equal weight tensors through Identity nodes; the quantizer needs each
    Conv/Gemm to read its own initializer, so each Identity of an initializer becomes a copy."""
    proto = onnx.load_from_string(model)
    inits = {t.name: t for t in proto.graph.initializer}
    keep = []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            proto.graph.initializer.append(copy)
        else:
            keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    return proto.SerializeToString()


def compact(model: bytes) -> bytes:
    """The same graph with short tensor names and no node names or doc strings: a deployed file
    holds weights, not the exporter's 50-byte paths (half the bytes of a small int8 model).
    The input and output keep their names (`input`, `logits`)."""
    proto = onnx.load_from_string(model)
    graph = proto.graph
    fixed = {v.name for v in [*graph.input, *graph.output]}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in fixed:
            return name
        return names.setdefault(name, format(len(names), "x"))

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
        tensor.doc_string = ""
    for node in graph.node:
        node.name, node.doc_string = "", ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for value in graph.value_info:
        value.name = short(value.name)
    proto.doc_string, proto.producer_name = "", "tofa"
    return proto.SerializeToString()


def quantize_int8(model: bytes, calibration: np.ndarray) -> bytes:
    """An int8 QDQ copy of the float ONNX `model`, calibrated on `calibration` (the model's
    input: preprocessed, at its resolution). Min-max calibration: with a few hundred images
    of the training data it is what deployment toolchains (TFLite's converter) do."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if len(calibration) == 0:
        raise QuantizationError("no calibration images: int8 needs training images to set its scales")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        Path(src).write_bytes(_inline_shared_weights(model))
        quiet = _QuantizerNotes()
        logging.getLogger().addFilter(quiet)
        try:
            quantize_static(
                src,
                dst,
                _Images(np.ascontiguousarray(calibration, dtype=np.float32)),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        except Exception as err:  # the quantizer raises bare Exceptions and ValueErrors alike
            raise QuantizationError(f"ONNX Runtime could not quantize the model: {err}") from err
        finally:
            logging.getLogger().removeFilter(quiet)
        return compact(Path(dst).read_bytes())


def _shapes(model: bytes) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The graph with batch 1 and the element count of every tensor shape inference knows."""
    proto = onnx.load_from_string(model)
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[:1]:
        dim.Clear()
        dim.dim_value = 1
    proto = shape_inference.infer_shapes(proto)
    sizes = {}
    for value in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
        sizes[value.name] = int(np.prod(dims)) if dims else 1
    return proto, sizes


def _lifetimes(graph, nodes) -> tuple[set[str], dict[str, int]]:
    """The tensors computed from the input, and per tensor the index of the last node that reads
    it (past the last node for the graph's outputs)."""
    dynamic = {i.name for i in graph.input}
    ends: dict[str, int] = {}
    for index, node in enumerate(nodes):
        if any(name in dynamic for name in node.input):
            dynamic.update(node.output)
        for name in node.input:
            ends[name] = index
    ends |= {o.name: len(nodes) for o in graph.output}
    return dynamic, ends


def peak_activation_bytes(model: bytes, precision: str) -> int:
    """Peak bytes of activations alive at once when the graph runs in its node order at batch 1.

    Only tensors computed from the input count (weights and constants are flash). A node's
    inputs and outputs are alive while it runs; an in-place op's output shares its input's
    buffer when that input is not read again; a buffer is freed after its last reader.
    Every activation is stored at the precision's element size (an int8 runtime keeps
    activations in int8 between its fused ops).
    """
    proto, sizes = _shapes(model)
    element = ELEMENT_BYTES[precision]
    nodes = list(proto.graph.node)
    dynamic, ends_at = _lifetimes(proto.graph, nodes)
    buffer_of = {i.name: i.name for i in proto.graph.input}
    alive = {name: sizes.get(name, 0) * element for name in buffer_of}
    ends = {name: ends_at.get(name, -1) for name in buffer_of}
    peak = sum(alive.values())
    for index, node in enumerate(nodes):
        reads = [buffer_of[n] for n in node.input if n in buffer_of]
        for out in (o for o in node.output if o in dynamic):
            size = sizes.get(out, 0) * element
            free = [b for b in reads if ends[b] == index and alive[b] == size]
            buffer = free[0] if free and node.op_type in _IN_PLACE else out
            alive.setdefault(buffer, size)
            buffer_of[out] = buffer
            ends[buffer] = max(ends.get(buffer, -1), ends_at.get(out, -1))
        peak = max(peak, sum(alive.values()))
        for buffer in [b for b in alive if ends[b] <= index]:
            del alive[buffer]
    return peak
