"""`wardwatch demo`: the whole pipeline end to end on the embedded broker.

replay (clinosim -> Debezium CDC + FHIR notifications, with faults)
    CDC rows     -> the Debezium topics (as Debezium would produce them)
    FHIR bundles -> HTTP POST to `wardwatch receiver` (as a FHIR server's rest-hook does)
-> `wardwatch ingest` -> `wardwatch worker` (+ `wardwatch subscriptions`, the gap watcher)
-> archiver -> nightly rebuild + parity (+ retraining) -> a DuckDB file and a summary, with the
services' own counters (the stats topic) next to what the replay injected.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import duckdb
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from streams.archiver import Archiver
from streams.replay import DEFAULT_DISEASES, build_replay, generate_cohort, publish
from streams.topics import ensure_topics, topics_for
from wardwatch.broker import EmbeddedBroker
from wardwatch.procs import (check_alive, start_http_service, start_service, stop_service, wait_for_commits,
                             wait_for_group)
from wardwatch.result_files import write_atomically
from wardwatch.settings import Settings

BUNDLED_MODELS = Path(__file__).parent / "models"


@dataclass(frozen=True)
class DemoOptions:
    patients: int = 8
    seed: int = 7
    faults: bool = True
    train: bool = True
    data_dir: Path = Path("data/demo")
    cache_dir: Path = Path("data/cache")
    bootstrap: str | None = None  # an existing broker instead of the embedded one
    timeout_s: float = 150.0
    # A live EHR emits changes as they happen; replaying days of data in a burst would turn every
    # poll batch into hours of event time. Pacing keeps arrival order close to emission order: at
    # 1000 msg/s a millisecond is minutes of event time, and the ingest reading one raw partition
    # ~80 ms behind another (a patient's CDC rows are keyed by row id, so spread over partitions)
    # made ~45 extra rows late in about half the runs; at 250 msg/s that needs a 300+ ms skew.
    rate: float = 250.0
    diseases: tuple[str, ...] = DEFAULT_DISEASES  # "name[:severity]" clinosim runs (batch/dataset.py widens the mix)


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def seed_models(model_dir: Path) -> None:
    """The demo scores with the model shipped in the package until its own nightly trains one."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    if BUNDLED_MODELS.exists():
        shutil.copytree(BUNDLED_MODELS, model_dir)
    else:
        model_dir.mkdir(parents=True)


def _wait_for_receiver(url: str, proc, logs: Path, deadline: float) -> None:
    import httpx

    while True:
        check_alive({"receiver": proc}, logs)
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the receiver did not become ready: see {logs}/receiver.log")
        time.sleep(0.2)


def _poller(archiver: Archiver, *, every_s: float) -> Callable[[], None]:
    """A callable that polls the archiver (without waiting) at most every `every_s`. The replay's
    publish calls it: an archiver left unpolled for longer than max.poll.interval.ms (300 s; a slow
    machine, a bigger --patients) is dropped from its group by librdkafka and has to rejoin."""
    last = time.monotonic()

    def poll() -> None:
        nonlocal last
        if time.monotonic() - last >= every_s:
            archiver.poll_once(timeout_s=0)
            last = time.monotonic()

    return poll


def _wait_for_quiet(archiver: Archiver, *, quiet_s: float, deadline: float, topics: set[str] | None = None) -> None:
    """Consume until nothing new arrived (on `topics`, default all) for quiet_s."""
    def seen():
        return {tp: n for tp, n in archiver.seen_offsets.items() if topics is None or tp[0] in topics}

    last, last_change = seen(), time.monotonic()
    while time.monotonic() - last_change < quiet_s:
        if time.monotonic() >= deadline:
            raise TimeoutError("the stream did not finish before the demo's deadline")
        archiver.poll_once(timeout_s=0.2)
        if (now := seen()) != last:
            last, last_change = now, time.monotonic()


def _wait_until_processed(settings: Settings, archiver: Archiver, raw_end_offsets: dict, procs: dict,
                          logs: Path, deadline: float) -> dict[str, int]:
    """Wait on the pipeline's own progress, not on a timer:
    1. the ingest group has committed every raw message (so every canonical batch and dead letter
       is written), 2. the archiver has read the canonical topic to its end, 3. the worker group
    has committed all of it (its outputs are flushed before it commits), 4. the archiver has read
    those outputs."""
    canonical = topics_for(settings).canonical

    def keep_consuming() -> None:
        check_alive(procs, logs)
        archiver.poll_once(timeout_s=0.2)

    wait_for_commits(settings, f"{settings.group_prefix}-ingest", raw_end_offsets, deadline=deadline,
                     on_wait=keep_consuming)
    _wait_for_quiet(archiver, quiet_s=1.0, deadline=deadline, topics={canonical})  # nothing new is coming
    canonical_ends = {tp: n for tp, n in archiver.seen_offsets.items() if tp[0] == canonical}
    wait_for_commits(settings, f"{settings.group_prefix}-worker", canonical_ends, deadline=deadline,
                     on_wait=keep_consuming)
    _wait_for_quiet(archiver, quiet_s=1.0, deadline=deadline)
    archiver.flush()
    return dict(archiver.consumed)


