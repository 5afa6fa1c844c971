"""`wardwatch deploy ...`: the one-shot and scheduler services of docker-compose.yml.

Each command prints what it generates (so an operator can read it) and, with --apply, sends it to
the server. The artefacts come from wardwatch/deploy.py, i.e. from the same settings and mappings
the services use.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

deploy_app = typer.Typer(help="Deployment helpers: topics, Debezium connector, FHIR subscriptions, "
                              "Prometheus config, nightly scheduler, demo feeder.", no_args_is_help=True)
console = Console(stderr=True)


def _settings():
    from wardwatch.cli import _settings as settings_or_exit

    return settings_or_exit()


def _kafka_settings():
    from wardwatch.cli import _kafka_settings as settings_or_exit

    return settings_or_exit()


def _fail(exc: Exception) -> None:
    """The CLI's one red line (markup escaped, not wrapped): a server's answer quoted in the message can
    hold square brackets, and a one-shot's log is read with grep."""
    from wardwatch.cli import _fail as fail

    fail(str(exc), code=1)


@deploy_app.command("topics")
def topics(timeout_s: float = typer.Option(60.0, help="How long to wait for the broker (seconds)")) -> None:
    """Create every wardwatch topic with its partitions and configs; fail if one exists with another
    partition count."""
    from wardwatch.deploy import DeployError, create_topics, topic_specs
    from wardwatch.preflight import broker_problem

    settings = _settings()
    problem = broker_problem(settings, timeout_s)  # one line, not librdkafka's every 50 ms until the timeout
    if problem:
        _fail(problem)
    try:
        created = create_topics(settings, timeout_s=timeout_s)
    except DeployError as exc:
        _fail(exc)
    console.print(f"{len(topic_specs(settings))} topics present, {len(created)} created")


@deploy_app.command("connector")
def connector(
    apply: Optional[str] = typer.Option(None, help="Kafka Connect REST URL to PUT the connector to, "
                                                   "e.g. http://connect:8083; without it, print the JSON"),
    db_host: str = typer.Option("postgres", envvar="EHR_DB_HOST", help="EHR PostgreSQL host"),
    db_port: int = typer.Option(5432, envvar="EHR_DB_PORT", help="EHR PostgreSQL port"),
    db_name: str = typer.Option("hospital", envvar="EHR_DB_NAME", help="EHR database name"),
    db_user: str = typer.Option("debezium", envvar="DEBEZIUM_DB_USER", help="Replication user Debezium logs in as"),
    db_password: str = typer.Option("${env:DEBEZIUM_DB_PASSWORD}", envvar="DEBEZIUM_DB_PASSWORD_REF",
                                    help="Password, or a Connect config-provider reference resolved in "
                                         "the connect container (the default keeps it out of the REST API)"),
    timeout_s: float = typer.Option(180.0, help="How long to wait for Connect and the running task (seconds)"),
) -> None:
    """Generate the Debezium PostgreSQL connector from the settings and schemas.codes.CDC_TABLES."""
    from wardwatch.deploy import DeployError, EhrDatabase, connector_config, put_connector

    try:
        config = connector_config(_settings(), EhrDatabase(db_host, db_port, db_name, db_user, db_password))
        if apply is None:
            print(json.dumps(config, indent=2))
            return
        state = put_connector(apply, config, timeout_s=timeout_s)
    except DeployError as exc:
        _fail(exc)
    console.print(f"connector {config['name']} {state}")


