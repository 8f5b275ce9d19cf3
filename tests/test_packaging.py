"""Project hygiene: dependency lists agree, exports are complete, imports point one way."""

import ast
import re
import tomllib
from pathlib import Path

import yaml

import pipeline

ROOT = Path(__file__).resolve().parent.parent
# Lower layers may not import higher ones (STYLE.md section 1).
LAYERS = [
    {"errors", "store_types", "tracing", "timers", "priority", "passes", "ratelog"},
    {"addresses"},
    {"config", "serve_config", "settings_file", "dag", "store", "metrics", "metrics_counts", "metrics_scrape"},
    {"sqlite_schema", "postgres_schema", "sql_base", "sql_purge", "sql_store", "duration_bins", "wakeup"},
    {"sqlite_store", "postgres_store", "stages", "spool", "workdir"},
    {"executors", "dask_executor", "handover", "health", "liveness", "datadir_watch"},
    {"runner", "runner_completion"},
    {"engine", "engine_breaks", "engine_heartbeat", "workflows"},
    {"smtp_limits", "bulk_smtp", "smtp_lean", "inline_accept"},
    {"gateway", "dropfolder", "housekeeping", "gatewayprocess"},
    {"service"},
    {"cli", "cli_parser", "cli_format", "__main__", "gatewaychild", "ingest_command"},
]


def _names(requirements):
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"]) | _names(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _names(pip_section) == wanted


def test_all_lists_every_public_name():
    module = type(pipeline)
    public = {n for n in dir(pipeline) if not n.startswith("_") and not isinstance(getattr(pipeline, n), module)}
    assert set(pipeline.__all__) == public


def _layer(module: str) -> int:
    return next((i for i, layer in enumerate(LAYERS) if module in layer), len(LAYERS))


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of the pipeline modules a file imports (``pipeline.x.y``)."""
    package = ["pipeline", *path.relative_to(ROOT / "pipeline").parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            if node.module:
                found.append(".".join([*base, node.module]))
            else:
                found += [".".join([*base, a.name]) for a in node.names]
    return [m for m in found if m.startswith("pipeline.")]


def test_imports_point_downward_and_core_never_imports_audit():
    for path in (ROOT / "pipeline").rglob("*.py"):
        parts = path.relative_to(ROOT / "pipeline").with_suffix("").parts
        if parts[0] == "audit" or parts[0] == "__init__":
            continue
        me = _layer(parts[0])
        for module in _imported_modules(path):
            target = module.split(".")[1]
            assert target != "audit", f"{path} imports the audit"
            assert _layer(target) <= me, f"{path} (layer {me}) imports {module} (layer {_layer(target)})"
