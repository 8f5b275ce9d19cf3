"""InlineAccepts: small messages on the event loop, unless a recent inline accept was slow or failed."""

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


def test_a_slow_or_failed_inline_accept_sends_every_accept_to_the_pool_for_the_backoff(caplog):
    clock = Clock()
    inline = InlineAccepts(1000, slow_s=0.02, backoff_s=5.0, clock=clock)
    inline.took(0.019)
    assert inline.inline(10)  # fast enough: stays on the loop
    inline.took(0.021)
    assert not inline.inline(10)
    clock.now += 4.9
    assert not inline.inline(10)
    clock.now += 0.2
    assert inline.inline(10)
    inline.took(0.001, failed=True)
    assert not inline.inline(10)
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "took after 21 ms" in caplog.records[0].getMessage() and "failed" in caplog.records[1].getMessage()
