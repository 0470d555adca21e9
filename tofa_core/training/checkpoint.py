"""Checkpoints in the store: written atomically as bytes, read back with weights_only=True.

A checkpoint records what it belongs to (search space, classes, data version), so loading
it into another space or class list fails with a sentence, not a shape error deep in torch.
"""

from __future__ import annotations

import dataclasses
import io
import pickle

import torch

from tofa_core.arch import SearchSpace
from tofa_core.storage import NotFound, Storage

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not fit; the message says which and why."""


class OtherSpaceError(CheckpointError):
    """A readable checkpoint of another search space (its weights cannot fit this supernet)."""


def space_dict(space: SearchSpace) -> dict:
    return dataclasses.asdict(space)


def _on_cpu(value):
    """`value` with every tensor in it moved to the CPU: a checkpoint loads on any device."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def save_checkpoint(storage: Storage, key: str, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **_on_cpu(state)}, buffer)
    storage.write_bytes(key, buffer.getvalue())


def load_checkpoint(storage: Storage, key: str) -> dict:
    try:
        data = storage.read_bytes(key)
    except NotFound:
        raise CheckpointError(f"no checkpoint at {storage.uri(key)}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"{storage.uri(key)} is not a readable TOFA checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{storage.uri(key)} is not a TOFA checkpoint (format {FORMAT} with a model)")
    return state


def check_fits(state: dict, space: SearchSpace, where: str, classes: list[str] | None = None) -> bool:
    """Raise unless `state` was trained on `space`'s architecture; return whether classes match.

    The number of classes and the resolutions may differ (the head is re-initialised, the
    network does not depend on resolution); anything else about the space must match.
    """
    theirs, ours = dict(state.get("space", {})), space_dict(space)
    if isinstance(theirs.get("stages"), (list, tuple)):  # written before stages had a block kind
        theirs["stages"] = [
            {"block": "mbconv", **stage} if isinstance(stage, dict) else stage for stage in theirs["stages"]
        ]
    free = {"num_classes", "resolutions"}
    diff = sorted(k for k in ours if k not in free and _norm(theirs.get(k)) != _norm(ours[k]))
    if diff:
        raise OtherSpaceError(
            f"{where} was trained on another search space ({theirs.get('name')!r}; differs in {diff}); "
            f"this run uses {space.name!r}: start fresh or pick a checkpoint of this space"
        )
    return classes is None or list(state.get("classes", [])) == list(classes)


def _norm(value):
    """Tuples and lists compare equal (a checkpoint stores whichever it was given)."""
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def latest_key(storage: Storage, prefix: str) -> str | None:
    """The last (by name) checkpoint under `prefix`; names sort by epoch or time."""
    keys = [o.key for o in storage.list(prefix) if o.key.endswith(".pt")]
    return keys[-1] if keys else None
