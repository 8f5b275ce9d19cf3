"""What a user types on the command line, run as `python -m pipeline` in a real process: refused values are named
by the option typed."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from pipeline.audit.base import fixtures as fx
from pipeline.sqlite_store import SqliteRunStore

ROOT = Path(__file__).resolve().parent.parent


def pipeline(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipeline`` (this checkout's, from any ``cwd``) as a user would."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120, env=env)


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--port", "70000"], "--port must be a TCP port, 0-65535 (0: any free port), not 70000"),
    (["serve", "--port", "-1"], "--port must be a TCP port, 0-65535 (0: any free port), not -1"),
    (["serve", "--metrics-port", "70000"], "--metrics-port must be a TCP port, 0-65535 (0: no metrics endpoint), "
                                           "not 70000"),
    (["serve", "--max-message-mb", "100000"], "gateway.max_inflight_bytes (256 MB) must be >= --max-message-mb "
                                              "(100,000 MB): raise max_inflight_bytes too"),
    (["serve", "--deliver", "http://relay.example"], "--deliver must look like smtp://host:port, not"),
    (["ingest", "--deliver", "smtp://relay.example:99999", "x.eml"], "--deliver must look like smtp://host:port: Port"),
    (["serve", "--scheduler", "sched.example:8786"], "--scheduler must be an address like tcp://host:8786, not"),
    (["--store-url", "mysql://db.example/runs", "runs"], "--store-url must start with postgresql://"),
])
def test_a_refused_option_value_is_named_by_the_option_typed(tmp_path, argv, message):
    """`serve --port 70000` said `gateway.port 70000 is not a TCP port`: the settings file's key, which the user
    never wrote, and no valid range."""
    (tmp_path / "x.eml").write_bytes(b"Subject: x\r\n\r\nx\r\n")
    done = pipeline("--data-dir", str(tmp_path / "data"), *argv, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {message}") and "\n" not in done.stderr.strip(), done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_a_value_from_the_settings_file_is_still_named_by_its_key(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text("[gateway]\nport = 70000\n")
    done = pipeline("--config", str(config), "--data-dir", str(tmp_path / "data"), "serve", "--metrics-port", "44090")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {config}: gateway.port must be a TCP port, 0-65535 (0: any free port), "
                                   "not 70000")


@pytest.mark.parametrize(("option", "named"), [("--metrics-port", "metrics port {port} on 127.0.0.1 is in use (another "
                                                "serve running? choose another with --metrics-port, or [metrics] port "
                                                "in the --config file)"),
                                               ("--port", "SMTP port {port} on 127.0.0.1 is in use (another serve "
                                                "running? choose another with --port, or [gateway] port in the "
                                                "--config file)")])
def test_a_port_in_use_names_the_port_and_what_chooses_another(tmp_path, option, named):
    """A taken metrics port failed serve with 'cannot serve metrics on 127.0.0.1:9108: Address already in use', no
    word of --metrics-port; nothing is claimed either way."""
    store = SqliteRunStore(tmp_path / "data" / "runs.sqlite3")
    store.create_run("email_digest", {"spool": "none", "source": "test"}, "<queued@x>")
    store.close()
    ports = {"--port": str(free_port()), "--metrics-port": str(free_port())}
    with socket.create_server(("127.0.0.1", 0)) as taken:
        ports[option] = str(port := taken.getsockname()[1])
        done = pipeline("--data-dir", str(tmp_path / "data"), "serve", "--no-drop-folder",
                        *(word for pair in ports.items() for word in pair))
    assert done.returncode == 2 and done.stderr.strip() == f"error: {named.format(port=port)}", done.stderr
    store = SqliteRunStore(tmp_path / "data" / "runs.sqlite3")
    assert store.count_runs_by_state() == {"queued": 1}
    store.close()


def test_relative_paths_in_the_settings_file_are_relative_to_the_file_and_on_the_command_line_to_the_cwd(tmp_path):
    """A settings file's data_dir = "data" was taken relative to wherever the command ran: `--config
    /etc/pipeline/p.toml` from another directory made a new, empty store there."""
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    conf.mkdir()
    elsewhere.mkdir()
    (conf / "pipeline.toml").write_text('data_dir = "data"\n[delivery]\noutbox = "digests"\n')
    (elsewhere / "doc.pdf").write_bytes(fx.text_pdf(1))
    done = pipeline("--config", "../conf/pipeline.toml", "ingest", "doc.pdf", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert (conf / "data" / "runs.sqlite3").is_file() and len(list((conf / "digests" / "new").iterdir())) == 1
    assert sorted(p.name for p in elsewhere.iterdir()) == ["doc.pdf"]  # nothing made in the current directory

    done = pipeline("--config", "../conf/pipeline.toml", "--data-dir", "mine", "ingest", "doc.pdf", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert (elsewhere / "mine" / "runs.sqlite3").is_file()  # --data-dir: relative to where the command runs
    assert len(list((conf / "digests" / "new").iterdir())) == 2  # the file's outbox: still beside the file
