"""The LiteRT converter's Python: found, or a clear error naming the fix before any search."""

from __future__ import annotations

import numpy as np
import pytest

from tofa_core import litert
from tofa_core.search.targets import Target
from tofa_core.specialize import specialize


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
        litert.shared_converter().convert(program, x.numpy(), float_out=files["tflite"], int8_out=files["tflite-int8"])
        for kind, file in files.items():
            error = abs(flash_bytes(arch, space, kind) / file.stat().st_size - 1)
            assert error < 0.05, (kind, arch, error)
