"""The elastic supernet: extraction equivalence, explicit-arch forward, weight sharing."""

from __future__ import annotations

import copy
import random
import threading

import pytest
import torch
import torch.nn.functional as F
from ofa_reference import randomise

from tofa_core.arch import SearchSpace
from tofa_core.supernet import StaticNet, Supernet
from tofa_core.supernet.ops import ElasticDepthwiseConvBN, ElasticKernelConvBN

SPACES = {
    "tiny": lambda: SearchSpace.preset("tiny", num_classes=10, in_channels=1),
    "tiny-fused": lambda: SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1),
    "small-fused": lambda: SearchSpace.preset("small-fused", num_classes=10, in_channels=1),
    "ofa-mbv3": lambda: SearchSpace.preset("ofa-mbv3", num_classes=10),
}


def random_supernet(name: str, seed: int = 0) -> Supernet:
    torch.manual_seed(seed)
    return randomise(Supernet(SPACES[name]()), seed).eval()


# ofa-mbv3 (the ImageNet space) is the slow one: it runs with `make test`, not `make test-fast`.
@pytest.fixture(
    scope="module",
    params=[pytest.param(n, marks=pytest.mark.slow) if n == "ofa-mbv3" else n for n in sorted(SPACES)],
)
def net(request) -> Supernet:
    return random_supernet(request.param)


def archs(space: SearchSpace, n: int, seed: int = 0):
    rng = random.Random(seed)
    return [space.max_arch(), space.min_arch()] + [space.sample(rng) for _ in range(n - 2)]


def test_extracted_subnet_computes_what_the_supernet_does(net):
    space = net.space
    for arch in archs(space, 22):
        x = torch.randn(2, space.in_channels, arch.resolution, arch.resolution)
        static = net.extract(arch).eval()
        with torch.no_grad():
            ours, theirs = net(x, arch), static(x)
        assert ours.shape == (2, space.num_classes)
        assert ours.abs().max() > 0.1, "outputs too small for the comparison to mean anything"
        torch.testing.assert_close(static(x), theirs)  # deterministic
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (arch, (ours - theirs).abs().max())


def test_extracted_subnet_is_standalone(net):
    arch = net.space.sample(random.Random(3))
    static = net.extract(arch).eval()
    kinds = {type(m).__module__ for m in static.modules()}
    assert all(k.startswith("torch.nn") or k == "tofa_core.supernet.static" for k in kinds), kinds
    x = torch.randn(2, net.space.in_channels, arch.resolution, arch.resolution)
    with torch.no_grad():
        before = static(x)
        other = copy.deepcopy(net)
        for p in other.parameters():
            p.zero_()
        # Changing a supernet (here a copy, to keep the fixture intact) never touches an
        # extracted model: it owns copies, not views.
        fresh = other.extract(arch).eval()
        torch.testing.assert_close(static(x), before)
        assert not torch.allclose(fresh(x), before)
    n_static = sum(p.numel() for p in static.parameters())
    assert n_static < sum(p.numel() for p in net.parameters())


def test_extracted_subnet_scripts_with_torchscript():
    net = random_supernet("tiny")
    arch = net.space.sample(random.Random(5))
    static = net.extract(arch).eval()
    scripted = torch.jit.script(static)
    x = torch.randn(3, 1, arch.resolution, arch.resolution)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), static(x))


