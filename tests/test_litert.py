"""The LiteRT converter's Python: found, or a clear error naming the fix before any search."""

from __future__ import annotations

import numpy as np
import pytest

from tofa_core import litert
from tofa_core.search.targets import Target
from tofa_core.specialize import specialize


def _no_litert() -> bool:
    try:
        litert.require()
    except litert.LiteRTUnavailable:
        return True
    return False


needs_litert = pytest.mark.skipif(
    _no_litert(), reason="no LiteRT converter (.venv-litert: `make litert`) or interpreter (ai-edge-litert)"
)


def test_a_missing_converter_is_named_with_its_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(litert.PYTHON_ENV, str(tmp_path / "no-python"))
    with pytest.raises(litert.LiteRTUnavailable, match="make litert") as err:
        litert.require()
    assert str(tmp_path / "no-python") in str(err.value) and litert.PYTHON_ENV in str(err.value)


def test_a_tflite_target_fails_before_any_search_without_the_converter(tmp_path, monkeypatch):
    monkeypatch.setenv(litert.PYTHON_ENV, str(tmp_path / "no-python"))
    target = Target(name="mcu", max_macs=10**6, formats=("onnx", "tflite"))
    # nothing else is needed: the check comes first (the supernet and data are never touched)
    with pytest.raises(litert.LiteRTUnavailable):
        specialize(None, target, None, None, None, tmp_path / "out", classes=[])
    assert not (tmp_path / "out").exists()


def test_the_litert_file_at_the_targets_precision_is_the_one_budgets_apply_to():
    assert Target(name="a", max_macs=1, formats=("onnx", "tflite", "tflite-int8")).litert_file == "tflite"
    int8 = Target(name="b", max_macs=1, precision="int8", formats=("onnx", "tflite", "tflite-int8"))
    assert int8.litert_file == "tflite-int8"
    assert Target(name="c", max_macs=1, precision="int8", formats=("onnx", "tflite")).litert_file is None
    assert Target(name="d", max_macs=1).litert_file is None


@pytest.mark.slow  # starts the converter's Python (jax, litert-torch): seconds
def test_a_conversion_that_fails_says_what_litert_torch_said(tmp_path):
    program = tmp_path / "model.pt2"
    program.write_bytes(b"not a torch.export file")
    with pytest.raises(litert.ConversionError, match="litert-torch failed") as err:
        litert.shared_converter().convert(
            program, np.zeros((2, 1, 8, 8), np.float32), float_out=tmp_path / "m.tflite", int8_out=None
        )
    assert "Traceback" in str(err.value) and not (tmp_path / "m.tflite").exists()


def test_only_targets_asking_for_litert_need_it(tmp_path, monkeypatch):
    monkeypatch.setenv(litert.PYTHON_ENV, str(tmp_path / "no-python"))
    litert.require_for([Target(name="a", max_macs=1, formats=("onnx", "onnx-int8", "pt2"))])  # no error
    with pytest.raises(litert.LiteRTUnavailable):
        litert.require_for(
            [Target(name="a", max_macs=1), Target(name="b", max_macs=1, formats=("onnx", "tflite-int8"))]
        )


class _Failed:
    def __init__(self, error: Exception):
        self.error = error

    def result(self, raise_on_failure: bool = True):
        return self.error


@pytest.mark.parametrize(
    "error", [litert.LiteRTUnavailable("no converter"), litert.ConversionError("litert-torch failed")]
)
def test_litert_errors_are_not_retried(error):
    """They come back on every try; a retry would repeat the target's whole search and export."""
    from flows.specialize import _worth_retrying

    assert not _worth_retrying(None, None, _Failed(error))
    assert _worth_retrying(None, None, _Failed(OSError("storage hiccup")))


@pytest.mark.slow  # converts 3 subnets (seconds each)
def test_the_litert_flash_model_is_within_5_percent_of_the_files(tmp_path):
    import random

    import torch

    from tofa_core.arch import SearchSpace
    from tofa_core.costs import flash_bytes
    from tofa_core.supernet import Supernet

    space = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1, resolutions=(8,))
    torch.manual_seed(0)
    net, rng = Supernet(space).eval(), random.Random(3)
    for i, arch in enumerate([space.min_arch(), space.sample(rng), space.sample(rng)]):
        model = net.extract(arch).eval()
        x = torch.randn(32, 1, arch.resolution, arch.resolution)
        program = tmp_path / f"{i}.pt2"
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        torch.export.save(torch.export.export(model, (x[:2],), dynamic_shapes={"x": {0: batch}}), program)
        files = {"tflite": tmp_path / f"{i}.tflite", "tflite-int8": tmp_path / f"{i}.int8.tflite"}
        litert.shared_converter().convert(
            program, x.numpy(), float_out=files["tflite"], int8_out=files["tflite-int8"]
        )
        for kind, file in files.items():
            error = abs(flash_bytes(arch, space, kind) / file.stat().st_size - 1)
            assert error < 0.05, (kind, arch, error)


