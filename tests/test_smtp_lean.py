"""LeanSMTP must build the same session as aiosmtpd's SMTP and parse addresses as it does, only cheaper."""

import asyncio

import pytest
from aiosmtpd.smtp import SMTP

from pipeline.bulk_smtp import BulkDataSMTP
from pipeline.gateway import _SmtpHandler
from pipeline.smtp_lean import LeanSMTP, parse_address
from pipeline.smtp_limits import SessionLimits

ARGUMENTS = ["", "<>", "<a@example.org>", " <a@example.org>", "<a@example.org> SIZE=1234 BODY=8BITMIME",
             "a@example.org", "a@example.org SIZE=10", '<"quoted > local"@example.org>', "<postmaster>",
             "<@relay.example:a@example.org>", "<a@[127.0.0.1]>", "<ü@exämple.org> SMTPUTF8", "junk <<",
             "<a@example.org", "@", "<" + "x" * 65 + "@example.org>", "<" + "x" * 64 + "@example.org>",
             "<a b@example.org>", "<a@example.org>>", "<a.@example.org>", "<.a@example.org>", "a"]


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class _PlainSMTP(SMTP):
    local_part_limit = 64


class _LeanSMTP(LeanSMTP):
    local_part_limit = 64


@pytest.mark.parametrize("limit_class", [(SMTP, LeanSMTP), (_PlainSMTP, _LeanSMTP)])
def test_addresses_parse_as_aiosmtpd_parses_them_with_and_without_a_local_part_limit(loop, limit_class):
    plain_class, lean_class = limit_class
    parse_address.cache_clear()
    plain, lean = plain_class(object(), loop=loop, hostname="h"), lean_class(object(), loop=loop, hostname="h")
    for argument in ARGUMENTS:
        assert lean._getaddr(argument) == plain._getaddr(argument), argument
        assert lean._getaddr(argument) == plain._getaddr(argument), argument  # from the cache this time
    assert parse_address.cache_info().hits == len(ARGUMENTS)  # each argument parsed once


@pytest.mark.parametrize("argument", ["<a@", "<alice@", '"', "<a@[", "a@[", "<ü@[ "])
def test_a_truncated_address_that_crashes_aiosmtpds_parser_is_malformed_here(loop, argument):
    with pytest.raises((IndexError, AttributeError, UnboundLocalError)):
        SMTP(object(), loop=loop, hostname="h")._getaddr(argument)
    assert LeanSMTP(object(), loop=loop, hostname="h")._getaddr(argument) == (None, None)


def test_a_session_gets_the_same_command_auth_and_hook_tables_as_aiosmtpd_builds(loop):
    handler = _SmtpHandler(gateway=None)  # type: ignore[arg-type]
    ours = BulkDataSMTP(handler, limits=SessionLimits(), loop=loop, hostname="h")
    names = [name for name in object.__dir__(ours)]  # what dir() lists without LeanSMTP's shortcut
    assert set(ours._smtp_methods) == {n.removeprefix("smtp_") for n in names if n.startswith("smtp_")}
    assert {"EHLO", "MAIL", "RCPT", "DATA", "QUIT", "AUTH"} <= set(ours._smtp_methods)
    assert all(method.__self__ is ours for method in ours._smtp_methods.values())  # bound to this session
    assert set(ours._auth_methods) == {"LOGIN", "PLAIN"}  # aiosmtpd's two built-in mechanisms
    assert ours._handle_hooks.keys() == {n.removeprefix("handle_") for n in dir(handler) if n.startswith("handle_")}


def test_a_session_that_is_not_lean_is_aiosmtpds_own_the_switchs_baseline(loop):
    from pipeline.smtp_limits import LimitedSMTP

    plain = LimitedSMTP(object(), limits=SessionLimits(), lean=False, loop=loop, hostname="h")
    lean = LimitedSMTP(object(), limits=SessionLimits(), loop=loop, hostname="h")
    assert len(dir(plain)) > 3 * len(dir(lean)) and set(dir(lean)) < set(dir(plain))
    assert plain._smtp_methods.keys() == lean._smtp_methods.keys()
    with pytest.raises(IndexError):
        plain._getaddr("<a@")
    assert lean._getaddr("<a@") == (None, None)
