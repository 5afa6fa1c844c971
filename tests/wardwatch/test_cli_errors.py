"""What a newcomer sees when a command is given a wrong input: one clear line, never a traceback or a hang."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from wardwatch import preflight
from wardwatch.broker import free_port
from wardwatch.cli import app


@pytest.fixture
def clean_env(monkeypatch):
    for name in [k for k in os.environ if k.startswith("WARDWATCH_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["ingest"], ["archiver"], ["stats"], ["deploy", "redrive", "--dry-run"]])
def test_a_command_that_needs_the_broker_says_in_one_line_that_it_cannot_reach_it(command, clean_env, capfd,
                                                                                 tmp_path):
    clean_env.setattr(preflight, "BROKER_WAIT_S", 1.0)
    nobody = f"127.0.0.1:{free_port()}"  # a port nothing listens on

    result = invoke(*command, env={"WARDWATCH_BOOTSTRAP_SERVERS": nobody, "WARDWATCH_DATA_DIR": str(tmp_path)})

    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not a KafkaException traceback
    assert f"cannot reach the Kafka broker at {nobody}" in result.output
    assert "WARDWATCH_BOOTSTRAP_SERVERS" in result.output
    assert "%3|" not in capfd.readouterr().err  # librdkafka's connection errors, one every 50 ms


def test_an_invalid_setting_is_named_by_its_variable_with_its_value_and_meaning(clean_env):
    result = invoke("config", "show", env={"WARDWATCH_PARTITIONS": "abc", "WARDWATCH_STATS_INTERVAL_S": "-1"})

    assert result.exit_code == 2
    assert "WARDWATCH_PARTITIONS='abc': Input should be a valid integer" in result.output
    assert "Partition count of the per-patient topics" in result.output
    assert "WARDWATCH_STATS_INTERVAL_S='-1': Input should be greater than 0" in result.output
    assert "errors.pydantic.dev" not in result.output
