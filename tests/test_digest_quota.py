"""The per-address digest quota (``[delivery] max_digests_per_hour``): a sliding hour, addresses without case."""

from pipeline.stages.digest_quota import DigestQuota


def test_an_address_is_refused_past_its_quota_within_the_window_and_taken_once_it_slides_past():
    quota = DigestQuota(2, window_s=3600)
    assert quota.reserve("Victim <victim@example.org>", now=0)
    assert quota.reserve("VICTIM@example.org", now=10)
    assert not quota.reserve("victim@example.org", now=11) and quota.reserve("other@example.org", now=11)
    assert not quota.reserve("victim@example.org", now=3599)
    assert quota.reserve("victim@example.org", now=3601)  # the first digest left the window


def test_a_released_reservation_frees_its_place_and_no_limit_refuses_nothing():
    quota = DigestQuota(1)
    assert quota.reserve("a@b", now=0) and not quota.reserve("a@b", now=1)
    quota.release("a@b")  # its digest was not sent (the relay refused it)
    assert quota.reserve("a@b", now=2)
    unlimited = DigestQuota(0)
    assert all(unlimited.reserve("a@b", now=i) for i in range(5))


def test_the_least_recent_address_is_forgotten_first():
    quota = DigestQuota(1, remembered=2)
    for i, who in enumerate(["a@x", "b@x", "c@x"]):
        assert quota.reserve(who, now=i)
    assert quota.reserve("a@x", now=3)  # forgotten: its count started again
    assert not quota.reserve("a@x", now=4)
