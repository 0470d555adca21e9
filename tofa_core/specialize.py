"""One target, end to end: search -> re-rank by real score -> export -> verify.

The supernet, its evaluation images and the accuracy predictor are built once and shared by
every target; this is the per-target work, seconds each, with no training.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tofa_core import litert, onnx_runtime
from tofa_core.arch import Arch
from tofa_core.constraints import CONSTRAINTS
from tofa_core.data.loaders import DataSplits, load_splits
from tofa_core.data.store import DatasetStore
from tofa_core.export import Exported, Verification, VerificationError, export_subnet, verify
from tofa_core.formats import by_runtime
from tofa_core.quantize import quantize_int8
from tofa_core.search.evolution import CostModel, EvolutionConfig, InfeasibleTarget, SearchResult, evolve
from tofa_core.search.predictor import AccuracyPredictor, Scored, score_subnets, teacher_labels
from tofa_core.search.targets import Target
from tofa_core.storage import Storage
from tofa_core.supernet import Supernet
from tofa_core.supernet.static import at_resolution
from tofa_core.training.checkpoint import check_fits, load_checkpoint
from tofa_core.training.config import TrainConfig
from tofa_core.training.evaluate import EvalData, calibrated_subnet, eval_data
from tofa_core.training.loop import space_for

log = logging.getLogger(__name__)


@dataclass
class Specialized:
    target: Target
    arch: Arch
    predicted: float  # the predictor's score
    score: float  # the same score measured after BN recalibration
    verification: Verification  # what verification measured on the exported files
    exported: Exported
    search: dict
    seconds: float
    rejected: list[str] = field(default_factory=list)  # better candidates that failed verification
    rejected_by: dict[str, int] = field(default_factory=dict)  # how many of them each check rejected

    @property
    def measured(self) -> dict[str, float]:
        """What verification measured, as one flat mapping (a summary row's keys)."""
        return self.verification.as_dict()

    def result(self, files: dict[str, str]) -> TargetResult:
        """What later stages read of it, with `files` where they were published."""
        return TargetResult(
            target=self.target.name,
            constraints=self.target.constraints(),
            device=self.target.device,
            precision=self.target.precision,
            arch=self.arch.to_dict(),
            predicted_score=round(self.predicted, 4),
            score=round(self.score, 4),
            measured=self.measured,
            search=self.search,
            rejected=self.rejected,
            rejected_by=self.rejected_by,
            seconds=round(self.seconds, 3),
            files=files,
        )


@dataclass(frozen=True)
class TargetResult:
    """One target specialized and published, as the stages after it (registry, plots, tables)
    read it: what was chosen, what verification measured on its files, where the files are.
    `to_json` is its row of summary.json: the fields with `measured` spread among them."""

    target: str
    constraints: dict[str, float]
    device: str | None
    precision: str
    arch: dict
    predicted_score: float | None
    score: float | None
    measured: dict  # macs, params, test_acc, ram_kb, ...: what verification measured
    search: dict = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    rejected_by: dict[str, int] = field(default_factory=dict)  # check -> candidates it rejected
    seconds: float | None = None
    files: dict[str, str] = field(default_factory=dict)  # file name -> URI in the store

    def to_json(self) -> dict:
        head = ("target", "constraints", "device", "precision", "arch", "predicted_score", "score")
        tail = ("search", "rejected", "rejected_by", "seconds", "files")
        counted = {"rejected_candidates": len(self.rejected)}
        return (
            {k: getattr(self, k) for k in head}
            | self.measured
            | counted
            | {k: getattr(self, k) for k in tail}
        )

    @classmethod
    def from_json(cls, row: dict) -> TargetResult:
        """A row of summary.json back (keys that are not fields are what was measured)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"measured"}
        measured = {k: v for k, v in row.items() if k not in names | {"rejected_candidates"}}
        known = {k: v for k, v in row.items() if k in names}
        return cls(**{"predicted_score": None, "score": None} | known, measured=measured)


class Subnets:
    """Each arch's BN-recalibrated subnet, recalibrated once: a candidate is scored in float,
    scored in int8 and exported, and recalibration is most of what each of those costs.
    Callers get a copy they may change."""

    def __init__(self, net: Supernet, calib: torch.Tensor):
        self.net, self.calib = net, calib
        self._kept: dict[Arch, torch.nn.Module] = {}

    def __call__(self, arch: Arch) -> torch.nn.Module:
        if arch not in self._kept:
            self._kept[arch] = calibrated_subnet(self.net, arch, self.calib)
        return copy.deepcopy(self._kept[arch])


def specialize(
    net: Supernet,
    target: Target,
    predictor: AccuracyPredictor,
    data: EvalData,
    costs: CostModel,
    folder: str | Path,
    *,
    classes: list[str],
    about: dict | None = None,
    score: str = "agreement",
    evolution: EvolutionConfig = EvolutionConfig(),
    seed: int = 0,
    reference: torch.Tensor | None = None,
    measured: Sequence[Scored] = (),
) -> Specialized:
    """Pick, export and verify `target`'s subnet into `folder` (model.onnx, model.pt, model.json).

    `reference`: the largest subnet's predictions on the unlabelled pool (`teacher_labels`),
    computed once for all targets; computed here when not given. `measured`: subnets already
    scored (the predictor's samples); the best of them that fit compete with search's picks."""
    started = time.perf_counter()
    if any(f in by_runtime("LiteRT") for f in target.formats):
        litert.require()  # now, not after a search
    rejected: list[VerificationError] = []
    searches = 0
    subnets = Subnets(net, data.calib)
    for search_round in range(SEARCH_ROUNDS):
        # A latency table predicts whole networks within ~10% (up to ~30%), the flash model
        # within ~1.5%: when every candidate near the budget measures over it, search again
        # under tighter predicted budgets.
        searched = _tightened(target, search_round, {e.check for e in rejected})
        if searched is None:
            break  # no budget to tighten: another search would find the same candidates
        try:
            found = evolve(searched, costs, predictor.predict, evolution, seed)
        except InfeasibleTarget:
            if not search_round:
                raise
            break  # not even the smallest subnet fits the tighter budget: report what was measured
        searches += 1
        ranked = rank_candidates(net, searched, found, costs, data, score, reference, measured, subnets)
        job = _Job(net, target, predictor, data, Path(folder), classes, about, score, subnets)
        done = _export_verify(job, ranked, found, rejected)
        if done is not None:
            return dataclasses.replace(done, seconds=time.perf_counter() - started)
    raise VerificationError(
        rejected[-1].check,
        f"target {target.name}: none of the best candidates of {searches} searches passed "
        f"verification ({'; '.join(str(e) for e in rejected)})",
    )


def _tightened(target: Target, search_round: int, failed: set[str]) -> Target | None:
    """`target` with its predicted budgets tightened for the `search_round`-th search (0: as is):
    those that candidates measured over (`failed`: the checks that rejected them). None when
    there is none (candidates that failed only the int8 agreement say nothing of the budgets)."""
    if not search_round:
        return target
    update = {
        c.field: getattr(target, c.field) * c.tighten**search_round
        for c in CONSTRAINTS
        if c.tighten is not None and getattr(target, c.field) is not None and c.field in failed
    }
    if update:
        log.info("target %s: searching again under tighter predicted budgets %s", target.name, update)
    return target.model_copy(update=update) if update else None


# Searches per target when every candidate measures over a predicted budget (each further
# search tightens that budget by its constraint's `tighten` factor).
SEARCH_ROUNDS = 3
# Verification failures after which the next-ranked candidate is tried: the budgets a file
# can measure over by bad luck (`Constraint.retry`), and int8 error another subnet lacks.
NEXT_CANDIDATE = (*(c.field for c in CONSTRAINTS if c.retry), "int8-agreement")


def rank_candidates(
    net: Supernet,
    target: Target,
    found: SearchResult,
    costs: CostModel,
    data: EvalData,
    score: str = "agreement",
    reference: torch.Tensor | None = None,
    measured: Sequence[Scored] = (),
    subnets: Subnets | None = None,
) -> list[Scored]:
    """Search's candidates scored for real, with as many of the best already-measured subnets
    that fit `target`, best measured score first.

    Search maximises the predictor's score, which ranks subnets only roughly (Kendall tau
    ~0.4); among measured subnets a smaller one (often the smallest, trained every step) can
    score better than anything search proposes near the budget."""
    picks = [arch for arch, _ in found.candidates]
    subnets = subnets or Subnets(net, data.calib)
    real = score_subnets(net, picks, data, reference=reference, subnet=subnets)

    def order(s: Scored) -> tuple:
        return s.score(score), s.agreement, s.val

    fitting = [s for s in measured if s.arch not in picks and costs.fits(s.arch, target)]
    real += sorted(fitting, key=order, reverse=True)[: len(picks)]
    if target.precision == "int8":  # quantization error differs between subnets: rank what deploys
        real = int8_scores(net, [s.arch for s in real], data, reference, subnets)
    return sorted(real, key=order, reverse=True)


def int8_scores(
    net: Supernet,
    archs: list[Arch],
    data: EvalData,
    reference: torch.Tensor | None,
    subnets: Subnets | None = None,
) -> list[Scored]:
    """Both scores of each arch's int8 model (exported, quantized as export does, run in ONNX
    Runtime): agreement with the largest subnet on the unlabelled pool, validation accuracy."""
    if reference is None:
        reference = teacher_labels(net, data)
    subnets = subnets or Subnets(net, data.calib)
    out = []
    for arch in archs:
        model = subnets(arch).to(memory_format=torch.contiguous_format)
        calib = at_resolution(data.calib, arch.resolution)
        sess = onnx_runtime.session(quantize_int8(onnx_runtime.onnx_bytes(model, calib[:1]), calib.numpy()))
        pool = onnx_runtime.run(sess, at_resolution(data.pool, arch.resolution).numpy()).argmax(1)
        agreement = float((torch.from_numpy(pool) == reference).float().mean())
        val = 0.0
        if len(data.val_y):
            logits = onnx_runtime.run(sess, at_resolution(data.val_x, arch.resolution).numpy())
            val = float((torch.from_numpy(logits.argmax(1)) == data.val_y).float().mean())
        out.append(Scored(arch, val, agreement))
    return out


@dataclasses.dataclass(frozen=True)
class _Job:
    """What exporting and verifying one target's candidates needs."""

    net: Supernet
    target: Target
    predictor: AccuracyPredictor
    data: EvalData
    folder: Path
    classes: list[str]
    about: dict | None
    score: str
    subnets: Subnets