# written into every run's data directory: a directory holding it is a run's, and the next run wipes it
RUN_MARK = ".wardwatch-run"


def check_wipeable(data_dir: Path) -> None:
    """Refuse to wipe a directory that is neither empty nor an earlier run's (`--out .`, a home
    directory, `data` with the clinosim cache in it, a deployment's data directory with its archive and
    DuckDB file): ValueError naming it. Only RUN_MARK makes a directory a run's: what a run leaves
    (archive/, wardwatch.duckdb) is also what a live deployment holds."""
    if not data_dir.exists():
        return
    if not data_dir.is_dir():
        raise ValueError(f"{data_dir} is a file, not a directory: choose a new or empty directory")
    entries = {p.name for p in data_dir.iterdir()}
    if entries and RUN_MARK not in entries:
        raise ValueError(f"refusing to wipe {data_dir}: it is not empty and is not an earlier run's (no {RUN_MARK}; "
                         f"it holds {len(entries)} entries); choose a new or empty directory, or delete it yourself "
                         "if it is a run's from before wardwatch marked them")


def start_run_dir(data_dir: Path) -> None:
    """Wipe an earlier run's directory (check_wipeable first) and mark the new one as a run's."""
    check_wipeable(data_dir)
    if data_dir.exists():
        shutil.rmtree(data_dir)
    (data_dir / "logs").mkdir(parents=True)
    (data_dir / RUN_MARK).write_text("a wardwatch run's directory: the next demo, batch dataset or soak wipes it\n")


def run_demo(opts: DemoOptions, console: Console | None = None) -> dict:
    console = console or Console()
    started = time.monotonic()
    data_dir = opts.data_dir.resolve()
    start_run_dir(data_dir)  # a demo run starts clean: its DuckDB reflects this run only
    with ExitStack() as stack, _progress(console) as progress:
        step = progress.add_task("starting the embedded Kafka broker (Tansu)", total=None)
        if opts.bootstrap:
            bootstrap = opts.bootstrap
        else:
            broker = stack.enter_context(EmbeddedBroker.start(log_path=data_dir / "logs" / "broker.log"))
            bootstrap = broker.bootstrap
        settings = Settings(bootstrap_servers=bootstrap, data_dir=data_dir, model_dir=data_dir / "models",
                            topic_prefix="demo", cdc_topic_prefix="demo.ehr.public", group_prefix="demo",
                            receiver_port=0)  # any free port: the receiver binds it and logs which
        seed_models(settings.model_dir)
        topics = topics_for(settings)
        ensure_topics(settings, topics)
        progress.update(step, total=1, completed=1)

        step = progress.add_task(f"generating {opts.patients} patients with clinosim (cached)", total=None)
        cohort = generate_cohort(opts.cache_dir.resolve(), patients=opts.patients, seed=opts.seed,
                                 diseases=opts.diseases)
        replay = build_replay(cohort, faults=opts.faults, seed=opts.seed,
                              allowed_lateness_s=settings.allowed_lateness_s,
                              late_by_s=settings.allowed_lateness_s + 4 * 3600)
        progress.update(step, total=1, completed=1)

        step = progress.add_task("starting receiver, ingest, patient worker and subscription watcher", total=None)
        logs = data_dir / "logs"
        services = {}
        for name in ("ingest", "worker", "subscriptions"):
            services[name] = start_service([name], settings, logs / f"{name}.log")
            stack.callback(stop_service, services[name])
        services["receiver"], receiver_port = start_http_service(["receiver"], settings, logs / "receiver.log")
        stack.callback(stop_service, services["receiver"])
        ingest, worker = services["ingest"], services["worker"]
        receiver_url = f"http://{settings.receiver_host}:{receiver_port}"
        archiver = Archiver(settings, topics, flush_interval_s=2.0)
        stack.callback(archiver.close)
        # replay only once both consumer groups have their partitions: a live feed starts mid-stream
        wait_for_group(settings, f"{settings.group_prefix}-ingest", alive=ingest)
        wait_for_group(settings, f"{settings.group_prefix}-worker", alive=worker)
        _wait_for_receiver(receiver_url, services["receiver"], logs, started + opts.timeout_s)
        while not archiver.assigned.is_set():  # its group must own the output partitions before they fill
            if time.monotonic() >= started + opts.timeout_s:
                raise TimeoutError("the archiver got no partitions before the demo's deadline")
            archiver.poll_once(timeout_s=0.2)
        progress.update(step, total=1, completed=1)

        import httpx

        from streams.receiver import post_notification

        n = len(replay.messages)
        step = progress.add_task("replaying CDC rows + POSTing FHIR notifications", total=n)
        keep_archiving = _poller(archiver, every_s=1.0)

        def on_published(done: int) -> None:
            progress.update(step, completed=done)
            keep_archiving()

        with httpx.Client(timeout=30) as http:
            published = publish(replay, settings, topics, rate=opts.rate, progress=on_published,
                                post_fhir=lambda body: post_notification(http, f"{receiver_url}/fhir/notifications",
                                                                         body))

        step = progress.add_task("waiting for the stream to process everything", total=None)
        consumed = _wait_until_processed(settings, archiver, published["end_offsets"], services, logs,
                                         started + opts.timeout_s)
        progress.update(step, total=1, completed=1)
        for name in ("subscriptions", "worker", "ingest", "receiver"):  # each publishes its final counters
            stop_service(services[name])
        from streams.stats import read_stats, summarize as summarize_stats

        stats = summarize_stats(read_stats(settings, topics, timeout_s=30))

        step = progress.add_task("nightly rebuild + parity (DuckDB/Polars)", total=None)
        from batch.nightly import run_nightly

        nightly = run_nightly(settings)
        progress.update(step, total=1, completed=1)
        card = None
        if opts.train:
            step = progress.add_task("retraining the model on the rebuilt state", total=None)
            from batch.retrain import retrain

            try:
                card = retrain(settings, promote_if_none=False)
            except ValueError as exc:  # e.g. a tiny cohort with a single label class
                console.print(f"[yellow]retraining skipped: {exc}[/]")
            progress.update(step, total=1, completed=1)

    summary = summarize(settings, replay.manifest, nightly, consumed, card, time.monotonic() - started)
    summary["service_counters"] = stats
    summary["accounting_ok"] = stats["balanced"]
    _print_summary(console, summary)
    return summary