def test_input_is_resized_to_the_arch_resolution():
    net = random_supernet("tiny")
    arch = net.space.sample(random.Random(1))
    x = torch.randn(2, 1, 8, 8)  # digits-sized input, smaller than any resolution of the space
    resized = F.interpolate(x, size=(arch.resolution,) * 2, mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(net(x, arch), net(resized, arch))
        torch.testing.assert_close(net.extract(arch).eval()(x), net(resized, arch), atol=1e-5, rtol=0)
    assert isinstance(net.extract(arch), StaticNet)


def test_invalid_arch_is_rejected_with_the_field_named():
    net = random_supernet("tiny")
    bad = net.space.max_arch().__class__(
        resolution=32, depths=(3, 3, 3, 3), kernels=(9,) * 12, expands=(4,) * 12, width=1.0
    )
    with pytest.raises(ValueError, match=r"Arch\.kernels\[0\]=9.*allowed: \[3, 5, 7\]"):
        net(torch.randn(1, 1, 32, 32), bad)
    with pytest.raises(ValueError, match=r"Arch\.kernels"):
        net.extract(bad)


def test_two_threads_two_archs_match_sequential_runs():
    net = random_supernet("tiny")
    a, b = net.space.max_arch(), net.space.sample(random.Random(7))
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        expected = {"a": net(x, a), "b": net(x, b)}
    results = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def run(key, arch):
        barrier.wait()
        with torch.no_grad():
            for _ in range(15):
                results[key].append(net(x, arch))

    threads = [threading.Thread(target=run, args=(k, arch)) for k, arch in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not torch.allclose(expected["a"], expected["b"])
    for key in ("a", "b"):
        assert len(results[key]) == 15
        for out in results[key]:
            torch.testing.assert_close(out, expected[key], atol=0, rtol=0)


def test_reorganize_keeps_the_max_subnet_and_sorts_hidden_channels(net):
    space = net.space
    reorganized = copy.deepcopy(net)
    reorganized.reorganize_channels()
    big, small = space.max_arch(), space.min_arch()
    x = torch.randn(2, space.in_channels, big.resolution, big.resolution)
    with torch.no_grad():
        torch.testing.assert_close(reorganized(x, big), net(x, big), atol=1e-5, rtol=1e-4)
        xs = torch.randn(2, space.in_channels, small.resolution, small.resolution)
        assert not torch.allclose(reorganized(xs, small), net(xs, small), atol=1e-4)
    for stage in reorganized.stages:
        for block in stage:
            importance = block.project.conv.weight.abs().sum(dim=(0, 2, 3))
            assert torch.all(importance[:-1] >= importance[1:])


def test_subnets_share_weights_and_kernel_transforms_learn():
    net = random_supernet("tiny").train()
    space = net.space
    small = space.min_arch()  # kernel 3 everywhere: reached through both transforms
    big = space.max_arch()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    net.eval()
    with torch.no_grad():
        before = net(x, big)
    net.train()
    F.cross_entropy(net(x, small), y).backward()
    depthwise = net.stages[0][0].depthwise
    assert depthwise.transform_7to5.grad is not None and depthwise.transform_7to5.grad.abs().sum() > 0
    assert depthwise.transform_5to3.grad.abs().sum() > 0
    # Only the centre of the 7x7 kernel is reachable from a 3x3 subnet.
    grad = depthwise.conv.weight.grad
    assert grad[:, :, 1:6, 1:6].abs().sum() > 0 and grad[:, :, 0, :].abs().sum() == 0
    # Unused channels and blocks get no gradient.
    assert net.stages[0][2].project.conv.weight.grad is None
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    net.eval()
    with torch.no_grad():
        assert not torch.allclose(net(x, big), before), "training the small subnet moved the big one"


def test_training_updates_only_the_active_prefix_of_bn_statistics():
    net = random_supernet("tiny").train()
    arch = net.space.min_arch()
    bn = net.stem.bn
    before = bn.running_mean.clone()
    with torch.no_grad():
        net(torch.randn(8, 1, 16, 16), arch)
    active = net.space.channels(net.space.stem_width, arch.width)
    assert active < bn.num_features
    assert not torch.allclose(bn.running_mean[:active], before[:active])
    torch.testing.assert_close(bn.running_mean[active:], before[active:], atol=0, rtol=0)


@pytest.mark.parametrize("size,kernel,stride", [(1, 7, 1), (2, 7, 1), (2, 5, 2), (3, 7, 2), (4, 3, 1)])
def test_depthwise_tap_cropping_is_exact(size, kernel, stride):
    """Small maps drop the kernel taps that only see padding; outputs and grads must not change."""
    torch.manual_seed(0)
    op = ElasticDepthwiseConvBN(16, (3, 5, 7), stride, "relu")
    randomise(op)
    op.bn.eval()
    x = torch.randn(2, 12, size, size, requires_grad=True)
    out = op(x, kernel)
    w = op.kernel_weight(12, kernel)
    ref = F.relu(op.bn(F.conv2d(x, w, None, stride, kernel // 2, 1, 12)))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    g_out = torch.autograd.grad(out.sum(), [x, op.conv.weight])
    g_ref = torch.autograd.grad(ref.sum(), [x, op.conv.weight])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,kernel,stride", [(1, 5, 1), (2, 5, 2), (3, 3, 2), (8, 3, 1)])
def test_dense_elastic_kernel_conv_is_a_transformed_centre_with_exact_cropping(size, kernel, stride):
    """The Fused-MBConv expansion: same filter rule as depthwise (transformed centre), any
    in/out prefix, and cropping taps that only see padding changes nothing."""
    torch.manual_seed(0)
    op = ElasticKernelConvBN(16, 24, (3, 5), stride, "relu")
    randomise(op)
    op.bn.eval()
    x = torch.randn(2, 12, size, size, requires_grad=True)
    out = op(x, 20, kernel)
    w = op.conv.weight[:20, :12]
    if kernel == 3:
        w = F.linear(w[..., 1:4, 1:4].reshape(20 * 12, 9), op.transform_5to3).reshape(20, 12, 3, 3)
    ref = F.relu(op.bn(F.conv2d(x, w, None, stride, kernel // 2)))
    assert out.shape == (2, 20, (size - 1) // stride + 1, (size - 1) // stride + 1)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    params = [x, op.conv.weight] + ([op.transform_5to3] if kernel == 3 else [])
    g_out = torch.autograd.grad(out.sum(), params)
    g_ref = torch.autograd.grad(ref.sum(), params)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    static = op.extract(12, 20, kernel).eval()
    with torch.no_grad():
        torch.testing.assert_close(static(x), ref, atol=1e-6, rtol=1e-5)


def test_fused_stages_have_dense_expansions_and_no_depthwise():
    net = random_supernet("tiny-fused")
    kinds = [spec.block for spec in net.space.stages]
    assert kinds == ["fused", "fused", "mbconv", "mbconv"]
    for spec, stage in zip(net.space.stages, net.stages):
        for block in stage:
            fused = spec.block == "fused"
            assert (block.depthwise is None) == fused
            assert isinstance(block.expand, ElasticKernelConvBN) == fused
    arch = net.space.max_arch()
    static = net.extract(arch)
    first = static.blocks[1]  # blocks[0] is the fixed first block
    assert first.expand.conv.kernel_size == (arch.kernels[0],) * 2 and first.expand.conv.groups == 1
    assert isinstance(first.depthwise, torch.nn.Identity)
