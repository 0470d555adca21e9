"""A format from the registry end to end: ONNX with float16 weights and arithmetic, written,
run by ONNX Runtime and judged against PyTorch like every other file."""

import shutil

import pytest
import torch

from tofa_core.arch import SearchSpace
from tofa_core.export import MEASURED_KEYS, VerificationError, export_subnet, verify
from tofa_core.search.targets import Target
from tofa_core.supernet import Supernet
from tofa_core.training.evaluate import EvalData, calibrated_subnet

SPACE = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1, resolutions=(8,))
CLASSES = [str(i) for i in range(10)]
TARGET = Target(name="gpu", max_macs=10**9, formats=("onnx", "onnx-fp16"))


def images(n: int = 48) -> EvalData:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return EvalData(x, x[:16], y[:16], x, y, x, size=8, channels=1, mean=[0.5], std=[0.25])


def subnet(seed: int) -> torch.nn.Module:
    """The largest subnet of an untrained supernet, BN recalibrated as specialization does."""
    torch.manual_seed(seed)
    return calibrated_subnet(Supernet(SPACE), SPACE.max_arch(), images().calib)


def test_an_fp16_onnx_file_is_half_the_size_and_within_its_tolerance(tmp_path):
    arch, model, data = SPACE.max_arch(), subnet(0), images()
    exported = export_subnet(model, arch, data, tmp_path, classes=CLASSES, formats=TARGET.formats)
    verified = verify(exported, model, arch, SPACE, TARGET, data)
    half, full = exported.files["model.fp16.onnx"], exported.files["model.onnx"]
    assert 0.45 < half.stat().st_size / full.stat().st_size < 0.55
    assert 1e-5 < verified.files["fp16_max_abs_diff"] < 1e-2  # rounded to half floats, and close
    assert abs(verified.accuracy["test_acc_fp16"] - verified.accuracy["test_acc_fp32"]) <= 1 / 48
    assert set(verified.accuracy) <= set(MEASURED_KEYS)  # each file's accuracy reaches MLflow and the summary


def test_an_fp16_file_of_other_weights_fails_verification(tmp_path):
    arch, data = SPACE.max_arch(), images()
    other = export_subnet(subnet(1), arch, data, tmp_path / "other", classes=CLASSES, formats=TARGET.formats)
    model = subnet(0)
    exported = export_subnet(model, arch, data, tmp_path / "ours", classes=CLASSES, formats=TARGET.formats)
    shutil.copy(other.files["model.fp16.onnx"], exported.files["model.fp16.onnx"])
    with pytest.raises(VerificationError, match=r"model.fp16.onnx\) differs from PyTorch") as err:
        verify(exported, model, arch, SPACE, TARGET, data)
    assert err.value.check == "onnx-fp16-matches-pytorch"


def test_an_unknown_format_is_refused_before_any_file_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"unknown export formats \['onnx-fp8'\]: the formats are onnx, "):
        export_subnet(
            subnet(0), SPACE.max_arch(), images(), tmp_path, classes=CLASSES, formats=("onnx", "onnx-fp8")
        )
    assert list(tmp_path.iterdir()) == []
