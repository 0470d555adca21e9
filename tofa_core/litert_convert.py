"""Convert a torch.export program to LiteRT (.tflite), float and post-training int8.

Run by `tofa_core.litert` in the converter's own venv (`make litert`), as a script with
`python -I`: it imports nothing of tofa_core (that venv does not have the pipeline's stack).

    python -I litert_convert.py PROGRAM.pt2 CALIBRATION.npy [--float OUT] [--int8 OUT]

int8 is ai-edge-quantizer's static recipe: int8 weights (symmetric, per channel), int8
activations (asymmetric, per tensor), min-max calibrated on CALIBRATION's images (N, C, H, W,
preprocessed as model.json says), int8 input and output (what TFLite Micro kernels take).
Tensor names are dropped from both files (flash a device saves); the signature stays.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def convert_float(program: Path, example: np.ndarray, out: Path) -> None:
    """The program at batch 1 (an edge runtime's shape) as a float32 .tflite file."""
    import litert_torch

    module = torch.export.load(str(program)).module()
    litert_torch.convert(module, (torch.from_numpy(example[:1]),)).export(str(out))


def quantize_int8(float_file: Path, calibration: np.ndarray, out: Path) -> None:
    """`float_file` post-training quantized to int8, calibrated one image at a time."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    signatures = Interpreter(model_path=str(float_file)).get_signature_list()
    (signature, io), *_ = signatures.items()
    (name,) = io["inputs"]
    q = quantizer.Quantizer(str(float_file))
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    samples = [{name: calibration[i : i + 1]} for i in range(len(calibration))]
    calibrated = q.calibrate({signature: samples}, num_threads=1)
    q.quantize(calibrated, enable_progress_bar=False, enable_progress_report=False).export_model(
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", type=Path)
    parser.add_argument("calibration", type=Path)
    parser.add_argument("--float", dest="float_out", type=Path)
    parser.add_argument("--int8", dest="int8_out", type=Path)
    args = parser.parse_args()
    calibration = np.load(args.calibration).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="tofa-litert-") as tmp:
        float_file = args.float_out or Path(tmp) / "model.tflite"
        convert_float(args.program, calibration, float_file)
        if args.int8_out:
            quantize_int8(float_file, calibration, args.int8_out)
            strip_tensor_names(args.int8_out)
        if args.float_out:
            strip_tensor_names(args.float_out)  # after quantizing: the quantizer reads them


if __name__ == "__main__":
    main()
