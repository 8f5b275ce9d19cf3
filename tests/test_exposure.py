"""serve listens beyond this machine only when told to and told whom to accept mail from (issue 11)."""

import pytest

from pipeline.cli import main
from pipeline.config import GatewayConfig, is_loopback
from pipeline.errors import ConfigurationError


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"])
def test_loopback_hosts_need_no_flag(host):
    assert is_loopback(host)
    GatewayConfig(host=host).validate()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "mail.example.com"])
def test_other_hosts_are_refused_without_allow_remote(host):
    assert not is_loopback(host)
    with pytest.raises(ConfigurationError, match="allow_remote"):
        GatewayConfig(host=host).validate()


def test_allow_remote_still_needs_a_sender_allow_list():
    with pytest.raises(ConfigurationError, match="allowed_sender_domains"):
        GatewayConfig(host="0.0.0.0", allow_remote=True).validate()
    GatewayConfig(host="0.0.0.0", allow_remote=True, allowed_sender_domains=("example.com",)).validate()


def test_serve_on_all_interfaces_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "refusing to listen on 0.0.0.0" in err and "--allow-remote" in err
    assert not (tmp_path / "d").exists()  # refused before anything was created


def test_serve_with_allow_remote_but_no_allow_list_names_what_is_missing(tmp_path, capsys):
    code = main(["serve", "--host", "0.0.0.0", "--allow-remote", "--data-dir", str(tmp_path / "d")])
    assert code == 2
    assert "allowed_sender_domains" in capsys.readouterr().err


def test_a_gateway_listening_beyond_this_machine_warns_that_it_has_no_tls_or_auth(settings, caplog):
    """A prober's find: serve on 0.0.0.0 with --allow-remote said nothing of what it lacks."""
    import logging
    from dataclasses import replace

    from conftest import free_port

    from pipeline.service import PipelineService

    gateway = GatewayConfig(host="0.0.0.0", port=free_port(), allow_remote=True,
                            allowed_sender_domains=("example.com",))
    with caplog.at_level(logging.WARNING, logger="pipeline.gateway"):
        service = PipelineService(replace(settings, gateway=gateway)).start()
        service.stop(grace_s=1)
    assert any("no TLS and no AUTH" in r.getMessage() and "example.com" in r.getMessage() for r in caplog.records)