@deploy_app.command("subscriptions")
def subscriptions(
    apply: Optional[str] = typer.Option(None, help="FHIR base URL to PUT the resources to, e.g. "
                                                   "http://fhir:8080/fhir; without it, print them. When it is "
                                                   "WARDWATCH_FHIR_SERVER_URL, with WARDWATCH_FHIR_AUTH_TOKEN "
                                                   "and through WARDWATCH_FHIR_PROXY_URL (if set)"),
    receiver: str = typer.Option("receiver", help="Host name the FHIR server uses to reach `wardwatch receiver`"),
    heartbeat_s: Optional[int] = typer.Option(None, min=1, help="Heartbeat period the FHIR server promises (seconds); "
                                                           "default WARDWATCH_FHIR_HEARTBEAT_PERIOD_S, the period the "
                                                           "subscriptions watcher expects"),
    timeout_s: float = typer.Option(300.0, help="How long to wait for the FHIR server (seconds)"),
) -> None:
    """Generate the R4B SubscriptionTopics and backport Subscriptions (rest-hook to the receiver); printed
    with the receiver token masked, sent with it by --apply."""
    from wardwatch.deploy import (DeployError, fhir_access, put_fhir_resources, receiver_url,
                                  subscription_resources, without_secrets)

    settings = _settings()
    # the watcher (`wardwatch subscriptions`) reports a channel heartbeat-missed after
    # WARDWATCH_FHIR_HEARTBEAT_MISSED_PERIODS x WARDWATCH_FHIR_HEARTBEAT_PERIOD_S of silence: a server asked for a
    # longer period than that raises a false alarm between every two heartbeats
    expected_s = max(1, int(settings.fhir_heartbeat_period_s))  # unsignedInt; rounded down, never later
    if heartbeat_s is None:
        heartbeat_s = expected_s
    elif heartbeat_s > expected_s:
        console.print(f"warning: --heartbeat-s {heartbeat_s} is longer than WARDWATCH_FHIR_HEARTBEAT_PERIOD_S="
                      f"{settings.fhir_heartbeat_period_s:g}, the period the subscriptions watcher expects: set that "
                      "setting to the same value for every wardwatch service, or the watcher reports missed heartbeats",
                      highlight=False, soft_wrap=True)
    resources = subscription_resources(settings, receiver_url(settings, receiver), heartbeat_s)
    if apply is None:  # to check what will be sent: the receiver token stays out of terminals and logs
        print(json.dumps(without_secrets(resources), indent=2))
        return
    try:
        put_fhir_resources(apply, resources, timeout_s=timeout_s, **fhir_access(settings, apply))
    except DeployError as exc:
        _fail(exc)
    console.print(f"{len(resources)} subscription resources on {apply}")


@deploy_app.command("prometheus")
def prometheus(output: Optional[Path] = typer.Option(None, help="Write here instead of printing")) -> None:
    """Generate the Prometheus scrape config: every service's metrics port (WARDWATCH_METRICS_PORT)."""
    from wardwatch.deploy import render_prometheus_config

    text = render_prometheus_config(_settings())
    if output is None:
        print(text, end="")
    else:
        output.write_text(text)
        console.print(f"written to {output}")


@deploy_app.command("scheduler")
def scheduler(
    at: Optional[str] = typer.Option(None, help="Time of day (HH:MM, container time); default WARDWATCH_NIGHTLY_AT"),
    once: bool = typer.Option(False, help="Run the job once now and exit (for testing the schedule's command, or "
                                          "to rerun a failed night: its outcome is recorded as the scheduler's)"),
) -> None:
    """Run `wardwatch batch nightly` every day at --at; a failed night is logged and tried again the next.

    Each run's outcome goes to WARDWATCH_DATA_DIR/nightly-status.json; the container healthcheck
    (deploy/healthcheck.py --nightly) reads it: unhealthy after a failed run or 26 h without a success."""
    from wardwatch import nightly_status
    from wardwatch.deploy import DeployError, next_run, parse_clock_time

    settings = _settings()
    try:
        when = parse_clock_time(at or settings.nightly_at)
    except DeployError as exc:
        _fail(exc)
    command = [sys.executable, "-m", "wardwatch", "batch", "nightly"]
    path = nightly_status.status_path(settings)

    def record(change) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            nightly_status.update(path, change)
        except OSError as exc:  # the healthcheck reports the unwritable data dir; the schedule goes on
            console.print(f"cannot write {path}: {exc.strerror or exc}")

    def now() -> datetime:
        # wall clock is right here: this is a timetable, not event time
        return datetime.now().astimezone()

    def run(stop: threading.Event) -> None:
        first = True
        while not stop.is_set():
            if not once:
                due = next_run(now(), when)
                record(lambda status: nightly_status.scheduled(status, due, first=first))
                first = False
                console.print(f"next nightly run at {due.isoformat(timespec='minutes')}")
                if stop.wait((due - now()).total_seconds()):
                    return
            record(lambda status: nightly_status.started(status, now()))
            code = subprocess.call(command)
            record(lambda status: nightly_status.finished(status, now(), code))
            console.print(f"nightly run finished with exit code {code}")
            if once:
                raise typer.Exit(code)

    from wardwatch.cli import _run_until_signal

    _run_until_signal(run)


