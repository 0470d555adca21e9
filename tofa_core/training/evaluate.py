"""BN recalibration and accuracy of one subnet, on an extracted copy (the supernet is untouched)."""

from __future__ import annotations

import torch
from torch import nn

from tofa_core.arch import Arch
from tofa_core.supernet import Supernet


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Re-estimate every BatchNorm's statistics on `images` (normalised floats), exactly.

    Shared supernet statistics fit no single subnet well; a subnet's own statistics, averaged
    over a few hundred training images, restore its accuracy (OFA's recalibration).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches, not an EMA
    was_training = model.training
    model.train()
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size])
    model.train(was_training)
    for bn, momentum in zip(bns, saved):
        bn.momentum = momentum
    return model


def calibrated_subnet(net: Supernet, arch: Arch, calib: torch.Tensor) -> nn.Module:
    """The static subnet `arch` with BN statistics of its own, in eval mode."""
    return recalibrate_bn(net.extract(arch), calib).eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` (eval mode) on normalised `images`."""
    if len(labels) == 0:
        return float("nan")
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        pred = model(images[start : start + batch_size]).argmax(dim=1)
        correct += (pred == labels[start : start + batch_size]).sum().item()
    return correct / len(labels)
