"""Settings files: every value checked against its field's type; every mistake is one line naming file, section, key."""

from pathlib import Path

import pytest

from pipeline import cli
from pipeline.config import Settings, load_settings
from pipeline.errors import ConfigurationError


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("toml", "message"), [
    ('[gateway]\nport = "2525"', "[gateway] port must be an integer, not the string '2525'"),
    ("[gateway]\nport = 2525.0", "[gateway] port must be an integer, not the number 2525.0"),
    ("[gateway]\nport = true", "[gateway] port must be an integer, not the boolean true"),
    ("[gateway]\ndrop_folder = 1", "[gateway] drop_folder must be true or false, not the integer 1"),
    ('[gateway]\nbulk_data = "yes"', "[gateway] bulk_data must be true or false, not the string 'yes'"),
    ('[gateway]\nallowed_recipient_domains = "example.com"',
     "[gateway] allowed_recipient_domains must be a list of strings, not the string 'example.com'"),
    ('[gateway]\nallowed_recipient_domains = ["example.com", 7]',
     "[gateway] allowed_recipient_domains must be a list of strings, not the list ['example.com', 7]"),
    ('[ingest]\ntimeout_s = "60"', "[ingest] timeout_s must be a finite number, not the string '60'"),
    ("[ingest]\ntimeout_s = nan", "[ingest] timeout_s must be a finite number, not the number nan"),
    ("[gateway]\ncommand_timeout_s = inf", "[gateway] command_timeout_s must be a finite number, not the number inf"),
    ("[store]\npath = 5", "[store] path must be a path (a string), not the integer 5"),
    ("[delivery]\nrecipient = 5", "[delivery] recipient must be a string, not the integer 5"),
    ("[delivery]\nrelay = []", "[delivery] relay must be a string, not the list []"),
    ("data_dir = 3", "data_dir must be a path (a string), not the integer 3"),
    ("[gateway]\nprot = 2525", "unknown setting [gateway] prot (did you mean port?)"),
    ("[gatway]\nport = 2525", "unknown settings section [gatway] (did you mean gateway?)"),
    ('data_dr = "x"', "unknown setting data_dr (did you mean data_dir?)"),
    ("[gateway]\nzzz = 1", "unknown setting [gateway] zzz (known: host, port, "),
    ("gateway = 5", "[gateway] must be a table of settings, not the integer 5"),
    ("[gateway]\nport = 70000", "gateway.port must be a TCP port, 0-65535 (0: any free port), not 70000"),
    ("[gateway]\nmax_message_bytes = 300000000", "gateway.max_inflight_bytes (256 MB) must be >= "
                                                 "gateway.max_message_bytes (286.102 MB): raise max_inflight_bytes"),
    ("[ingest]\nmax_pages = 0", "ingest.max_pages must be > 0, not 0"),
    ("[runner]\ncompletion_threads = -1", "runner.completion_threads must be >= 0"),
    ("[gateway]\ninline_accept_bytes = -1", "gateway.inline_accept_bytes must be >= 0 (0: every message in the"),
    ("[serve]\nengine_nice = 20", "[serve] engine_nice must be 0-19 (nice steps), got 20"),
    ('[delivery]\nrelay = "smtps://mail.example.com:465"', "delivery.relay must look like smtp://host:port, not"),
    ('[delivery]\nrelay = "mail.example.com:25"', "delivery.relay must look like smtp://host:port, not"),
    ('[delivery]\nrelay = "smtp://127.0.0.1:25x"', "delivery.relay must look like smtp://host:port: Port could"),
    ('[delivery]\nrelay = "smtp://127.0.0.1:99999"', "delivery.relay must look like smtp://host:port: Port out of"),
    ('[delivery]\nrelay = "smtp://127.0.0.1:0"', "delivery.relay must look like smtp://host:port: port 0 is no port"),
    ('[delivery]\nrelay = "smtp://:2525"', "delivery.relay must look like smtp://host:port, not 'smtp://:2525'"),
    ('[delivery]\nrelay = "smtp://relay:25?starttls=1"', "delivery.relay must look like smtp://host:port, not"),
    ("[delivery]\nretries = -1", "delivery.retries must be >= 0"),
    ("[delivery]\nmax_digests_per_hour = -1", "delivery.max_digests_per_hour must be >= 0 (0: no limit), not -1"),
    ("[serve]\ngateway_slice_us = 50", "[serve] gateway_slice_us must be 0 (the kernel's) or 100-100000 (µs), got 50"),
    ("[serve]\ngateway_slice_us = 100001", "[serve] gateway_slice_us must be 0 (the kernel's) or 100-100000"),
    ("[serve]\ngateway_hung_after_s = 1", "[serve] gateway_hung_after_s must be 0 (never) or 2 s or more, got 1"),
    ('[delivery]\nrecipient = "a@b, c@d"', "delivery.recipient must be one mail address"),
    ('[delivery]\nsender = "digest"', "delivery.sender must be one mail address"),
    ("[gateway]\nport = \nhost = \"x\"", "cannot read settings: Invalid value (at line 2, column 8)"),
    # durations past a day: their waits raised OverflowError in the thread that waited, which died (the
    # dispatcher: runs stayed queued for ever while serve answered 250)
    ("[engine]\nqueue_poll_s = 1e10", "engine.queue_poll_s must be between 0 and 86,400 s (a day), not 1e+10"),
    ("[engine]\nheartbeat_interval_s = 1e12\nstale_after_s = 1e13", "engine.heartbeat_interval_s must be between 0"),
    ("[ingest]\ntimeout_s = 1e10", "ingest.timeout_s must be between 0 and 86,400 s (a day), not 1e+10"),
    ("[store]\nbusy_timeout_ms = 1e10", "[store] busy_timeout_ms must be an integer"),
    ("[store]\nbusy_timeout_ms = 10000000000", "store.busy_timeout_ms must be between 0 and 86,400,000 ms (a day)"),
    ("[engine]\nshutdown_grace_s = -5", "engine.shutdown_grace_s must be between 0 and 86,400 s (a day), not -5"),
    ("[runner]\ndefault_timeout_s = -1", "runner.default_timeout_s must be > 0 (or left out: no timeout), not -1"),
    ("[gateway]\npoll_interval_s = 0", "gateway.poll_interval_s must be > 0, not 0"),
    ("[ingest]\nsummary_sentences = -3", "ingest.summary_sentences must be 0-100, not -3"),
    # typo guards (a prober's finds): a cap setrlimit cannot take failed every run worker_crashed with an
    # OverflowError, one too small to import anything failed them untyped, and every worker starts at once
    ("[ingest]\nmemory_limit_bytes = 99999999999999999999", "ingest.memory_limit_bytes must be 128 MB to 1,048,576"),
    ("[ingest]\nmemory_limit_bytes = 9999999999999999", "ingest.memory_limit_bytes must be 128 MB to 1,048,576 MB"),
    ("[ingest]\nmemory_limit_bytes = 1000", "ingest.memory_limit_bytes must be 128 MB to 1,048,576 MB, not 1,000"),
    ("[ingest]\nworkers = 20000\npage_workers = 2", "ingest.workers must be at most 256, not 20000"),
    ("[runner]\nprocess_workers = 5000", "runner.process_workers must be at most 256"),
    ("[engine]\nmax_active_runs = 10000000", "engine.max_active_runs must be 1 to 100,000"),
    ("[engine]\nstuck_after_s = -1", "engine.stuck_after_s must be >= 0 (0: never)"),
    ("[serve]\nstop_margin_s = -1", "[serve] stop_margin_s must be 0 (wait for ever) to 86,400 s, got -1"),
    ("[gateway]\nmax_junk_commands = 0", "gateway.max_junk_commands must be >= 1 (EHLO counts), not 0"),
    ("[gateway]\nfair_share_replies = -1", "gateway.fair_share_replies must be >= 0 (0: no turns), not -1"),
])
def test_bad_setting_is_one_line_naming_file_section_and_key(tmp_path, toml, message):
    path = write_toml(tmp_path, toml)
    with pytest.raises(ConfigurationError) as err:
        load_settings(path, tmp_path / "data")
    assert str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("toml", "section", "key", "expected"), [
    ("[ingest]\ntimeout_s = 5", "ingest", "timeout_s", 5.0),  # a float field takes an integer
    ("[runner]\ndefault_timeout_s = 3", "runner", "default_timeout_s", 3.0),  # float | None
    ('[delivery]\nrecipient = "ops@example.com"', "delivery", "recipient", "ops@example.com"),  # str | None
    ('[delivery]\nrecipient = "\\"System Administrator\\"@example.com"', "delivery", "recipient",
     '"System Administrator"@example.com'),
    ('[store]\npath = "/srv/elsewhere/runs.sqlite3"', "store", "path", Path("/srv/elsewhere/runs.sqlite3")),
    ('[gateway]\nallowed_recipient_domains = ["example.com", "example.org"]', "gateway",
     "allowed_recipient_domains", ("example.com", "example.org")),
    ("[gateway]\nallowed_recipient_domains = []", "gateway", "allowed_recipient_domains", ()),
    ("[gateway]\ndrop_folder = false", "gateway", "drop_folder", False),
])
def test_good_setting_is_stored_as_its_field_type(tmp_path, toml, section, key, expected):
    settings = load_settings(write_toml(tmp_path, toml), tmp_path / "data")
    value = getattr(getattr(settings, section), key)
    assert value == expected and type(value) is type(expected)


