"""BN recalibration and accuracy of one subnet, on an extracted copy (the supernet is untouched)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from tofa_core.arch import Arch
from tofa_core.data.augment import Augmenter
from tofa_core.data.loaders import DataSplits, take
from tofa_core.supernet import Supernet
from tofa_core.supernet.static import ConvBNAct
from tofa_core.training.config import TrainConfig


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int | None = None) -> nn.Module:
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
    device = next(model.parameters()).device
    batch_size = batch_size or min(256, eval_batch(images))  # 256 up to 45x45 images
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size].to(device))
    model.train(was_training)
    for bn, momentum in zip(bns, saved):
        bn.momentum = momentum
    return model


def calibrated_subnet(net: Supernet, arch: Arch, calib: torch.Tensor) -> nn.Module:
    """The static subnet `arch` with BN statistics of its own, in eval mode.

    Channels-last: PyTorch's CPU depthwise convolutions are 5-20x faster in that layout
    than in the default one, and scoring hundreds of subnets is most of search's time.
    """
    model = net.extract(arch).to(memory_format=torch.channels_last)
    return recalibrate_bn(model, calib).eval()


@torch.no_grad()
def fuse_bn(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the convolution before it, in place (same outputs
    up to rounding, about half the memory traffic): for scoring many subnets, not for export,
    whose parameter count must match the architecture's."""
    for module in model.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
    return model


# Pixels per evaluation batch: an eval batch's activations grow with images x pixels, so at
# 64x64 and over a fixed count of 512 images would ask a worker for over a GiB at once.
EVAL_BATCH_PIXELS = 2**19


def eval_batch(images: torch.Tensor) -> int:
    """Images per evaluation batch for images of this size: 512 up to 32x32, fewer above."""
    return max(1, min(512, EVAL_BATCH_PIXELS // (images.shape[-1] * images.shape[-2])))


@torch.no_grad()
def accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int | None = None,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Top-1 accuracy of `model` (eval mode) on normalised `images`, or on raw ones that
    `normalize` turns to the network's input a batch at a time (no float copy of the set)."""
    if len(labels) == 0:
        return float("nan")
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    batch_size = batch_size or eval_batch(images)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        batch = normalize(batch) if normalize is not None else batch
        pred = model(batch.to(device)).argmax(dim=1).cpu()
        correct += (pred == labels[start : start + batch_size].cpu()).sum().item()
    return correct / len(labels)


@dataclass
class EvalData:
    """Normalised images a trained supernet's subnets are judged on, the same for every subnet."""

    calib: torch.Tensor  # BN recalibration (training images, no augmentation)
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    # unlabelled images (training images when there are none), calibration's last: the agreement
    # score of search, and the images int8 files are gated on (never the test split)
    pool: torch.Tensor
    size: int  # the data set's image side
    channels: int
    mean: list[float]
    std: list[float]


def _calibration_picks(splits: DataSplits, count: int, seed: int) -> torch.Tensor:
    """Indices into the training images laid end to end (labelled, then unlabelled)."""
    total = len(splits.train) + len(splits.unlabeled)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count]


def calibration_images(splits: DataSplits, aug: Augmenter, count: int, seed: int) -> torch.Tensor:
    """A fixed sample of training images (labelled and unlabelled), normalised."""
    return aug.normalize(take([splits.train, splits.unlabeled], _calibration_picks(splits, count, seed)))


def _pool_picks(splits: DataSplits, calibration: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Up to `count` images of the pool split (the unlabelled one, else the labelled training
    images), those that calibration did not use first: int8 gates are measured on the pool,
    and a quantizer's ranges fit the images they were calibrated on best."""
    unlabelled = len(splits.unlabeled) > 0
    pool_size = len(splits.unlabeled) if unlabelled else len(splits.train)
    used = calibration - len(splits.train) if unlabelled else calibration
    taken = torch.zeros(pool_size, dtype=torch.bool)
    taken[used[(used >= 0) & (used < pool_size)]] = True
    order = torch.randperm(pool_size, generator=torch.Generator().manual_seed(seed))
    return torch.cat([order[~taken[order]], order[taken[order]]])[:count]


def eval_data(splits: DataSplits, cfg: TrainConfig, pool_images: int = 1024) -> EvalData:
    """What evaluation, search and export need from a data version, split as training split it."""
    aug = Augmenter(cfg.augment, splits.channels)
    pool = splits.unlabeled if len(splits.unlabeled) else splits.train
    calibration = _calibration_picks(splits, cfg.calib_images, cfg.seed)
    pick = _pool_picks(splits, calibration, pool_images, cfg.seed + 1)
    channels = splits.channels
    return EvalData(
        calib=aug.normalize(take([splits.train, splits.unlabeled], calibration)),
        val_x=aug.normalize(splits.val.images),
        val_y=splits.val.labels,
        test_x=aug.normalize(splits.test.images),
        test_y=splits.test.labels,
        pool=aug.normalize(pool.take(pick)),
        size=splits.size,
        channels=channels,
        mean=aug.mean,
        std=aug.std,
    )
