"""One normalisation: what a model is scored on is what model.json's preprocess feeds it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tofa_core import litert
from tofa_core.data.augment import AugmentConfig, Augmenter
from tofa_core.data.normalise import PIXEL_SCALE, normalise
from tofa_core.export import preprocess


def _about(aug: Augmenter, resolution: int) -> dict:
    return {
        "normalisation": {"scale": PIXEL_SCALE, "mean": aug.mean, "std": aug.std},
        "input": {"resolution": resolution},
    }


@pytest.mark.parametrize(
    "config", [AugmentConfig(), AugmentConfig(mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))]
)
def test_every_grey_level_is_the_same_float_in_training_verification_and_preprocess(config):
    channels = len(config.mean) if len(config.mean) > 1 else 1
    levels = (
        torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, channels, 16, 16).contiguous()
    )
    aug = Augmenter(config, channels)
    scored = aug.normalize(levels)
    # bit for bit, not approximately: an int8 input of scale 2/255 puts grey levels on
    # rounding ties, where one ulp flips the quantized pixel
    assert np.array_equal(preprocess(levels, _about(aug, 16)), scored.numpy())
    assert torch.equal(normalise(levels, aug.mean, aug.std), scored)
    # at another resolution, the resize comes after the normalisation in both
    assert np.array_equal(
        preprocess(levels, _about(aug, 8)),
        torch.nn.functional.interpolate(scored, size=(8, 8), mode="bilinear", align_corners=False).numpy(),
    )


def test_a_model_json_with_another_pixel_scale_is_refused():
    aug = Augmenter(AugmentConfig(), 1)
    about = _about(aug, 8) | {"normalisation": {"scale": 1 / 256, "mean": aug.mean, "std": aug.std}}
    with pytest.raises(ValueError, match="normalisation.scale"):
        preprocess(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), about)


def test_litert_int8_input_rounds_halves_away_from_zero_as_the_quantize_kernel_does():
    scale, zero = 2 / 255, -1
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 126.7, -200.0], np.float32) * np.float32(scale)
    q = litert.quantize_input(x, scale, zero)
    # np.round would give 0, 2, 2, -0, -2 for the halves (to even)
    assert q.tolist() == [1 - 1, 2 - 1, 3 - 1, -1 - 1, -2 - 1, 127 - 1, -128]
    assert q.dtype == np.int8
