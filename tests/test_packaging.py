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
    {"errors", "tracing", "timers"},
    {"config", "dag", "store"},
    {"sqlite_store", "stages", "spool"},
    {"runner"},
    {"engine", "workflows"},
    {"gateway", "dropfolder"},
    {"service"},
    {"cli", "__main__"},
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
    public = {n for n in dir(pipeline) if not n.startswith("_") and not isinstance(getattr(pipeline, n), type(pipeline))}
    assert set(pipeline.__all__) == public


def _layer(module: str) -> int:
    head = module.split(".")[0]
    return next((i for i, layer in enumerate(LAYERS) if head in layer), len(LAYERS))


def test_imports_point_downward_and_core_never_imports_audit():
    for path in (ROOT / "pipeline").rglob("*.py"):
        rel = path.relative_to(ROOT / "pipeline").with_suffix("")
        parts = rel.parts
        if parts[0] == "audit":
            continue
        me = _layer(parts[0] if parts[0] != "stages" else "stages")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = (node.module or "").split(".")[0] or (node.names[0].name if node.level == 1 else "")
                if parts[0] == "stages" and node.level == 1:
                    continue
                assert target != "audit", f"{rel} imports the audit"
                assert _layer(target) <= me, f"{rel} (layer {me}) imports {target} (layer {_layer(target)})"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert not (mod or "").startswith("pipeline.audit"), f"{rel} imports the audit"
