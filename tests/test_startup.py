"""The CLI's early start of Prefect's temporary API server (flows/startup.py), in fresh processes:
the server must answer when the block ends, be the one the flow then uses (one start, not
two), and be gone when the process exits; with a real server configured nothing starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts a Prefect server

SCRIPT = """
import json, urllib.request
from flows.startup import prefect_api_starting
with prefect_api_starting():
    pass
from prefect import flow
from prefect.server.api.server import SubprocessASGIServer
server = SubprocessASGIServer()
pid = server.server_process.pid if server.running else None
health = urllib.request.urlopen(server.api_url + "/health", timeout=5).status if pid else None
from prefect.client.orchestration import get_client
@flow
def api() -> str:
    return str(get_client(sync_client=True).api_url)
print(json.dumps({"pid": pid, "health": health, "url": server.api_url, "flow": api()}), flush=True)
"""


def run_script(tmp_path: Path, **env: str) -> tuple[dict, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=base | env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout + out.stderr


def test_the_server_started_early_answers_serves_the_flow_and_stops_with_the_process(tmp_path):
    info, logs = run_script(tmp_path)
    assert info["health"] == 200
    assert info["flow"].rstrip("/") == info["url"].rstrip("/")  # the flow ran against it, no second one
    assert logs.count("Stopping temporary server") == 1
    assert not Path(f"/proc/{info['pid']}").exists()


def test_nothing_starts_when_a_prefect_server_is_configured(tmp_path):
    # Nothing listens on port 9, so the script stops after the block: no flow, only the start
    # the block would have logged (the test above shows that line appears when it does start).
    script = "from flows.startup import prefect_api_starting as s\nwith s():\n    pass\nprint('ok')"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok" and "Starting temporary server" not in out.stdout + out.stderr
