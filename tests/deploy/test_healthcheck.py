"""deploy/healthcheck.py: what a container's healthcheck reports, against the real broker."""

import importlib.util
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


def test_a_misspelt_setting_is_unhealthy_as_the_service_refuses_to_start(healthcheck, clean_env, capsys):
    """The CLI refuses a WARDWATCH_* variable that names no setting (the service never starts): the
    container's healthcheck must not call it healthy meanwhile."""
    clean_env.setenv("WARDWATCH_PARTITONS", "8")
    assert healthcheck.main(["--no-broker"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("invalid settings: WARDWATCH_PARTITONS is not a wardwatch setting")
