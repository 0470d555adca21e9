"""Preflight: every external service the environment points at answers, within seconds.

Without these checks a missing MLflow server or S3 endpoint shows up minutes later as a
retry storm or a traceback from deep inside a client library. Each check names the service,
the variable that points at it and how to fix it. Embedded defaults (no variable set) need
no check.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from urllib.parse import urlparse

from flows.settings import redact

TIMEOUT_S = 3.0
HINT = "start the local stack with `tofa stack up` and export what it prints, or unset {var} to use {default}"


class ServiceUnavailable(RuntimeError):
    """A configured service does not answer; the message says which and what to do."""


def _http_ok(url: str) -> str | None:
    """None when `url` answers 2xx, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def check_mlflow() -> None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return
    if why := _http_ok(uri.rstrip("/") + "/health"):
        raise ServiceUnavailable(
            f"the MLflow tracking server at {redact(uri)} (MLFLOW_TRACKING_URI) does not answer: {why}; "
            + HINT.format(var="MLFLOW_TRACKING_URI", default="a local SQLite file under .tofa/")
        )


def check_prefect() -> None:
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        return
    if why := _http_ok(url.rstrip("/") + "/health"):
        raise ServiceUnavailable(
            f"the Prefect API at {redact(url)} (PREFECT_API_URL) does not answer: {why}; "
            + HINT.format(var="PREFECT_API_URL", default="Prefect's ephemeral API")
        )


def check_store(store: str) -> None:
    """An s3:// store: the endpoint answers, the credentials work and the bucket exists."""
    if not store.startswith("s3://"):
        return
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = urlparse(store).netloc
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
    config = Config(connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1})
    try:
        boto3.session.Session().client("s3", config=config).head_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "?")
        fix = {
            "404": f"create the bucket (`aws s3 mb s3://{bucket}`) or point TOFA_STORE at one that exists",
            "403": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
        }.get(code, "check the bucket and the AWS_* credentials")
        raise ServiceUnavailable(
            f"S3 bucket {bucket!r} at {endpoint} (TOFA_STORE={store}): error {code}; {fix}"
        ) from None
    except BotoCoreError as err:
        raise ServiceUnavailable(
            f"S3 at {endpoint} (AWS_ENDPOINT_URL_S3, for TOFA_STORE={store}) does not answer: {err}; "
            + HINT.format(var="TOFA_STORE", default="the local folder .tofa/store")
        ) from None


def check_ray() -> None:
    """RAY_ADDRESS as host:port (a cluster's GCS) or ray://host:port: the port accepts connections."""
    address = os.environ.get("RAY_ADDRESS", "")
    if not address or address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.hostname is None or parsed.port is None:
        return  # not a host:port form we can probe; Ray reports its own error
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=TIMEOUT_S).close()
    except OSError as err:
        raise ServiceUnavailable(
            f"the Ray cluster at {address} (RAY_ADDRESS) does not accept connections: {err}; "
            "start the cluster (`ray start --head`) or unset RAY_ADDRESS to run Ray locally"
        ) from None


def check_services(store: str, prefect: bool = True) -> None:
    """All of the above that apply; raises ServiceUnavailable on the first that fails."""
    if prefect:
        check_prefect()
    check_mlflow()
    check_store(store)
    check_ray()
