"""OFA weight import, proven against the reference implementation (PyPI `ofa`)."""

from __future__ import annotations

import random

import pytest
import torch
from ofa_reference import ofa_mbv3, randomise

from tofa_core.arch import SearchSpace
from tofa_core.supernet import Supernet, load_ofa_weights


@pytest.fixture(scope="module")
def reference():
    return randomise(ofa_mbv3(num_classes=10, dropout_rate=0.0), seed=1).eval()


def ofa_space(num_classes=10, in_channels=3):
    # Small resolutions keep the test fast; the network does not depend on resolution.
    return SearchSpace.preset(
        "ofa-mbv3", num_classes=num_classes, in_channels=in_channels, resolutions=(32, 64)
    )


@pytest.mark.slow
def test_imported_supernet_matches_reference_on_random_archs(reference):
    space = ofa_space()
    net = Supernet(space)
    assert load_ofa_weights(net, reference.state_dict()) == []
    net.eval()
    rng = random.Random(0)
    for arch in [space.max_arch(), space.min_arch()] + [space.sample(rng) for _ in range(10)]:
        reference.set_active_subnet(**space.to_ofa(arch))
        x = torch.randn(2, 3, arch.resolution, arch.resolution)
        with torch.no_grad():
            ours, theirs = net(x, arch), reference(x)
        assert theirs.abs().max() > 0.1
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (
            arch,
            (ours - theirs).abs().max(),
        )
        # and the subnet extracted from the imported weights computes the same
        with torch.no_grad():
            assert torch.allclose(net.extract(arch).eval()(x), theirs, atol=1e-4, rtol=1e-4)


def test_old_checkpoint_key_names_load_too(reference, tmp_path):
    """OFA's published file uses `mobile_inverted_conv` and single `.bn.`/`.conv.` keys, in a dict."""
    old = {}
    for key, value in reference.state_dict().items():
        key = key.replace(".conv.inverted_bottleneck", ".mobile_inverted_conv.inverted_bottleneck")
        key = key.replace(".conv.depth_conv", ".mobile_inverted_conv.depth_conv")
        key = key.replace(".conv.point_linear", ".mobile_inverted_conv.point_linear")
        key = (
            key.replace(".bn.bn.", ".bn.")
            .replace(".conv.conv.", ".conv.")
            .replace(".linear.linear.", ".linear.")
        )
        old[key] = value
    assert any("mobile_inverted_conv" in k for k in old)
    path = tmp_path / "ofa_mbv3_d234_e346_k357_w1.0"
    torch.save({"state_dict": old}, path)
    space = ofa_space()
    net = Supernet(space)
    load_ofa_weights(net, path)
    net.eval()
    arch = space.sample(random.Random(4))
    reference.set_active_subnet(**space.to_ofa(arch))
    x = torch.randn(2, 3, arch.resolution, arch.resolution)
    with torch.no_grad():
        assert torch.allclose(net(x, arch), reference(x), atol=1e-4, rtol=1e-4)


def test_other_class_count_reinitialises_only_the_classifier(reference):
    net = Supernet(ofa_space(num_classes=4))
    notes = load_ofa_weights(net, reference.state_dict())
    assert any("classifier" in n and "re-initialised" in n for n in notes)
    assert net.classifier.weight.shape == (4, 1280)
    assert net.classifier.weight.abs().max() < 0.1  # fresh small init, not a slice of theirs
    theirs = reference.state_dict()
    torch.testing.assert_close(net.stem.conv.weight, theirs["first_conv.conv.weight"])
    torch.testing.assert_close(
        net.stages[4][3].se.reduce.weight,
        theirs["blocks.20.conv.depth_conv.se.fc.reduce.weight"].flatten(1),
    )
    torch.testing.assert_close(net.feature_mix.weight, theirs["feature_mix_layer.conv.weight"].flatten(1))


def test_grayscale_space_sees_a_gray_image_as_ofa_sees_it_in_rgb(reference):
    space = ofa_space(in_channels=1)
    net = Supernet(space)
    notes = load_ofa_weights(net, reference.state_dict())
    assert any("stem" in n for n in notes)
    net.eval()
    arch = space.sample(random.Random(2))
    reference.set_active_subnet(**space.to_ofa(arch))
    gray = torch.randn(2, 1, arch.resolution, arch.resolution)
    with torch.no_grad():
        assert torch.allclose(net(gray, arch), reference(gray.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_foreign_checkpoints_are_rejected_with_the_key_named(reference):
    net = Supernet(ofa_space())
    state = dict(reference.state_dict())
    state["blocks.1.conv.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"mystery.*OFAMobileNetV3"):
        load_ofa_weights(net, state)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("final_expand_layer")}
    with pytest.raises(ValueError, match=r"no value for .* parameters"):
        load_ofa_weights(net, state)
    tiny = Supernet(SearchSpace.preset("tiny", num_classes=10, in_channels=3))
    with pytest.raises(ValueError, match="only the 'ofa-mbv3' search space"):
        load_ofa_weights(tiny, reference.state_dict())
