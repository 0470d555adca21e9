"""Orchestration: Prefect flows over tofa_core, the CLI, the local stack."""

from flows.errors import report_recognised_errors_plainly

# Every process that runs a flow imports this package first (the CLI, a deployment's worker).
report_recognised_errors_plainly()
