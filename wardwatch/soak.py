"""`wardwatch soak`: the chaos check of issue #8, on the embedded broker.

Two pipelines on one broker, each with its own topics and consumer groups, fed the same replay at
the same pace, side by side:

    replay (a clinosim cohort, no injected faults, repeated with fresh patient ids until it makes
    at least `events` canonical events; benchmarks.pipeline.repeated)
      -> reference  `wardwatch ingest` + `wardwatch worker` + archiver, never disturbed
      -> chaos      the same, but the worker is SIGKILLed at random moments (seeded) and restarted,
                    optionally the ingest worker too

Afterwards the chaos run must match the reference:
    1. no alert lost        the chaos run's alert ids == the reference's
    2. duplicates identical every alert id delivered more than once carries one identical record
    3. accounting           per source, raw messages in == parsed + dead-lettered + control + ignored
                            (the services' own counters, streams.stats), every raw message was read,
                            and the worker's table applied every canonical offset
    4. same scoring         the same snapshot ids, and the same feature values at each of them
    5. parity               the nightly rebuild (batch.nightly.run_nightly) of the chaos run's archive
                            passes parity

The feed is paced (a live stream, not a backlog) and lasts long enough for every kill and its
restart to land while data is still flowing: each kill falls at a random moment of its own slice of
the feed. A restart after SIGKILL takes ~15 s here (6 s of it the dead member's session timeout).
"""

from __future__ import annotations

import random
import shutil
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from benchmarks.pipeline import id_pattern, repeated
from streams.archiver import Archiver, part_files
from streams.replay import RawMessage, Replay, build_replay, generate_cohort, load_patient_refs, publish
from streams.topics import Topics, ensure_topics, topics_for
from wardwatch.broker import EmbeddedBroker
from wardwatch.demo import _wait_for_quiet, seed_models
from wardwatch.procs import (committed_offsets, kill_service, start_service, stop_service,
                             total_committed, wait_for_commits, wait_for_group)
from wardwatch.settings import Settings
from wardwatch.worker_results import Results, collect_results, recovery_seconds

SLOT_S = 25.0  # feed time per kill: a SIGKILL restart (~15 s) plus room for the random moment
TAIL_S = 20.0  # feed time after the last kill's slice: the last restart catches up while data flows
COMMIT_WAIT_S = 90.0  # after the canonical topic is complete, how long the worker may take to commit it
POLL_S = 0.5  # how often progress is read from the broker (each read is a new admin client)
SHOW_IDS = 20  # how many missing / extra ids a failed check prints


@dataclass(frozen=True)
class SoakOptions:
    events: int = 200_000  # at least this many canonical events
    kills: int = 5  # worker SIGKILLs
    seed: int = 7  # kill moments (and which of them also hit ingest)
    kill_ingest: bool = False  # also SIGKILL the ingest worker at about half of the kill moments
    patients: int = 30  # the clinosim cohort one copy of the replay comes from
    cohort_seed: int = 11
    rate: float | None = None  # raw messages/s per pipeline; None: the feed lasts kills * SLOT_S + TAIL_S
    data_dir: Path = Path("data/soak")
    cache_dir: Path = Path("data/cache")
    bootstrap: str | None = None  # an existing broker instead of a fresh embedded one
    timeout_s: float = 1800.0


