"""The per-address digest quota (``[delivery] max_digests_per_hour``) as part of the DAGRunStore contract, on
every backend (SQLite and a real PostgreSQL): a sliding window, addresses without case, counted in the store so
that a restart keeps the count and every process on the store shares it."""

from __future__ import annotations

import threading

import pytest

from pipeline.store import open_store


@pytest.fixture
def quota_store(store_config):
    st = open_store(store_config)
    yield st
    st.close()


def test_an_address_is_refused_past_its_quota_within_the_window_and_taken_once_it_slides_past(quota_store):
    def reserve(who, digest, now):
        return quota_store.reserve_digest(who, digest, 2, 3600, now=now)

    assert reserve("Victim <victim@example.org>", "d1", 1000)
    assert reserve("VICTIM@example.org", "d2", 1010)
    assert not reserve("victim@example.org", "d3", 1011) and reserve("other@example.org", "d4", 1011)
    assert not reserve("victim@example.org", "d3", 4599)
    assert reserve("victim@example.org", "d3", 4601)  # the first digest left the window
    assert not reserve("victim@example.org", "d5", 4602)


def test_a_released_reservation_frees_its_place_and_a_counted_digest_passes_again_without_counting(quota_store):
    assert quota_store.reserve_digest("a@b.example", "d1", 1, 3600, now=0)
    assert not quota_store.reserve_digest("a@b.example", "d2", 1, 3600, now=1)
    assert quota_store.reserve_digest("a@b.example", "d1", 1, 3600, now=2)  # d1's retry after a crash
    quota_store.release_digest("A@B.example", "d1")  # its digest was not sent (the relay refused it)
    quota_store.release_digest("a@b.example", "d1")  # no reservation: no error
    assert quota_store.reserve_digest("a@b.example", "d2", 1, 3600, now=3)
    with pytest.raises(ValueError, match="limit of 1 or more"):
        quota_store.reserve_digest("a@b.example", "d3", 0, 3600)


def test_a_unicode_domain_and_its_punycode_are_one_address(quota_store):
    assert quota_store.reserve_digest("anna@bücher.example", "d1", 1, 3600, now=0)
    assert not quota_store.reserve_digest("anna@xn--bcher-kva.example", "d2", 1, 3600, now=1)


def test_reservations_older_than_the_window_are_deleted(quota_store):
    for i, who in enumerate(["a@x.example", "b@x.example", "c@x.example"]):
        assert quota_store.reserve_digest(who, f"d{i}", 5, 3600, now=i)
    assert quota_store.reserve_digest("d@x.example", "late", 5, 3600, now=3601.5)
    assert quota_store.query("SELECT address FROM digest_reservations ORDER BY address") == [
        ("c@x.example",), ("d@x.example",)]


def test_the_count_is_kept_when_the_store_is_opened_again(store_config):
    with open_store(store_config) as first:
        assert first.reserve_digest("a@x.example", "d1", 1, 3600)
    with open_store(store_config) as again:
        assert not again.reserve_digest("a@x.example", "d2", 1, 3600)


def test_threads_racing_on_one_address_never_pass_the_limit(store_config):
    """Each thread on a store of its own (its own connections, as another process would have)."""
    stores = [open_store(store_config) for _ in range(8)]
    barrier = threading.Barrier(len(stores), timeout=30)
    passed, errors = [], []

    def race(i):
        try:
            barrier.wait()
            for j in range(5):
                if stores[i].reserve_digest("victim@example.org", f"d{i}-{j}", 3, 3600):
                    passed.append((i, j))
        except Exception as exc:  # reported below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for st in stores:
            st.close()
    assert not errors and len(passed) == 3, (errors, passed)
