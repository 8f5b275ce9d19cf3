"""InlineAccepts: small messages on the event loop, unless a recent inline accept was slow or failed."""

import time

import pytest

from pipeline.errors import StoreBusyError, UnavailableError
from pipeline.inline_accept import InlineAccepts


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_only_messages_up_to_the_size_are_accepted_inline_and_zero_sends_all_to_the_pool():
    inline = InlineAccepts(64 * 1024)
    assert inline.inline(0) and inline.inline(64 * 1024) and not inline.inline(64 * 1024 + 1)
    assert not InlineAccepts(0).inline(1)


def _slow(seconds: float):
    def accept():
        time.sleep(seconds)
        return "run"
    return accept


def _failing(exc: Exception):
    def accept():
        raise exc
    return accept


def test_a_slow_accept_or_a_store_failure_sends_every_accept_to_the_pool_for_the_backoff(caplog):
    clock = Clock()
    inline = InlineAccepts(1000, slow_s=0.02, backoff_s=5.0, clock=clock)
    assert inline.timed(lambda: "run") == "run" and inline.inline(10)  # fast: stays on the loop
    assert inline.timed(_slow(0.03)) == "run"
    assert not inline.inline(10)
    clock.now += 4.9
    assert not inline.inline(10)
    clock.now += 0.2
    assert inline.inline(10)
    with pytest.raises(StoreBusyError):
        inline.timed(_failing(StoreBusyError("locked")))
    assert not inline.inline(10)
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "an accept took 3" in caplog.records[0].getMessage()
    assert "failed after 0 ms (StoreBusyError)" in caplog.records[1].getMessage()


def test_a_slow_accept_in_the_pool_extends_the_backoff_with_one_log_line(caplog):
    clock = Clock()
    inline = InlineAccepts(1000, slow_s=0.02, backoff_s=5.0, clock=clock)
    inline.timed(_slow(0.03))
    clock.now += 4.0
    inline.timed(_slow(0.03))  # still slow (in the pool): 5 s more from now
    clock.now += 4.0
    assert not inline.inline(10)
    clock.now += 1.1
    assert inline.inline(10)
    assert len(caplog.records) == 1


def test_a_message_refused_for_other_reasons_does_not_back_off():
    inline = InlineAccepts(1000)
    with pytest.raises(UnavailableError):
        inline.timed(_failing(UnavailableError("engine unhealthy")))
    assert inline.inline(10)
