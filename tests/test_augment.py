import pydantic
import pytest
import torch

from tofa_core.data.augment import AugmentConfig, Augmenter


def _images(n: int, c: int, s: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)


def _smooth(n: int, c: int, s: int) -> torch.Tensor:
    """Asymmetric, spatially smooth images (a ramp plus a bright blob), so shifts keep correlation."""
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    img = xx * (200 / s) + 40 * ((yy - s // 4) ** 2 + (xx - s // 4) ** 2 < (s // 4) ** 2)
    return img.clamp(0, 255).to(torch.uint8).expand(n, c, s, s).clone()


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("s", [8, 16, 32])
def test_shapes_and_dtypes(c, s):
    aug = Augmenter(AugmentConfig(), channels=c)
    x = _images(5, c, s)
    for out in (aug.normalize(x), aug.weak(x), aug.strong(x)):
        assert out.shape == (5, c, s, s) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6


def test_normalize_exact_numbers():
    aug = Augmenter(AugmentConfig(mean=(0.5, 0.0, 0.25), std=(0.5, 1.0, 0.25)), channels=3)
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3).contiguous()
    out = aug.normalize(x)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([-1.0, 1.0, 0.2 / 0.5 - 1.0]))
    torch.testing.assert_close(out[0, 1, 0], torch.tensor([0.0, 1.0, 0.2]))
    torch.testing.assert_close(out[0, 2, 0], torch.tensor([-1.0, 3.0, -0.2]))


def test_weak_without_pad_or_flip_is_normalize():
    aug = Augmenter(AugmentConfig(pad=0, hflip=False), channels=3)
    x = _images(8, 3, 16)
    assert torch.equal(aug.weak(x), aug.normalize(x))


def test_weak_translation_keeps_most_pixels():
    aug = Augmenter(AugmentConfig(hflip=False), channels=1)  # default pad: 2 px at 16 px
    x = _smooth(64, 1, 16)
    a, b = aug.normalize(x).flatten(1), aug.weak(x, torch.Generator().manual_seed(0)).flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert corr.min() > 0.8
    assert (b != a).any(dim=1).float().mean() > 0.5  # most images actually moved


def test_hflip_disabled_never_mirrors():
    aug = Augmenter(AugmentConfig(pad=0, hflip=False), channels=1)
    x = _smooth(200, 1, 12)
    ref, mirrored = aug.normalize(x[:1]), aug.normalize(x[:1].flip(-1))
    out = aug.weak(x, torch.Generator().manual_seed(1))
    assert not any(torch.equal(o, mirrored[0]) for o in out)
    assert all(torch.equal(o, ref[0]) for o in out)


def test_hflip_enabled_mirrors_about_half():
    aug = Augmenter(AugmentConfig(pad=0, hflip=True), channels=1)
    x = _smooth(200, 1, 12)
    mirrored = aug.normalize(x[:1].flip(-1))[0]
    out = aug.weak(x, torch.Generator().manual_seed(2))
    frac = sum(torch.equal(o, mirrored) for o in out) / len(out)
    assert 0.3 < frac < 0.7


def test_strong_differs_more_than_weak():
    # hflip off: mirroring a ramp image would dominate both distances and hide the RandAugment part.
    aug = Augmenter(AugmentConfig(hflip=False), channels=3)
    x = _smooth(128, 3, 16)
    base = aug.normalize(x)
    weak = aug.weak(x, torch.Generator().manual_seed(3))
    strong = aug.strong(x, torch.Generator().manual_seed(3))  # same seed: same crop as `weak`
    d_weak = (weak - base).abs().mean()
    assert (strong - base).abs().mean() > 1.3 * d_weak
    assert (strong - weak).abs().mean() > d_weak


def test_strong_without_ops_or_cutout_is_weak():
    # strong draws its crop/flip first, so with N=0 and no cutout it reproduces weak exactly.
    aug = Augmenter(AugmentConfig(strong_ops=0, cutout=0.0), channels=1)
    x = _images(16, 1, 16)
    assert torch.equal(
        aug.strong(x, torch.Generator().manual_seed(4)), aug.weak(x, torch.Generator().manual_seed(4))
    )


