"""Overlapping a CLI run's slow starts: Prefect's temporary API server, the imports, Ray.

Without PREFECT_API_URL, Prefect starts a temporary API server (a uvicorn process, ~9 s
on 2 cores) when the first flow begins; training then starts Ray (~7 s). One after the
other, behind ~8 s of imports, they were 25 s of a 5-minute `tofa train`. The server is a
separate process, so it can come up on the other core while this one imports and starts Ray.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


def _start_temporary_api() -> None:
    try:
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():  # a real server: nothing to start
            return
        from prefect.server.api.server import SubprocessASGIServer

        # The per-process instance Prefect's client would start itself; its later start() is a no-op.
        SubprocessASGIServer().start()
    except Exception as err:  # noqa: BLE001 - the flow's own start tries again and reports the error
        log.debug("early start of Prefect's temporary server failed: %s", err)


@contextmanager
def prefect_api_starting() -> Iterator[None]:
    """Start Prefect's temporary API server (if one is needed) while the block runs; wait
    for it on leaving, also on an error, so no half-started server outlives the process.

    Flows must start after the block: Prefect marks the server running before it answers,
    so a flow started meanwhile would call an API that is not up yet."""
    thread = threading.Thread(target=_start_temporary_api, name="prefect-api-start", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
