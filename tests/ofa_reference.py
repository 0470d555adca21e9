"""The Once-for-All reference implementation (PyPI `ofa`), importable here.

`ofa.utils` pulls in OFA's ImageNet data loader, which imports torchvision; PyPI's
torchvision does not import beside the CPU torch used here. The network code never uses
that loader, so a stand-in module takes its place for that one import alone. Shared by the
tests and benchmarks/bench_train_step.py.
"""

from __future__ import annotations

import sys
import types

import torch


def ofa_mbv3(num_classes: int = 10, dropout_rate: float = 0.1):
    """OFA's `OFAMobileNetV3` for ofa_mbv3_d234_e346_k357_w1.0, random weights."""
    sys.modules.setdefault("ofa.utils.my_dataloader", types.ModuleType("ofa.utils.my_dataloader"))
    from ofa.imagenet_classification.elastic_nn.networks import OFAMobileNetV3

    return OFAMobileNetV3(
        n_classes=num_classes,
        dropout_rate=dropout_rate,
        width_mult=1.0,
        ks_list=[3, 5, 7],
        expand_ratio_list=[3, 4, 6],
        depth_list=[2, 3, 4],
    )


@torch.no_grad()
def randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights AND BN statistics, so that every parameter and buffer shows in outputs."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in net.state_dict().items():
        if not t.dtype.is_floating_point:
            continue
        noise = torch.randn(t.shape, generator=gen)
        if name.endswith("running_var"):
            t.copy_(0.5 + noise.abs())
        elif name.endswith("bn.weight") or name.endswith("_matrix") or "transform_" in name:
            t.copy_(torch.eye(t.shape[0]) + 0.1 * noise if t.dim() == 2 else 1 + 0.1 * noise)
        else:
            fan_in = t[0].numel() if t.dim() > 1 else 1
            t.copy_(noise * (0.1 if t.dim() == 1 else fan_in**-0.5))
    return net