def summarize(settings: Settings, manifest: dict, nightly: dict, consumed: dict, card: dict | None,
              seconds: float) -> dict:
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        def one(sql: str) -> int:
            return int(con.execute(sql).fetchone()[0] or 0)

        canonical = one("SELECT count(*) FROM canonical_events")
        duplicates = one("SELECT count(*) FROM canonical_events WHERE outcome = 'duplicate'")
        summary = {
            "events_in": manifest["messages"],
            "events_canonical": canonical,
            "dead_lettered": one("SELECT count(*) FROM dead_letters"),
            "duplicates_dropped": duplicates,
            "late_events": one("SELECT count(*) FROM late_events"),
            "scores": one("SELECT count(*) FROM scores"),
            "alerts": one("SELECT count(*) FROM alerts"),
            "patients": one("SELECT count(DISTINCT patient_id) FROM canonical_events"),
        }
    parity = nightly.get("parity", {})
    summary.update({
        "parity_checked": int(parity.get("values_checked", 0)),
        "parity_points": int(parity.get("points_checked", 0)),
        "parity_mismatched": int(parity.get("mismatched", 0)),
        "parity_ok": bool(nightly.get("parity_ok")),
        "late_injected": len(manifest.get("late_fact_ids", [])),
        "late_injected_fact_ids": sorted(manifest.get("late_fact_ids", [])),
        "faults": manifest.get("fault_counts", {}),
        "model_trained": card["version"] if card else None,
        "model_auroc": (card or {}).get("metrics", {}).get("model", {}).get("auroc"),
        "archived_records": consumed,
        "duckdb_path": str(settings.duckdb_path),
        "model_dir": str(settings.model_dir),
        "seconds": round(seconds, 1),
    })
    return summary


def _print_summary(console: Console, s: dict) -> None:
    t = Table(title="wardwatch demo", show_header=False)
    for k in ("events_in", "events_canonical", "dead_lettered", "duplicates_dropped", "late_events", "scores",
              "alerts", "parity_checked", "parity_mismatched", "model_trained", "duckdb_path", "seconds"):
        t.add_row(k, str(s[k]))
    console.print(t)
    ingest = s.get("service_counters", {}).get("services", {}).get("ingest", {}).get("counters", {})
    for source in ("cdc", "fhir"):
        c = ingest.get(source)
        if c:
            console.print(f"ingest {source}: {c['messages_in']} messages in = {c['messages_parsed']} with events "
                          f"+ {sum(c['dead_lettered'].values())} dead-lettered + {sum(c['control'].values())} control "
                          f"+ {sum(c['ignored'].values())} ignored -> {c['events_out']} canonical events")
    if "accounting_ok" in s:
        console.print("[green]accounting OK[/]: every raw message is accounted for" if s["accounting_ok"]
                      else "[red]accounting FAILED[/]: see `wardwatch stats`")
    verdict = "[green]parity OK[/]" if s["parity_ok"] else "[red]parity FAILED[/]"
    console.print(f"{verdict}: {s['parity_points']} scoring points, {s['parity_checked']} feature values compared.")
    # `wardwatch query` reads WARDWATCH_DATA_DIR (default data/), not the demo's directory
    console.print(f"Open the database: `WARDWATCH_DATA_DIR={Path(s['duckdb_path']).parent} wardwatch query` "
                  f"(or duckdb -readonly {s['duckdb_path']})", highlight=False, soft_wrap=True)
    # the model commands read WARDWATCH_MODEL_DIR (default models/), not the demo's registry
    if s.get("model_dir"):
        console.print(f"Its models: `WARDWATCH_MODEL_DIR={s['model_dir']} wardwatch model list` (also for "
                      "`batch train`, `model promote`)", highlight=False, soft_wrap=True)


def write_summary(summary: dict, path: Path) -> None:
    write_atomically(path, orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
