"""deploy/healthcheck.py: what a container's healthcheck reports, against the real broker."""

import importlib.util
import json
from pathlib import Path

import pytest

from streams.topics import ensure_topics, topics_for

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


@pytest.fixture(scope="module")
def healthcheck():
    spec = importlib.util.spec_from_file_location("wardwatch_healthcheck", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def ready_dirs(settings):
    settings.data_dir.mkdir(parents=True)
    settings.model_dir.mkdir(parents=True)
    return settings


@pytest.mark.integration
def test_unhealthy_until_every_topic_exists_then_healthy(healthcheck, ready_dirs):
    settings = ready_dirs
    before = healthcheck.problems(settings)
    assert len(before) == 1 and before[0].startswith("missing topics")
    for topic in topics_for(settings).all:
        assert topic in before[0]

    ensure_topics(settings, topics_for(settings))

    assert healthcheck.problems(settings) == []


@pytest.mark.integration
def test_a_missing_data_volume_is_reported(healthcheck, settings):
    ensure_topics(settings, topics_for(settings))
    settings.model_dir.mkdir(parents=True)

    assert healthcheck.problems(settings) == [f"data dir {settings.data_dir} is not writable"]


def test_an_unreachable_broker_is_reported(healthcheck, tmp_path):
    from wardwatch.settings import Settings

    settings = Settings(bootstrap_servers="127.0.0.1:1", data_dir=tmp_path, model_dir=tmp_path)
    found = healthcheck.problems(settings)

    assert len(found) == 1 and "unreachable" in found[0]


def test_an_unreachable_broker_is_said_in_the_first_line_docker_keeps(healthcheck, clean_env, tmp_path, capfd):
    # Docker stores only the first 4 KB of a healthcheck's output: librdkafka's connection errors (one
    # line every 50 ms) used to fill them, and `docker inspect` .State.Health never showed the reason
    from wardwatch.broker import closed_port

    with closed_port() as port:
        clean_env.setenv("WARDWATCH_BOOTSTRAP_SERVERS", f"127.0.0.1:{port}")
        clean_env.setenv("WARDWATCH_DATA_DIR", str(tmp_path))
        clean_env.setenv("WARDWATCH_MODEL_DIR", str(tmp_path))
        assert healthcheck.main([]) == 1
    err = capfd.readouterr().err

    [line] = err.splitlines()
    assert line.startswith(f"broker 127.0.0.1:{port} unreachable") and len(err) < 4096


def test_a_service_port_that_nobody_listens_on_is_reported(healthcheck, tmp_path):
    import socket

    from wardwatch.settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
        settings = Settings(data_dir=tmp_path, model_dir=tmp_path, receiver_port=closed)
        found = healthcheck.problems(settings, broker=False, port_setting="receiver_port")
    assert len(found) == 1 and found[0].startswith(f"nothing listens on port {closed} (receiver_port)")


def test_a_listening_service_port_and_no_broker_check_is_healthy(healthcheck, tmp_path):
    import socket

    from wardwatch.settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        settings = Settings(bootstrap_servers="127.0.0.1:1", data_dir=tmp_path, model_dir=tmp_path,
                            receiver_port=s.getsockname()[1])
        assert healthcheck.problems(settings, broker=False, port_setting="receiver_port") == []


def test_invalid_settings_are_unhealthy_in_one_line_not_a_traceback(healthcheck, clean_env, capsys):
    # clean_env: another WARDWATCH_* of the shell running the tests would add its own line
    clean_env.setenv("WARDWATCH_PARTITIONS", "many")
    assert healthcheck.main(["--no-broker"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = err.splitlines()  # one line per invalid setting, and only one is
    assert line.startswith("invalid settings: WARDWATCH_PARTITIONS='many': Input should be a valid integer")


def test_a_port_setting_that_names_no_port_is_refused_in_one_line(healthcheck, capsys):
    # a compose override with `--port-setting reciever_port` was an AttributeError traceback in docker inspect
    with pytest.raises(SystemExit) as exited:
        healthcheck.main(["--no-broker", "--port-setting", "reciever_port"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "invalid choice: 'reciever_port'" in err and "receiver_port" in err


def test_a_misspelt_setting_is_unhealthy_as_the_service_refuses_to_start(healthcheck, clean_env, capsys):
    """The CLI refuses a WARDWATCH_* variable that names no setting (the service never starts): the
    container's healthcheck must not call it healthy meanwhile."""
    clean_env.setenv("WARDWATCH_PARTITONS", "8")
    assert healthcheck.main(["--no-broker"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("invalid settings: WARDWATCH_PARTITONS is not a wardwatch setting")


# --- the scheduler's nightly runs ----------------------------------------------------------------


def scheduler_env(clean_env, tmp_path):
    for name, value in {"WARDWATCH_DATA_DIR": str(tmp_path / "data"),
                        "WARDWATCH_MODEL_DIR": str(tmp_path / "models")}.items():
        clean_env.setenv(name, value)
    (tmp_path / "data").mkdir()
    (tmp_path / "models").mkdir()


@pytest.mark.timeout(120)  # runs `wardwatch batch nightly` twice as subprocesses (the scheduler's real job)
def test_the_scheduler_is_unhealthy_after_a_failed_nightly_until_one_succeeds(healthcheck, clean_env, tmp_path,
                                                                               capsys):
    """A failed nightly was only the scheduler's log line `nightly run finished with exit code 1`:
    `docker compose ps` showed the scheduler healthy for as long as nightlies kept failing."""
    from typer.testing import CliRunner

    from wardwatch.cli import app

    scheduler_env(clean_env, tmp_path)
    assert healthcheck.main(["--no-broker", "--nightly"]) == 0  # nothing due yet

    # the real job: no archive in the data dir, so `wardwatch batch nightly` exits 1
    failed = CliRunner().invoke(app, ["deploy", "scheduler", "--once"])
    assert failed.exit_code == 1, failed.output
    capsys.readouterr()
    assert healthcheck.main(["--no-broker", "--nightly"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "the last scheduled nightly" in line and "failed with exit code 1" in line
    assert healthcheck.main(["--no-broker"]) == 0  # other services' checks are unchanged

    (tmp_path / "data" / "archive").mkdir()  # the operator fixes it and reruns the night
    rerun = CliRunner().invoke(app, ["deploy", "scheduler", "--once"])
    assert rerun.exit_code == 0, rerun.output
    assert healthcheck.main(["--no-broker", "--nightly"]) == 0
    status = json.loads((tmp_path / "data" / "nightly-status.json").read_text())
    assert status["last_outcome"] == "succeeded" and status["last_success"] == status["last_end"]
    assert set(status) == {"last_start", "last_end", "last_outcome", "last_exit_code", "last_success"}


@pytest.mark.parametrize(("status", "unhealthy"), [
    ({"first_due": 27}, "no nightly succeeded for 27 h (the first run was due at"),
    ({"first_due": 25}, None),
    ({"first_due": -5}, None),  # not due yet
    ({"first_due": 50, "last_success": 25, "last_outcome": "succeeded"}, None),
    ({"first_due": 50, "last_success": 30, "last_outcome": "succeeded"}, "no nightly succeeded for 30 h (the last success"),
    # restarted two hours ago: a success before the restart does not make it unhealthy at once
    ({"first_due": 2, "last_success": 100, "last_outcome": "succeeded"}, None),
])
def test_the_scheduler_is_unhealthy_when_no_nightly_succeeded_for_26_hours(healthcheck, clean_env, tmp_path,
                                                                            capsys, status, unhealthy):
    """The scheduler stopped running nightlies (hung job, clock, a stop that never came back): nothing
    failed, so only the age of the last success shows it."""
    from datetime import datetime, timedelta, timezone

    scheduler_env(clean_env, tmp_path)
    now = datetime.now(timezone.utc)
    written = {k: v if isinstance(v, str) else (now - timedelta(hours=v, minutes=1)).isoformat(timespec="seconds")
               for k, v in status.items()}
    (tmp_path / "data" / "nightly-status.json").write_text(json.dumps(written))
    code = healthcheck.main(["--no-broker", "--nightly"])
    err = capsys.readouterr().err
    if unhealthy is None:
        assert code == 0, err
    else:
        assert code == 1 and unhealthy in err, err


@pytest.mark.parametrize("text", [
    "{half",
    '{"last_success": "yesterday"}',  # not a time
    '{"last_success": "2026-11-25T02:30:00"}',  # a time without its zone
    '{"first_due": 7}',  # not a string
])
def test_an_unreadable_nightly_status_is_unhealthy(healthcheck, clean_env, tmp_path, capsys, text):
    """One line that says so, not a traceback (a file edited by hand, or written by another version)."""
    scheduler_env(clean_env, tmp_path)
    (tmp_path / "data" / "nightly-status.json").write_text(text)
    assert healthcheck.main(["--no-broker", "--nightly"]) == 1
    assert "cannot read the nightly status" in capsys.readouterr().err


def test_ready_asks_the_services_own_readyz(healthcheck, tmp_path):
    """--ready (compose's long-running services): the worker's /readyz is 503 while it recovers or
    its consumption watchdog sees messages waiting that it does not apply; unhealthy then."""
    from wardwatch import observability
    from wardwatch.settings import Settings

    ready = [False]
    server = observability.serve(0, ready=lambda: ready[0])
    try:
        settings = Settings(metrics_port=server.server_port, data_dir=tmp_path, model_dir=tmp_path)
        (found,) = healthcheck.problems(settings, broker=False, ready=True)
        assert found.startswith("not ready:") and "answers 503" in found
        ready[0] = True
        assert healthcheck.problems(settings, broker=False, ready=True) == []
    finally:
        server.shutdown()
        server.server_close()
    (gone,) = healthcheck.problems(settings, broker=False, ready=True)  # nothing serves it any more
    assert gone.startswith("not ready: nothing answers")
    # a service without a metrics port has no /readyz to ask
    assert healthcheck.problems(Settings(data_dir=tmp_path, model_dir=tmp_path), broker=False, ready=True) == []


def test_ready_asks_the_service_itself_even_with_a_proxy_in_the_environment(healthcheck, tmp_path, monkeypatch):
    """A container given HTTP_PROXY (a site's outbound proxy, in wardwatch.env) must not send its own
    /readyz through it: every --ready service would be unhealthy for good."""
    from wardwatch import observability
    from wardwatch.settings import Settings

    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:1")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = observability.serve(0, ready=lambda: True)
    try:
        settings = Settings(metrics_port=server.server_port, data_dir=tmp_path, model_dir=tmp_path)
        assert healthcheck.problems(settings, broker=False, ready=True) == []
    finally:
        server.shutdown()
        server.server_close()
