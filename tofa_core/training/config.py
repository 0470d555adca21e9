"""Training settings: one validated object, the `train:` section of a config file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tofa_core import config_files
from tofa_core.data.augment import AugmentConfig

# The largest input side a config may ask for: beyond it a value is a typo, not a network.
MAX_SIDE = 1024


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # search space
    space: str = Field(
        "auto",
        description="search space preset; auto: tiny-fused for images of 16 px or less, "
        "small-fused up to 32 px, else tiny",
    )
    resolutions: tuple[Annotated[int, Field(ge=1, le=MAX_SIDE)], ...] | None = Field(
        None, description="default: the image side only (upsampling adds cost, not information)"
    )
    # schedule
    epochs: int = Field(30, ge=1, le=10_000)
    steps_per_epoch: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="auto: one pass over the unlabelled images (the labelled ones when training is "
        "supervised), and at least min_steps over all epochs",
    )
    min_steps: int = Field(
        400, ge=1, description="steps_per_epoch auto: the least training any data set gets, in steps"
    )
    budget_minutes: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="cap on training time: after the first epoch the run keeps as many of its "
        "epochs as fit (at least one), and the learning-rate schedule ends with the last",
    )
    batch_size: int = Field(32, ge=1, le=65_536, description="labelled images per step, over all workers")
    mu: int = Field(3, ge=0, description="unlabelled batch = mu x labelled batch")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    # the unified loss
    k_random: int = Field(1, ge=0, description="random subnets per step besides the largest and smallest")
    weak_view: Literal["train", "label"] = Field(
        "train",
        description="the weak view of the unlabelled images: train (every subnet trains on it, "
        "as FixMatch's shared batch) or label (it only gives the teacher's pseudo-labels, a "
        "forward without gradient in its own batch; the students distil on the labelled and "
        "strong views)",
    )
    alpha: float = Field(1.0, ge=0, description="weight of the students' labelled cross-entropy")
    lambda_kd: float = Field(1.0, ge=0, description="weight of distillation from the largest subnet")
    lambda_u: float = Field(1.0, ge=0, description="weight of the pseudo-label term")
    tau: float = Field(
        0.8, ge=0, le=1, description="confidence threshold for pseudo-labels (threshold: fixed)"
    )
    threshold: Literal["fixed", "adaptive"] = Field(
        "fixed", description="fixed: tau; adaptive: FreeMatch's self-adaptive per-class threshold"
    )
    threshold_momentum: float = Field(
        0.99, ge=0, lt=1, description="moving-average momentum of the adaptive threshold (per step)"
    )
    warmup: float = Field(
        0.25, ge=0, le=1, description="lambda_u and lambda_kd ramp up linearly over this share of the steps"
    )
    # int8 deployment
    quantization_aware: bool = Field(
        True,
        description="train every subnet for int8 over the last qat_fraction of the epochs: weights "
        "and activations fake-quantized as the deployed int8 files round them, so each int8 target's "
        "file keeps its float accuracy with no per-target training. On by default: it costs about 4% "
        "of a training, float subnets lose nothing, and one supernet then serves float and int8 "
        "targets alike (tofa train and tofa run train the same supernet)",
    )
    qat_fraction: float = Field(
        0.2, gt=0, le=1, description="share of the epochs, the last ones, that train quantization-aware"
    )
    # data
    val_fraction: float = Field(0.1, ge=0, lt=1)
    # A worker is torch, its activations and the allocator's slack (about 1.2 GiB at 32 px on
    # 2 workers, benchmarks/bench_scale.py) plus what it holds: 512 keeps it under 2 GiB.
    in_memory_mb: float = Field(
        512,
        ge=0,
        description="MiB of training pixels one worker holds in memory, as raw uint8: the labelled "
        "split, then its own share of the unlabelled split, while they fit; a split that does not "
        "fit is streamed from the store a few shards at a time",
    )
    # no flips (a mirrored digit is another or no class), no cutout: it erases a quarter of an 8 px digit
    augment: AugmentConfig = AugmentConfig(hflip=False, cutout=0.0)
    calib_images: int = Field(512, ge=1, description="training images for BN recalibration of a subnet")
    seed: int = 0
    threads: int | None = Field(None, ge=1, le=1024, description="torch threads per worker")
    # where it runs
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: the GPU the worker was given (Ray), else its own CUDA device, else CPU"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU"
    )
    gpus_per_worker: float = Field(
        0, ge=0, le=64, description="GPUs Ray reserves for each training worker (0: CPU workers)"
    )

    @property
    def semi_supervised(self) -> bool:
        """Whether unlabelled images take part at all (they do not when both their terms are off)."""
        return self.mu > 0 and (self.lambda_u > 0 or self.lambda_kd > 0)

    def quantization_aware_epochs(self, epochs: int) -> int:
        """How many of `epochs` (the last ones) train quantization-aware."""
        return math.ceil(self.qat_fraction * epochs) if self.quantization_aware else 0

    def epoch_steps(self, labelled: int, unlabelled: int) -> int:
        """Steps per epoch for a data set of `labelled` and `unlabelled` training images.

        A fixed step count would train 1,000 images as long as 100,000; an epoch that is one pass
        over the data makes the schedule grow with it, and the floor (`min_steps` over all
        epochs) keeps very small sets from stopping before the network has learned.
        """
        if self.steps_per_epoch != "auto":
            return self.steps_per_epoch
        if self.semi_supervised and unlabelled:
            images, per_step = unlabelled, self.batch_size * self.mu
        else:
            images, per_step = labelled, self.batch_size
        return max(math.ceil(self.min_steps / self.epochs), math.ceil(images / per_step))

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> TrainConfig:
        """The `train:` section of a config file, or the defaults without one; overrides that
        are None (an option not given) leave the file's value."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls.from_yaml(path, **given) if path else cls(**given)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        return config_files.load_section_model(cls, path, "train", **overrides)
