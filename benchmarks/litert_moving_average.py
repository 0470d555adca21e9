"""The LiteRT int8 file as the pipeline made it before its ranges were min-max: ai-edge-quantizer's
default calibration, a moving average (weight 0.95) of each image's min and max. For
`bench_edge.py --seeds`, which compares it with the pipeline's file on the same subnet.

Runs in the LiteRT converter's venv (`.venv-litert/bin/python`), like tofa_core/litert_convert.py:

    python -I litert_moving_average.py FOLDER

FOLDER holds model.pt2, calib.npy, pool.npy, pool_picks.npy (the float model's top-1 on the
pool), test.npy and test_y.npy; writes FOLDER/moving_average.json: agreement on the pool, test
accuracy, and the file's bytes.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tofa_core"))
import litert_convert  # noqa: E402  (the converter's own script: no tofa_core imports)


def quantize_moving_average(float_file: Path, calibration: np.ndarray, out: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer, recipe

    (signature, io), *_ = Interpreter(model_path=str(float_file)).get_signature_list().items()
    (name,) = io["inputs"]
    q = quantizer.Quantizer(str(float_file))
    q.load_quantization_recipe(recipe.static_wi8_ai8())
    samples = [{name: calibration[i : i + 1]} for i in range(len(calibration))]
    calibrated = q.calibrate({signature: samples}, num_threads=1)
    q.quantize(calibrated, enable_progress_bar=False, enable_progress_report=False).export_model(
        str(out), overwrite=True
    )
    litert_convert.strip_tensor_names(out)


def run(path: Path, x: np.ndarray) -> np.ndarray:
    """Top-1 of the int8 file, fed as a device would (see tofa_core.litert.run)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(
        model_path=str(path), num_threads=1,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )  # fmt: skip
    it.allocate_tensors()
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    scale, zero = inp["quantization"]
    q = x.astype(np.float32) / np.float32(scale)
    q = np.clip(np.sign(q) * np.floor(np.abs(q) + np.float32(0.5)) + zero, -128, 127).astype(np.int8)
    picks = []
    for image in q:
        it.set_tensor(inp["index"], image[None])
        it.invoke()
        picks.append(int(it.get_tensor(out["index"])[0].argmax()))
    return np.array(picks)


def main() -> None:
    folder = Path(sys.argv[1])
    calib = np.load(folder / "calib.npy")
    litert_convert.convert_float(folder / "model.pt2", calib, folder / "float.tflite")
    quantize_moving_average(folder / "float.tflite", calib, folder / "moving_average.tflite")
    pool = run(folder / "moving_average.tflite", np.load(folder / "pool.npy"))
    test = run(folder / "moving_average.tflite", np.load(folder / "test.npy"))
    result = {
        "tflite_int8_agreement": float((pool == np.load(folder / "pool_picks.npy")).mean()),
        "test_acc_tflite_int8": float((test == np.load(folder / "test_y.npy")).mean()),
        "flash_kb": (folder / "moving_average.tflite").stat().st_size / 1024,
    }
    (folder / "moving_average.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
