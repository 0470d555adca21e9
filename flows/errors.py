"""The errors TOFA recognises, and how a failed flow run reports them: with their message alone.

A recognised error (a bad source or config, a missing service, a checkpoint that does not fit,
another run holding the lock) already says what is wrong and how to fix it. Prefect's flow
engine logs every exception that ends a flow run with its traceback: forty lines of engine
frames above the one line that matters, on the console and in the run's logs in the UI. A
filter on the loggers Prefect's engines log through drops the traceback of recognised errors;
everything unexpected keeps its traceback.
"""

from __future__ import annotations

import functools
import logging


@functools.cache
def recognised() -> tuple[type[BaseException], ...]:
    """The recognised error types (imported on first use: installing the filter costs no import)."""
    from flows.services import ServiceUnavailable
    from flows.specialize import SpecializationFailed  # its message lists each target's error
    from tofa_core.config_files import ConfigError
    from tofa_core.costs import LatencyTableError
    from tofa_core.data.sources import SourceError
    from tofa_core.litert import LiteRTUnavailable
    from tofa_core.names import InvalidName
    from tofa_core.runlock import RunLocked
    from tofa_core.search.evolution import InfeasibleTarget
    from tofa_core.search.targets import TargetError
    from tofa_core.storage import StorageError
    from tofa_core.training.checkpoint import CheckpointError

    return (
        CheckpointError, ConfigError, InfeasibleTarget, InvalidName, LatencyTableError, LiteRTUnavailable,
        RunLocked, ServiceUnavailable, SourceError, SpecializationFailed, StorageError, TargetError,
    )  # fmt: skip


# Where Prefect's flow and task engines log the exception that ends a run.
ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class MessageOnly(logging.Filter):
    """Keeps every record; strips the traceback from those about a recognised error."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and isinstance(error, recognised()):
            record.exc_info, record.exc_text = None, None
        return True


def report_recognised_errors_plainly() -> None:
    """Install MessageOnly on Prefect's engine loggers in this process (again: no effect)."""
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, MessageOnly) for f in logger.filters):
            logger.addFilter(MessageOnly())
