"""The thin `wardwatch` CLI: every service and job of the pipeline is a subcommand."""

from __future__ import annotations

import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Optional, get_args

import typer
from rich.console import Console

from wardwatch.settings import Settings, load_settings


class _ScrubbedTyper(typer.Typer):
    """The root command. An exception that escapes a command (a bug, a full disk, a broker error) ends it
    with exit code 1 and its traceback scrubbed of identifier-like values (observability.redact), as in a
    log line: Typer's handler printed it whole on stderr, the container's log, so the archiver's scrubbed
    "archiver stopped" line was followed by the patient id it had scrubbed (`could not convert 'C0-0001'`)."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:  # SystemExit and KeyboardInterrupt (Ctrl-C) go on as they are
            _report_uncaught(exc)
            sys.exit(1)


def _report_uncaught(exc: BaseException) -> None:
    import logging
    import traceback

    from wardwatch.observability import JsonFormatter, PlainFormatter, redact

    if any(isinstance(h.formatter, (JsonFormatter, PlainFormatter)) for h in logging.getLogger().handlers):
        # a service (configure_logging): one log line like the others, its traceback scrubbed by the formatter
        logging.getLogger("wardwatch").critical("exiting on an uncaught %s", type(exc).__name__, exc_info=exc)
    else:
        sys.stderr.write(redact("".join(traceback.format_exception(exc))))
        sys.stderr.flush()


app = _ScrubbedTyper(help="wardwatch: streaming early-warning pipeline for hospital wards.", no_args_is_help=True,
                     add_completion=False)
batch_app = typer.Typer(help="The offline plane: nightly rebuild, parity, retraining.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")

from wardwatch.deploy_cli import deploy_app  # noqa: E402  (the `deploy` group: one-shot services of docker-compose.yml)

app.add_typer(deploy_app, name="deploy")
model_app = typer.Typer(help="The model registry in WARDWATCH_MODEL_DIR (default models/): list, promote, roll back.",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")
config_app = typer.Typer(help="The settings every service reads (WARDWATCH_* environment variables).",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table")) -> None:
    """Print the effective settings (environment over defaults) with secrets masked."""
    from wardwatch.settings import Settings, describe_settings

    rows = describe_settings(_settings())
    if as_json:
        import orjson

        typer.echo(orjson.dumps({r["name"]: r["value"] for r in rows}, option=orjson.OPT_INDENT_2).decode())
        return
    from rich.table import Table

    table = Table(title="wardwatch settings", show_lines=False)
    for col in ("variable", "value", "source", "meaning"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["variable"], str(r["value"]), r["source"], r["description"])
    console.print(table)
console = Console()
err_console = Console(stderr=True)  # errors never mix with a command's output (query --csv, check)


def _fail(message: str, code: int = 2) -> None:
    """One red line on stderr (not wrapped, so it can be grepped and copied), then exit."""
    from rich.markup import escape

    err_console.print(f"[red]{escape(message)}[/]", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _model_dir(settings: Settings) -> Path:
    """settings.model_dir, refused in one line when it names a file (model.onnx, say): the registry is the
    directory that holds the version directories and `current`."""
    if settings.model_dir.exists() and not settings.model_dir.is_dir():
        _fail(f"WARDWATCH_MODEL_DIR={settings.model_dir} is a file: point it at the model registry, the directory "
              "holding the version directories and `current` (default: models)")
    return settings.model_dir


def _nightly_file(path: Path, *, code: int = 1, or_: str = "") -> Path:
    """`path` (the nightly's DuckDB file), refused in one line saying how to get one when it is missing."""
    if not path.exists():
        _fail(f"{path} does not exist: run `wardwatch batch nightly`{or_} first, or point WARDWATCH_DATA_DIR at the "
              "directory that holds wardwatch.duckdb (the demo's: WARDWATCH_DATA_DIR=data/demo)", code=code)
    return path


def _unreadable(path: Path, exc: Exception) -> str:
    """What to say of a DuckDB file a batch command cannot read: duckdb's first line (a catalog error goes on
    with a 'LINE 1: <sql>' excerpt that means nothing to the reader) and what to do."""
    return (f"cannot read {path}: {str(exc).splitlines()[0]} (is it a wardwatch nightly file? rebuild it with "
            "`wardwatch batch nightly --full`)")


def _settings() -> Settings:
    import os

    from pydantic import ValidationError
    from rich.markup import escape

    from wardwatch.settings import settings_errors, unknown_variables

    lines = unknown_variables(os.environ)  # refused, not ignored: a typo'd variable would go unnoticed
    try:
        settings = load_settings()
    except ValidationError as exc:
        lines += settings_errors(exc)
    if lines:
        err_console.print("[red]invalid settings:[/] " + escape("\n  ".join(lines)), highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    return settings


def _kafka_settings() -> Settings:
    """Settings of a command that needs the broker: stop in one line when it cannot be reached."""
    return _require_broker(_settings())


def _require_broker(settings: Settings) -> Settings:
    from wardwatch.preflight import broker_problem

    problem = broker_problem(settings)
    if problem:
        _fail(problem)
    return settings


def _require_bootstrap(bootstrap: str | None) -> None:
    """A run's --bootstrap broker (demo, soak) answers: checked before the earlier run's directory is wiped
    (it was a KafkaException traceback after ~30 s)."""
    if bootstrap:
        from wardwatch.preflight import broker_problem

        problem = broker_problem(_settings().model_copy(update={"bootstrap_servers": bootstrap}))
        if problem:
            _fail(f"--bootstrap {bootstrap}: {problem}")


def _observe(service: str) -> None:
    """Every long-running service: JSON logs and the metrics/health endpoint, from settings."""
    from wardwatch import observability

    settings = _settings()
    observability.configure_logging(service, settings.log_level, json_logs=settings.json_logs)
    try:
        observability.serve(settings.metrics_port, host=settings.metrics_host)
    except OSError as exc:
        console.print(f"[red]cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc}[/] "
                      "(set WARDWATCH_METRICS_PORT to a free port, or unset it to turn metrics off)")
        raise typer.Exit(2)


def _sigterm_unwinds() -> None:
    """SIGTERM (`timeout`, a CI job cancelled, `kill`) unwinds like Ctrl-C, so a command that started an
    embedded broker and child services stops them on the way out: they run in sessions of their own,
    and the default SIGTERM would end this process alone and leave them running."""
    import signal

    def interrupt(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _run_until_signal(run) -> None:
    """Run a blocking `run(stop)` loop; SIGTERM/SIGINT set `stop` so it finishes cleanly."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(stop)


@app.command()
def demo(
    patients: int = typer.Option(8, min=1, help="Patients to generate with clinosim"),
    seed: int = typer.Option(7, help="Seed for the cohort and the injected faults"),
    faults: bool = typer.Option(True, help="Inject realistic faults (duplicates, late, amendments, ...)"),
    train: bool = typer.Option(True, help="Retrain a model on the rebuilt state at the end"),
    data_dir: Path = typer.Option(Path("data/demo"), help="Where the archive, DuckDB file and logs go (wiped first)"),
    summary_json: Optional[Path] = typer.Option(None, help="Also write the summary as JSON to this path"),
    bootstrap: Optional[str] = typer.Option(None, help="Use this Kafka instead of the embedded broker"),
) -> None:
    """Run the whole pipeline end to end on the embedded broker and print a summary."""
    from wardwatch.demo import DemoOptions, check_wipeable, run_demo, write_summary

    try:
        check_wipeable(data_dir.resolve())
    except ValueError as exc:
        _fail(str(exc))
    _require_bootstrap(bootstrap)
    _check_result_path(summary_json)
    _sigterm_unwinds()
    summary = run_demo(DemoOptions(patients=patients, seed=seed, faults=faults, train=train, data_dir=data_dir,
                                   bootstrap=bootstrap), console)
    if summary_json:
        write_summary(summary, summary_json)
        console.print(f"summary written to {summary_json}")
    if not summary["parity_ok"]:
        raise typer.Exit(1)


@app.command()
def ingest() -> None:
    """Run the ingest worker: raw CDC + FHIR topics -> canonical micro-batches + dead letters.

    Broker and topics from WARDWATCH_BOOTSTRAP_SERVERS / WARDWATCH_TOPIC_PREFIX (`wardwatch config show`); exits 2
    when the broker does not answer within 15 s. SIGTERM/Ctrl-C stops it cleanly."""
    from streams.ingest import run_ingest

    settings = _kafka_settings()
    _observe("ingest")
    _run_until_signal(lambda stop: run_ingest(settings, stop))


@app.command()
def worker(loglevel: Optional[str] = typer.Option(None, help="Log level (default: WARDWATCH_LOG_LEVEL)")) -> None:
    """Run the faust worker: per-patient state, features, scoring, alerts.

    Scores with the model WARDWATCH_MODEL_DIR's `current` names (NEWS2 rule without one); exits 2 when the broker
    (WARDWATCH_BOOTSTRAP_SERVERS) does not answer within 15 s."""
    from schemas.model_contract import ContractError
    from streams.app import run_worker

    if loglevel and loglevel.upper() not in get_args(Settings.model_fields["log_level"].annotation):
        _fail(f"--loglevel {loglevel}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    settings = _kafka_settings()
    level = (loglevel or settings.log_level).upper()
    try:
        run_worker(settings.model_copy(update={"log_level": level}), loglevel={"WARNING": "WARN"}.get(level, level))
    except ContractError as exc:
        console.print(f"[red]worker not started:[/] {exc}")
        raise typer.Exit(2)


@app.command()
def cds() -> None:
    """Run the CDS Hooks service (patient-view): the latest risk per patient as a card, from the scores topic.

    Listens on WARDWATCH_CDS_HOST:WARDWATCH_CDS_PORT (default 127.0.0.1:8082); discovery at /cds-services.
    Service calls need the EHR's signed JWT when WARDWATCH_CDS_JWKS_FILE is set; without it the service
    starts only on a loopback address or with WARDWATCH_CDS_ALLOW_ANONYMOUS=true (exit 2 otherwise).
    """
    from streams.cds import AuthConfigError, load_client_auth, run_cds
    from wardwatch.listen import ListenError

    settings = _settings()
    try:  # before the broker: a service that would be open to anyone never starts
        auth = load_client_auth(settings)
    except AuthConfigError as exc:
        _fail(str(exc))
    _require_broker(settings)
    _observe("cds")
    try:
        run_cds(settings, auth)
    except ListenError as exc:
        _fail(f"{exc}: set WARDWATCH_CDS_PORT to a free port (0: any), or WARDWATCH_CDS_HOST to an address of "
              "this host")


@app.command()
def archiver() -> None:
    """Run the archiver: output topics -> Parquet under WARDWATCH_DATA_DIR/archive (what `batch nightly` reads).

    Exits 2 when the broker (WARDWATCH_BOOTSTRAP_SERVERS) does not answer within 15 s."""
    from streams.archiver import Archiver
    from streams.topics import ensure_topics, topics_for
    from streams.watchdog import watching

    settings = _kafka_settings()
    _observe("archiver")
    topics = topics_for(settings)
    ensure_topics(settings, topics)

    def run(stop) -> None:
        archiver = Archiver(settings, topics)
        with watching(settings, "archiver", archiver.group_id, lambda: archiver.partitions):
            archiver.run(stop)

    _run_until_signal(run)


subscriptions_app = typer.Typer(help="FHIR subscriptions: the gap and heartbeat watcher (run without a subcommand).")
app.add_typer(subscriptions_app, name="subscriptions")


@subscriptions_app.callback(invoke_without_command=True)
def subscriptions(ctx: typer.Context) -> None:
    """Run the subscription watcher: every notification partition -> gap / heartbeat-missed records.

    One instance per deployment (it reads all partitions). Grace and heartbeat timing:
    WARDWATCH_FHIR_GAP_GRACE_S, WARDWATCH_FHIR_HEARTBEAT_PERIOD_S, WARDWATCH_FHIR_HEARTBEAT_MISSED_PERIODS."""
    if ctx.invoked_subcommand is not None:
        return
    from streams.subscription_watch import run_subscription_watch

    settings = _kafka_settings()
    _observe("subscriptions")
    _run_until_signal(lambda stop: run_subscription_watch(settings, stop))


@subscriptions_app.command("recover")
def subscriptions_recover() -> None:
    """Ask the FHIR server ($events) for the notifications of every reported, still open gap and
    republish them to the notifications topic. Prints one JSON line per gap."""
    import orjson

    from streams.fhir_fetch import FhirClient
    from streams.subscription_watch import recover_gaps
    from streams.topics import ensure_topics, topics_for

    settings = _settings()
    if not settings.fhir_server_url:
        console.print("[red]no FHIR server configured:[/] set WARDWATCH_FHIR_SERVER_URL (and WARDWATCH_FHIR_AUTH_TOKEN "
                      "if the server needs one)")
        raise typer.Exit(2)
    _require_broker(settings)
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    client = FhirClient(settings)
    try:
        results = recover_gaps(settings, topics, client)
    finally:
        client.close()
    for result in results:
        typer.echo(orjson.dumps(result).decode())
    if not results:
        console.print("no open gaps", style="green")


@app.command()
def broker(port: int = typer.Option(9092, help="Port on 127.0.0.1")) -> None:
    """Run the embedded Tansu broker in the foreground (Ctrl-C stops it)."""
    from wardwatch.broker import BrokerError, EmbeddedBroker

    try:
        b = EmbeddedBroker.start(port=port)
    except BrokerError as exc:  # a port in use (another broker, a docker-compose Kafka): one line, no traceback
        _fail(f"cannot start the embedded broker: {exc}")
    with b:
        console.print(f"Kafka-protocol broker on {b.bootstrap} (memory storage). Ctrl-C to stop.")
        _run_until_signal(lambda stop: stop.wait())


@batch_app.command("nightly")
def batch_nightly(full: bool = typer.Option(False, "--full",
                                           help="Rebuild from every archive part (default: only parts not yet processed)"),
                  quarantine_unreadable: bool = typer.Option(
                      False, "--quarantine-unreadable",
                      help="Move archive part files that cannot be read to <archive>/quarantine/ (kept) and build "
                           "without their rows (default: stop, naming them)")) -> None:
    """Rebuild the DuckDB file from the archive, recompute features offline and check parity.

    Reads WARDWATCH_DATA_DIR/archive (the archiver's Parquet parts) and writes WARDWATCH_DATA_DIR/wardwatch.duckdb
    and an HTML report under WARDWATCH_DATA_DIR/reports. Exits 1 when parity fails, or when an archive part file
    cannot be read (without --quarantine-unreadable)."""
    from rich.markup import escape

    from batch.nightly import QUARANTINE, NightlyBusy, UnreadableParts, quarantined_files, run_nightly

    settings = _settings()
    if not settings.archive_dir.is_dir():
        _fail(f"no archive at {settings.archive_dir}: the archiver (`wardwatch archiver`) writes it; point "
              "WARDWATCH_DATA_DIR at the directory that holds archive/", code=1)
    with console.status("nightly rebuild") as status:
        def progress(step: str) -> None:
            status.update(f"nightly rebuild: {step}")
            console.log(step)

        try:
            result = run_nightly(settings, full=full, progress=progress, quarantine=quarantine_unreadable)
        except (NightlyBusy, UnreadableParts) as exc:  # busy: the scheduler's run and one by hand, the first wins
            _fail(str(exc), code=1)
    p = result["parity"]
    console.print(f"{result['duckdb_path']}: {result['new_parts']} new archive parts, {p['points_checked']} scoring "
                  f"points, {p['values_checked']} values, {p['mismatched']} mismatched")
    quarantine = settings.archive_dir / QUARANTINE
    if result["quarantined_parts"]:
        console.print(f"[yellow]set aside {result['quarantined_parts']} unreadable archive part file(s) in "
                      f"{escape(str(quarantine))}"
                      "[/yellow] (kept; their rows are in no table)")
    if result["quarantine_files"] and (full or result["quarantined_parts"]):
        held = quarantined_files(settings.archive_dir)
        console.print(f"[yellow]{len(held)} file(s) in {escape(str(quarantine))} were not read[/yellow] "
                      f"({escape(', '.join(held[:5]))}{', ...' if len(held) > 5 else ''}): the tables lack their rows. Move a "
                      "readable copy back to its path under the archive and the next nightly reads it")
    if result.get("report_path"):
        console.print(f"report: {result['report_path']}")
    if not result["parity_ok"]:
        raise typer.Exit(1)


@batch_app.command("dataset", epilog="Then: WARDWATCH_DATA_DIR=data/train WARDWATCH_MODEL_DIR=data/train/models "
                   "wardwatch batch train")
def batch_dataset(
    patients: int = typer.Option(300, min=1, help="Inpatients to generate (a mix of diseases and severities)"),
    seed: int = typer.Option(11, help="Seed for the cohort and the injected faults"),
    out: Path = typer.Option(Path("data/train"), help="Where the archive, DuckDB file and dataset.json go (wiped first)"),
    cache_dir: Path = typer.Option(Path("data/cache"), help="clinosim cohort cache (keyed by its parameters)"),
    faults: bool = typer.Option(True, help="Inject the replay's realistic faults, as in production"),
    bootstrap: Optional[str] = typer.Option(None, help="Use this Kafka instead of a fresh embedded broker (the "
                                            "embedded one cannot carry ~1000 patients: README)"),
) -> None:
    """Training data through the real pipeline: clinosim -> replay -> stream -> archive -> nightly rebuild."""
    from batch.dataset import DatasetOptions, build_dataset
    from wardwatch.demo import check_wipeable

    _require_bootstrap(bootstrap)
    try:
        check_wipeable(out.resolve())
    except ValueError as exc:
        _fail(str(exc))
    _sigterm_unwinds()
    summary = build_dataset(DatasetOptions(patients=patients, seed=seed, out=out, cache_dir=cache_dir,
                                           faults=faults, bootstrap=bootstrap), console)
    console.print_json(data={k: summary[k] for k in ("duckdb_path", "labels", "parity_ok", "seconds")})
    if not summary["parity_ok"]:
        raise typer.Exit(1)


@batch_app.command("train", epilog="Example: WARDWATCH_DATA_DIR=data/train WARDWATCH_MODEL_DIR=data/train/models "
                                   "wardwatch batch train --version v0002")
def batch_train(version: Optional[str] = typer.Option(None, help="Version name: letters, digits, '.', '_', '-' "
                                                                 "(default: v<UTC timestamp>)"),
                promote_if_none: bool = typer.Option(True, help="Make it current when no model is current (the gate "
                                                                "still has to pass)"),
                allow_small_holdout: bool = typer.Option(
                    False, "--allow-small-holdout", help="Let the gate promote even when the held-out patients are "
                    "too few to judge a model by (fewer than 20, or 10 with an onset); recorded in the model card"),
                as_json: bool = typer.Option(False, "--json", help="Print the whole model card as JSON"),
                record_wait_s: float = typer.Option(1800.0, min=0, help="How long to wait for a nightly run "
                                                    "holding the DuckDB file before recording the decision (s)")) -> None:
    """Train a model on the nightly's DuckDB file (WARDWATCH_DATA_DIR/wardwatch.duckdb) into the model registry
    (WARDWATCH_MODEL_DIR), then run the promotion gate: it becomes `current` only when it beats NEWS2 on the
    held-out patients (WARDWATCH_GATE_MIN_AUROC_GAIN / _AUPRC_GAIN, and the gain's 95 % interval above 0) and is
    not shown worse than the current model (the paired gain's interval above -WARDWATCH_GATE_NONINFERIORITY_AUROC
    / _AUPRC), else `candidate`. Never automatically on fewer than 20 held-out patients or 10 with an onset
    (too few to judge a model by) unless --allow-small-holdout.
    The decision goes into the file's `runs` table; a nightly run writing the file meanwhile is waited for."""
    import duckdb

    from batch.nightly import NightlyBusy
    from batch.registry import check_version_name
    from batch.retrain import retrain

    settings = _settings()
    _model_dir(settings)  # before the data is read: retrain creates it only then
    _nightly_file(settings.duckdb_path, code=2, or_=" (or `wardwatch batch dataset`)")
    try:
        if version is not None:
            check_version_name(version)
        if version is not None and (settings.model_dir / version).exists():
            raise FileExistsError(f"model version {version!r} already exists in {settings.model_dir}: "
                                  "choose another --version (see `wardwatch model list`)")
    except (ValueError, FileExistsError) as exc:
        _fail(str(exc))
    try:
        with console.status(f"training on {settings.duckdb_path}"):
            def waiting(holder: str) -> None:  # else a train would seem to hang while a nightly runs
                err_console.print(f"waiting for {holder or 'another writer'} to finish with {settings.duckdb_path} "
                                  f"(up to {record_wait_s:.0f} s) to record the gate's decision",
                                  highlight=False, soft_wrap=True)

            card = retrain(settings, version=version, promote_if_none=promote_if_none,
                           allow_small_holdout=allow_small_holdout, record_wait_s=record_wait_s, on_wait=waiting)
    except NightlyBusy as exc:  # the model is published; only its row in `runs` is missing
        _fail(str(exc), code=1)
    except ValueError as exc:  # too little data: no points, one patient, one label class
        _fail(f"cannot train on {settings.duckdb_path}: {exc}. A model needs patients who deteriorate and patients "
              "who do not: build more data (`wardwatch batch dataset --patients 300`; README, 'The offline plane')")
    except duckdb.Error as exc:
        _fail(_unreadable(settings.duckdb_path, exc))
    if as_json:
        typer.echo(orjson_dumps(card))
        return
    console.print(train_summary(card, settings.model_dir), highlight=False, soft_wrap=True)


def orjson_dumps(data: dict) -> str:
    import orjson

    return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()


def train_summary(card: dict, model_dir: Path) -> str:
    """What a data scientist reads after `batch train`: held-out metrics next to NEWS2, and the gate's verdict."""
    from batch.train import held_out_too_small

    def num(x):
        return "n/a" if x is None else f"{x:.3f}"

    def span(interval):
        return "" if not interval else f" (95% CI {interval[0]:.3f} to {interval[1]:.3f})"

    def ci(metric, block, values=None):  # a figure and its interval, when the card has one
        return num((values or block).get(metric)) + span((block.get("ci95") or {}).get(metric))

    metrics = card["metrics"]
    model, news2 = metrics["model"], metrics.get("news2") or {}
    gate = card.get("gate", {})
    rule_path = (metrics.get("evaluation") or {}).get("excluded_rows_rule_path")
    lines = [f"{card['version']} in {model_dir}: {card['n_train_patients']} training / {card['n_test_patients']} "
             f"held-out patients, {model.get('n_rows')} held-out rows at risk the model serves ({model.get('positives')} "
             "positive" + (f"; {rule_path} on the NEWS2 rule path left out" if rule_path else "") + ")",
             f"  model  AUROC {ci('auroc', model)}  AUPRC {ci('auprc', model)}  Brier {num(model.get('brier'))}",
             f"  NEWS2  AUROC {ci('auroc', news2)}  AUPRC {ci('auprc', news2)}"]
    if small := held_out_too_small(metrics):  # before the figures are read as a verdict
        lines.insert(1, f"  warning: held-out set too small: {small}")
    gain = metrics.get("model_vs_news2") or {}
    if gain:
        lines.append("  model - NEWS2  " + "  ".join(
            f"{m.upper()} {num(gain[f'{m}_gain'].get('estimate'))}{span(gain[f'{m}_gain'].get('ci95'))}"
            for m in ("auroc", "auprc")))
    vs_current = metrics.get("model_vs_current") or {}
    if vs_current:
        margin = vs_current.get("noninferiority_margin") or {}
        lines.append(f"  model - current {vs_current.get('current_version')}  " + "  ".join(
            f"{m.upper()} {num(vs_current[f'{m}_gain'].get('estimate'))}{span(vs_current[f'{m}_gain'].get('ci95'))}"
            for m in ("auroc", "auprc")) + "  (paired; non-inferiority margins "
            + ", ".join(f"{m.upper()} -{margin[m]:g}" for m in ("auroc", "auprc") if m in margin) + ")")
        if burden := vs_current.get("alert_burden"):  # reported, not gated
            new_op, cur_op = burden["new"], burden["current"]
            ratio = burden.get("ratio_new_to_current")
            lines.append(f"  alerts at >= {burden['threshold']:g} per 100 patient-days (every held-out scoring point, "
                         f"same rows): model {num(new_op['alerts_per_100_patient_days'])}, current "
                         f"{vs_current.get('current_version')} {num(cur_op['alerts_per_100_patient_days'])}"
                         + (f" (x{ratio:.2f})" if ratio is not None else "")
                         + f"; sensitivity {num(new_op['sensitivity'])} vs {num(cur_op['sensitivity'])} (not gated)")
        if vs_current.get("same_split") is False:  # the gate's reasons below say why
            lines.append(f"  warning: {vs_current.get('current_version')} was trained with another split: some of "
                         "these held-out patients may be its training patients; the comparison favours current")
    for name, label in ((model, "model >= "), (news2, "NEWS2 >= ")):
        op = name.get("operating") or {}
        if op:
            lines.append(f"  {label}{op['threshold']:g}: sensitivity {ci('sensitivity', name, op)}, "
                         f"{ci('alerts_per_100_patient_days', name, op)} alerts per 100 patient-days")
    if metrics.get("bootstrap"):
        lines.append(f"  (95 % intervals: patient-level bootstrap, {metrics['bootstrap']['resamples']} resamples of "
                     f"the {metrics['bootstrap']['patients']} held-out patients)")
    lines += [f"gate: {gate.get('decision', '?')}" + (f", kept as {gate['outcome']}" if gate.get("outcome") not in
                                                      (None, gate.get("decision"), "promoted") else "")]
    lines += [f"  - {reason}" for reason in gate.get("reasons", [])]
    if model.get("auroc") is None:
        lines.append("held-out metrics are not computable (the held-out rows hold one class, or none): too little data for "
                     "this model to be judged; build more (`wardwatch batch dataset --patients 300`)")
    lines.append(f"card: {model_dir / card['version'] / 'card.json'}  (--json prints it)")
    return "\n".join(lines)


@model_app.command("list")
def model_list() -> None:
    """List model versions: which is current/candidate, held-out metrics, and whether model.onnx matches its card."""
    from rich.table import Table

    from batch.registry import describe, unapplied_entry

    settings = _settings()
    rows = describe(_model_dir(settings))
    if not rows:
        console.print(f"no model versions in {settings.model_dir} (train one with `wardwatch batch train`)")
        return
    table = Table("version", "pointer", "sha256", "AUROC", "AUPRC", "NEWS2 AUROC", "gate", "created")
    # a narrow terminal (80 columns) cut every cell to "v202611…": nothing is cut now, the version
    # (`model promote VERSION` takes it) is kept whole on one line, the other columns wrap
    for column in table.columns:
        column.overflow = "fold"
    table.columns[0].no_wrap, table.columns[0].min_width = True, max(len(r["version"]) for r in rows)

    def num(x):
        return "-" if x is None else f"{x:.3f}"

    for r in rows:
        pointer = "current" if r["current"] else "candidate" if r["candidate"] else ""
        integrity = "[green]ok[/]" if r["sha256"] == "ok" else f"[red]{r['sha256']}[/]"
        table.add_row(r["version"], pointer, integrity, num(r["auroc"]), num(r["auprc"]), num(r["news2_auroc"]),
                      r["gate"] or "-", r["created"] or "-")
    console.print(table)
    void = unapplied_entry(_model_dir(settings))
    if void is not None:  # a promote/rollback interrupted between its history line and the pointer
        console.print(f"note: the last {void.get('action')} in history.jsonl ({void.get('from')} -> {void.get('to')}, "
                      f"by {void.get('who')} at {void.get('at')}) never took effect: current still names "
                      f"{void.get('from')}", highlight=False, soft_wrap=True)


@model_app.command("promote")
def model_promote(version: str = typer.Argument(..., help="The version to make current"),
                  reason: str = typer.Option("manual promotion", "--reason", help="Why (kept in the registry history)")) -> None:
    """Make VERSION current after checking its sha256 and contract; the switch is atomic and recorded.
    A version whose held-out set was too small to judge it (which `batch train` promotes only with
    --allow-small-holdout) is promoted with a warning, kept in the history."""
    from batch.registry import PromotionRefused, check_version_name, promote

    model_dir = _model_dir(_settings())
    try:
        if not (model_dir / check_version_name(version)).is_dir():
            raise PromotionRefused(f"no model version {version!r} in {model_dir} (WARDWATCH_MODEL_DIR): "
                                   "`wardwatch model list` shows the versions there")
        entry = promote(model_dir, version, why=reason)
    except (PromotionRefused, ValueError) as exc:
        _fail(str(exc), code=1)
    console.print(f"current: {entry['from']} -> {entry['to']} (by {entry['who']} at {entry['at']})")
    if entry.get("held_out_too_small"):  # done, by hand: said, and kept in history.jsonl with the entry
        err_console.print(f"warning: {version}'s held-out set was too small to judge it: {entry['held_out_too_small']}; "
                          "promoted on your decision (recorded in the registry history)", highlight=False, soft_wrap=True)


@model_app.command("rollback")
def model_rollback(reason: str = typer.Option("manual rollback", "--reason", help="Why (kept in the registry history)")) -> None:
    """Point current back at the version it named before the last promotion."""
    from batch.registry import PromotionRefused, rollback

    try:
        entry = rollback(_model_dir(_settings()), why=reason)
    except (PromotionRefused, ValueError) as exc:
        _fail(str(exc), code=1)
    console.print(f"current: {entry['from']} -> {entry['to']} (by {entry['who']} at {entry['at']})")


@batch_app.command("export")
def batch_export(out_dir: Path = typer.Argument(..., help="Directory for the Parquet files (created)"),
                 deidentify: bool = typer.Option(False, "--deidentify",
                                                 help="Required: hash ids with WARDWATCH_DEID_SECRET, shift dates, drop free text")) -> None:
    """Export the analyst tables as de-identified Parquet for use outside the clinical perimeter."""
    import duckdb

    from batch.export import ExportRefused, export_deidentified

    if not deidentify:
        _fail("only de-identified exports leave the clinical perimeter: pass --deidentify")
    settings = _settings()
    try:
        written = export_deidentified(settings, out_dir)
    except ExportRefused as exc:
        _fail(str(exc))
    except duckdb.Error as exc:  # not a nightly file, or not DuckDB at all: duckdb's traceback before
        _fail(_unreadable(settings.duckdb_path, exc))
    for name, rows in written.items():
        console.print(f"{out_dir / (name + '.parquet')}: {rows} rows")


@batch_app.command("report")
def batch_report(out: Optional[Path] = typer.Option(None, help="HTML file to write (default: <data_dir>/reports/nightly-<run>.html)")) -> None:
    """Write the self-contained HTML report of the latest nightly run (parity, ROC/calibration vs NEWS2, alert burden)."""
    import duckdb

    from batch.report import NoNightlyRun, write_report

    settings = _settings()
    _nightly_file(settings.duckdb_path)
    try:
        written = write_report(settings, out)
    except duckdb.Error as exc:  # not a nightly file: no `runs` table, or not DuckDB at all
        _fail(_unreadable(settings.duckdb_path, exc))
    except NoNightlyRun as exc:  # the tables without a run (emptied by hand, or made by other tooling)
        _fail(f"nothing to report in {settings.duckdb_path}: {exc} (run `wardwatch batch nightly` first)")
    console.print(f"report written to {written}")


@app.command()
def bench(
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here"),
    patients: int = typer.Option(8, min=1, help="Patients in the replayed cohort"),
    repeat: int = typer.Option(60, min=1, help="Replay the cohort this many times (fresh patient ids each time)"),
    rates: str = typer.Option("1000,10000", help="Offered loads (raw msg/s) for the latency phases, comma-separated; "
                                                 "empty for none"),
    paced_seconds: float = typer.Option(10.0, min=0.1, help="Length of each paced latency phase (seconds)"),
    batch: bool = typer.Option(False, "--batch", help="Benchmark the nightly rebuild + parity instead, on a large "
                                                      "archive, next to a plain DuckDB scan of the same Parquet"),
    events: int = typer.Option(5_000_000, min=1, help="With --batch: canonical events in the archive"),
    state_patients: int = typer.Option(1000, min=0, help="Patients for the live-state memory measurement (0: skip)"),
    sustained: bool = typer.Option(True, "--sustained/--no-sustained",
                                   help="Search the max sustained rate: paced phases from 20% of the unpaced "
                                        "events/s up by 25% a step while each keeps up with a steady "
                                        "latency (by halves below 20% if even that one does not)"),
) -> None:
    """Measure the pipeline against a plain confluent-kafka loop on the same broker.

    Prints events/s (unpaced: a backlog fed as fast as one producer goes) next to the baseline's
    (a plain relay of the same payloads, pre-filled), latency percentiles at each offered load next
    to the relay's at the same load (raw produce -> score record, and -> alert record: event-to-alert),
    the max sustained rate with its latency, and the worker's memory per 10k patients. The relay runs in a process of its own, as ingest and worker do.
    """
    _check_result_path(json_path)
    _sigterm_unwinds()
    if batch:
        from benchmarks.batch import run_batch_bench

        result = run_batch_bench(events=events, patients=patients, console=console)
        _write_json(result, json_path)
        return
    from benchmarks.pipeline import run_bench

    try:
        offered = tuple(int(r) for r in rates.split(",") if r.strip())
    except ValueError:
        raise typer.BadParameter("--rates takes integers separated by commas, e.g. 1000,10000")
    if any(r < 1 for r in offered):
        raise typer.BadParameter(f"--rates {rates}: offered loads are messages/s, at least 1 each (e.g. 1000,10000)")
    result = run_bench(patients=patients, repeat=repeat, console=console, rates=offered, paced_s=paced_seconds,
                       state_patients=state_patients, find_sustained=sustained)
    _write_json(result, json_path)


@app.command(epilog="Example: wardwatch soak --events 1000000 --kills 20 --kill-ingest --json soak.json")
def soak(
    events: int = typer.Option(200_000, min=1, help="Replay at least this many canonical events"),
    kills: int = typer.Option(5, min=1, help="SIGKILL the chaos run's worker this many times (restarted after each)"),
    seed: int = typer.Option(7, help="Seed of the kill moments"),
    kill_ingest: bool = typer.Option(False, "--kill-ingest/--no-kill-ingest",
                                     help="Also SIGKILL the ingest worker at about half of the kill moments"),
    rate: Optional[float] = typer.Option(None, help="Raw messages/s fed to the shared ingest (default: the feed lasts "
                                                    "25 s per kill + 20 s)"),
    data_dir: Path = typer.Option(Path("data/soak"), help="Archives, DuckDB file and service logs (wiped first)"),
    bootstrap: Optional[str] = typer.Option(None, help="Use this Kafka instead of a fresh embedded broker"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures as JSON here"),
) -> None:
    """Chaos soak: replay through ingest + worker while SIGKILLing the worker at random moments, and
    compare with an undisturbed worker fed the same canonical stream (one ingest, its canonical
    topic mirrored record for record to the killed worker's), on the same broker.

    Checks: no alert lost, every duplicate alert identical, the accounting equation, the same
    scoring points and feature values, and nightly parity on the chaos run's archive. Exits 1 when
    any check fails (the missing ids and the log directory are printed).
    """
    from wardwatch.demo import check_wipeable
    from wardwatch.soak import SoakOptions, run_soak, write_json

    try:
        check_wipeable(data_dir.resolve())
    except ValueError as exc:
        _fail(str(exc))
    _require_bootstrap(bootstrap)
    _check_result_path(json_path)
    _sigterm_unwinds()
    figures = run_soak(SoakOptions(events=events, kills=kills, seed=seed, kill_ingest=kill_ingest, rate=rate,
                                   data_dir=data_dir, bootstrap=bootstrap), console)
    if json_path:
        write_json(figures, json_path)
        console.print(f"written to {json_path}")
    if not figures["ok"]:
        raise typer.Exit(1)


def _check_result_path(path: Optional[Path]) -> None:
    """Before a long run: a results path that cannot be written fails now (exit 2), not after the run."""
    if path is None:
        return
    from wardwatch.result_files import check_writable

    try:
        check_writable(path)
    except ValueError as exc:
        _fail(str(exc))


def _write_json(result: dict, json_path: Optional[Path]) -> None:
    if json_path:
        import orjson

        from wardwatch.result_files import write_atomically

        write_atomically(json_path, orjson.dumps(result, option=orjson.OPT_INDENT_2))
        console.print(f"written to {json_path}")


@app.command(epilog="Example: WARDWATCH_DATA_DIR=data/demo wardwatch query \"SELECT kind, count(*) FROM alerts "
                    "GROUP BY kind\" --csv")
def query(
    sql: Optional[str] = typer.Argument(None, help="SQL to run read-only; omit it for the schema summary"),
    csv: bool = typer.Option(False, "--csv", help="Print the result as CSV instead of a table"),
) -> None:
    """Query the reconciled DuckDB file (WARDWATCH_DATA_DIR/wardwatch.duckdb) read-only; without SQL, list its
    tables and views with their comments and how to open it elsewhere."""
    from batch.catalog import query_csv, query_result, schema_summary

    path = _nightly_file(_settings().duckdb_path)
    import duckdb

    if sql is None:
        try:
            summary = schema_summary(path)
        except duckdb.Error as exc:  # not DuckDB at all (a nightly file with fewer tables lists what it has)
            _fail(_unreadable(path, exc))
        console.print(summary)
        return
    if not sql.strip():
        _fail("query: no SQL given (omit the argument for the schema summary)")
    try:
        if csv:
            import sys

            sys.stdout.write(query_csv(path, sql))
            return
        columns, rows = query_result(path, sql)
    except duckdb.Error as exc:
        _fail(f"query failed: {exc}")
    if columns:
        _print_rows(columns, rows)


def _print_rows(columns: list[str], rows: list[tuple]) -> None:
    """The result as a table that shows every value as stored: cells are plain text (rich would read a value
    such as `effective[x]` as markup and drop it, `:smile:` as an emoji, and stop on `[/]`), and wrapped on
    a terminal narrower than the table, never cut to an ellipsis (an id or a time in ms cut short reads as
    another one); into a file or a pipe the table is as wide as its widest row."""
    from rich.console import Console
    from rich.table import Column, Table
    from rich.text import Text

    table = Table(*(Column(Text(name), overflow="fold") for name in columns))
    for row in rows:
        table.add_row(*(Text("" if v is None else str(v)) for v in row))
    out = console
    if not console.is_terminal:  # no terminal width to fit: rich would squeeze the table into 80 columns
        out = Console(width=Console(width=1 << 20).measure(table).maximum, highlight=False)
    out.print(table)


@app.command()
def receiver(
    host: Optional[str] = typer.Option(None, help="Bind address (default WARDWATCH_RECEIVER_HOST, 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="Port (default WARDWATCH_RECEIVER_PORT, 8081)"),
) -> None:
    """Run the rest-hook receiver: a FHIR server POSTs notifications to /fhir/notifications; each is
    stored on the notifications topic and answered 2xx only once the broker acknowledged it.

    Token, size limit, in-flight bound and ack timeout: WARDWATCH_RECEIVER_* (see wardwatch/settings.py)."""
    from streams.receiver import open_receiver_refusal, run_receiver
    from wardwatch.listen import ListenError

    settings = _settings()
    overrides = {k: v for k, v in {"receiver_host": host, "receiver_port": port}.items() if v is not None}
    settings = settings.model_copy(update=overrides)
    refusal = open_receiver_refusal(settings)
    if refusal:  # before the broker: a receiver open to anyone never starts
        _fail(refusal)
    _require_broker(settings)
    _observe("receiver")
    try:
        run_receiver(settings)
    except ListenError as exc:
        _fail(f"{exc}: set WARDWATCH_RECEIVER_PORT (or --port) to a free port (0: any), or WARDWATCH_RECEIVER_HOST "
              "(--host) to an address of this host")


class CheckSource(str, Enum):
    cdc = "cdc"
    fhir = "fhir"


@app.command(epilog="Example: wardwatch check cdc captured.jsonl | grep '\"rejected\"'  "
                    "(one message per line: a bare value, or {\"topic\", \"key\", \"value\", \"headers\"})")
def check(
    source: CheckSource = typer.Argument(..., help="Which parser: cdc (Debezium JSON) or fhir (notification Bundles)"),
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True,
                                help="Raw messages, one per line: a bare message value or an envelope object "
                                     '{"topic", "key", "value", "headers"}'),
    topic: Optional[str] = typer.Option(None, help="Topic assumed for bare lines; for CDC its last segment is the "
                                                   "table (default: ehr.public.vital_signs / ww.fhir.notifications)"),
    cdc_timezone: str = typer.Option("UTC", envvar="WARDWATCH_CDC_TIMEZONE",
                                     help="IANA zone of the database's zone-less timestamp columns, as the ingest "
                                          "reads them (default: WARDWATCH_CDC_TIMEZONE, else UTC)"),
    fhir_patient_ids_are_mrns: bool = typer.Option(
        False, envvar="WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS",
        help="The FHIR server's Patient ids are the EHR's patient keys, as the ingest's setting (default: "
             "WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS, else off: a subject named by that id alone is rejected)"),
    mrn_system: Optional[str] = typer.Option(
        None, envvar="WARDWATCH_MRN_SYSTEM",
        help="Identifier system URI of the EHR's MRN, as the ingest's setting: a subject's identifier of another "
             "system is not taken for the MRN (default: WARDWATCH_MRN_SYSTEM, else any system is)"),
) -> None:
    """Run the ingest parsers offline on FILE and print one JSON line per outcome (event, rejected,
    control, ignored) and a summary. Exit code 0 even when messages are rejected. No Kafka, no FHIR server."""
    import sys

    from wardwatch.check import check_file
    from wardwatch.settings import iana_zone, identifier_system

    try:
        iana_zone(cdc_timezone)
    except ValueError as exc:
        _fail(f"--cdc-timezone {cdc_timezone!r}: {exc}")
    if mrn_system is not None:
        try:
            identifier_system(mrn_system)
        except ValueError as exc:
            _fail(f"--mrn-system {mrn_system!r}: {exc}")
    out = sys.stdout.buffer
    check_file(source.value, file, topic, emit=lambda line: out.write(line + b"\n"), cdc_timezone=cdc_timezone,
               fhir_patient_ids_are_mrns=fhir_patient_ids_are_mrns, mrn_system=mrn_system)
    out.flush()


@app.command()
def stats(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
    timeout: float = typer.Option(15.0, help="Seconds allowed to read the stats topic to its end"),
) -> None:
    """Show the counters every service instance published to the stats topic, summed per service
    and source, and whether each source's accounting equation holds
    (messages in = canonical-producing + dead-lettered + control + ignored); and the gauges (current
    values, e.g. open gaps) of each live instance, never summed (an instance that stopped, or has not
    published for 30 s or 5 of its intervals, is left out)."""
    from streams.stats import read_stats, stats_table, summarize
    from streams.topics import topics_for

    settings = _kafka_settings()
    try:
        summary = summarize(read_stats(settings, topics_for(settings), timeout_s=timeout))
    except Exception as exc:  # KafkaException / TimeoutError: say what to check
        console.print(f"[red]could not read the stats topic:[/] {exc} (is WARDWATCH_BOOTSTRAP_SERVERS right?)")
        raise typer.Exit(1)
    if as_json:
        import orjson

        typer.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    else:
        console.print(stats_table(summary))


if __name__ == "__main__":
    app()
