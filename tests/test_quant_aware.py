"""Quantization-aware supernet: every subnet's int8 rounding simulated in training, the same in
an extracted subnet, and the same grid in the deployed int8 file."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
import torch
from ofa_reference import randomise
from onnx import numpy_helper

from tofa_core.arch import SearchSpace
from tofa_core.supernet import Supernet, quant

SPACES = ("tiny-fused", "small-fused", "tiny")


def _net(name: str, seed: int = 0) -> Supernet:
    torch.manual_seed(seed)
    space = SearchSpace.preset(name, num_classes=10, in_channels=1)
    return randomise(Supernet(space), seed).eval()


def _archs(space, n: int, seed: int = 0):
    rng = random.Random(seed)
    return [space.max_arch(), space.min_arch()] + [space.sample(rng) for _ in range(n - 2)]


def test_weights_round_to_a_per_channel_grid_of_max_over_127():
    w = torch.tensor([[0.5, -0.25, 0.1], [2.0, 1.0, -0.013]], requires_grad=True)
    q = quant.weight(w, True)
    scales = torch.tensor([0.5, 2.0]) / 127
    codes = q.detach() / scales[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.abs().max() == pytest.approx(127)
    assert q[1, 2].item() == pytest.approx(-2.0 / 127)  # -0.013 is one step, not -0.013
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight through
    assert quant.weight(w, False) is w


def test_the_weight_grid_survives_folding_a_per_channel_scale():
    """BN folding multiplies each output channel by gamma / sigma: the integers stay the same."""
    w = torch.randn(6, 4, 3, 3)
    fold = torch.tensor([0.3, -2.0, 7.5, 1.0, 0.01, -0.4])[:, None, None, None]
    assert torch.allclose(quant.weight(w, True) * fold, quant.weight(w * fold, True), rtol=1e-5, atol=1e-7)


def test_activations_use_their_own_range_with_zero_on_the_grid():
    x = torch.linspace(-1.0, 3.0, 1001)
    q = quant.activation(x, True)
    step = 4.0 / 255
    assert (q - x).abs().max() <= step / 2 + 1e-6
    assert len(torch.unique(q)) <= 256
    assert quant.activation(torch.zeros(3), True).abs().max() == 0
    relu = quant.activation(torch.relu(torch.randn(1000)), True)
    assert relu.min() == 0  # zero exactly representable: padding and ReLU stay exact
    assert torch.equal(quant.activation(q, True), q)  # idempotent on its own grid


@pytest.mark.parametrize("name", SPACES)
def test_extracted_subnet_fake_quant_forward_equals_the_supernets(name):
    net = quant.set_fake_quant(_net(name), True)
    space = net.space
    checked = 0
    for arch in _archs(space, 6):
        x = torch.rand(32, space.in_channels, arch.resolution, arch.resolution)
        static = quant.set_fake_quant(net.extract(arch).eval(), True)
        with torch.no_grad():
            ours, theirs, plain = (
                net(x, arch),
                static(x),
                quant.set_fake_quant(net.extract(arch).eval(), False)(x),
            )
        # the two compute the same sums in different orders (the supernet's small depthwise maps are
        # matmuls): a value on a rounding edge may land one step of its grid apart, and a few such
        # steps reach the logits; the rounding itself moves them by many steps
        step = float(ours.max() - ours.min().clamp(max=0)) / 255
        apart = (ours - theirs).abs()
        assert apart.max() <= 4 * step and apart.mean() <= step, (arch, apart.max() / step)
        assert len(torch.unique(ours)) <= 256 and not torch.allclose(ours, plain, atol=1e-6, rtol=0)
        checked += 1
    assert checked == 6


def test_fake_quant_is_off_by_default_and_switches_off_again():
    net = _net("tiny-fused")
    arch = net.space.max_arch()
    x = torch.rand(8, 1, arch.resolution, arch.resolution)
    with torch.no_grad():
        before = net(x, arch)
        quant.set_fake_quant(net, True)
        assert quant.fake_quant_on(net)
        during = net(x, arch)
        quant.set_fake_quant(net, False)
        after = net(x, arch)
    assert torch.equal(before, after)
    assert not torch.equal(before, during)


def test_fake_quant_trains_every_layer_through_the_rounding():
    net = quant.set_fake_quant(_net("tiny-fused").train(), True)
    arch = net.space.min_arch()
    loss = net(torch.rand(8, 1, arch.resolution, arch.resolution), arch).logsumexp(1).mean()
    loss.backward()
    assert net.stem.conv.weight.grad.abs().sum() > 0
    assert net.classifier.weight.grad.abs().sum() > 0


def test_the_trained_weight_grid_reaches_the_int8_onnx_file(tmp_path):
    """The deployed file's integer weights are the fake-quantized weights of training, BN folded."""
    from tofa_core.onnx_runtime import onnx_bytes
    from tofa_core.quantize import quantize_int8

    net = _net("tiny-fused")
    arch = net.space.sample(random.Random(1))
    static = net.extract(arch).eval()
    images = np.random.default_rng(0).random((32, 1, arch.resolution, arch.resolution), dtype=np.float32)
    model = onnx.load_from_string(quantize_int8(onnx_bytes(static, torch.from_numpy(images[:1])), images))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [m for m in static.modules() if isinstance(m, torch.nn.Conv2d)]
    expected = []
    for conv in convs:  # the exporter folds BN: w * gamma / sqrt(var + eps), per output channel
        bn = _bn_after(static, conv)
        fold = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        expected.append(quant.weight(conv.weight.detach(), True) * fold[:, None, None, None])
    dequantized = _dequantized_weights(model, inits)
    matched = 0
    for want in expected:
        found = [d for d in dequantized if d.shape == tuple(want.shape)]
        assert any(np.allclose(d, want.numpy(), rtol=1e-4, atol=1e-6) for d in found), want.shape
        matched += 1
    assert matched == len(convs) > 3


