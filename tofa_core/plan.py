"""One pipeline run resolved once: the files it reads, parsed and validated at its entry point.

Every stage of a run takes its part of the plan (the ingest and training settings, the
parsed targets) and reads no file again, so no two stages can see different versions of a
file that changed meanwhile, and the "nothing new" key hashes exactly what the run uses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from tofa_core import config_files, litert
from tofa_core.data.ingest import IngestConfig
from tofa_core.search.targets import Target, read_targets
from tofa_core.storage import Storage, open_storage
from tofa_core.training.config import TrainConfig


@dataclass(frozen=True)
class RunPlan:
    """What one pipeline run does: its data, store, settings and targets, resolved.

    `store` is the store, opened once for the whole run (every stage derives its folders
    from it), and `tracking_uri` where MLflow records the run (both as the entry point
    resolved them from options and the environment); `targets_text` is the text `targets`
    were parsed from."""

    source: str
    dataset: str
    store: Storage
    tracking_uri: str
    config_file: str | None
    ingest: IngestConfig
    train: TrainConfig
    targets_file: str
    targets_text: str
    targets: tuple[Target, ...]
    workers: int
    samples: int
    score: str

    @classmethod
    def resolve(
        cls,
        *,
        source: str,
        dataset: str,
        store: str,
        tracking_uri: str,
        config_file: str | None,
        targets_file: str,
        devices: Iterable[str],
        workers: int,
        samples: int,
        score: str,
        **train_overrides,
    ) -> RunPlan:
        """Read the config file and the targets file once each; fail here, before any work,
        on a bad file or a LiteRT format this machine cannot make. `train_overrides` that
        are None (an option not given) leave the config file's value."""
        sections = config_files.load_sections(config_file) if config_file else {}
        given = {k: v for k, v in train_overrides.items() if v is not None}
        where = config_file or "the defaults"
        ingest = config_files.section_model(IngestConfig, sections.get("ingest", {}), where, "ingest")
        train = config_files.section_model(TrainConfig, sections.get("train", {}), where, "train", **given)
        text, targets = read_targets(targets_file, devices=devices)
        litert.require_for(targets)
        return cls(
            source=source,
            dataset=dataset,
            store=open_storage(store),
            tracking_uri=tracking_uri,
            config_file=config_file,
            ingest=ingest,
            train=train,
            targets_file=str(targets_file),
            targets_text=text,
            targets=tuple(targets),
            workers=workers,
            samples=samples,
            score=score,
        )

    def key(self, version: str) -> str:
        """Everything the run's result depends on, for data `version`: an equal key means
        nothing new to do."""
        parts = [
            version,
            config_hash(self.train),
            hashlib.sha256(self.targets_text.encode()).hexdigest(),
            str(self.samples),
            self.score,
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    @property
    def targets_sha256(self) -> str:
        return hashlib.sha256(self.targets_text.encode()).hexdigest()


def config_hash(cfg: TrainConfig) -> str:
    """Identifies a training setup: same data version + same hash = the same supernet to expect."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
