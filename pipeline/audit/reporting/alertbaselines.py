"""Alert thresholds next to the measured baseline of the same traffic.

An alert that fires on ordinary traffic is noise, and one set far above it
finds nothing. Each rule of ``docs/performance/alerts.yml`` whose expression
ends in ``> THRESHOLD`` is paired here with the audit figure that measures the
same quantity on the same kind of traffic (what the rule's metric would read on
the audited serve), so the report shows the headroom: threshold / baseline.
A rule whose threshold is below its baseline would fire on normal traffic.

The pairing is written down (``BASELINES``); a rule without a measured
counterpart is listed with its reason rather than dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..base.harness import percentile, row
from ..base.recorder import AuditRecorder
from .report import ROOT

ALERTS = ROOT / "docs" / "performance" / "alerts.yml"
MIN_HEADROOM = 2.0  # a warning threshold at least this far above the baseline: room for a slower day


@dataclass(frozen=True)
class Baseline:
    """Where the audit measures what a rule watches: rows of ``scenario`` named ``metric``, reduced by ``stat``
    (``p99``, ``max`` or ``median``), times ``scale`` into the rule's base unit; ``traffic`` says what ran."""

    scenario: str
    metric: str
    stat: str
    scale: float
    traffic: str
    variant: str | None = None
    tags: tuple[tuple[str, Any], ...] = ()  # tag values the rows must have, e.g. (("process", "serve"),)


BASELINES: dict[str, list[Baseline]] = {
    "PipelineTriggerP99Slow": [
        Baseline("monitoring", "trigger_seconds", "p99", 1.0, "small mails, 4 senders, serve processing them"),
        Baseline("email_burst", "trigger_latency_ms", "p99", 1e-3, "small-mail bursts at 100-400 msg/s on serve"),
    ],
    "PipelineTriggerP99OverSLA": [
        Baseline("email_burst", "trigger_latency_ms", "p99", 1e-3, "small-mail bursts at 100-400 msg/s on serve"),
    ],
    "PipelineServeRssHigh": [
        Baseline("soak", "rss_bytes", "max", 1.0, "serve soak: mails with a PDF, serve process alone", "serve",
                 (("process", "serve"),)),
        Baseline("hostile", "serve_peak_rss_mb", "max", 1024 * 1024, "10 x 44 MB mails at once, shipped settings",
                 tags=(("mode", "after"),)),
    ],
    "PipelineServeRssGrowth": [
        Baseline("soak", "leak_rss_bytes_per_run", "max", 1.0, "serve soak: serve's RSS slope per finished run",
                 "serve", (("process", "serve"),)),
    ],
    "PipelineStoreWalLarge": [
        Baseline("soak", "store_wal_bytes", "max", 1.0, "serve soak: the run store's WAL after each batch", "serve",
                 (("process", "store"),)),
    ],
    "PipelineQueueGrowing": [
        Baseline("email_burst", "backlog_peak", "max", 1.0,
                 "peak backlog of 2 s bursts (they drain; the rule also needs 30 min of growth)"),
    ],
}

# Level rules the audit has no normal-traffic figure for, and why.
UNMEASURED: dict[str, str] = {
    "PipelineRunsFailing": "failure share by reason: normal traffic fails none; the faults notebook injects failures",
    "PipelineWorkerRestarts": "restarts per 15 min: normal traffic restarts no worker; the faults notebook kills one",
    "PipelineDeliveryRetrying": "deliver retries per 10 min: normal traffic retries none; the faults notebook's "
                                "greylisting relay retries two",
}


def rule_thresholds(path: Path = ALERTS) -> dict[str, float]:
    """Each rule's trailing ``> THRESHOLD`` (base unit), by alert name; rules without one are left out."""
    import yaml  # the dev extra's pyyaml: only the report reads the rules file

    out = {}
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            found = re.findall(r">\s*([0-9.eE+-]+)\s*$", rule["expr"].strip())
            if found:
                out[rule["alert"]] = float(found[0])
    return out


def measured(measurements: pd.DataFrame, baseline: Baseline) -> float:
    """The baseline's figure in the rule's unit; NaN when the session did not measure it."""
    rows = measurements[(measurements.scenario == baseline.scenario) & (measurements.metric == baseline.metric)]
    if baseline.variant is not None:
        rows = rows[rows.variant == baseline.variant]
    for key, wanted in baseline.tags:
        rows = rows[rows.tags.map(lambda tags, k=key, w=wanted: tags.get(k) == w).astype(bool)]
    values = rows.value.dropna()
    if values.empty:
        return math.nan
    if baseline.stat == "p99":
        value = percentile(values, 99)
    elif baseline.stat == "max":
        value = float(values.max())
    else:
        value = float(values.median())
    return value * baseline.scale


def baseline_table(measurements: pd.DataFrame, path: Path = ALERTS) -> pd.DataFrame:
    """Per rule with a threshold: the threshold, the highest measured baseline, its traffic, the headroom and
    whether the rule would have fired on that traffic."""
    rows: list[dict[str, Any]] = []
    for alert, threshold in rule_thresholds(path).items():
        if threshold == 0:  # "> 0": any occurrence fires it; there is no level to compare with traffic
            rows.append({"alert": alert, "threshold": threshold, "baseline": math.nan,
                         "traffic": "event rule: any occurrence fires it", "headroom": math.nan,
                         "on this traffic": "n/a"})
            continue
        pairs = [(measured(measurements, b), b) for b in BASELINES.get(alert, [])]
        pairs = [(v, b) for v, b in pairs if not math.isnan(v)]
        if not pairs:
            rows.append({"alert": alert, "threshold": threshold, "baseline": math.nan,
                         "traffic": f"not measured: {UNMEASURED.get(alert, 'no baseline paired with this rule')}",
                         "headroom": math.nan, "on this traffic": "unknown"})
            continue
        value, source = max(pairs, key=lambda pair: pair[0])
        headroom = threshold / value if value > 0 else math.inf
        rows.append({"alert": alert, "threshold": threshold, "baseline": value,
                     "traffic": f"{source.traffic} ({source.stat})", "headroom": headroom,
                     "on this traffic": "fires" if headroom <= 1 else
                     ("quiet, narrow" if headroom < MIN_HEADROOM else "quiet")})
    return pd.DataFrame(rows)


def record(recorder: AuditRecorder, path: Path = ALERTS) -> pd.DataFrame:
    """Judge every rule against this session's measurements so far; record the headroom per rule and how many
    rules would fire on the audited traffic (scenario ``alerts``; an SLA reads the count). Returns the table."""
    table = baseline_table(recorder.measurements(), path)
    judged = table[table["on this traffic"].isin(["fires", "quiet", "quiet, narrow"])]
    rows = [row("baseline", "alert_headroom", float(r.headroom), "x", 0, alert=r.alert) for r in judged.itertuples()]
    rows.append(row("baseline", "alerts_firing_on_baseline", int((judged["on this traffic"] == "fires").sum()),
                    "rules", 0, judged=len(judged)))
    recorder.record("alerts", pd.DataFrame(rows))
    return table