def _program(tmp_path, model, x):
    """`model` as a torch.export file with any batch, as export writes model.pt2."""
    import torch

    program = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    exported = torch.export.export(model.eval(), (x[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(exported, program)
    return program


@pytest.mark.slow  # starts the converter's Python once (seconds)
def test_one_converter_process_serves_every_conversion_and_a_converted_subnet_is_copied(tmp_path):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten())
    x = torch.randn(16, 1, 8, 8)
    program = _program(tmp_path, model, x)
    with litert.Converter() as converter:
        converter.convert(program, x.numpy(), float_out=tmp_path / "a.tflite", int8_out=None, key="k")
        first = converter._proc.pid  # noqa: SLF001
        converter.convert(program, x.numpy(), float_out=None, int8_out=tmp_path / "b.tflite")
        assert converter._proc.pid == first and converter.conversions == 2  # noqa: SLF001
        # the same key again: copied from the first conversion, the process is not asked
        assert converter.copy_converted("k", float_out=tmp_path / "c.tflite", int8_out=None)
        assert not converter.copy_converted("k", float_out=None, int8_out=tmp_path / "d.tflite")
        assert converter.conversions == 2
        assert (tmp_path / "c.tflite").read_bytes() == (tmp_path / "a.tflite").read_bytes()
        assert not (tmp_path / "d.tflite").exists()
        with torch.no_grad():
            np.testing.assert_allclose(
                litert.run(tmp_path / "a.tflite", x.numpy()), model(x).numpy(), atol=1e-5
            )
    assert converter._proc is None  # noqa: SLF001  closed with the block


@pytest.mark.slow  # one conversion (seconds)
def test_int8_activation_ranges_span_every_calibration_image_not_the_last_ones(tmp_path):
    """ai-edge-quantizer's default range is a moving average weighing the last ~20 images: one
    bright image among 200 dim ones would be clipped. The pipeline's ranges are min-max."""
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.Flatten())
    bright = torch.full((1, 1, 4, 4), 10.0)
    dim = torch.rand(200, 1, 4, 4)
    calibration = torch.cat([bright, dim]).numpy()
    program = _program(tmp_path, model, torch.cat([bright, dim]))
    out = tmp_path / "model.int8.tflite"
    with litert.Converter() as converter:
        converter.convert(program, calibration, float_out=None, int8_out=out)
    io = litert.io_description(out)["input"]
    top = io["scale"] * (127 - io["zero_point"])  # the largest input the int8 file represents
    assert top == pytest.approx(10.0, rel=0.02)
    with torch.no_grad():
        np.testing.assert_allclose(
            litert.run(out, bright.numpy()), model(bright).numpy(), rtol=0.05, atol=0.1
        )


# The presets' usual input sides. Here the largest subnet (every block, the widest tensors)
# and one random one; benchmarks/bench_litert_ram.py checks 20 random subnets of each.
LITERT_RAM_PRESETS = {"tiny-fused": (8,), "small-fused": (28,), "tiny": (16, 32)}


@pytest.mark.slow  # converts 2 subnets to float and int8 LiteRT (10-25 s each on 2 cores)
@needs_litert
@pytest.mark.parametrize("preset", LITERT_RAM_PRESETS)
def test_the_litert_ram_model_equals_liveness_on_the_converted_files(tmp_path, preset):
    import random

    import torch

    from tofa_core.arch import SearchSpace
    from tofa_core.costs import peak_ram_bytes
    from tofa_core.formats import save_pt2
    from tofa_core.supernet import Supernet

    space = SearchSpace.preset(preset, num_classes=10, in_channels=1, resolutions=LITERT_RAM_PRESETS[preset])
    torch.manual_seed(1)
    net, rng = Supernet(space).eval(), random.Random(1)
    for i, arch in enumerate((space.max_arch(), space.sample(rng))):
        images = torch.randn(16, 1, arch.resolution, arch.resolution)
        save_pt2(net.extract(arch).eval(), images[:2], tmp_path / f"{i}.pt2")  # as export writes it
        files = {"tflite": tmp_path / f"{i}.tflite", "tflite-int8": tmp_path / f"{i}.int8.tflite"}
        litert.shared_converter().convert(
            tmp_path / f"{i}.pt2", images.numpy(), float_out=files["tflite"], int8_out=files["tflite-int8"]
        )
        for kind, file in files.items():
            assert peak_ram_bytes(arch, space, kind) == litert.peak_activation_bytes(file), (kind, arch)
