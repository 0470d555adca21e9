"""The stack's names, ports and record: what every part of the supervisor refers to."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from flows.settings import state_dir

SERVICES = ("s3", "mlflow", "prefect", "worker")
BUCKET = "tofa"
USER = "tofa"  # the stack's one user, of MLflow and Prefect
CSRF_CLIENT = "tofa-stack"  # how `tofa stack` names itself to Prefect's CSRF protection
POOL = "tofa"
WORKER_NAME = "tofa-local-worker"
REGION = "us-east-1"
GRPC_OFFSET = 10000  # weed's convention: a component's gRPC port is its HTTP port + 10000
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class StackError(RuntimeError):
    """A service of the stack did not start or stop; the message carries its log's tail."""


@dataclass
class StackConfig:
    home: Path = field(default_factory=lambda: state_dir() / "stack")
    s3_port: int = 8333
    mlflow_port: int = 5000
    prefect_port: int = 4200

    @property
    def record(self) -> Path:
        return self.home / "stack.json"


# ---------------------------------------------------------------- SeaweedFS (also used by tests)


def _load(cfg: StackConfig) -> dict:
    if cfg.record.exists():
        return json.loads(cfg.record.read_text())
    return {}


def _save(cfg: StackConfig, record: dict) -> None:
    cfg.home.mkdir(parents=True, exist_ok=True)
    cfg.home.chmod(0o700)  # keys, passwords, the S3 volumes and the databases: the owner's only
    tmp = cfg.record.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.chmod(0o600)  # it holds the S3 secret
    tmp.replace(cfg.record)
