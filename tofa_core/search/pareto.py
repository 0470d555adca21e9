"""The accuracy-cost points of sampled subnets: what a Pareto plot of a supernet shows."""

from __future__ import annotations

from tofa_core.arch import Arch
from tofa_core.costs import count_macs
from tofa_core.supernet import Supernet
from tofa_core.training.evaluate import EvalData, accuracy, calibrated_subnet, fuse_bn


def subnet_points(net: Supernet, archs: list[Arch], data: EvalData) -> list[dict]:
    """MACs and test accuracy of each subnet, each with its own recalibrated BN statistics."""
    points = []
    for arch in archs:
        model = fuse_bn(calibrated_subnet(net, arch, data.calib))
        points.append(
            {"macs": count_macs(arch, net.space), "test_acc": accuracy(model, data.test_x, data.test_y)}
        )
    return points
