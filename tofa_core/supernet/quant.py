"""Fake quantization: an int8 deployment's rounding, simulated in float so training can see it.

One set of rules serves the elastic ops (training every subnet at once) and the static layers of
an extracted subnet (so a test can hold the two forwards equal). A layer quantizes only while
its `fake_quant` attribute is on (`set_fake_quant`); off, every function here is the identity.

- Weights: int8, symmetric, per output channel, scale max|w| / 127: the rule ONNX Runtime's
  quantizer and ai-edge-quantizer apply to the deployed files. It is computed on the sliced
  (and kernel-transformed) weight a subnet actually uses, so every subnet trains on its own
  grid. BatchNorm folding multiplies each output channel by one number, and max|w| / 127 scales
  with it, so the integers a converter writes after folding are the ones trained here.
- Activations: int8, asymmetric, per tensor, over the range [min, max] (0 included) of the
  current batch: each subnet is quantized over its own ranges, as the exporter calibrates each
  subnet on its own (min and max over its calibration images). A range shared by all subnets
  would fit none of them.
- The points quantized are the tensors an int8 LiteRT graph holds (read off converted files):
  the input (and its resize), each conv's output after its fused ReLU (before and after a
  HardSwish, which is an op of its own), every tensor of the squeeze-excite (pool, the reduce
  linear with its ReLU, the expand linear with HardSigmoid's + 3 and ReLU6, the / 6, the
  product), each residual sum, the pooled features, the feature mix before and after its
  HardSwish, and the logits.

Gradients pass straight through the rounding (the straight-through estimator); the scales are
read off the tensors and get none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127  # symmetric int8 weights: [-127, 127]


def weight(w: torch.Tensor, on: bool) -> torch.Tensor:
    """`w` (out, ...) rounded to its per-output-channel int8 grid, scale max|w| / 127."""
    if not on:
        return w
    flat = w.detach().reshape(w.shape[0], -1).float()
    scale = (flat.abs().amax(dim=1) / QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -QMAX, QMAX).to(w.dtype)


def activation(x: torch.Tensor, on: bool) -> torch.Tensor:
    """`x` rounded to the int8 grid of its own range [min, max] (asymmetric, 0 included)."""
    if not on:
        return x
    plain = x.detach()
    low, high = torch.aminmax(plain)
    low, high = low.clamp(max=0.0), high.clamp(min=0.0)
    scale = ((high - low) / 255.0).clamp_min(torch.finfo(plain.dtype).tiny)
    zero = -128 - torch.round(low / scale)
    # in place on one new tensor: a fifth of the memory traffic of torch's fake-quantize kernels,
    # whose cost showed in a training step; nothing is clipped (the range is the tensor's own),
    # so the straight-through gradient is the identity: `x - plain` is zero and carries it
    grid = torch.round(plain / scale).add_(zero).clamp_(-128, 127).sub_(zero).mul_(scale)
    return grid + (x - plain)


def activate(name: str, x: torch.Tensor, on: bool) -> torch.Tensor:
    """The layer's activation with its quantization points: ReLU fuses into the conv before it (one
    int8 output), HardSwish is an op of its own (int8 in, int8 out)."""
    if name == "hswish":
        return activation(F.hardswish(activation(x, on)), on)
    if name == "relu":
        return activation(F.relu(x), on)
    return activation(x, on)


def resized(x: torch.Tensor, resolution: int, resize, on: bool) -> torch.Tensor:
    """The int8 input, resized by `resize` to the subnet's side (another int8 tensor when it is
    resized; quantizing a tensor on its own grid again changes nothing)."""
    return activation(resize(activation(x, on), resolution), on)


def squeeze_excite(x, reduce_w, reduce_b, expand_w, expand_b, on: bool) -> torch.Tensor:
    """Squeeze-and-excite of `x` with the given (possibly sliced) weights, quantized throughout."""
    y = activation(x.mean((2, 3)), on)
    y = activation(F.relu(F.linear(y, weight(reduce_w, on), reduce_b)), on)
    # HardSigmoid is ReLU6(x + 3) / 6: LiteRT fuses the + 3 and the ReLU6 into the linear (one
    # int8 output in [0, 6]) and multiplies by 1/6 in an op of its own (another)
    y = activation(F.relu6(F.linear(y, weight(expand_w, on), expand_b) + 3.0), on)
    y = activation(y / 6.0, on)
    return activation(x * y[:, :, None, None], on)


def head(x: torch.Tensor, mix_w, dropout: nn.Module | float, training: bool, classifier, on: bool):
    """Pooled features -> feature mix -> HardSwish -> (dropout) -> logits, the last layers of every
    network here, quantized at each tensor."""
    x = activation(x.mean((2, 3)), on)
    x = activation(F.hardswish(activation(F.linear(x, weight(mix_w, on)), on)), on)
    x = dropout(x) if isinstance(dropout, nn.Module) else F.dropout(x, dropout, training)
    return activation(F.linear(x, weight(classifier.weight, on), classifier.bias), on)


def set_fake_quant(net: nn.Module, on: bool) -> nn.Module:
    """Switch fake quantization on or off in every layer of `net` that has it; returns `net`."""
    for module in net.modules():
        if hasattr(module, "fake_quant"):
            module.fake_quant = on
    return net


def fake_quant_on(net: nn.Module) -> bool:
    return any(getattr(m, "fake_quant", False) for m in net.modules())