def test_cutout_square_matches_config():
    # Identity-only strong pass (N=0) isolates cutout; the filled square is 0 in normalised space
    # (i.e. the normalisation mean colour), never produced by this constant image of value 255.
    aug = Augmenter(AugmentConfig(pad=0, hflip=False, strong_ops=0, cutout=0.25), channels=3)
    x = torch.full((32, 3, 16, 16), 255, dtype=torch.uint8)
    out = aug.strong(x, torch.Generator().manual_seed(4))
    for o in out:
        zero = o == 0.0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # all channels
        rows, cols = zero[0].nonzero().unbind(1)
        assert zero[0].sum() == 16  # a 4x4 square (0.25 * 16)
        assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3
        assert (o[~zero] == 1.0).all()
    tops = {int(o[0].eq(0).nonzero()[0, 0]) for o in out}
    assert len(tops) > 3  # position varies per image


def test_cutout_zero_disables():
    aug = Augmenter(AugmentConfig(pad=0, hflip=False, strong_ops=0, cutout=0.0), channels=1)
    x = _images(4, 1, 8)
    assert torch.equal(aug.strong(x), aug.normalize(x))


def test_per_image_randomness_in_batch():
    aug = Augmenter(AugmentConfig(), channels=3)
    x = _smooth(16, 3, 16)  # identical images
    for fn in (aug.weak, aug.strong):
        out = fn(x, torch.Generator().manual_seed(5)).flatten(1)
        distinct = {tuple(o.tolist()) for o in out}
        assert len(distinct) >= 8


def test_strong_ops_vary_per_image():
    # Without crop/flip/cutout, the RandAugment ops alone must still differ across one batch.
    aug = Augmenter(AugmentConfig(pad=0, hflip=False, cutout=0.0, strong_magnitude=1.0), channels=1)
    x = _smooth(32, 1, 16)
    out = aug.strong(x, torch.Generator().manual_seed(6)).flatten(1)
    assert len({tuple(o.tolist()) for o in out}) >= 16


def test_determinism_generator_and_global_seed():
    aug = Augmenter(AugmentConfig(), channels=3)
    x = _images(16, 3, 16)
    for fn in (aug.weak, aug.strong):
        a = fn(x, torch.Generator().manual_seed(7))
        b = fn(x, torch.Generator().manual_seed(7))
        c = fn(x, torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
        torch.manual_seed(9)
        d = fn(x)
        torch.manual_seed(9)
        assert torch.equal(d, fn(x))


def test_input_not_modified():
    aug = Augmenter(AugmentConfig(), channels=1)
    x = _images(8, 1, 16)
    before = x.clone()
    aug.strong(x)
    aug.weak(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pad": -1}, "pad"),
        ({"strong_magnitude": 2.0}, "strong_magnitude"),
        ({"cutout": 1.5}, "cutout"),
        ({"strong_ops": -1}, "strong_ops"),
        ({"std": (0.0,)}, "std"),
        ({"mean": (0.1, 0.2), "std": (0.1, 0.2, 0.3)}, "mean"),
        ({"colour": True}, "colour"),
    ],
)
def test_invalid_config(kwargs, field):
    with pytest.raises(pydantic.ValidationError, match=field):
        AugmentConfig(**kwargs)


@pytest.mark.parametrize("field", ["mean", "std"])
def test_channel_count_mismatch(field):
    cfg = AugmentConfig(**{field: (0.1, 0.2)})
    with pytest.raises(ValueError, match=field):
        Augmenter(cfg, channels=3)
    Augmenter(cfg, channels=2)  # matching length is fine


def test_config_is_frozen():
    cfg = AugmentConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.pad = 3


def test_rejects_wrong_dtype_or_channels():
    aug = Augmenter(AugmentConfig(), channels=3)
    with pytest.raises(ValueError, match="uint8"):
        aug.weak(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        aug.strong(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_equalize_works_on_tiny_images():
    # kornia/PIL equalize is a no-op below 256 pixels; ours must stretch an 8x8 low-contrast image.
    from tofa_core.data.augment import _equalize

    x = torch.linspace(0.2, 0.5, 64).view(1, 1, 8, 8).repeat(2, 3, 1, 1)
    y = _equalize(x)
    assert y.amin() == 0.0 and y.amax() == 1.0
    assert (y.flatten(2).diff(dim=2) >= 0).all()  # monotone mapping keeps pixel order
    flat = torch.full((1, 1, 4, 4), 0.3)
    assert torch.equal(_equalize(flat), flat)
