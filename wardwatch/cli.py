"""The thin `wardwatch` CLI: every service and job of the pipeline is a subcommand."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from wardwatch.settings import Settings, load_settings

app = typer.Typer(help="wardwatch: streaming early-warning pipeline for hospital wards.", no_args_is_help=True,
                  add_completion=False)
batch_app = typer.Typer(help="The offline plane: nightly rebuild, parity, retraining.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")
console = Console()


def _settings() -> Settings:
    try:
        return load_settings()
    except Exception as exc:  # pydantic ValidationError: say which variable is wrong
        console.print(f"[red]invalid WARDWATCH_* settings:[/] {exc}")
        raise typer.Exit(2)


def _run_until_signal(run) -> None:
    """Run a blocking `run(stop)` loop; SIGTERM/SIGINT set `stop` so it finishes cleanly."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(stop)


@app.command()
def demo(
    patients: int = typer.Option(8, help="Patients to generate with clinosim"),
    seed: int = typer.Option(7, help="Seed for the cohort and the injected faults"),
    faults: bool = typer.Option(True, help="Inject realistic faults (duplicates, late, amendments, ...)"),
    train: bool = typer.Option(True, help="Retrain a model on the rebuilt state at the end"),
    data_dir: Path = typer.Option(Path("data/demo"), help="Where the archive, DuckDB file and logs go (wiped first)"),
    summary_json: Optional[Path] = typer.Option(None, help="Also write the summary as JSON to this path"),
    bootstrap: Optional[str] = typer.Option(None, help="Use this Kafka instead of the embedded broker"),
) -> None:
    """Run the whole pipeline end to end on the embedded broker and print a summary."""
    from wardwatch.demo import DemoOptions, run_demo, write_summary

    summary = run_demo(DemoOptions(patients=patients, seed=seed, faults=faults, train=train, data_dir=data_dir,
                                   bootstrap=bootstrap), console)
    if summary_json:
        write_summary(summary, summary_json)
        console.print(f"summary written to {summary_json}")
    if not summary["parity_ok"]:
        raise typer.Exit(1)


@app.command()
def ingest() -> None:
    """Run the ingest worker: raw CDC + FHIR topics -> canonical micro-batches + dead letters."""
    from streams.ingest import run_ingest

    logging.basicConfig(level=logging.WARNING)
    settings = _settings()
    _run_until_signal(lambda stop: run_ingest(settings, stop))


@app.command()
def worker(loglevel: str = typer.Option("WARN", help="faust log level")) -> None:
    """Run the faust worker: per-patient state, features, scoring, alerts."""
    from streams.app import run_worker

    run_worker(_settings(), loglevel=loglevel)


@app.command()
def archiver() -> None:
    """Run the archiver: output topics -> Parquet under the data directory."""
    from streams.archiver import Archiver
    from streams.topics import ensure_topics, topics_for

    logging.basicConfig(level=logging.WARNING)
    settings = _settings()
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    _run_until_signal(lambda stop: Archiver(settings, topics).run(stop))


@app.command()
def broker(port: int = typer.Option(9092, help="Port on 127.0.0.1")) -> None:
    """Run the embedded Tansu broker in the foreground (Ctrl-C stops it)."""
    from wardwatch.broker import EmbeddedBroker

    with EmbeddedBroker.start(port=port) as b:
        console.print(f"Kafka-protocol broker on {b.bootstrap} (memory storage). Ctrl-C to stop.")
        _run_until_signal(lambda stop: stop.wait())


@batch_app.command("nightly")
def batch_nightly(full: bool = typer.Option(True, help="Rebuild everything (default) or only recent days")) -> None:
    """Rebuild the DuckDB file from the archive, recompute features offline and check parity."""
    from batch.nightly import run_nightly

    settings = _settings()
    with console.status("nightly rebuild"):
        result = run_nightly(settings, full=full, progress=lambda step: console.log(step))
    p = result["parity"]
    console.print(f"{result['duckdb_path']}: {p['points_checked']} scoring points, {p['values_checked']} values, "
                  f"{p['mismatched']} mismatched")
    if not result["parity_ok"]:
        raise typer.Exit(1)


@batch_app.command("train")
def batch_train(version: Optional[str] = typer.Option(None, help="Version name (default: a timestamp)"),
                promote_if_none: bool = typer.Option(True, help="Make it current when no model is current")) -> None:
    """Train a model from the rebuilt DuckDB file into the model registry."""
    from batch.retrain import retrain

    card = retrain(_settings(), version=version, promote_if_none=promote_if_none)
    console.print_json(data={k: card[k] for k in ("version", "metrics", "promoted")})


@app.command()
def bench(
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here"),
    patients: int = typer.Option(8, help="Patients in the replayed cohort"),
    repeat: int = typer.Option(10, help="Replay the cohort this many times (fresh patient ids each time)"),
    rates: str = typer.Option("1000,10000", help="Offered loads (raw msg/s) for the latency phases, comma-separated; "
                                                 "empty for none"),
    paced_seconds: float = typer.Option(10.0, help="Length of each paced latency phase (seconds)"),
) -> None:
    """Measure the pipeline against a plain confluent-kafka loop on the same broker.

    Prints events/s (unpaced, as fast as one producer feeds) next to the baseline, latency
    percentiles at each offered load, and the worker's memory per 10k patients.
    """
    from benchmarks.pipeline import run_bench

    try:
        offered = tuple(int(r) for r in rates.split(",") if r.strip())
    except ValueError:
        raise typer.BadParameter("--rates takes integers separated by commas, e.g. 1000,10000")
    result = run_bench(patients=patients, repeat=repeat, console=console, rates=offered, paced_s=paced_seconds)
    if json_path:
        import orjson

        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        console.print(f"written to {json_path}")


@app.command()
def query() -> None:
    """Open the reconciled DuckDB file (prints how when the duckdb CLI is not installed)."""
    import shutil
    import subprocess

    path = _settings().duckdb_path
    if not path.exists():
        console.print(f"[red]{path} does not exist:[/] run `wardwatch batch nightly` (or `wardwatch demo`) first")
        raise typer.Exit(1)
    exe = shutil.which("duckdb")
    if exe:
        raise typer.Exit(subprocess.call([exe, "-readonly", str(path)]))
    console.print(f"python -c \"import duckdb; con = duckdb.connect('{path}', read_only=True); "
                  f"print(con.sql('SHOW TABLES'))\"")


if __name__ == "__main__":
    app()