def _export_verify(
    job: _Job, ranked: list[Scored], found: SearchResult, rejected: list[VerificationError]
) -> Specialized | None:
    """Export and verify the best of `ranked` that passes. None when every one failed a check
    another candidate may pass (`NEXT_CANDIDATE`; each is added to `rejected`)."""
    net, target, data, score = job.net, job.target, job.data, job.score
    started = time.perf_counter()
    searched = dict(found.candidates)
    predicted = searched | {
        s.arch: float(p)
        for s, p in zip(ranked, job.predictor.predict([s.arch for s in ranked]))
        if s.arch not in searched
    }
    search = {
        "evaluated": found.evaluated,
        "candidates_per_s": round(found.per_second),
        "seconds": round(found.seconds, 3),
        "reranked": len(ranked),
        "measured_before": sum(s.arch not in searched for s in ranked),
    }
    for cand in ranked:
        model = job.subnets(cand.arch)
        scores = {"predicted": predicted[cand.arch], score: cand.score(score)}
        exported = _export(job, model, cand.arch, scores)
        try:
            verification = verify(exported, model, cand.arch, net.space, target, data)
        except VerificationError as err:
            for path in exported.files.values():  # nothing of a failed candidate stays in `folder`
                path.unlink(missing_ok=True)
            # A measurement over a budget the model only predicts (latency on a noisy host,
            # flash within ~1.5%), or int8 error another subnet does not have: the next
            # candidate may pass. Any other failure is a defect in export, not bad luck: stop.
            if err.check not in NEXT_CANDIDATE:
                raise
            err.args = (f"{cand.arch.to_json()}: {err}",)
            rejected.append(err)
            continue
        exported.about["verified"] = verification.as_dict()
        exported.files["model.json"].write_text(json.dumps(exported.about, indent=2))
        return Specialized(
            target,
            cand.arch,
            predicted[cand.arch],
            cand.score(score),
            verification,
            exported,
            search,
            time.perf_counter() - started,
            [str(e) for e in rejected],
            dict(Counter(e.check for e in rejected)),
        )
    return None


