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
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tofa_core.arch import Arch, SearchSpace
from tofa_core.data.augment import Augmenter
from tofa_core.data.loaders import (
    BatchStream,
    DataSplits,
    ImageSet,
    ShardStream,
    StreamedSet,
    load_splits,
    stream_of,
    worker_splits,
)
from tofa_core.data.store import DatasetStore
from tofa_core.storage import Storage
from tofa_core.supernet import Supernet, load_ofa_weights
from tofa_core.supernet.quant import set_fake_quant
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
from tofa_core.training.device import pick_device
from tofa_core.training.evaluate import accuracy, calibrated_subnet, calibration_images
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


def space_for(cfg: TrainConfig, splits: DataSplits) -> SearchSpace:
    """The configured space for this data: its classes, channels and (by default) image side."""
    resolutions = cfg.resolutions or (splits.size,)
    return SearchSpace.for_data(cfg.space, resolutions, len(splits.classes), splits.channels)


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


# Seeds of a run's random streams: the run's seed times a prime, plus an offset per stream
# (another prime) and the rank, so no two streams of any run or worker share a seed.
SEED_STRIDE = 7919
STREAM_OFFSET = 104729


@dataclass
class _Run:
    """One worker's training state: what the epochs advance and every checkpoint saves."""

    cfg: TrainConfig
    rank: int
    world: int
    splits: DataSplits
    space: SearchSpace
    fixed: Arch | None
    net: Supernet
    streams: list[BatchStream | ShardStream]  # labelled, then unlabelled when semi-supervised
    aug: Augmenter
    aug_gen: torch.Generator
    sampler: random.Random  # the same on every rank: all ranks train the same subnets
    adaptive: AdaptiveThreshold | None
    about: dict  # what every checkpoint of this run says about itself (resume and warm start check it)
    steps_per_epoch: int
    epochs: int  # planned: cfg.epochs, or fewer once a time budget has measured the pace
    device: torch.device = torch.device("cpu")
    optimizer: torch.optim.Optimizer = None
    scheduler: torch.optim.lr_scheduler.LRScheduler = None
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0

    @property
    def judged(self) -> tuple[tuple[str, Arch], ...]:
        """The subnets whose accuracy is reported: the fixed one, or the largest and smallest."""
        if self.fixed is not None:
            return (("arch", self.fixed),)
        return (("max", self.space.max_arch()), ("min", self.space.min_arch()))

    def rng_state(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "torch": torch.get_rng_state(),
            "device": self.device.type,  # the augmentation generator and dropout draw there
            "cuda": torch.cuda.get_rng_state(self.device) if cuda else torch.zeros(0, dtype=torch.uint8),
            "aug": self.aug_gen.get_state(),
            "streams": [s.state_dict() for s in self.streams],
        }

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        for stream, saved in zip(self.streams, state["streams"]):
            stream.load_state_dict(saved)
        if state.get("device", "cpu") != self.device.type:
            # A CUDA generator's state means nothing to a CPU one: the run continues with its
            # weights, optimizer and batches restored, and fresh augmentation draws.
            log.warning(
                "resumed on %s from a %s checkpoint: augmentation draws start afresh",
                self.device.type,
                state.get("device", "cpu"),
            )
            return
        self.aug_gen.set_state(state["aug"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


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
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train one supernet on `dataset` (latest version unless given); checkpoints under `run_dir`.

    `fixed`: train only this one subnet, by the teacher's loss alone (labelled cross-entropy +
    masked pseudo-labels, FixMatch-style): the per-target baseline, "one network trained
    alone", with the same data, schedule, augmentation and evaluation as the supernet. Metrics
    are then reported for `arch` instead of `max`/`min`.

    `warm_if_fits`: a `warm` checkpoint of another search space (say the previous run's, before
    the config changed its space) is skipped with a warning instead of failing the run.
    `device`: the one the launcher gave this worker (Ray's `get_device()`); see `pick_device`."""
    started = time.perf_counter()
    run = _build(cfg, store, dataset, version, fixed, pick_device(cfg, device))
    resume = latest_key(run_dir, "checkpoints")
    if resume is not None:
        _resume(run, run_dir, resume)
    elif warm is not None:
        _warm_start(run, warm, warm_if_fits)
    calib = calibration_images(run.splits, run.aug, cfg.calib_images, cfg.seed).to(run.device)
    epoch = run.start_epoch
    try:
        while epoch < run.epochs:
            epoch_started = time.perf_counter()
            metrics = _epoch(run, epoch, calib)
            run.history.append(metrics)
            epoch += 1
            if epoch == 1 and cfg.budget_minutes is not None:
                now = time.perf_counter()
                _fit_budget(run, now - started, now - epoch_started)
            _checkpoint(run, run_dir, epoch)
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
            if report is not None:
                report(metrics)
    finally:
        for stream in run.streams:
            stream.close()  # a streamed split's read-ahead thread and the windows it holds
    return _finish(run, run_dir, calib, time.perf_counter() - started)


def _build(
    cfg: TrainConfig,
    store: DatasetStore,
    dataset: str,
    version: str | None,
    fixed: Arch | None,
    device: torch.device,
) -> _Run:
    """The data, network, batch streams, optimizer and schedule of a fresh run on this worker."""
    rank, world = _world()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must divide evenly over {world} workers")
    # Places only: this worker reads just what it draws from (worker_splits), never a whole split.
    splits = load_splits(
        store, dataset, version, val_fraction=cfg.val_fraction, seed=cfg.seed, hold_training=False
    )
    space = space_for(cfg, splits)
    if fixed is not None:
        space.validate(fixed)
    torch.manual_seed(cfg.seed)
    net = Supernet(space).to(device)
    streams = _streams(cfg, splits, rank, world, device)
    adaptive = None
    if cfg.threshold == "adaptive" and len(streams) > 1:
        adaptive = AdaptiveThreshold(len(splits.classes), cfg.threshold_momentum)
    about = {
        "space": space_dict(space),
        "classes": splits.classes,
        "data_version": splits.version,
        "dataset": dataset,
        "config": cfg.model_dump(mode="json"),
        **({"fixed_arch": fixed.to_dict()} if fixed else {}),
    }
    run = _Run(
        cfg,
        rank,
        world,
        splits,
        space,
        fixed,
        net,
        streams,
        aug=Augmenter(cfg.augment, splits.channels),
        aug_gen=torch.Generator(device=device).manual_seed(cfg.seed * SEED_STRIDE + 2 * STREAM_OFFSET + rank),
        sampler=random.Random(cfg.seed),
        adaptive=adaptive,
        about=about,
        steps_per_epoch=cfg.epoch_steps(len(splits.train), len(splits.unlabeled)),
        epochs=cfg.epochs,
        device=device,
    )
    run.optimizer, run.scheduler = _optimizer(cfg, net, cfg.epochs * run.steps_per_epoch)
    return run


def _streams(cfg: TrainConfig, splits, rank: int, world: int, device: torch.device) -> list:
    """This worker's batch streams: its share of the labelled images, and of the unlabelled
    ones when there are any; each held in memory within train.in_memory_mb, else streamed."""
    per_rank, seed = cfg.batch_size // world, cfg.seed * SEED_STRIDE
    hold = cfg.in_memory_mb * 2**20
    labelled, share = worker_splits(splits, rank, world, cfg.seed, hold, unlabelled=cfg.semi_supervised)
    log.info(
        "worker %d of %d holds %.0f MiB of training pixels (budget train.in_memory_mb %.0f); streams %s",
        rank,
        world,
        sum(s.nbytes for s in (labelled, share) if isinstance(s, ImageSet)) / 2**20,
        cfg.in_memory_mb,
        ", ".join(n for n, s in (("labelled", labelled), ("unlabelled", share)) if isinstance(s, StreamedSet))
        or "nothing",
    )
    streams = [stream_of(labelled, per_rank, seed=seed + rank, device=device)]
    if share is not None and len(share):
        unlabelled = stream_of(share, per_rank * cfg.mu, seed=seed + STREAM_OFFSET + rank, device=device)
        streams.append(unlabelled)
    return streams


def _optimizer(cfg: TrainConfig, net: Supernet, total_steps: int):
    """SGD (no weight decay on biases, BN and kernel transforms) under a cosine schedule."""
    decayed = {n for n, p in net.named_parameters() if p.dim() > 1 and "transform_" not in n}
    params = dict(net.named_parameters())
    optimizer = torch.optim.SGD(
        [
            {"params": [params[n] for n in params if n in decayed], "weight_decay": cfg.weight_decay},
            {"params": [params[n] for n in params if n not in decayed], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


def _resume(run: _Run, run_dir: Storage, key: str) -> None:
    """Continue this run from its last checkpoint, exactly where that epoch ended."""
    state = load_checkpoint(run_dir, key)
    if not check_fits(state, run.space, run_dir.uri(key), run.splits.classes):
        raise CheckpointError(
            f"{run_dir.uri(key)} was trained on other classes than {run.about['dataset']!r} has now"
        )
    if state.get("data_version") != run.splits.version:
        raise CheckpointError(
            f"{run_dir.uri(key)} belongs to data version {state.get('data_version')}, "
            f"not {run.splits.version}; resume with the same version, or start a new run warm-started from it"
        )
    run.net.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.sampler.setstate(state["sampler"])
    if run.adaptive is not None and "threshold" in state:
        run.adaptive.load_state_dict(state["threshold"])
    ranks = state["rng"]
    run.set_rng_state(ranks[run.rank] if len(ranks) == run.world else ranks[0])
    run.start_epoch, run.history = state["epoch"], list(state["history"])
    run.epochs = state.get("epochs_planned", run.epochs)
    run.scheduler.T_max = run.epochs * run.steps_per_epoch
    run.about["warm_start"] = state.get("warm_start")
    log.info("resumed %s at epoch %d", run_dir.uri(key), run.start_epoch)


def _warm_start(run: _Run, warm: tuple[str | Storage, str | None], warm_if_fits: bool) -> None:
    source, key = warm
    try:
        for note in warm_start(run.net, source, key):
            log.info(note)
        run.about["warm_start"] = source if isinstance(source, str) else source.uri(key)
    except OtherSpaceError as err:
        if not warm_if_fits:
            raise
        log.warning("not warm-started, training from scratch: %s", err)


def _epoch(run: _Run, epoch: int, calib: torch.Tensor) -> dict:
    """One epoch of sandwich steps; its mean losses, pace and validation accuracies."""
    cfg, net, aug, gen = run.cfg, run.net, run.aug, run.aug_gen
    net.train()
    fake_quant = epoch >= run.epochs - cfg.quantization_aware_epochs(run.epochs)
    set_fake_quant(net, fake_quant)
    sums: dict[str, float] = {}
    started, images = time.perf_counter(), 0
    total = run.epochs * run.steps_per_epoch
    for i in range(run.steps_per_epoch):
        x, y = next(run.streams[0])
        xw = aug.weak(x, gen)
        uw = us = None
        if len(run.streams) > 1:
            u, _ = next(run.streams[1])
            uw, us = aug.weak(u, gen), aug.strong(u, gen)
            images += len(u)
        images += len(x)
        run.optimizer.zero_grad(set_to_none=True)
        step = epoch * run.steps_per_epoch + i + 1
        ramp = min(1.0, step / (cfg.warmup * total)) if cfg.warmup > 0 else 1.0
        archs = [run.fixed] if run.fixed else sandwich(run.space, run.sampler, cfg.k_random)
        logs = train_step(net, archs, xw, y, uw, us, cfg, ramp, run.adaptive)
        allreduce_gradients(net, run.world)
        run.optimizer.step()
        run.scheduler.step()
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + v / run.steps_per_epoch
    set_fake_quant(net, False)  # what is judged and saved is the float supernet
    metrics = {"epoch": epoch + 1, "lr": run.scheduler.get_last_lr()[0], **sums}
    metrics["images_per_s"] = images * run.world / (time.perf_counter() - started)
    metrics["fake_quant"] = float(fake_quant)  # its pace is another one: read it apart
    val = run.splits.val
    for name, arch in run.judged:
        model = calibrated_subnet(net, arch, calib)
        metrics[f"val_acc/{name}"] = accuracy(model, val.images, val.labels, normalize=aug.normalize)
    return metrics


def _fit_budget(run: _Run, spent: float, per_epoch: float) -> None:
    """Keep as many epochs as fit `budget_minutes` (`spent` seconds gone, the first epoch done)
    at the first epoch's pace, the slowest rank's (all ranks must agree), and end the cosine
    schedule with the last of them."""
    fit = torch.tensor([max(1, 1 + int((run.cfg.budget_minutes * 60 - spent) / per_epoch))])
    if run.world > 1:
        dist.all_reduce(fit, op=dist.ReduceOp.MIN)
    epochs = min(run.epochs, int(fit.item()))
    if epochs < run.epochs:
        log.info(
            "budget %.1f min at %.0f s per epoch: %d of %d epochs",
            run.cfg.budget_minutes,
            per_epoch,
            epochs,
            run.epochs,
        )
        run.epochs = epochs
        # CosineAnnealingLR steps by ratios of its curve: with the new end it reaches 0 there
        run.scheduler.T_max = epochs * run.steps_per_epoch


def _checkpoint(run: _Run, run_dir: Storage, epoch: int) -> None:
    """Everything a restart needs, with every rank's RNG state (written by rank 0)."""
    rng = [run.rng_state()]
    if run.world > 1:
        gathered: list = [None] * run.world
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    if run.rank != 0:
        return
    state = {
        **run.about,
        "model": run.net.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "sampler": run.sampler.getstate(),
        **({"threshold": run.adaptive.state_dict()} if run.adaptive is not None else {}),
        "rng": rng,
        "epoch": epoch,
        "epochs_planned": run.epochs,
        "history": run.history,
    }
    save_checkpoint(run_dir, f"checkpoints/epoch-{epoch:04d}.pt", state)
    # Small and readable without torch: a launcher polls it to show progress.
    run_dir.write_bytes("progress.json", json.dumps(run.history).encode())


def _finish(run: _Run, run_dir: Storage, calib: torch.Tensor, seconds: float) -> TrainResult:
    """Test accuracies, the final supernet and the run's record (rank 0 writes them)."""
    test = run.splits.test
    final = {
        f"test_acc/{name}": accuracy(
            calibrated_subnet(run.net, arch, calib), test.images, test.labels, normalize=run.aug.normalize
        )
        for name, arch in run.judged
    }
    supernet_key = "supernet.pt" if run.rank == 0 else None
    if supernet_key is not None:
        # what specialization tells model.json: how many of the last epochs trained every subnet for int8
        qat = run.cfg.quantization_aware_epochs(run.epochs)
        state = {**run.about, "model": run.net.state_dict(), "final": final, "quantization_aware_epochs": qat}
        save_checkpoint(run_dir, supernet_key, state)
    result = TrainResult(
        run_dir.root,
        run.splits.version,
        run.epochs,
        seconds,
        run.history,
        final,
        supernet_key,
        run.about.get("warm_start"),
    )
    if run.rank == 0:  # the run's record, readable without torch: whoever launched us reads this
        run_dir.write_bytes("result.json", json.dumps(dataclasses.asdict(result), indent=2).encode())
    return result
