"""What every Ray Train worker runs: the plain training loop, reporting each epoch to Ray.

Its own module, apart from the flow: each worker imports the module of the function it runs,
and this one pulls in only torch, Ray and tofa_core; the flow's module would add Prefect and
MLflow, 8 more seconds of imports in every worker's start (3.6 s instead of 11.6 s here).
"""

from __future__ import annotations

import json

from tofa_core.arch import Arch
from tofa_core.data.store import DamagedShard, DatasetStore
from tofa_core.runs import WarmStart
from tofa_core.storage import Storage, StorageError, open_storage
from tofa_core.training.config import TrainConfig

# Errors of the input, not of the machine: the same run fails the same way every time.
# CheckpointError is a ValueError; so are bad configs. A damaged shard reads the same every time.
RECURRING = (ValueError, MemoryError, DamagedShard)
FATAL_KEY = "fatal.json"  # in the run folder: why the workers stopped without a result


def train_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from tofa_core.training.loop import train_supernet

    cfg = TrainConfig(**config["train"])
    store = open_storage(config["store"])  # once in this process; the rest derives from it
    run_dir = store.at(config["run_dir"])
    start = WarmStart(**config["warm"]) if config.get("warm") else None
    warm = None
    if start is not None:
        warm = (start.where, None) if start.kind == "ofa" else (_folder(store, start.where), start.key)
    try:
        result = train_supernet(
            cfg,
            DatasetStore(store),
            config["dataset"],
            run_dir,
            version=config.get("version"),
            warm=warm,
            report=lambda metrics: ray.train.report(metrics),
            fixed=Arch.from_dict(config["fixed"]) if config.get("fixed") else None,
            # `last` is a default, not a request: a last supernet of another space is skipped.
            warm_if_fits=start is not None and start.kind == "last",
            # the GPU Ray assigned this worker (CPU when it asked for none)
            device=ray.train.torch.get_device() if cfg.gpus_per_worker > 0 else None,
        )
    except RECURRING as err:
        if not recurring(err):
            raise  # the machine's: Ray's FailureConfig restarts the workers from the checkpoint
        # A restart would fail the same way: leave the reason for the driver and end cleanly,
        # so Ray's FailureConfig does not retry it (the driver raises it).
        if ray.train.get_context().get_world_rank() == 0:
            fatal = {"type": type(err).__name__, "message": str(err)}
            run_dir.write_bytes(FATAL_KEY, json.dumps(fatal).encode())
        return
    ray.train.report({"epoch": cfg.epochs, **result.final, "seconds": result.seconds})


def recurring(err: BaseException) -> bool:
    """Whether `err` is the input's (a restart fails the same way). A peer worker's death tears
    down the process group mid-call, and torch raises a ValueError for that too ("Default
    process group has not been initialized"): with the group gone, the error is the machine's."""
    import torch.distributed as dist

    return isinstance(err, RECURRING) and dist.is_available() and dist.is_initialized()


def _folder(store: Storage, where: str) -> Storage:
    """A warm start's checkpoint folder: in the store, or wherever a user's option named it."""
    try:
        return store.at(where)
    except StorageError:
        return open_storage(where)
