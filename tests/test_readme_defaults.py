"""The README's documented defaults are config.py's: a default changed in one place fails here."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from pipeline import config

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SECTIONS = {"store": config.StoreConfig, "runner": config.RunnerConfig, "executor": config.ExecutorConfig,
            "engine": config.EngineConfig, "gateway": config.GatewayConfig, "ingest": config.IngestConfig,
            "delivery": config.DeliveryConfig, "metrics": config.MetricsConfig}
UNITS = {"": 1, "s": 1, "ms": 0.001, "KB": 1024, "MB": 1024 ** 2, "GiB": 1024 ** 3}
# "`[ingest] max_pages` (5,000)", "`stale_after_s` (30 s)"; and limit-table rows "| `key` ... | 60 s |"
SENTENCE = re.compile(r"`(?:\[(\w+)\] )?(\w+)`[^`(|\n]{0,20}\((\d[\d,.]*) ?(MB|GiB|KB|ms|s)?[,)]")
TABLE_ROW = re.compile(r"^\| `(?:\[(\w+)\] )?(\w+)`[^|]*\| (\d[\d,.]*) ?(MB|GiB|KB|ms|s)? \|", re.M)


def defaults() -> dict[str, dict[str, object]]:
    return {name: {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
            for name, cls in SECTIONS.items()}


def documented() -> list[tuple[str | None, str, float, int]]:
    found = []
    for pattern in (SENTENCE, TABLE_ROW):
        for match in pattern.finditer(README):
            section, key, number, unit = match.groups()
            found.append((section, key, float(number.replace(",", "")) * UNITS[unit or ""], match.start()))
    return found


def section_of(key: str, section: str | None, at: int, known: dict[str, dict[str, object]]) -> str | None:
    """The section a documented key belongs to: named, the only one with that key, or the nearest
    ``[section]`` mentioned before it in the README."""
    if section:
        return section
    owners = [name for name, fields in known.items() if key in fields]
    if len(owners) == 1:
        return owners[0]
    mentions = [(m.start(), m.group(1)) for m in re.finditer(r"\[(\w+)\]", README[:at]) if m.group(1) in owners]
    return mentions[-1][1] if mentions else None


def test_every_documented_default_is_the_configured_one():
    known = defaults()
    checked = []
    for section, key, value, at in documented():
        owner = section_of(key, section, at, known)
        if owner is None or key not in known.get(owner, {}):
            continue  # not a setting (a metric, a column) or not one with a plain default
        actual = known[owner][key]
        if isinstance(actual, bool) or not isinstance(actual, int | float):
            continue
        assert float(actual) == value, f"README says [{owner}] {key} = {value:g}; config.py has {actual}"
        checked.append(f"{owner}.{key}")
    # the ones this test was written for are all found (a rewording must not silently skip them)
    assert {"ingest.max_attachment_bytes", "ingest.max_pages", "ingest.timeout_s", "ingest.memory_limit_bytes",
            "engine.stale_after_s", "runner.retry_max_delay_s", "gateway.command_timeout_s",
            "ingest.max_mime_depth"} <= set(checked), checked
