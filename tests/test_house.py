"""The house rules the code must keep: short functions, and arrows from flows to tofa_core only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60  # a longer function is several steps that want names


def _modules(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        yield path, ast.parse(path.read_text())


def test_no_function_in_the_core_or_the_flows_is_over_60_lines():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for package in ("tofa_core", "flows")
        for path, tree in _modules(package)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_the_core_never_imports_orchestration():
    banned = ("flows", "prefect", "prefect_ray", "ray", "mlflow")
    found = []
    for path, tree in _modules("tofa_core"):
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in banned]
    assert not found, found


# Where a run's settings and targets are parsed: a pipeline run's plan (tofa_core/plan.py),
# and the entry of each flow that also runs on its own (`tofa train`, `tofa tune`, `tofa
# baseline`, `tofa specialize`, `tofa targets validate`), each only when its caller handed it
# nothing resolved. Anywhere else a stage would read a file again, and could see another
# version of it than the one the run hashed.
PARSERS = {"load", "from_yaml", "section_model", "load_section_model", "load_targets", "read_targets"}
PARSED = {"TrainConfig", "IngestConfig", "config_files", "stages"}
ALLOWED_PARSES = {
    ("flows/baseline.py", "baseline_flow", "TrainConfig.load"),
    ("flows/cli/targets.py", "targets_validate", "load_targets"),
    ("flows/ingest.py", "ingest_flow", "stages.IngestConfig.from_yaml"),
    ("flows/specialize.py", "specialize_flow", "load_targets"),
    ("flows/train.py", "train_flow", "TrainConfig.load"),
    ("flows/tune.py", "tune_flow", "TrainConfig.load"),
    ("tofa_core/plan.py", "resolve", "config_files.section_model"),
    ("tofa_core/plan.py", "resolve", "read_targets"),
}


def _called(node: ast.Call) -> str | None:
    """`TrainConfig.load`, `read_targets`, ...: the parse a call makes, if it is one."""
    func = node.func
    if isinstance(func, ast.Name) and func.id in PARSERS:
        return func.id
    if isinstance(func, ast.Attribute) and func.attr in PARSERS:
        owner = ast.unparse(func.value)
        if owner.split(".")[0] in PARSED:
            return f"{owner}.{func.attr}"
    return None


def _call_sites(which) -> set[tuple]:
    """(file, function, what `which` makes of the call) for each call in tofa_core and flows
    for which `which` returns something."""
    found = set()
    for package in ("tofa_core", "flows"):
        for path, tree in _modules(package):
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call) and (call := which(node)):
                        found.add((str(path.relative_to(ROOT)), fn.name, call))
    return found


def test_settings_and_targets_are_parsed_only_where_a_run_is_resolved():
    found = _call_sites(_called)
    # the parsers' own layers (TrainConfig.load calls from_yaml, and so on) are not call sites
    inner = {f for f in found if f[0].startswith("tofa_core/") and f[0] != "tofa_core/plan.py"}
    assert found - inner == ALLOWED_PARSES, sorted((found - inner) ^ ALLOWED_PARSES)


# Where a store is opened: the plan of a pipeline run, the entry of each flow that also runs
# on its own (flows.settings.open_store, which uses a store its caller opened as it is), and
# each Ray process (a training worker, a Tune trial), which gets URIs. Everything else derives
# its folders from an open store (`child`, `at`), sharing its connection. Sources a user names
# (tofa_core/data) and a warm start's checkpoint outside the store are not the store.
ALLOWED_OPENS = {
    ("flows/settings.py", "open_store"),
    ("flows/train_worker.py", "train_worker"),
    ("flows/train_worker.py", "_folder"),
    ("flows/tune.py", "_trial"),
    ("tofa_core/plan.py", "resolve"),
    ("tofa_core/data/ingest.py", "_decode_chunk"),  # a source's files, in a decode process
    ("tofa_core/data/sources.py", "list_source"),
}
OPEN_STORE_CALLERS = {  # open_store's callers: every flow that runs alone, and `tofa gc`
    ("flows/baseline.py", "baseline_flow"),
    ("flows/cli/data.py", "gc"),
    ("flows/ingest.py", "ingest_flow"),
    ("flows/specialize.py", "specialize_flow"),
    ("flows/train.py", "train_flow"),
    ("flows/tune.py", "tune_flow"),
}


def _calls_of(name: str) -> set[tuple[str, str]]:
    def named(node: ast.Call) -> bool:
        return isinstance(node.func, ast.Name) and node.func.id == name

    return {(path, fn) for path, fn, _ in _call_sites(named)}


def test_the_store_is_opened_once_per_process_where_a_run_or_a_flow_starts():
    assert _calls_of("open_storage") == ALLOWED_OPENS, sorted(_calls_of("open_storage") ^ ALLOWED_OPENS)
    assert _calls_of("open_store") == OPEN_STORE_CALLERS, sorted(_calls_of("open_store") ^ OPEN_STORE_CALLERS)
