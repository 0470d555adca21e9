"""The per-worker training loop. Plain PyTorch; torch.distributed when several workers run.

Whoever launches it (Ray Train in flows/train.py, a test, a notebook) calls
`train_supernet` once per worker after setting up the process group (or not, for one).
Every rank samples the same subnets (one seeded sampler), draws its own share of the
unlabelled images, and after the sandwich backward all ranks average their accumulated
gradients in a single all-reduce; so each update equals one over the global batch.
Checkpoints go to the store every epoch with every rank's RNG state, so a restarted run
(Ray's FailureConfig, a crash, a kill) continues exactly where the last epoch ended.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tofa_core.arch import Arch, SearchSpace
from tofa_core.data.augment import Augmenter
from tofa_core.data.loaders import BatchStream, DataSplits, load_splits
from tofa_core.data.store import DatasetStore
from tofa_core.storage import Storage
from tofa_core.supernet import Supernet, load_ofa_weights
from tofa_core.training.checkpoint import (
    CheckpointError,
    OtherSpaceError,
    check_fits,
    latest_key,
    load_checkpoint,
    save_checkpoint,
    space_dict,
)
from tofa_core.training.config import TrainConfig
from tofa_core.training.evaluate import accuracy, calibrated_subnet
from tofa_core.training.loss import AdaptiveThreshold
from tofa_core.training.step import sandwich, train_step

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: str
    data_version: str
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)  # test accuracies of the largest and smallest subnet
    supernet_key: str | None = None
    warm_start: str | None = None  # the checkpoint or weights file training started from


# `space: auto`: the largest image side each preset is for, smallest first; above all, tiny.
# tiny-fused's first stage keeps the input size, so its cost grows with the square of the
# side; small-fused halves the side in its stem.
AUTO_SPACES = ((16, "tiny-fused"), (32, "small-fused"))


def space_for(cfg: TrainConfig, splits: DataSplits) -> SearchSpace:
    resolutions = cfg.resolutions or (splits.size,)
    name = cfg.space
    if name == "auto":
        largest = max(resolutions)
        name = next((preset for side, preset in AUTO_SPACES if largest <= side), "tiny")
    return SearchSpace.preset(
        name, num_classes=len(splits.classes), in_channels=splits.channels, resolutions=resolutions
    )


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def allreduce_gradients(net: torch.nn.Module, world: int) -> None:
    """Average the accumulated gradients over ranks in one flat all-reduce.

    Only parameters the sampled subnets touched have gradients, and every rank sampled the
    same subnets, so every rank contributes the same list in the same order.
    """
    if world == 1:
        return
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def warm_start(net: Supernet, source: str | Storage, key: str | None = None) -> list[str]:
    """Initialise from a TOFA supernet checkpoint (storage + key) or OFA weights (a file path)."""
    if isinstance(source, str):  # OFA's published file (or a state dict saved from OFA)
        return load_ofa_weights(net, source)
    state = load_checkpoint(source, key)
    same_classes = check_fits(state, net.space, source.uri(key), state.get("classes"))
    model = state["model"]
    head_fits = model.get("classifier.weight") is not None and model["classifier.weight"].shape[0] == (
        net.space.num_classes
    )
    if not head_fits:
        model = {k: v for k, v in model.items() if not k.startswith("classifier.")}
    missing, unexpected = net.load_state_dict(model, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise CheckpointError(f"{source.uri(key)} does not fit this supernet: {unexpected or missing}")
    notes = [f"warm start from {source.uri(key)}"]
    if not head_fits or not same_classes:
        net.reset_classifier()
        notes.append("classifier re-initialised (other classes)")
    return notes


def _rng_state(streams: list[BatchStream], aug_gen: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "aug": aug_gen.get_state(),
        "streams": [
            {"gen": s.generator.get_state(), "order": s._order.clone(), "passes": s.passes} for s in streams
        ],
    }


def _set_rng_state(state: dict, streams: list[BatchStream], aug_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    aug_gen.set_state(state["aug"])
    for s, saved in zip(streams, state["streams"]):
        s.generator.set_state(saved["gen"])
        s._order = saved["order"]
        s.passes = saved["passes"]


def train_supernet(
    cfg: TrainConfig,
    store: DatasetStore,
    dataset: str,
    run_dir: Storage,
    *,
    version: str | None = None,
    warm: tuple[str | Storage, str | None] | None = None,
    report: Callable[[dict], None] | None = None,
    fixed: Arch | None = None,
    warm_if_fits: bool = False,
) -> TrainResult:
    """Train one supernet on `dataset` (latest version unless given); checkpoints under `run_dir`.

    `fixed`: train only this one subnet, by the teacher's loss alone (labelled cross-entropy +
    masked pseudo-labels, FixMatch-style): the per-target baseline, "one network trained
    alone", with the same data, schedule, augmentation and evaluation as the supernet. Metrics
    are then reported for `arch` instead of `max`/`min`.

    `warm_if_fits`: a `warm` checkpoint of another search space (say the previous run's, before
    the config changed its space) is skipped with a warning instead of failing the run."""
    rank, world = _world()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {world} workers")
    started = time.perf_counter()
    splits = load_splits(store, dataset, version, val_fraction=cfg.val_fraction, seed=cfg.seed)
    space = space_for(cfg, splits)
    if fixed is not None:
        space.validate(fixed)
    judged = (("arch", fixed),) if fixed else (("max", space.max_arch()), ("min", space.min_arch()))
    torch.manual_seed(cfg.seed)
    net = Supernet(space)
    per_rank = cfg.batch_size // world
    labelled = BatchStream(splits.train, per_rank, seed=cfg.seed * 7919 + rank)
    streams = [labelled]
    unlabelled = None
    if cfg.semi_supervised and len(splits.unlabeled):
        share = splits.unlabeled.shard(rank, world, seed=cfg.seed)
        unlabelled = BatchStream(share, per_rank * cfg.mu, seed=cfg.seed * 7919 + 104729 + rank)
        streams.append(unlabelled)
    aug = Augmenter(cfg.augment, splits.channels)
    aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 2 * 104729 + rank)
    sampler = random.Random(cfg.seed)  # the same on every rank: all ranks train the same subnets
    adaptive = None
    if cfg.threshold == "adaptive" and unlabelled is not None:
        adaptive = AdaptiveThreshold(len(splits.classes), cfg.threshold_momentum)

    decay = [p for n, p in net.named_parameters() if p.dim() > 1 and "transform_" not in n]
    no_decay = [p for n, p in net.named_parameters() if not (p.dim() > 1 and "transform_" not in n)]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )
    steps_per_epoch = cfg.epoch_steps(len(splits.train), len(splits.unlabeled))
    total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )

    # What every checkpoint of this run says about itself (resume and warm start check it).
    about = {
        "space": space_dict(space),
        "classes": splits.classes,
        "data_version": splits.version,
        "dataset": dataset,
        "config": cfg.model_dump(mode="json"),
        **({"fixed_arch": fixed.to_dict()} if fixed else {}),
    }
    history: list[dict] = []
    start_epoch = 0
    resume = latest_key(run_dir, "checkpoints")
    if resume is not None:
        state = load_checkpoint(run_dir, resume)
        if not check_fits(state, space, run_dir.uri(resume), splits.classes):
            raise CheckpointError(
                f"{run_dir.uri(resume)} was trained on other classes than {dataset!r} has now"
            )
        if state.get("data_version") != splits.version:
            raise CheckpointError(
                f"{run_dir.uri(resume)} belongs to data version {state.get('data_version')}, "
                f"not {splits.version}; resume with the same version, or start a new run warm-started from it"
            )
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.setstate(state["sampler"])
        if adaptive is not None and "threshold" in state:
            adaptive.load_state_dict(state["threshold"])
        ranks = state["rng"]
        _set_rng_state(ranks[rank] if len(ranks) == world else ranks[0], streams, aug_gen)
        start_epoch, history = state["epoch"], list(state["history"])
        about["warm_start"] = state.get("warm_start")
        log.info("resumed %s at epoch %d", run_dir.uri(resume), start_epoch)
    elif warm is not None:
        source, key = warm
        try:
            for note in warm_start(net, source, key):
                log.info(note)
            about["warm_start"] = source if isinstance(source, str) else source.uri(key)
        except OtherSpaceError as err:
            if not warm_if_fits:
                raise
            log.warning("not warm-started, training from scratch: %s", err)

    # A fixed sample of training images (no augmentation) recalibrates BN for evaluation.
    pool = torch.cat([splits.train.images, splits.unlabeled.images])
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.calib_images]
    calib = aug.normalize(pool[pick])
    val_x, val_y = aug.normalize(splits.val.images), splits.val.labels

    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        images = 0
        for i in range(steps_per_epoch):
            x, y = next(labelled)
            xw = aug.weak(x, aug_gen)
            uw = us = None
            if unlabelled is not None:
                u, _ = next(unlabelled)
                uw, us = aug.weak(u, aug_gen), aug.strong(u, aug_gen)
                images += len(u)
            images += len(x)
            optimizer.zero_grad(set_to_none=True)
            step = epoch * steps_per_epoch + i + 1
            ramp = min(1.0, step / (cfg.warmup * total)) if cfg.warmup > 0 else 1.0
            archs = [fixed] if fixed else sandwich(space, sampler, cfg.k_random)
            logs = train_step(net, archs, xw, y, uw, us, cfg, ramp, adaptive)
            allreduce_gradients(net, world)
            optimizer.step()
            scheduler.step()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v / steps_per_epoch
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], **sums}
        metrics["images_per_s"] = images * world / seconds
        for name, arch in judged:
            metrics[f"val_acc/{name}"] = accuracy(calibrated_subnet(net, arch, calib), val_x, val_y)
        history.append(metrics)
        rng = [_rng_state(streams, aug_gen)]
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if rank == 0:
            save_checkpoint(
                run_dir,
                f"checkpoints/epoch-{epoch + 1:04d}.pt",
                {
                    **about,
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "sampler": sampler.getstate(),
                    **({"threshold": adaptive.state_dict()} if adaptive is not None else {}),
                    "rng": rng,
                    "epoch": epoch + 1,
                    "history": history,
                },
            )
            # Small and readable without torch: a launcher polls it to show progress.
            run_dir.write_bytes("progress.json", json.dumps(history).encode())
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
        if report is not None:
            report(metrics)

    test_x, test_y = aug.normalize(splits.test.images), splits.test.labels
    final = {
        f"test_acc/{name}": accuracy(calibrated_subnet(net, arch, calib), test_x, test_y)
        for name, arch in judged
    }
    supernet_key = None
    if rank == 0:
        supernet_key = "supernet.pt"
        save_checkpoint(
            run_dir,
            supernet_key,
            {**about, "model": net.state_dict(), "final": final},
        )
    result = TrainResult(
        run_dir.root,
        splits.version,
        cfg.epochs,
        time.perf_counter() - started,
        history,
        final,
        supernet_key,
        about.get("warm_start"),
    )
    if rank == 0:  # the run's record, readable without torch: whoever launched us reads this
        run_dir.write_bytes("result.json", json.dumps(dataclasses.asdict(result), indent=2).encode())
    return result