def test_a_relay_url_with_a_password_is_refused_without_showing_it(tmp_path):
    with pytest.raises(ConfigurationError) as refused:
        load_settings(write_toml(tmp_path, '[delivery]\nrelay = "smtp://mailer:s3cret@relay.example.com:587"'))
    assert "no user or password" in str(refused.value) and "s3cret" not in str(refused.value)


@pytest.mark.parametrize("relay", ["smtp://relay.example.com", "SMTP://relay.example.com:2525", "smtp://[::1]:2525",
                                   "smtp://127.0.0.1:25/"])
def test_a_relay_url_a_user_would_write_is_taken(tmp_path, relay):
    assert load_settings(write_toml(tmp_path, f'[delivery]\nrelay = "{relay}"')).delivery.relay == relay


def test_data_dir_from_the_file_places_store_and_outbox(tmp_path):
    settings = load_settings(write_toml(tmp_path, f'data_dir = "{tmp_path / "d"}"\n[gateway]\nport = 2525'))
    assert settings.store.path == tmp_path / "d" / "runs.sqlite3" and settings.gateway.port == 2525
    assert settings.delivery.outbox == tmp_path / "d" / "outbox"


def test_data_dir_argument_wins_over_the_file(tmp_path):
    settings = load_settings(write_toml(tmp_path, f'data_dir = "{tmp_path / "d"}"'), tmp_path / "cli")
    assert settings.data_dir == tmp_path / "cli"