@deploy_app.command("feed")
def feed(
    patients: int = typer.Option(8, min=1, help="clinosim patients to generate"),
    seed: int = typer.Option(7, help="clinosim seed"),
    db_url: str = typer.Option("postgresql://ehr_admin@postgres:5432/hospital", envvar="EHR_DB_URL",
                               help="libpq URL of the EHR database (password via PGPASSWORD)"),
    fhir_url: Optional[str] = typer.Option("http://fhir:8080/fhir", envvar="EHR_FHIR_URL",
                                           help="FHIR base URL for Patients, Encounters and lab Observations; "
                                                "empty to skip the FHIR path"),
    cache_dir: Path = typer.Option(Path("/tmp/wardwatch-cohorts"), help="Where generated cohorts are cached"),
) -> None:
    """Demo: write clinosim patients as rows into the EHR database and as resources into the FHIR server."""
    from wardwatch.deploy import DeployError
    from wardwatch.feed import feed_database, feed_fhir, load_ehr_cohort

    try:
        cohort = load_ehr_cohort(cache_dir, patients=patients, seed=seed)
        rows = feed_database(db_url, cohort)
        console.print("rows written: " + ", ".join(f"{table} {n}" for table, n in rows.items()))
        if fhir_url:
            console.print(f"FHIR resources written: {feed_fhir(fhir_url, cohort)}")
    except DeployError as exc:
        _fail(exc)


@deploy_app.command("redrive")
def redrive(
    reason: Optional[list[str]] = typer.Option(None, help="Only dead letters with this ww.reason (repeatable); "
                                                           "default: every reason"),
    dry_run: bool = typer.Option(False, help="Count what would be sent back, send nothing, commit nothing"),
    idle_s: float = typer.Option(5.0, help="Stop when no dead letter arrived for this long (seconds)"),
) -> None:
    """Send dead letters back to the topic they came from (after deploying the fix that parses them)."""
    import difflib

    from schemas.deadletter import Reason
    from wardwatch.cli import _fail as fail
    from wardwatch.deploy import DeployError, redrive_deadletters

    # a misspelt reason matched nothing: "0 redriven", and the dead letters wanted stayed where they were
    known = sorted({r.value for r in Reason})
    for name in reason or ():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            fail(f"--reason {name}: no dead letter has that reason"
                 + (f" (did you mean {close[0]}?)" if close else "") + f"; the reasons are {', '.join(known)}")
    try:
        counts = redrive_deadletters(_kafka_settings(), set(reason) if reason else None, dry_run=dry_run, idle_s=idle_s)
    except DeployError as exc:
        _fail(exc)
    verb = "would be redriven" if dry_run else "redriven"
    console.print(f"{counts['redriven']} {verb}, {counts['skipped']} kept in the dead-letter topic")
    if counts.get("omitted"):
        console.print(f"{counts['omitted']} kept because the dead letter does not hold the original (too large "
                      "to copy): its ww.source.topic/partition/offset headers say where to read it")