def _export(job: _Job, model: torch.nn.Module, arch: Arch, scores: dict) -> Exported:
    """One candidate's files, model.json naming its target (budgets, precision) and scores."""
    target = job.target
    info = {
        **(job.about or {}),
        "target": {
            "name": target.name,
            **target.constraints(),
            "device": target.device,
            "precision": target.precision,
        },
        "scores": scores,
    }
    return export_subnet(
        model,
        arch,
        job.data,
        job.folder,
        classes=job.classes,
        formats=target.formats,
        about=info,
        precision=target.precision,
    )


@dataclass
class Trained:
    """A trained supernet with the data version it was trained on, ready for specialization."""

    net: Supernet
    config: TrainConfig
    splits: DataSplits
    data: EvalData
    state: dict  # the checkpoint's record: dataset, data_version, classes, final scores
    reference: torch.Tensor  # the largest subnet's predictions on data.pool (agreement scores)


def load_trained(store: DatasetStore, run_dir: Storage, key: str = "supernet.pt") -> Trained:
    """Load `run_dir/key` and the exact data splits and evaluation images its training used."""
    state = load_checkpoint(run_dir, key)
    config = TrainConfig(**state["config"])
    splits = load_splits(
        store,
        state["dataset"],
        state["data_version"],
        val_fraction=config.val_fraction,
        seed=config.seed,
        hold_training=False,  # specialization reads only the calibration and pool images of them
    )
    space = space_for(config, splits)
    check_fits(state, space, run_dir.uri(key))
    net = Supernet(space)
    net.load_state_dict(state["model"])
    net.eval()
    info = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "rng", "sampler")}
    data = eval_data(splits, config)
    return Trained(net, config, splits, data, info, teacher_labels(net, data))