def test_every_field_of_every_section_is_type_checked(tmp_path):
    """A field added later is covered too: the check comes from the annotations."""
    import dataclasses

    defaults = Settings()
    for section in dataclasses.fields(defaults):
        config = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(config):
            continue
        for f in dataclasses.fields(config):
            path = write_toml(tmp_path, f"[{section.name}]\n{f.name} = {{ x = 1 }}")
            with pytest.raises(ConfigurationError, match=rf"\[{section.name}\] {f.name} must be .*, not the table"):
                load_settings(path, tmp_path / "data")


def test_overrides_are_type_checked_too(tmp_path):
    with pytest.raises(ConfigurationError, match=r"^\[gateway\] port must be an integer, not the string '25'$"):
        load_settings(None, tmp_path, gateway={"port": "25"})
    with pytest.raises(ConfigurationError, match=r"^unknown setting \[gateway\] prot \(did you mean port\?\)$"):
        load_settings(None, tmp_path, gateway={"prot": 25})


def test_cli_reports_a_bad_setting_in_one_line_and_exits_2(tmp_path, capsys):
    path = write_toml(tmp_path, '[gateway]\nport = "2525"\n')
    code = cli.main(["--config", str(path), "--data-dir", str(tmp_path / "data"), "runs"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [f"error: {path}: [gateway] port must be an integer, not the string '2525'"]


def test_a_home_relative_path_in_a_settings_file_is_expanded(tmp_path, monkeypatch):
    """A reprobe's find: ``data_dir = "~/pdata"`` became ``<the file's dir>/~/pdata``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    conf = tmp_path / "conf" / "pipeline.toml"
    conf.parent.mkdir()
    conf.write_text('data_dir = "~/pdata"\n[delivery]\noutbox = "~/digests"\n')
    settings = load_settings(conf)
    assert settings.data_dir == tmp_path / "home" / "pdata"
    assert settings.delivery.outbox == tmp_path / "home" / "digests"
