"""`tofa stack`: the local S3, MLflow and Prefect services (flows/stack/ supervises them)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from flows.cli.common import (
    app,
    console,
    fail,
)

stack_app = typer.Typer(
    help="The local service stack: S3 (SeaweedFS), MLflow server, Prefect server and worker.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")


@stack_app.command("up")
def stack_up(
    s3_port: int = typer.Option(8333, "--s3-port", help="S3 endpoint port on 127.0.0.1."),
    mlflow_port: int = typer.Option(5000, "--mlflow-port", help="MLflow server port on 127.0.0.1."),
    prefect_port: int = typer.Option(4200, "--prefect-port", help="Prefect server (API and UI) port."),
) -> None:
    """Start the stack (what already runs is kept) and print the environment to export."""
    from flows.stack import StackConfig, StackError, up

    cfg = StackConfig(s3_port=s3_port, mlflow_port=mlflow_port, prefect_port=prefect_port)
    try:
        env = up(cfg, progress=lambda message: Console(stderr=True).print(message, highlight=False))
    except StackError as err:
        fail(str(err))
    Console(stderr=True).print(
        f"stack up; data and logs under {cfg.home}. MLflow UI: {env['MLFLOW_TRACKING_URI']}, Prefect UI: "
        f"{env['PREFECT_API_URL'].removesuffix('/api')}. Use it from this shell with "
        f"`source {cfg.home / 'env'}` (the lines below):",
        highlight=False,
    )
    print("".join(f"export {k}={v}\n" for k, v in env.items()), end="")


@stack_app.command("down")
def stack_down() -> None:
    """Stop the stack's processes (by their recorded PIDs); data stays for the next `up`."""
    from flows.stack import StackConfig, down

    stopped = down(StackConfig())
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running", highlight=False)


@stack_app.command("status")
def stack_status() -> None:
    """Each service: running, healthy, PID, URL. Exits 1 when any is not healthy."""
    from flows.stack import StackConfig, status

    rows = status(StackConfig())
    table = Table(title="tofa stack")
    for col in ("service", "state", "pid", "url", "log"):
        table.add_column(col)
    for r in rows:
        state = "healthy" if r["healthy"] else ("running, not answering" if r["running"] else "stopped")
        table.add_row(r["service"], state, str(r["pid"] or "-"), r["url"] or "-", r["log"] or "-")
    console.print(table)
    if not all(r["healthy"] for r in rows):
        raise typer.Exit(code=1)


@stack_app.command("env")
def stack_env() -> None:
    """Print the environment that points tofa, MLflow and Prefect clients at the stack."""
    from flows.stack import StackConfig, StackError, saved_env

    try:
        env = saved_env(StackConfig())
    except StackError as err:
        fail(str(err))
    print("".join(f"export {k}={v}\n" for k, v in env.items()), end="")
