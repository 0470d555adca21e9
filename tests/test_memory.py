"""RAM and flash of a subnet: the Arch-based models against the exported files, and the
constraint registry that carries them to every stage."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tofa_core import onnx_runtime
from tofa_core.arch import Arch, SearchSpace
from tofa_core.constraints import CONSTRAINTS, KB
from tofa_core.costs import flash_bytes, peak_ram_bytes
from tofa_core.quantize import QuantizationError, compact, peak_activation_bytes, quantize_int8
from tofa_core.search.evolution import CostModel, InfeasibleTarget, check_feasible
from tofa_core.search.targets import Target, TargetError, parse_targets
from tofa_core.supernet import Supernet

PRESETS = [("tiny-fused", (8, 12, 16)), ("small-fused", (24, 28)), ("tiny", (16, 20))]


def exported(preset: str, resolutions, seed: int):
    space = SearchSpace.preset(preset, num_classes=10, in_channels=1, resolutions=resolutions)
    torch.manual_seed(seed)
    net = Supernet(space).eval()
    arch = space.sample(random.Random(seed))
    example = torch.randn(1, 1, arch.resolution, arch.resolution)
    return space, arch, onnx_runtime.onnx_bytes(net.extract(arch).eval(), example)


def calibration(side: int, count: int = 32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, 1, side, side)).astype(np.float32)


@pytest.mark.parametrize("preset,resolutions", PRESETS)
def test_ram_model_equals_graph_liveness_and_flash_model_the_file(preset, resolutions):
    worst_flash = 0.0
    for seed in range(6):
        space, arch, fp32 = exported(preset, resolutions, seed)
        int8 = quantize_int8(fp32, calibration(arch.resolution))
        for precision, content in (("fp32", fp32), ("int8", int8)):
            assert peak_ram_bytes(arch, space, precision) == peak_activation_bytes(content, precision)
            error = abs(flash_bytes(arch, space, precision) / len(content) - 1)
            worst_flash = max(worst_flash, error)
        assert peak_ram_bytes(arch, space, "int8") * 4 == peak_ram_bytes(arch, space, "fp32")
        assert len(int8) < 0.45 * len(fp32)  # int8 weights, not a float copy beside them
    assert worst_flash <= 0.05, worst_flash


def _residual_graph(skip: str) -> bytes:
    """input (1x4x4) -> conv (8x4x4) a -> relu r -> 1x1 conv b -> add(b, `skip`)."""
    g = onnx_runtime.onnx
    w = g.numpy_helper.from_array(np.ones((8, 1, 3, 3), np.float32), "w")
    w2 = g.numpy_helper.from_array(np.ones((8, 8, 1, 1), np.float32), "w2")
    nodes = [
        g.helper.make_node("Conv", ["input", "w"], ["a"], pads=[1, 1, 1, 1]),
        g.helper.make_node("Relu", ["a"], ["r"]),
        g.helper.make_node("Conv", ["r", "w2"], ["b"]),
        g.helper.make_node("Add", ["b", skip], ["logits"]),
    ]
    graph = g.helper.make_graph(
        nodes, "residual",
        [g.helper.make_tensor_value_info("input", g.TensorProto.FLOAT, [1, 1, 4, 4])],
        [g.helper.make_tensor_value_info("logits", g.TensorProto.FLOAT, [1, 8, 4, 4])],
        [w, w2],
    )  # fmt: skip
    return g.helper.make_model(graph, opset_imports=[g.helper.make_opsetid("", 17)]).SerializeToString()


def test_graph_liveness_holds_a_residual_input_until_its_add():
    # The relu works in place on a; r is held through conv b for the add: r + b = 2 x 128.
    assert peak_activation_bytes(_residual_graph("r"), "fp32") == 2 * 128 * 4
    assert peak_activation_bytes(_residual_graph("r"), "int8") == 2 * 128
    # The add reads a itself: the relu cannot overwrite it, so a, r and b are alive at conv b.
    assert peak_activation_bytes(_residual_graph("a"), "int8") == 3 * 128


def test_compact_names_keep_the_model_and_its_outputs():
    _, arch, fp32 = exported("tiny-fused", (8,), 1)
    small = compact(fp32)
    x = calibration(arch.resolution, 4)
    assert len(small) < len(fp32)
    np.testing.assert_allclose(
        onnx_runtime.run(onnx_runtime.session(small), x), onnx_runtime.run(onnx_runtime.session(fp32), x)
    )


def test_int8_without_calibration_images_is_refused():
    _, arch, fp32 = exported("tiny-fused", (8,), 0)
    with pytest.raises(QuantizationError, match="calibration images"):
        quantize_int8(fp32, calibration(arch.resolution, 0))


def test_every_registered_constraint_reaches_targets_search_and_messages():
    space = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1, resolutions=(8,))
    costs = CostModel(space)
    smallest = space.min_arch()
    priced = costs.costs(smallest, "int8")
    for c in CONSTRAINTS:
        if c.per_device:  # latency: priced by a device table (tests in test_specialize)
            continue
        value = c.price(smallest, space, "int8", None)
        assert priced[c.key] == value > 0
        tight = Target(name="t", precision="int8", **{c.field: c.kind(value) / 2 if c.kind is float else 1})
        assert c.label in tight.describe() and tight.constraints() == {c.field: getattr(tight, c.field)}
        assert costs.violations(smallest, tight) and c.label in costs.violations(smallest, tight)[0]
        with pytest.raises(InfeasibleTarget, match=f"Smallest achievable: .*{c.label} "):
            check_feasible(tight, costs)
        assert costs.fits(smallest, Target(name="t", precision="int8", **{c.field: c.kind(value * 2)}))
        with pytest.raises(TargetError, match=f"{c.field}"):
            parse_targets([{"name": "t", c.field: -1}], "targets.yaml")


def test_a_target_infeasible_by_ram_names_the_smallest_ram():
    space = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1, resolutions=(8, 12))
    least = peak_ram_bytes(space.min_arch(), space, "int8") / KB
    target = Target(name="m0", max_ram_kb=least / 2, precision="int8")
    with pytest.raises(InfeasibleTarget, match=rf"RAM {least:.4g} KB") as err:
        check_feasible(target, CostModel(space))
    assert "m0" in str(err.value) and "(int8)" in str(err.value)
    check_feasible(Target(name="m0", max_ram_kb=least, precision="int8"), CostModel(space))


def test_int8_targets_deploy_the_int8_file():
    target = Target(name="t", max_flash_kb=64.0, precision="int8")
    assert "onnx-int8" in target.formats and target.precision == "int8"
    assert "onnx-int8" not in Target(name="t", max_flash_kb=64.0).formats
    with pytest.raises(TargetError, match="precision"):
        parse_targets([{"name": "t", "max_macs": 5, "precision": "int4"}], "targets.yaml")


def test_a_verification_error_crosses_processes_whole():
    """Targets are verified in Ray workers: the driver must get the check and the message back."""
    import pickle

    from tofa_core.export import VerificationError

    err = VerificationError("max_ram_kb", "model.int8.tflite needs RAM 9 KB > 8 KB")
    err.args = (f"candidate x: {err}",)  # as specialize prefixes the candidate
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is VerificationError and back.check == "max_ram_kb" and str(back) == str(err)


def test_a_target_shipping_a_litert_file_is_priced_on_its_largest_file():
    """The largest subnet's LiteRT file is larger than its ONNX one (an int64 zero point per
    channel): a flash budget between the two fits a target deploying ONNX only, not one that
    ships the LiteRT file too. A target is priced on the largest file it ships."""
    space = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1, resolutions=(8,))
    largest, costs = space.max_arch(), CostModel(space)
    onnx_kb, litert_kb = (flash_bytes(largest, space, p) / KB for p in ("int8", "tflite-int8"))
    assert litert_kb > onnx_kb
    between = (onnx_kb + litert_kb) / 2
    plain = Target(name="onnx-only", precision="int8", max_flash_kb=between)
    shipping = Target(name="tflm", precision="int8", max_flash_kb=between, formats=("onnx", "tflite-int8"))
    assert plain.priced_as == "int8" and shipping.priced_as == "tflite-int8"
    assert costs.fits(largest, plain) and not costs.fits(largest, shipping)
    assert costs.costs(largest, "tflite-int8")["flash_kb"] == litert_kb
    for arch in (space.min_arch(), largest):  # never under the ONNX file it ships as well
        assert costs.costs(arch, "tflite-int8")["flash_kb"] >= flash_bytes(arch, space, "int8") / KB


def test_a_target_shipping_a_litert_file_is_priced_on_its_ram():
    """The largest subnet's LiteRT file needs 1.5x the ONNX graph's RAM (a PAD before each
    stride-2 conv, HARD_SWISH and layout transposes as tensors of their own): a RAM budget
    between the two fits a target deploying ONNX only, not one that ships the LiteRT file."""
    space = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1, resolutions=(8,))
    largest, costs = space.max_arch(), CostModel(space)
    onnx, tflite = (peak_ram_bytes(largest, space, p) for p in ("int8", "tflite-int8"))
    assert (onnx, tflite) == (5120, 7680)
    assert peak_ram_bytes(largest, space, "tflite") == 4 * tflite  # the same ops on float32
    between = (onnx + tflite) / 2 / KB
    plain = Target(name="onnx-only", precision="int8", max_ram_kb=between)
    shipping = Target(name="tflm", precision="int8", max_ram_kb=between, formats=("onnx", "tflite-int8"))
    assert costs.fits(largest, plain) and not costs.fits(largest, shipping)
    assert costs.costs(largest, "tflite-int8")["ram_kb"] == tflite / KB


# Float bytes that `litert.peak_activation_bytes` measured on converted files (litert-torch 0.10,
# ai-edge-quantizer 0.10; the int8 file: a quarter): stride-2 PADs on even sides only (small-fused
# at 20 px reaches a 5 px side: a PAD there would make it 14,208), three input channels.
LITERT_FILES = [
    ("tiny-fused", 1, ([2, 2, 1, 2], [5, 5, 5, 5, 3, 3, 5], [1, 1, 3, 2, 3, 3, 3], 8, 0.5), 9984),
    ("small-fused", 1, ([1, 2, 1, 3], [5, 3, 3, 3, 3, 5, 5], [1, 1, 3, 3, 2, 2, 1], 20, 0.5), 10368),
    ("tiny", 1, ([1, 3, 1, 2], [5, 5, 5, 7, 5, 3, 3], [3, 2, 3, 3, 4, 2, 4], 20, 0.75), 187392),
    ("tiny", 3, ([2, 3, 2, 2], [3, 7, 5, 7, 7, 3, 3, 5, 5], [2, 2, 4, 4, 4, 2, 4, 3, 3], 16, 1.0), 79872),
]


@pytest.mark.parametrize("preset,channels,genes,measured", LITERT_FILES)
def test_litert_ram_model_equals_what_the_converted_files_measured(preset, channels, genes, measured):
    space = SearchSpace.preset(preset, num_classes=10, in_channels=channels)
    depths, kernels, expands, resolution, width = genes
    arch = Arch(resolution=resolution, depths=depths, kernels=kernels, expands=expands, width=width)
    assert peak_ram_bytes(arch, space, "tflite") == measured
    assert peak_ram_bytes(arch, space, "tflite-int8") == measured // 4