def _bn_after(static, conv):
    for module in static.modules():
        if getattr(module, "conv", None) is conv:
            return module.bn
    return None


def _dequantized_weights(model, inits) -> list[np.ndarray]:
    out = []
    for node in model.graph.node:
        if (
            node.op_type == "DequantizeLinear"
            and node.input[0] in inits
            and inits[node.input[0]].dtype == np.int8
        ):
            codes, scale = inits[node.input[0]].astype(np.float32), inits[node.input[1]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * codes.ndim
            shape[axis] = -1
            out.append(codes * scale.reshape(shape) if scale.ndim else codes * scale)
    return out


@pytest.mark.slow  # starts the LiteRT converter's Python (seconds)
def test_the_trained_weight_grid_reaches_the_int8_litert_file(tmp_path):
    """ai-edge-quantizer writes the same integers: each conv's int8 weights in the .tflite file,
    times their per-channel scales, are the fake-quantized weights with BN folded."""
    from tofa_core import litert

    net = _net("tiny-fused")
    arch = net.space.sample(random.Random(2))
    static = net.extract(arch).eval()
    x = torch.rand(32, 1, arch.resolution, arch.resolution)
    program = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    torch.export.save(torch.export.export(static, (x[:2],), dynamic_shapes={"x": {0: batch}}), program)
    tflite = tmp_path / "model.int8.tflite"
    litert.shared_converter().convert(program, x.numpy(), float_out=None, int8_out=tflite)
    stored = _litert_int8_weights(tflite)
    convs = [m for m in static.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        bn = _bn_after(static, conv)
        fold = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        want = (quant.weight(conv.weight.detach(), True) * fold[:, None, None, None]).numpy()
        # LiteRT holds a conv's weights as (out, kh, kw, in), a depthwise conv's as (1, kh, kw, channels)
        layouts = [w.transpose(0, 3, 1, 2) for w in stored] + [w.transpose(3, 0, 1, 2) for w in stored]
        assert any(w.shape == want.shape and np.allclose(w, want, rtol=1e-4, atol=1e-6) for w in layouts), (
            conv,
            want.shape,
        )
    assert len(convs) > 3


def _litert_int8_weights(path) -> list[np.ndarray]:
    """The file's 4-d int8 constant tensors with per-channel scales, dequantized."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    out = []
    for detail in interpreter.get_tensor_details():
        q = detail["quantization_parameters"]
        if detail["dtype"] != np.int8 or len(detail["shape"]) != 4 or len(q["scales"]) < 2:
            continue
        codes = interpreter.get_tensor(detail["index"]).astype(np.float32)
        shape = [1] * 4
        shape[q["quantized_dimension"]] = -1
        out.append(codes * q["scales"].reshape(shape))
    return out