@dataclass
class _Feed:
    """A replay published in a background thread (streams.replay.publish), progress readable."""

    settings: Settings
    topics: Topics
    messages: list[RawMessage]
    rate: float | None
    sent: int = 0
    result: dict | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> "_Feed":
        def run() -> None:
            try:
                self.result = publish(Replay(self.messages, {}), self.settings, self.topics, rate=self.rate,
                                      progress=lambda n: setattr(self, "sent", n))
            except BaseException as exc:  # handed over by join()
                self.error = exc

        self.thread = threading.Thread(target=run, name=f"feed-{self.settings.topic_prefix}", daemon=True)
        self.thread.start()
        return self

    @property
    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def join(self, deadline: float) -> dict:
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            raise TimeoutError(f"publishing {len(self.messages):,} raw messages did not finish in time")
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class _Run:
    """One pipeline: ingest + worker child processes (restartable) and an in-process archiver."""

    name: str
    settings: Settings
    logs: Path
    procs: dict = field(default_factory=dict)
    starts: dict = field(default_factory=dict)  # service -> how many times started
    unplanned: dict = field(default_factory=dict)  # service -> restarts after it exited on its own
    archiver: Archiver | None = None

    @property
    def topics(self) -> Topics:
        return topics_for(self.settings)

    def group(self, service: str) -> str:
        return f"{self.settings.group_prefix}-{service}"

    def start(self, service: str) -> None:
        n = self.starts.get(service, 0)
        self.starts[service] = n + 1
        command = [service, "--loglevel", "INFO"] if service == "worker" else [service]  # INFO: recovery times
        self.procs[service] = start_service(command, self.settings, self.log_path(service, n))

    def log_path(self, service: str, n: int) -> Path:
        return self.logs / (f"{service}.log" if n == 0 else f"{service}-{n}.log")

    def open(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        ensure_topics(self.settings, self.topics)
        for service in ("ingest", "worker"):
            self.start(service)
        self.archiver = Archiver(self.settings, self.topics, flush_interval_s=2.0)

    def wait_ready(self, deadline: float) -> None:
        """Consumer groups joined and the archiver owns its partitions: the feed can start."""
        for service, proc in self.procs.items():
            wait_for_group(self.settings, self.group(service), timeout_s=max(1.0, deadline - time.monotonic()),
                           alive=proc)
        while not self.archiver.assigned.is_set():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {self.name} archiver got no partitions in time")
            self.archiver.poll_once(timeout_s=0.2)

    def poll(self) -> None:
        # a supervisor's semantics (compose: restart: unless-stopped): a service that exited on its
        # own (the worker exits 70 on a failure it cannot recover in place) is restarted and counted
        for service, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self.unplanned[service] = self.unplanned.get(service, 0) + 1
                self.start(service)
        self.archiver.poll_once(timeout_s=0.05)

    def close(self) -> None:
        """SIGTERM the services (they publish their final counters), then close the archiver."""
        for proc in self.procs.values():
            stop_service(proc)
        if self.archiver is not None:
            self.archiver.close()
            self.archiver = None


# --- pure helpers ---------------------------------------------------------------------------------


def events_in(messages: list[RawMessage], topics: Topics, settings: Settings) -> int:
    """How many canonical events the ingest parsers make of `messages` (offline)."""
    from schemas.cdc import parse_cdc
    from schemas.fhir import parse_notification
    from schemas.ingest_outcome import Parsed

    n = 0
    for m in messages:
        if m.kind == "cdc":
            outcome = parse_cdc(topics.cdc[m.table], m.key, m.value, partition=-1, offset=-1,
                                cdc_topic_prefix=settings.cdc_topic_prefix)
        else:
            outcome = parse_notification(m.value, topic=topics.fhir, partition=-1, offset=-1)
        if isinstance(outcome, Parsed):
            n += len(outcome.events)
    return n


def kill_moments(kills: int, seed: int) -> list[float]:
    """Fractions of the feed at which to kill: one random moment in each of `kills` equal slices of
    the first part of the feed (the rest is the tail), so kills spread over the stream."""
    rng = random.Random(seed)
    return [(k + rng.uniform(0.1, 0.9)) / (kills + 1) for k in range(kills)]


def feature_values(records: dict[str, set[bytes]]) -> dict[str, dict]:
    """snapshot id -> feature values (positions left out: they are Kafka offsets, which differ per run)."""
    return {sid: orjson.loads(next(iter(values)))["features"] for sid, values in records.items()}


def visible_events(archive_dir: Path) -> dict[str, int]:
    """snapshot id -> a fingerprint of the set of events its patient had when the point was taken.

    Each run has its own ingest worker, and the order in which it reads the CDC and the FHIR topics
    depends on timing: a lab result can reach the worker before a vitals set in one run and after it
    in the other. The features at that point then differ, rightly. Points whose inputs are the same
    set in both runs must have the same features; this tells the two apart."""
    import polars as pl

    def read(kind: str, columns: list[str]) -> pl.DataFrame:
        files = part_files(archive_dir, kind)
        return pl.concat([pl.read_parquet(f, columns=columns) for f in files], how="vertical") if files else None

    events = read("canonical", ["patient_id", "event_id", "offset", "idx"])
    points = read("features", ["snapshot_id", "patient_id", "offset", "idx"])
    if events is None or points is None:
        return {}
    position = (pl.col("offset") * 1_000_000 + pl.col("idx")).alias("position")  # one partition per patient
    events = (events.unique(["offset", "idx", "patient_id"]).with_columns(position).sort("patient_id", "position")
              .unique(["patient_id", "event_id"], keep="first", maintain_order=True)  # a re-emission adds nothing
              .with_columns((pl.col("event_id").hash() % (1 << 40)).cast(pl.Int64).cum_sum().over("patient_id")
                            .alias("fingerprint"))
              .select("patient_id", "position", "fingerprint"))
    points = points.unique("snapshot_id").with_columns(position).sort("position")
    joined = points.join_asof(events.sort("position"), on="position", by="patient_id", strategy="backward",
                              check_sortedness=False)  # sorted per patient, which is what "by" needs
    return dict(zip(joined["snapshot_id"].to_list(), joined["fingerprint"].fill_null(0).to_list()))


def compare(ref: Results, got: Results, ref_inputs: dict[str, int] | None = None,
            got_inputs: dict[str, int] | None = None) -> dict:
    """Checks 1, 2 and 4: alerts, duplicates and scoring of the chaos run against the reference.
    `*_inputs` (visible_events): a feature difference at a point whose inputs differ is arrival
    order, counted apart; one with the same inputs is a failure."""
    missing, extra = sorted(set(ref.alerts) - set(got.alerts)), sorted(set(got.alerts) - set(ref.alerts))
    differing = sorted(i for i, values in got.alerts.items() if len(values) > 1)
    ref_points, got_points = feature_values(ref.features), feature_values(got.features)
    differ = sorted(s for s in set(ref_points) & set(got_points) if ref_points[s] != got_points[s])
    same_inputs = (lambda s: ref_inputs.get(s) == got_inputs.get(s)) if ref_inputs and got_inputs else (lambda s: True)
    mismatched = [s for s in differ if same_inputs(s)]
    return {
        "alerts": len(ref.alerts),
        "alerts_lost": len(missing), "alerts_missing_ids": missing, "alerts_extra_ids": extra,
        "alerts_delivered": sum(got.records_per_id.values()),
        "duplicates_delivered": sum(n - 1 for n in got.records_per_id.values()),
        "duplicate_alert_ids": sum(1 for n in got.records_per_id.values() if n > 1),
        "duplicates_differing_ids": differing + [i for i in got.differing_repeats() if i not in got.alerts],
        "snapshots": len(ref_points),
        "snapshots_missing_ids": sorted(set(ref_points) - set(got_points)),
        "snapshots_extra_ids": sorted(set(got_points) - set(ref_points)),
        "scores_missing": len(set(ref.scores) - set(got.scores)), "scores_extra": len(set(got.scores) - set(ref.scores)),
        "feature_values_compared": sum(len(ref_points[s]) for s in set(ref_points) & set(got_points)),
        "feature_mismatch_ids": mismatched,
        "feature_differences_from_arrival_order": len(differ) - len(mismatched),
        "points_with_other_inputs": sum(1 for s in set(ref_points) & set(got_points) if not same_inputs(s)),
    }


def accounting(stats: dict, published: dict, canonical_ends: dict[int, int], applied: dict[int, int],
               committed: dict[int, int], *, ingest_killed: bool) -> dict:
    """Check 3 for one run: counters balance per source, every raw message was read (exactly once
    unless ingest was killed: a SIGKILLed ingest re-reads its last uncommitted batch), the worker's
    table applied every canonical offset (its next-offset markers) and the worker group committed
    every one of them."""
    ingest = stats.get("services", {}).get("ingest", {}).get("counters", {})
    read = {s: ingest.get(s, {}).get("messages_in", 0) for s in ("cdc", "fhir")}
    all_read = all((read[s] >= published[s]) if ingest_killed else (read[s] == published[s]) for s in read)
    return {
        "balanced": bool(stats.get("balanced")),
        "messages_published": {s: published[s] for s in ("cdc", "fhir")},
        "messages_in": read,
        "all_read": all_read,
        "canonical_events": sum(ingest.get(s, {}).get("events_out", 0) for s in ("cdc", "fhir")),
        "canonical_messages": sum(canonical_ends.values()),
        "canonical_unapplied": {str(p): end - applied.get(p, 0) for p, end in sorted(canonical_ends.items())
                                if applied.get(p, 0) != end},
        "canonical_uncommitted": {str(p): end - max(committed.get(p, 0), 0)
                                  for p, end in sorted(canonical_ends.items()) if committed.get(p, 0) != end},
    }


# --- the run ----------------------------------------------------------------------------------------


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


@contextmanager
def _step(progress: Progress, description: str):
    """A progress line for a step without a count (one live display: no console.status inside)."""
    task = progress.add_task(description, total=None)
    yield
    progress.update(task, total=1, completed=1)


def _settings(bootstrap: str, data_dir: Path, run: str, suffix: str, model_dir: Path) -> Settings:
    prefix = f"soak{run}{suffix}"
    return Settings(bootstrap_servers=bootstrap, data_dir=data_dir / suffix, model_dir=model_dir,
                    topic_prefix=prefix, cdc_topic_prefix=f"{prefix}.ehr.public", group_prefix=prefix,
                    stats_interval_s=1.0)


def _replay(opts: SoakOptions, settings: Settings) -> tuple[list[RawMessage], int]:
    """Copies of the cohort's replay (fresh patient ids each) until they make >= opts.events events."""
    cohort = generate_cohort(opts.cache_dir.resolve(), patients=opts.patients, seed=opts.cohort_seed)
    replay = build_replay(cohort, faults=False, seed=opts.cohort_seed, allowed_lateness_s=settings.allowed_lateness_s,
                          late_by_s=settings.allowed_lateness_s + 4 * 3600)
    mrns = replay.manifest["patients"]
    refs = load_patient_refs(cohort)
    pattern = id_pattern([*mrns, *(refs[m].removeprefix("Patient/") for m in mrns if m in refs)])
    per_copy = events_in(replay.messages, topics_for(settings), settings)
    copies = max(1, -(-opts.events // per_copy))  # ceiling
    return interleaved(repeated(replay.messages, pattern, copies), copies), copies


def interleaved(messages: list[RawMessage], copies: int) -> list[RawMessage]:
    """Back-to-back copies merged round-robin, each copy's own order kept: every patient's stay then
    spans the whole feed instead of a few seconds of it. Back to back, 13 days of a copy pass in ~2 s,
    so 100 ms of skew between the raw topics (two ingest runs never read them in the same order) is a
    day of event time, and lateness, scoring and alerts would differ between the runs for timing
    reasons alone."""
    size = len(messages) // copies
    parts = [messages[i * size:(i + 1) * size] for i in range(copies)]
    out = [m for group in zip(*parts) for m in group]
    return out + messages[copies * size:]  # nothing is left over when the copies are equal


def run_soak(opts: SoakOptions, console: Console | None = None) -> dict:
    """Run the reference and the chaos pipeline, compare them, print a table; returns the figures
    (`ok` is True when all five checks pass)."""
    console = console or Console()
    started = time.monotonic()
    deadline = started + opts.timeout_s
    data_dir = opts.data_dir.resolve()
    if data_dir.exists():
        shutil.rmtree(data_dir)  # each soak starts clean: its archive and logs are this run's only
    (data_dir / "logs").mkdir(parents=True)
    phases: dict[str, float] = {}
    mark = [time.monotonic()]

    def phase(name: str) -> None:
        now = time.monotonic()
        phases[name] = round(now - mark[0], 1)
        mark[0] = now

    with ExitStack() as stack, _progress(console) as progress:
        if opts.bootstrap:
            bootstrap = opts.bootstrap
        else:
            with _step(progress, "starting the embedded Kafka broker"):
                broker = stack.enter_context(EmbeddedBroker.start(log_path=data_dir / "logs" / "broker.log"))
            bootstrap = broker.bootstrap
        run_id = uuid.uuid4().hex[:6]  # fresh topics and groups, even on a shared broker
        model_dir = data_dir / "models"
        seed_models(model_dir)
        ref = _Run("reference", _settings(bootstrap, data_dir, run_id, "r", model_dir), data_dir / "logs" / "reference")
        chaos = _Run("chaos", _settings(bootstrap, data_dir, run_id, "k", model_dir), data_dir / "logs" / "chaos")

        with _step(progress, f"building a replay of at least {opts.events:,} canonical events"):
            messages, copies = _replay(opts, ref.settings)
        feed_s = opts.kills * SLOT_S + TAIL_S
        rate = opts.rate or len(messages) / feed_s
        console.log(f"replay: {copies} copies of a {opts.patients}-patient cohort = {len(messages):,} raw messages, "
                    f"fed at {rate:,.0f}/s to each pipeline (~{len(messages) / rate:,.0f} s)")
        phase("replay")

        with _step(progress, "starting ingest, worker and archiver for the reference and the chaos run"):
            for run in (ref, chaos):
                stack.callback(run.close)
                run.open()
            for run in (ref, chaos):
                run.wait_ready(deadline)
        phase("start")

        feeds = {run.name: _Feed(run.settings, run.topics, messages, rate).start() for run in (ref, chaos)}
        tasks = {name: progress.add_task(f"{name} feed", total=len(messages)) for name in feeds}
        kill_task = progress.add_task(f"worker kills (seed {opts.seed})", total=opts.kills)

        def tick() -> None:
            """Between checks: keep archiving, fail fast on a dead service, show progress."""
            for run in (ref, chaos):
                run.poll()
            for name, feed in feeds.items():
                progress.update(tasks[name], completed=feed.sent)
                if feed.error is not None:
                    raise feed.error

        kills = _chaos(chaos, feeds["chaos"], opts, rate, deadline, tick, progress, kill_task, console)
        phase("feed_and_kills")

        published, canonical_ends, committed = {}, {}, {}
        with _step(progress, "waiting for both pipelines to process everything"):
            for run in (ref, chaos):
                published[run.name] = feeds[run.name].join(deadline)
                progress.update(tasks[run.name], completed=len(messages))
            for run in (ref, chaos):
                canonical_ends[run.name] = _drain(run, published[run.name]["end_offsets"], deadline, console)
        for run in (ref, chaos):
            run.close()  # SIGTERM: each service publishes its final counters (and commits what it can)
            committed[run.name] = committed_offsets(run.settings, run.group("worker"),
                                                    [(run.topics.canonical, p) for p in canonical_ends[run.name]])
        phase("drain")

        from streams.stats import read_stats, summarize

        with _step(progress, "reading back alerts, features, scores, table changelog and counters"):
            results = {run.name: collect_results(run.settings, run.topics, timeout_s=120) for run in (ref, chaos)}
            stats = {run.name: summarize(read_stats(run.settings, run.topics, timeout_s=60)) for run in (ref, chaos)}
        phase("read_back")

        with _step(progress, "nightly rebuild + parity of the chaos run's archive"):
            from batch.nightly import run_nightly

            nightly = run_nightly(chaos.settings, full=True, report=False)
        phase("nightly")

    figures = _figures(opts, messages, copies, rate, kills, results, stats, published, canonical_ends, committed,
                       nightly, chaos, phases, time.monotonic() - started, data_dir,
                       {run.name: run.settings.archive_dir for run in (ref, chaos)})
    print_report(console, figures)
    return figures


def _drain(run: _Run, raw_end_offsets: dict, deadline: float, console: Console) -> dict[int, int]:
    """Wait on the pipeline's own progress (wardwatch.demo's order): ingest committed every raw
    message, the archiver read the canonical topic to its end, the worker committed all of it, the
    archiver read the outputs. Returns the canonical end offset per partition.

    A worker whose commits stall is reported, not waited for until the deadline: the accounting
    check then names the partitions behind."""
    canonical = run.topics.canonical
    wait_for_commits(run.settings, run.group("ingest"), raw_end_offsets, deadline=deadline, on_wait=run.poll)
    _wait_for_quiet(run.archiver, quiet_s=1.0, deadline=deadline, topics={canonical})  # nothing new is coming
    ends = {tp: n for tp, n in run.archiver.seen_offsets.items() if tp[0] == canonical}
    try:
        wait_for_commits(run.settings, run.group("worker"), ends, on_wait=run.poll,
                         deadline=min(deadline, time.monotonic() + COMMIT_WAIT_S))
    except TimeoutError as exc:
        console.log(f"[red]{run.name}: {exc} after {COMMIT_WAIT_S:.0f} s[/]; see {run.logs}")
    _wait_for_quiet(run.archiver, quiet_s=2.0, deadline=deadline)
    run.archiver.flush()
    return {p: n for (_, p), n in sorted(ends.items())}


def _chaos(chaos: _Run, feed: _Feed, opts: SoakOptions, rate: float, deadline: float, tick, progress, kill_task,
           console: Console) -> list[dict]:
    """SIGKILL the chaos worker (and maybe ingest) at each kill moment, restart it, and time how long
    until it commits again."""
    rng = random.Random(f"soak-{opts.seed}")
    total = len(feed.messages)
    canonical, partitions = chaos.topics.canonical, chaos.topics.partitions
    worker_group = chaos.group("worker")
    kills = []
    for k, moment in enumerate(kill_moments(opts.kills, opts.seed)):
        while feed.sent < moment * total and not feed.done:  # a random moment of this kill's slice
            tick()
        with_ingest = opts.kill_ingest and rng.random() < 0.5
        at_kill = total_committed(chaos.settings, worker_group, canonical, partitions)
        sent = feed.sent
        mid_stream = not feed.done
        victims = ["worker", "ingest"] if with_ingest else ["worker"]
        rng.shuffle(victims)  # with ingest: either may die first
        for service in victims:
            kill_service(chaos.procs[service])
        killed_at = time.monotonic()
        for service in victims:
            chaos.start(service)
        # recovered: the restarted worker commits beyond where the dead one was (data still flows in)
        while (committed := total_committed(chaos.settings, worker_group, canonical, partitions)) <= at_kill:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the worker did not commit again after kill {k + 1}: see {chaos.logs}")
            if feed.done and not mid_stream:
                break  # killed after the feed ended and idle: nothing new to commit
            next_read = time.monotonic() + POLL_S
            while time.monotonic() < next_read:
                tick()
        recovery = time.monotonic() - killed_at
        kills.append({"kill": k + 1, "services": sorted(victims), "raw_sent": sent, "mid_stream": mid_stream,
                      "worker_committed_at_kill": at_kill, "worker_committed_after": committed,
                      "recovery_s": round(recovery, 2)})
        progress.update(kill_task, completed=k + 1)
        console.log(f"kill {k + 1}: SIGKILL {' + '.join(victims)} at {sent:,}/{total:,} raw messages fed, "
                    f"{at_kill:,} canonical committed; committing again after {recovery:.1f} s")
    return kills


def _figures(opts, messages, copies, rate, kills, results, stats, published, canonical_ends, committed, nightly,
             chaos, phases, seconds, data_dir, archives) -> dict:
    ref_res, got_res = results["reference"], results["chaos"]
    cmp = compare(ref_res, got_res, visible_events(archives["reference"]), visible_events(archives["chaos"]))
    acct = {name: accounting(stats[name], published[name], canonical_ends[name], results[name].next_offsets,
                             {p: n for (_, p), n in committed[name].items()}, ingest_killed=name == "chaos" and any("ingest" in k["services"] for k in kills))
            for name in results}
    parity = nightly.get("parity", {})
    ready = [s for n in range(1, chaos.starts.get("worker", 1))
             for s in recovery_seconds(chaos.log_path("worker", n)) if chaos.log_path("worker", n).exists()]
    checks = {
        "no_alert_lost": not cmp["alerts_lost"] and not cmp["alerts_extra_ids"] and cmp["alerts"] > 0,
        "duplicates_identical": not cmp["duplicates_differing_ids"],
        # applied (the table's own next-offset markers), not committed: correctness rests on the
        # markers; a commit that lags (faust can stall its commit behind an offset it skipped) only
        # means a restart re-reads and drops messages already applied. The lag is reported.
        "accounting": all(a["balanced"] and a["all_read"] and not a["canonical_unapplied"] for a in acct.values()),
        "same_scoring": not (cmp["snapshots_missing_ids"] or cmp["snapshots_extra_ids"] or cmp["feature_mismatch_ids"]
                             or cmp["scores_missing"] or cmp["scores_extra"]),
        "parity": bool(nightly.get("parity_ok")),
    }
    recoveries = [k["recovery_s"] for k in kills]
    return {
        "events": acct["reference"]["canonical_events"],
        "events_target": opts.events,
        "raw_messages": len(messages),
        "replay_copies": copies, "cohort_patients": opts.patients,
        "patients": copies * opts.patients,
        "feed_rate_per_s": round(rate, 1),
        "kills": sum(1 for k in kills if "worker" in k["services"]),
        "kills_mid_stream": sum(1 for k in kills if k["mid_stream"]),
        "ingest_kills": sum(1 for k in kills if "ingest" in k["services"]),
        "restarts": sum(len(k["services"]) for k in kills),
        "unplanned_restarts": dict(chaos.unplanned),
        "seed": opts.seed,
        "alerts": cmp["alerts"],
        "alerts_lost": cmp["alerts_lost"],
        "losses": cmp["alerts_lost"] + sum(len(a["canonical_unapplied"]) for a in acct.values()),
        "duplicates_delivered": cmp["duplicates_delivered"],
        "duplicate_alert_ids": cmp["duplicate_alert_ids"],
        "duplicates_differing": len(cmp["duplicates_differing_ids"]),
        "snapshots": cmp["snapshots"],
        "feature_values_compared": cmp["feature_values_compared"],
        "feature_mismatches": len(cmp["feature_mismatch_ids"]),
        "points_with_other_inputs": cmp["points_with_other_inputs"],
        "feature_differences_from_arrival_order": cmp["feature_differences_from_arrival_order"],
        "recovery_s": recoveries,
        "recovery_s_max": max(recoveries, default=None),
        "worker_ready_after_assignment_s": [round(s, 2) for s in ready],
        "parity_points": int(parity.get("points_checked", 0)),
        "parity_values": int(parity.get("values_checked", 0)),
        "parity_mismatched": int(parity.get("mismatched", 0)),
        "accounting": acct,
        "kill_log": kills,
        "checks": checks,
        "ok": all(checks.values()),
        "phases_s": phases,
        "seconds": round(seconds, 1),
        "logs": str(data_dir / "logs"),
        "details": {k: cmp[k][:SHOW_IDS] for k in ("alerts_missing_ids", "alerts_extra_ids", "duplicates_differing_ids",
                                                    "snapshots_missing_ids", "snapshots_extra_ids",
                                                    "feature_mismatch_ids")},
    }


def print_report(console: Console, f: dict) -> None:
    t = Table(title="wardwatch soak: chaos run vs undisturbed reference (embedded broker)")
    t.add_column("check")
    t.add_column("result", justify="center")
    t.add_column("figures")
    ok = {True: "[green]pass[/]", False: "[red]FAIL[/]"}
    c, acct = f["checks"], f["accounting"]["chaos"]
    t.add_row("1. no alert lost", ok[c["no_alert_lost"]],
              f"{f['alerts']:,} alert ids in the reference, {f['alerts_lost']} lost, "
              f"{len(f['details']['alerts_extra_ids'])} extra")
    t.add_row("2. duplicates identical", ok[c["duplicates_identical"]],
              f"{f['duplicates_delivered']:,} repeat deliveries of {f['duplicate_alert_ids']:,} alert ids, "
              f"{f['duplicates_differing']} differing")
    t.add_row("3. accounting", ok[c["accounting"]],
              f"{sum(acct['messages_in'].values()):,} raw in (of {sum(acct['messages_published'].values()):,} fed), "
              f"balanced {acct['balanced']}; {acct['canonical_messages']:,} canonical messages, "
              f"{len(acct['canonical_unapplied'])} partitions unapplied, "
              f"{len(acct['canonical_uncommitted'])} uncommitted")
    t.add_row("4. same scoring", ok[c["same_scoring"]],
              f"{f['snapshots']:,} snapshot ids, {f['feature_values_compared']:,} feature values compared, "
              f"{f['feature_mismatches']} mismatched ({f['feature_differences_from_arrival_order']} more differ "
              f"where ingest delivered other inputs first: {f['points_with_other_inputs']} points)")
    t.add_row("5. parity (nightly on the chaos archive)", ok[c["parity"]],
              f"{f['parity_points']:,} points, {f['parity_values']:,} values, {f['parity_mismatched']} mismatched")
    console.print(t)
    recov = ", ".join(f"{s:.1f}" for s in f["recovery_s"])
    console.print(f"{f['events']:,} canonical events ({f['raw_messages']:,} raw messages, {f['patients']:,} patients) "
                  f"per run; {f['kills']} worker kills ({f['kills_mid_stream']} mid-stream), {f['ingest_kills']} "
                  f"ingest kills, {f['restarts']} restarts; kill -> committing again (s): {recov}; "
                  f"{f['seconds']:.0f} s in all {f['phases_s']}")
    if not f["ok"]:
        for name, ids in f["details"].items():
            if ids:
                console.print(f"[red]{name}[/] (first {len(ids)}): {', '.join(ids)}")
        console.print(f"[red]soak FAILED[/]: service logs are in {f['logs']} (reference/ and chaos/; "
                      f"worker-<n>.log is the n-th restart)")
    else:
        console.print(f"[green]soak passed[/]: nothing lost. Logs: {f['logs']}")


def write_json(figures: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
