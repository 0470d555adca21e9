"""Convert torch.export programs to LiteRT (.tflite), float and post-training int8: a server.

Run by `tofa_core.litert.Converter` in the converter's own venv (`make litert`), as a script
with `python -I`: it imports nothing of tofa_core (that venv does not have the pipeline's stack).
litert-torch and jax take seconds to import, so one process serves every conversion of a
specialization worker:

    python -I litert_convert.py --serve

reads one JSON request per line on stdin,
    {"program": "model.pt2", "calibration": "images.npy", "float": OUT|null, "int8": OUT|null}
and answers each with one JSON line on stdout: {"ok": true} or {"ok": false, "error": "..."}.
Whatever the libraries print goes to stderr.

int8 is ai-edge-quantizer's static recipe: int8 weights (symmetric, per channel), int8
activations (asymmetric, per tensor), int8 input and output (what TFLite Micro kernels take).
Activation ranges are the min and max over every calibration image (CALIBRATION: N, C, H, W,
preprocessed as model.json says), not the quantizer's default moving average, which weighs
the last twenty images of the set most and so moves with their order.
Tensor names are dropped from both files (flash a device saves); the signature stays.
"""

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch


def convert_float(program: Path, example: np.ndarray, out: Path) -> None:
    """The program at batch 1 (an edge runtime's shape) as a float32 .tflite file."""
    import litert_torch

    module = torch.export.load(str(program)).module()
    litert_torch.convert(module, (torch.from_numpy(example[:1]),)).export(str(out))


def _widest(old: dict, new: dict) -> dict:
    """Running min and max of a tensor over calibration images (ai-edge-quantizer's QSV)."""
    return {"min": np.minimum(old["min"], new["min"]), "max": np.maximum(old["max"], new["max"])}


def quantize_int8(float_file: Path, calibration: np.ndarray, out: Path) -> None:
    """`float_file` post-training quantized to int8, calibrated one image at a time."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import calibrator, quantizer, recipe

    signatures = Interpreter(model_path=str(float_file)).get_signature_list()
    (signature, io), *_ = signatures.items()
    (name,) = io["inputs"]
    q = quantizer.Quantizer(str(float_file))
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    samples = [{name: calibration[i : i + 1]} for i in range(len(calibration))]
    ranges = calibrator.Calibrator(Path(float_file).read_bytes(), num_threads=1, qsv_update_func=_widest)
    ranges.calibrate({signature: samples}, q._recipe_manager)  # noqa: SLF001  the recipe it loaded
    q.quantize(ranges.get_model_qsvs(), enable_progress_bar=False, enable_progress_report=False).export_model(
        str(out), overwrite=True
    )


def strip_tensor_names(path: Path) -> None:
    """Drop the converter's tensor names (module paths, a quarter of a small int8 file): no
    runtime reads them. The signature, which names the input and output, stays."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            tensor.name = None
    flatbuffer_utils.write_model(model, str(path))


def convert(request: dict) -> None:
    """One request: the float file (kept where asked, else temporary), then the int8 one."""
    calibration = np.load(request["calibration"]).astype(np.float32)
    float_out = Path(request["float"]) if request.get("float") else None
    int8_out = Path(request["int8"]) if request.get("int8") else None
    with tempfile.TemporaryDirectory(prefix="tofa-litert-") as tmp:
        float_file = float_out or Path(tmp) / "model.tflite"
        convert_float(Path(request["program"]), calibration, float_file)
        if int8_out:
            quantize_int8(float_file, calibration, int8_out)
            strip_tensor_names(int8_out)
        if float_out:
            strip_tensor_names(float_out)  # after quantizing: the quantizer reads them


def serve() -> None:
    """Answer requests until stdin closes. Replies go to the original stdout; everything the
    libraries write there (from Python or C) is sent to stderr instead."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    for line in sys.stdin:
        try:
            convert(json.loads(line))
            reply = {"ok": True}
        except Exception as err:  # noqa: BLE001  any failure is this request's, answered, not fatal
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", required=True, help="answer requests on stdin")
    parser.parse_args()
    serve()


if __name__ == "__main__":
    main()
