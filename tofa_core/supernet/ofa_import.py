"""Import Once-for-All's MobileNetV3 supernet weights (`ofa_mbv3_d234_e346_k357_w1.0`).

This is the "transfer" in TOFA: a user holding OFA's ImageNet supernet file starts from it.
Key names of both OFA releases are accepted (`mobile_inverted_conv` or `conv`, with or
without the doubled `.bn.bn.` / `.conv.conv.` of its dynamic wrappers). When the class
count differs, the classifier is re-initialised; a 1-channel (grayscale) space takes the
stem filters summed over RGB, which is what a gray image copied into RGB would see.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from tofa_core.supernet.network import Supernet

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^blocks\.(\d+)\.conv\.(.+)$")
_BLOCK_PARTS = [
    (re.compile(r"^inverted_bottleneck\.(.+)$"), r"expand.\1"),
    (re.compile(r"^depth_conv\.conv\.(\d+)to(\d+)_matrix$"), r"depthwise.transform_\1to\2"),
    (re.compile(r"^depth_conv\.se\.fc\.(reduce|expand)\.(weight|bias)$"), r"se.\1.\2"),
    (re.compile(r"^depth_conv\.(.+)$"), r"depthwise.\1"),
    (re.compile(r"^point_linear\.(.+)$"), r"project.\1"),
]
_TOP = [
    (re.compile(r"^first_conv\.(.+)$"), r"stem.\1"),
    (re.compile(r"^final_expand_layer\.(.+)$"), r"final_expand.\1"),
    (re.compile(r"^feature_mix_layer\.conv\.weight$"), "feature_mix.weight"),
    (re.compile(r"^classifier\.linear\.(weight|bias)$"), r"classifier.\1"),
]


def _normalise(key: str) -> str:
    key = key.replace(".mobile_inverted_conv.", ".conv.")
    for doubled in (".conv.conv.", ".bn.bn.", ".linear.linear."):
        key = key.replace(doubled, doubled[: doubled.index(".", 1) + 1])
    return key


def _block_names(net: Supernet) -> dict[int, str]:
    """OFA block index -> our module path. OFA numbers blocks 0 (first) then 1..N."""
    names, n = {0: "first_block"}, 1
    for i, stage in enumerate(net.stages):
        for j in range(len(stage)):
            names[n] = f"stages.{i}.{j}"
            n += 1
    return names


def convert_ofa_state_dict(state: Mapping[str, torch.Tensor], net: Supernet) -> dict[str, torch.Tensor]:
    """Rename OFA keys to ours; raise ValueError on a key that has no counterpart."""
    blocks = _block_names(net)
    out = {}
    for raw, value in state.items():
        key = _normalise(raw)
        new = None
        m = _BLOCK.match(key)
        if m and int(m.group(1)) in blocks:
            for pattern, repl in _BLOCK_PARTS:
                if pattern.match(m.group(2)):
                    new = f"{blocks[int(m.group(1))]}.{pattern.sub(repl, m.group(2))}"
                    break
        else:
            for pattern, repl in _TOP:
                if pattern.match(key):
                    new = pattern.sub(repl, key)
                    break
        if new is None:
            raise ValueError(
                f"OFA weights: key {raw!r} has no counterpart in the {net.space.name!r} supernet; "
                "is this an OFAMobileNetV3 (ofa_mbv3_d234_e346_k357_w1.0) checkpoint?"
            )
        out[new] = value
    return out


def load_ofa_weights(net: Supernet, source: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Load OFA MobileNetV3 weights (a file or a state dict) into `net`; return notes on what changed."""
    if net.space.name != "ofa-mbv3":
        raise ValueError(
            "OFA MobileNetV3 weights fit only the 'ofa-mbv3' search space; "
            f"this supernet uses {net.space.name!r}"
        )
    if isinstance(source, (str, Path)):
        state = torch.load(source, map_location="cpu", weights_only=True)
        if "state_dict" in state:
            state = state["state_dict"]
    else:
        state = source
    converted = convert_ofa_state_dict(state, net)
    own = net.state_dict()
    notes = []
    missing = sorted(set(own) - set(converted))
    if missing:
        raise ValueError(f"OFA weights: no value for {len(missing)} parameters of ours, e.g. {missing[:3]}")
    for key, value in converted.items():
        target = own[key]
        if key == "stem.conv.weight" and value.shape[1] != target.shape[1]:
            if target.shape[1] != 1:
                raise ValueError(
                    f"OFA weights: the stem reads {value.shape[1]} channels, this space {target.shape[1]}; "
                    "only 3 -> 1 (grayscale) is converted"
                )
            value = value.sum(dim=1, keepdim=True)
            notes.append("stem: RGB filters summed for a 1-channel input")
        if key.startswith("classifier.") and value.shape != target.shape:
            continue
        if value.numel() != target.numel():
            raise ValueError(f"OFA weights: {key} has shape {tuple(value.shape)}, ours {tuple(target.shape)}")
        own[key] = value.reshape(target.shape).to(target.dtype)
    net.load_state_dict(own)
    if converted["classifier.weight"].shape != net.classifier.weight.shape:
        net.reset_classifier()
        notes.append(
            f"classifier: {converted['classifier.weight'].shape[0]} classes in the file, "
            f"{net.space.num_classes} here; re-initialised"
        )
    for note in notes:
        log.info("OFA import: %s", note)
    return notes
