"""The sender's wait (pipeline.audit.scenarios.client_latency): a small client-side A/B against real serves."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import smtplib
import sqlite3
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

from pipeline.audit.base.baresink import BareSink
from pipeline.audit.scenarios import client_latency


def test_client_latency_times_every_mail_from_the_client_and_the_store_for_both_layouts(tmp_path):
    result = client_latency.client_latency(tmp_path, senders=(1, 2), per_sender=3, reps=1, large_mb=0.3,
                                          warmup_mails=2, timeout_s=300)
    per_mail = result[result.metric.isin(["client_txn_ms", "client_mail_ms", "server_trigger_ms"])]
    small = per_mail[per_mail.kind == "small"]
    # every small mail of every round: 1x3 + 2x3 + 2x3 (beside the large one), per variant and metric
    # the bare sink has no run store: no server-side figure
    assert Counter(zip(small.variant, small.metric, strict=True)) == {
        (v, m): 15 for v in client_latency.VARIANTS for m in ("client_txn_ms", "client_mail_ms", "server_trigger_ms")
        if (v, m) != (client_latency.BARE, "server_trigger_ms")}
    assert set(per_mail[per_mail.kind == "large"].variant) == set(client_latency.VARIANTS)
    assert (per_mail.value >= 0).all()
    for variant in client_latency.VARIANTS:  # connect -> 250 includes MAIL -> 250
        mine = small[small.variant == variant]
        assert mine[mine.metric == "client_txn_ms"].value.sum() >= mine[mine.metric == "client_mail_ms"].value.sum()
    assert (result[result.metric == "refused"].value == 0).all()
    assert (result[result.metric == "accepted_per_s"].value > 0).all()

    table = client_latency.summary(result)
    assert {"variant", "senders", "large", "kind", "metric", "n", "median", "p99"} <= set(table.columns)
    row = table[(table.variant == "gateway_process") & (table.senders == 2) & ~table.large.astype(bool)
                & (table.metric == "client_txn_ms")]
    assert row.n.tolist() == [6]


def test_the_bare_sink_stores_each_mail_durably_before_250_and_answers_451_when_it_cannot(tmp_path):
    sink = BareSink(tmp_path / "data", tmp_path / "work").start()
    try:
        for i in range(3):
            with smtplib.SMTP("127.0.0.1", sink.port, timeout=30) as smtp:
                smtp.sendmail("a@example.com", ["b@example.com"], f"Subject: {i}\r\n\r\nbody {i}\r\n")
        stored = sorted(p.read_bytes() for p in (tmp_path / "data").glob("*.eml"))
        assert len(stored) == 3 and all(b"body" in raw for raw in stored)
        with sqlite3.connect(tmp_path / "data" / "sink.sqlite3") as db:
            assert db.execute("SELECT count(*) FROM mails").fetchone() == (3,)
        shutil.rmtree(tmp_path / "data")  # the disk under it gone: no 250 for a mail it could not keep
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=30) as smtp, \
                pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("a@example.com", ["b@example.com"], "Subject: x\r\n\r\nlost?\r\n")
        assert refused.value.smtp_code == 451
    finally:
        sink.stop()
    assert sink.proc is None


def test_prestart_starts_every_sender_process_before_the_first_round():
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(3, mp_context=context) as pool:
        started = client_latency.prestart(pool, 3, context)
        assert len(started) == 3 and os.getpid() not in started
        # the rounds after it find the processes idle: the pids they run in are the prestarted ones
        assert set(pool.map(_pid, range(6))) <= started


def _pid(_: int) -> int:
    return os.getpid()


def test_variants_are_picked_by_name_and_an_unknown_name_is_refused():
    assert list(client_latency.pick_variants(["bare_sink", "gateway_process"])) == ["bare_sink", "gateway_process"]
    assert client_latency.pick_variants(None) == client_latency.VARIANTS
    with pytest.raises(ValueError, match="unknown client_latency variant.*known: gateway_process"):
        client_latency.pick_variants(["gateway_proces"])
