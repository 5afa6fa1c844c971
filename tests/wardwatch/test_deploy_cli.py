"""`wardwatch deploy ...`: what an operator sees from the one-shot commands."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from streams.topics import topics_for
from wardwatch.cli import app
from wardwatch.procs import settings_env


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["deploy", *args], env=env)


def test_connector_prints_the_connector_for_the_configured_prefix(clean_env):
    result = invoke("connector", env={"WARDWATCH_CDC_TOPIC_PREFIX": "north.clinical"})

    assert result.exit_code == 0, result.output
    config = json.loads(result.stdout)["config"]
    assert config["topic.prefix"] == "north" and config["schema.include.list"] == "clinical"


def test_subscriptions_print_resources_for_the_named_receiver_host(clean_env):
    result = invoke("subscriptions", "--receiver", "rx.internal", "--heartbeat-s", "30",
                    env={"WARDWATCH_RECEIVER_PORT": "9443"})

    assert result.exit_code == 0, result.output
    subs = [r for r in json.loads(result.stdout) if r["resourceType"] == "Subscription"]
    assert {s["channel"]["endpoint"] for s in subs} == {"http://rx.internal:9443/fhir/notifications"}


def test_subscriptions_print_the_receiver_token_masked_and_apply_sends_it(clean_env, monkeypatch):
    # printed to check what will be sent, the token went to the terminal, a CI log or a ticket
    from wardwatch import deploy

    env = {"WARDWATCH_RECEIVER_TOKEN": "s3cret-rx-token"}
    result = invoke("subscriptions", env=env)

    assert result.exit_code == 0, result.output
    assert "s3cret-rx-token" not in result.output
    subs = [r for r in json.loads(result.stdout) if r["resourceType"] == "Subscription"]
    assert subs and all(s["channel"]["header"] == ["Authorization: Bearer ********"] for s in subs)

    sent = []
    monkeypatch.setattr(deploy, "put_fhir_resources", lambda url, resources, **kw: sent.extend(resources))
    assert invoke("subscriptions", "--apply", "http://fhir:8080/fhir", env=env).exit_code == 0
    assert {tuple(r["channel"]["header"]) for r in sent if r["resourceType"] == "Subscription"} == {
        ("Authorization: Bearer s3cret-rx-token",)}


def test_prometheus_writes_the_config_with_the_metrics_port(clean_env, tmp_path):
    out = tmp_path / "prometheus.yml"
    result = invoke("prometheus", "--output", str(out), env={"WARDWATCH_METRICS_PORT": "9999"})

    assert result.exit_code == 0, result.output
    assert "port: 9999" in out.read_text() and "port: 9108" not in out.read_text()


def test_scheduler_rejects_a_malformed_time_with_the_format(clean_env):
    result = invoke("scheduler", "--at", "half past two")

    assert result.exit_code == 1
    assert "HH:MM" in result.output


def test_a_failed_apply_shows_the_servers_answer_verbatim_on_one_line(clean_env, monkeypatch):
    from wardwatch import deploy
    from wardwatch.deploy import DeployError

    answer = ("could not PUT Subscription/wardwatch-observation to the FHIR server at http://fhir:8080/fhir: HTTP 422: "
              "endpoint [/fhir/notifications] refused for [resthook] channels [/]")  # illustrative

    def refuse(*args, **kwargs):
        raise DeployError(answer)

    monkeypatch.setattr(deploy, "put_fhir_resources", refuse)
    result = invoke("subscriptions", "--apply", "http://fhir:8080/fhir")

    # rich took the brackets for markup: '[/fhir/notifications]' raised a MarkupError traceback, and
    # '[resthook]' would have vanished; long answers were wrapped at 80 columns in the container log
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert answer in result.output.splitlines()


@pytest.mark.integration
def test_topics_creates_every_topic_then_reports_nothing_new(settings, clean_env):
    env = settings_env(settings)

    first = invoke("topics", env=env)
    second = invoke("topics", env=env)

    n = len(topics_for(settings).all)
    assert first.exit_code == 0, first.output
    assert f"{n} topics present, {n} created" in first.output
    assert f"{n} topics present, 0 created" in second.output


def test_topics_fails_clearly_when_kafka_is_unreachable(clean_env, capfd):
    result = invoke("topics", "--timeout-s", "2", env={"WARDWATCH_BOOTSTRAP_SERVERS": "127.0.0.1:1"})

    assert result.exit_code == 1
    assert "cannot reach the Kafka broker at 127.0.0.1:1 within 2 s" in result.output
    # not librdkafka's connection error every 50 ms until the timeout (60 s by default: ~1,200 lines)
    assert "%3|" not in capfd.readouterr().err


def test_the_scheduler_records_when_its_first_run_is_due_for_the_healthcheck(clean_env, tmp_path, monkeypatch):
    """From that moment on, 26 h without a successful nightly make the scheduler unhealthy (a job that
    never starts fails nothing); a restart keeps the last outcome."""
    from datetime import datetime, timedelta

    from wardwatch import cli

    class StopAtTheFirstWait:
        def is_set(self):
            return False

        def wait(self, timeout):
            assert 0 < timeout <= 24 * 3600
            return True  # SIGTERM while waiting

    monkeypatch.setattr(cli, "_run_until_signal", lambda run: run(StopAtTheFirstWait()))
    status_file = tmp_path / "nightly-status.json"
    status_file.write_text(json.dumps({"last_outcome": "failed", "last_exit_code": 1}))
    result = invoke("scheduler", "--at", "02:30", env={"WARDWATCH_DATA_DIR": str(tmp_path)})

    assert result.exit_code == 0, result.output
    status = json.loads(status_file.read_text())
    due = datetime.fromisoformat(status["first_due"])
    assert status["next_due"] == status["first_due"] and due.astimezone().strftime("%H:%M") == "02:30"
    assert timedelta(0) < due - datetime.now(due.tzinfo) <= timedelta(days=1)
    assert status["last_outcome"] == "failed"  # still unhealthy until a run succeeds


@pytest.mark.timeout(60)
def test_redrive_refuses_a_reason_no_dead_letter_can_have_and_names_the_close_one(clean_env):
    # `--reason fetch-failed` matched nothing: "0 redriven", and the dead letters wanted stayed put
    from wardwatch.broker import closed_port

    with closed_port() as port:  # refused before the broker is asked
        result = invoke("redrive", "--reason", "fetch-failed", "--dry-run",
                        env={"WARDWATCH_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"})

    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output.count("\n") == 1
    assert "--reason fetch-failed: no dead letter has that reason (did you mean fetch_failed?)" in result.output
    assert "cannot reach the Kafka broker" not in result.output


def _heartbeats(result) -> set[int]:
    subs = [r for r in json.loads(result.stdout) if r["resourceType"] == "Subscription"]
    return {ext["valueUnsignedInt"] for s in subs for ext in s["channel"]["extension"]
            if ext["url"].endswith("/backport-heartbeat-period")}


def test_subscriptions_ask_for_the_heartbeat_period_the_watcher_expects(clean_env):
    # subscription-init runs without --heartbeat-s: with a fixed 60 s, a site that set
    # WARDWATCH_FHIR_HEARTBEAT_PERIOD_S=15 had its watcher report every channel heartbeat-missed (45 s of silence)
    result = invoke("subscriptions", env={"WARDWATCH_FHIR_HEARTBEAT_PERIOD_S": "15"})

    assert result.exit_code == 0, result.output
    assert _heartbeats(result) == {15}


def test_subscriptions_warn_of_a_heartbeat_longer_than_the_watcher_expects(clean_env):
    result = invoke("subscriptions", "--heartbeat-s", "120", env={"WARDWATCH_FHIR_HEARTBEAT_PERIOD_S": "60"})

    assert result.exit_code == 0, result.output
    assert _heartbeats(result) == {120}
    assert "--heartbeat-s 120 is longer than WARDWATCH_FHIR_HEARTBEAT_PERIOD_S=60" in result.stderr
