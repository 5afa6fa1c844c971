"""`wardwatch soak`: the chaos check of issue #8, on the embedded broker.

Two patient workers consume ONE canonical stream, side by side; one is left alone, the other is
SIGKILLed at random moments:

    replay (a clinosim cohort, no injected faults, repeated with fresh patient ids until it makes
    at least `events` canonical events; benchmarks.pipeline.repeated), paced as a live feed
      -> raw topics -> ONE `wardwatch ingest` (the reference run's; with --kill-ingest it is
         SIGKILLed too, so both workers see the same redeliveries)
      -> <reference>.canonical -> reference `wardwatch worker`, never disturbed
            | mirror (wardwatch.mirror, a thread here): same partition, order, key, value, headers
            v                                           and timestamp, live, record for record
         <chaos>.canonical -> chaos `wardwatch worker`, SIGKILLed at random moments (seeded) of the
                              feed and restarted -> chaos archiver (Parquet: the nightly's input)

Each run has its own topics and consumer groups. Why one canonical stream: an ingest worker
interleaves the raw topics (vitals, labs, encounters, notifications) by timing, so two ingest runs
of one replay make two different canonical streams, whose alerts differ for that reason alone.

Afterwards the chaos worker must match the reference worker:
    0. kills mid-stream     every kill landed while the feed was still flowing (a kill waits until
                            the previous restart applies new messages, so slow restarts push kills
                            past the end), killed the worker (it died of the SIGKILL) and a new
                            process replaced it; the reference worker never exited on its own
    1. no alert lost        the chaos run's alert ids == the reference's (none lost, none extra)
    2. duplicates identical every id (alert, snapshot, score) delivered more than once carries one
                            identical record, in both runs
    3. accounting           per source, raw messages in == parsed + dead-lettered + control + ignored
                            (the shared ingest's own counters, streams.stats), every raw message was
                            read (the ingest group committed every raw offset; without ingest kills its
                            counters also saw each once), the mirror copied every canonical record to
                            its own offset, and each worker's table applied every canonical offset
                            (its next-offset markers)
    4. same scoring         the same snapshot ids, the same snapshot and score records under each
                            (feature values, point, probability, tier...), the same alert records,
                            and the same patient table at the end
    5. parity               the nightly rebuild (batch.nightly.run_nightly) of the chaos run's archive
                            passes parity
None passes vacuously: no alert, snapshot, patient, canonical message or parity point compared fails.

"Caught up" is read from each worker's table (its next-offset markers, tailed from the changelog),
the truth the worker commits from once a batch is durable (a commit lost to a rebalance lands only
with the next batch); the committed offsets are checked against it at the end. A
kill's recovery time is from the SIGKILL until the restarted worker's table applies new messages (a
next-offset marker after its recovery barrier): ~15 s here, 6 s of it the dead member's session
timeout. How far the chaos worker is behind at each kill (and the reference, for comparison) is in
the kill log.
The feed lasts long enough for every kill and its restart to land while data is still flowing:
each kill falls at a random moment of its own slice of the feed.
"""

from __future__ import annotations

import random
import signal
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
from streams.archiver import Archiver
from streams.replay import RawMessage, Replay, build_replay, generate_cohort, load_patient_refs, publish
from streams.topics import Topics, ensure_topics, topics_for
from wardwatch.broker import EmbeddedBroker
from wardwatch.demo import _wait_for_quiet, seed_models, start_run_dir
from wardwatch.mirror import TopicMirror
from wardwatch.procs import (committed_offsets, kill_service, start_service, stop_service, wait_for_commits,
                             wait_for_group)
from wardwatch.result_files import write_atomically
from wardwatch.settings import Settings
from wardwatch.worker_results import Results, changelog_topic, collect_results, recovery_seconds

SLOT_S = 25.0  # feed time per kill: a SIGKILL restart (~15 s) plus room for the random moment
TAIL_S = 20.0  # feed time after the last kill's slice: the last restart catches up while data flows
APPLY_WAIT_S = 300.0  # after the canonical topic is complete, how long a worker may take to apply it (the
# chaos worker can end the feed ~20k messages behind on 2 busy cores: 110 s of catching up measured)
QUIET_S = 1.0  # nothing new on a topic for this long (and its writers done): it is complete
SHOW_IDS = 20  # how many missing / extra ids a failed check prints


@dataclass(frozen=True)
class SoakOptions:
    events: int = 200_000  # at least this many canonical events
    kills: int = 5  # worker SIGKILLs
    seed: int = 7  # kill moments (and which of them also hit ingest)
    kill_ingest: bool = False  # also SIGKILL the shared ingest worker at about half of the kill moments
    patients: int = 30  # the clinosim cohort one copy of the replay comes from
    cohort_seed: int = 11
    rate: float | None = None  # raw messages/s; None: the feed lasts kills * SLOT_S + TAIL_S
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


class _AppliedMarkers:
    """Tails a worker's table changelog for its next-offset markers (canonical partition -> next
    offset its table has not applied): what the table applied, read live and without writing
    anything (worker_results.collect_results appends end markers, so it only runs once the worker
    stopped). A marker seen is a lower bound of the truth; the final check uses collect_results."""

    def __init__(self, settings: Settings, partitions: int):
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.applied: dict[int, int] = {}
        self.barriers: dict[int, int] = {}  # partition -> recovery barriers seen (one per assignment)
        self._marked_after: dict[int, int] = {}  # partition -> barriers seen when its latest marker came
        self._consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-tail",
                                   "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self._consumer.assign([TopicPartition(changelog_topic(settings), p, OFFSET_BEGINNING)
                               for p in range(partitions)])

    def poll(self) -> None:
        for msg in self._consumer.consume(2000, timeout=0):
            if msg.error():
                continue
            p = msg.partition()
            if is_recovery_barrier(msg.key(), msg.value()):
                self.barriers[p] = self.barriers.get(p, 0) + 1
            elif (marker := next_offset_marker(msg.key(), msg.value())) is not None:
                self.applied[marker[0]] = marker[1]
                self._marked_after[p] = self.barriers.get(p, 0)

    def total(self) -> int:
        return sum(self.applied.values())

    def applied_since(self, barriers: dict[int, int]) -> bool:
        """A worker assigned after `barriers` (an earlier snapshot of self.barriers) has applied new
        messages: its recovery barrier is followed by a marker. (A dead worker's last markers, read
        late, precede the barrier, so they do not count.)"""
        return any(n > barriers.get(p, 0) for p, n in self._marked_after.items())

    def reached(self, ends: dict[int, int]) -> bool:
        return all(self.applied.get(p, 0) >= n for p, n in ends.items())

    def close(self) -> None:
        self._consumer.close()


@dataclass
class _Run:
    """One pipeline's restartable child processes (`services`) and, for the chaos run, an
    in-process archiver."""

    name: str
    settings: Settings
    logs: Path
    services: tuple[str, ...]
    archive: bool = False
    procs: dict = field(default_factory=dict)
    starts: dict = field(default_factory=dict)  # service -> how many times started
    unplanned: dict = field(default_factory=dict)  # service -> restarts after it exited on its own
    archiver: Archiver | None = None
    markers: _AppliedMarkers | None = None

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
        for service in self.services:
            self.start(service)
        if self.archive:
            self.archiver = Archiver(self.settings, self.topics, flush_interval_s=2.0)

    def wait_ready(self, deadline: float) -> None:
        """Consumer groups joined and the archiver owns its partitions: the feed can start."""
        for service, proc in self.procs.items():
            wait_for_group(self.settings, self.group(service), timeout_s=max(1.0, deadline - time.monotonic()),
                           alive=proc)
        while self.archiver is not None and not self.archiver.assigned.is_set():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {self.name} archiver got no partitions in time")
            self.archiver.poll_once(timeout_s=0.2)
        self.markers = _AppliedMarkers(self.settings, self.topics.partitions)  # the worker made its changelog

    def poll(self) -> None:
        # a supervisor's semantics (compose: restart: unless-stopped): a service that exited on its
        # own (the worker exits 70 on a failure it cannot recover in place) is restarted and counted
        for service, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self.unplanned[service] = self.unplanned.get(service, 0) + 1
                self.start(service)
        if self.markers is not None:
            self.markers.poll()
        if self.archiver is not None:
            self.archiver.poll_once(timeout_s=0.05)

    def close(self) -> None:
        """SIGTERM the services (they publish their final counters), then close the readers."""
        for proc in self.procs.values():
            stop_service(proc)
        if self.archiver is not None:
            self.archiver.close()
            self.archiver = None
        if self.markers is not None:
            self.markers.close()
            self.markers = None


# --- pure helpers ---------------------------------------------------------------------------------


def parsed_events(messages: list[RawMessage], topics: Topics, settings: Settings) -> list:
    """The canonical events the ingest parsers make of `messages` (offline), in message order."""
    from schemas.cdc import parse_cdc
    from schemas.fhir import parse_notification
    from schemas.ingest_outcome import Parsed

    events = []
    for m in messages:
        if m.kind == "cdc":
            outcome = parse_cdc(topics.cdc[m.table], m.key, m.value, partition=-1, offset=-1,
                                cdc_topic_prefix=settings.cdc_topic_prefix)
        else:
            outcome = parse_notification(m.value, topic=topics.fhir, partition=-1, offset=-1)
        if isinstance(outcome, Parsed):
            events += outcome.events
    return events


def events_in(messages: list[RawMessage], topics: Topics, settings: Settings) -> int:
    """How many canonical events the ingest parsers make of `messages` (offline)."""
    return len(parsed_events(messages, topics, settings))


def kill_moments(kills: int, seed: int) -> list[float]:
    """Fractions of the feed at which to kill: one random moment in each of `kills` equal slices of
    the first part of the feed (the rest is the tail), so kills spread over the stream."""
    rng = random.Random(seed)
    return [(k + rng.uniform(0.1, 0.9)) / (kills + 1) for k in range(kills)]


def next_offset_marker(key: bytes | None, value: bytes | None) -> tuple[int, int] | None:
    """(canonical partition, next offset not applied) if this changelog record is a table's
    next-offset marker (streams.app), else None (a patient record, a recovery barrier)."""
    from streams.app import NEXT_OFFSET_PREFIX

    if key is None or value is None:
        return None
    name = orjson.loads(key)
    if not isinstance(name, str) or not name.startswith(NEXT_OFFSET_PREFIX):
        return None
    return int(name.removeprefix(NEXT_OFFSET_PREFIX)), int(value)


def is_recovery_barrier(key: bytes | None, value: bytes | None) -> bool:
    """The tombstone a worker appends to each changelog partition it is assigned (streams.app)."""
    from streams.app import RECOVERY_BARRIER_KEY

    return value is None and key is not None and orjson.loads(key) == RECOVERY_BARRIER_KEY


def feature_values(records: dict[str, set[bytes]]) -> dict[str, dict]:
    """snapshot id -> feature values (one record per id: differing repeats are counted apart)."""
    return {sid: orjson.loads(next(iter(values)))["features"] for sid, values in records.items()}


def compare(ref: Results, got: Results) -> dict:
    """Checks 1, 2 and 4: the chaos worker's outputs against the reference worker's. Both read one
    canonical stream, so everything must be the same; a difference is a failure."""
    missing, extra = sorted(set(ref.alerts) - set(got.alerts)), sorted(set(got.alerts) - set(ref.alerts))
    both = set(ref.alerts) & set(got.alerts)
    ref_points, got_points = feature_values(ref.features), feature_values(got.features)
    shared_points = set(ref_points) & set(got_points)
    shared_scores = set(ref.scores) & set(got.scores)
    ref_state, got_state = ref.records(), got.records()
    return {
        "alerts": len(ref.alerts),
        "alerts_compared": len(both),
        "alerts_lost": len(missing), "alerts_missing_ids": missing, "alerts_extra_ids": extra,
        # same id, other contents (an amended alert has ids of its own, so none may differ)
        "alerts_differing_ids": sorted(i for i in both if ref.alerts[i] != got.alerts[i]),
        "alerts_delivered": sum(got.records_per_id.values()),
        "duplicates_delivered": sum(n - 1 for n in got.records_per_id.values()),
        "duplicate_alert_ids": sum(1 for n in got.records_per_id.values() if n > 1),
        # any output id (alert, snapshot, score) published twice with other contents, in either run
        "duplicates_differing_ids": sorted(got.differing_repeats()),
        "reference_duplicates_differing_ids": sorted(ref.differing_repeats()),
        "snapshots": len(ref_points),
        "snapshots_missing_ids": sorted(set(ref_points) - set(got_points)),
        "snapshots_extra_ids": sorted(set(got_points) - set(ref_points)),
        "scores_missing_ids": sorted(set(ref.scores) - set(got.scores)),
        "scores_extra_ids": sorted(set(got.scores) - set(ref.scores)),
        "feature_values_compared": sum(len(ref_points[s]) for s in shared_points),
        "feature_mismatch_ids": sorted(s for s in shared_points if ref_points[s] != got_points[s]),
        # the whole record, not only its feature values: its point (partition, offset, idx), trigger, patient
        "snapshots_differing_ids": sorted(s for s in shared_points if ref.features[s] != got.features[s]),
        # a score's probability, tier, rationale, stale readings... under the same snapshot id
        "scores_differing_ids": sorted(s for s in shared_scores if ref.scores[s] != got.scores[s]),
        # the table both end with (what the next message is scored against), as the worker reads it
        "patients": len(ref_state),
        "state_missing_ids": sorted(set(ref_state) - set(got_state)),
        "state_extra_ids": sorted(set(got_state) - set(ref_state)),
        "state_differing_ids": sorted(p for p in set(ref_state) & set(got_state) if ref_state[p] != got_state[p]),
    }


SCORING_DIFFERENCES = ("snapshots_missing_ids", "snapshots_extra_ids", "snapshots_differing_ids", "feature_mismatch_ids",
                       "scores_missing_ids", "scores_extra_ids", "scores_differing_ids", "alerts_differing_ids",
                       "state_missing_ids", "state_extra_ids", "state_differing_ids")


def soak_checks(kills: list[dict], cmp: dict, acct: dict, nightly: dict, unplanned: dict) -> dict[str, bool]:
    """The soak's verdict per check (`ok` is all of them). None may pass vacuously: a run that compared
    no snapshot, no alert or no parity point, or whose kills cannot be shown to have happened, fails."""
    workers = [acct["reference"], acct["chaos"]]
    return {
        # a kill after the feed ended tests nothing: each restart must catch up before the next moment;
        # and each kill must be one: the victim died of the SIGKILL and a new process (pid) replaced it
        "kills_mid_stream": bool(kills) and all(k["mid_stream"] and k.get("sigkilled") and k.get("restarted")
                                                for k in kills),
        # the comparison is against an undisturbed worker: one that exited and was restarted is not
        "reference_undisturbed": not unplanned.get("reference", {}).get("worker"),
        "no_alert_lost": not cmp["alerts_lost"] and not cmp["alerts_extra_ids"] and cmp["alerts"] > 0,
        "duplicates_identical": not (cmp["duplicates_differing_ids"] or cmp["reference_duplicates_differing_ids"]),
        # applied (the table's own next-offset markers), not committed: correctness rests on the
        # markers; a commit that lags only means a restart re-reads and drops messages already applied
        "accounting": (acct["raw"]["balanced"] and acct["raw"]["all_read"] and acct["mirror"]["exact"]
                       and all(not w["canonical_unapplied"] for w in workers)
                       and all(w["canonical_messages"] > 0 for w in workers)),
        "same_scoring": (not any(cmp[k] for k in SCORING_DIFFERENCES) and cmp["snapshots"] > 0
                         and cmp["feature_values_compared"] > 0 and cmp["patients"] > 0),
        "parity": bool(nightly.get("parity_ok")) and int(nightly.get("parity", {}).get("points_checked", 0)) > 0,
    }


def raw_accounting(stats: dict, published: dict, raw_uncommitted: dict[str, int], *, ingest_killed: bool) -> dict:
    """Check 3, raw side (the shared ingest): counters balance per source, and every raw message was
    read: the ingest group committed every raw offset (it commits only after its canonical output is
    acknowledged), and its counters saw each message exactly once. Not when ingest was SIGKILLed: the
    dead instance's counters are its last snapshot (published every stats interval), and its
    successor re-reads the uncommitted rest, so the counters may be off either way; the commits are
    the proof then."""
    ingest = stats.get("services", {}).get("ingest", {}).get("counters", {})
    read = {s: ingest.get(s, {}).get("messages_in", 0) for s in ("cdc", "fhir")}
    counted_once = all(read[s] == published[s] for s in read)
    return {
        "balanced": bool(stats.get("balanced")),
        "messages_published": {s: published[s] for s in ("cdc", "fhir")},
        "messages_in": read,
        "raw_uncommitted": raw_uncommitted,
        "all_read": not raw_uncommitted and (ingest_killed or counted_once),
        "canonical_events": sum(ingest.get(s, {}).get("events_out", 0) for s in ("cdc", "fhir")),
        # the replay has no injected faults: a dead letter here means ingest rejected good input
        "dead_lettered": {s: sum(ingest.get(s, {}).get("dead_lettered", {}).values()) for s in ("cdc", "fhir")},
    }


def canonical_accounting(ends: dict[int, int], applied: dict[int, int], committed: dict[int, int]) -> dict:
    """Check 3, one worker: its table applied every canonical offset (its next-offset markers);
    partitions whose committed offset lags are reported (a lagging commit only means a restart
    re-reads messages the table then drops as applied)."""
    return {
        "canonical_messages": sum(ends.values()),
        "canonical_unapplied": {str(p): end - applied.get(p, 0) for p, end in sorted(ends.items())
                                if applied.get(p, 0) != end},
        "canonical_uncommitted": {str(p): end - max(committed.get(p, 0), 0)  # no commit yet: a negative offset
                                  for p, end in sorted(ends.items()) if max(committed.get(p, 0), 0) != end},
    }


def mirror_accounting(ends: dict[int, int], copied: dict[int, int], target_ends: dict[int, int],
                      shifted: int) -> dict:
    """Check 3, the mirror: every canonical record copied, each to its source offset, and nothing
    else on the chaos topic (`target_ends`: what its archiver read), so both workers saw one stream."""
    uncopied = {str(p): n - copied.get(p, 0) for p, n in sorted(ends.items()) if copied.get(p, 0) != n}
    other_ends = {str(p): target_ends.get(p, 0) for p in sorted(set(ends) | set(target_ends))
                  if target_ends.get(p, 0) != ends.get(p, 0)}
    return {"exact": not uncopied and not other_ends and shifted == 0, "uncopied": uncopied,
            "shifted": shifted, "chaos_topic_ends_differing": other_ends}


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
    # static members, as compose deploys them: a restarted worker or ingest takes its partitions back
    # without waiting out its killed predecessor's session (each group has one member per run)
    return Settings(bootstrap_servers=bootstrap, data_dir=data_dir / suffix, model_dir=model_dir,
                    topic_prefix=prefix, cdc_topic_prefix=f"{prefix}.ehr.public", group_prefix=prefix,
                    stats_interval_s=1.0, static_membership=True, instance_id=f"soak-{suffix}")


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
    # interleaved copies (benchmarks.pipeline.repeated): every patient's stay spans the whole feed
    # instead of a few seconds of it, so every kill lands in the middle of every patient's stay
    return repeated(replay.messages, pattern, copies), copies


def run_soak(opts: SoakOptions, console: Console | None = None) -> dict:
    """Feed one ingest, mirror its canonical stream to the chaos worker, kill that worker, compare
    the two workers, print a table; returns the figures (`ok` is True when every check passes)."""
    console = console or Console()
    started = time.monotonic()
    deadline = started + opts.timeout_s
    data_dir = opts.data_dir.resolve()
    start_run_dir(data_dir)  # each soak starts clean: its archive and logs are this run's only
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
        ref = _Run("reference", _settings(bootstrap, data_dir, run_id, "r", model_dir), data_dir / "logs" / "reference",
                   services=("ingest", "worker"))
        chaos = _Run("chaos", _settings(bootstrap, data_dir, run_id, "k", model_dir), data_dir / "logs" / "chaos",
                     services=("worker",), archive=True)

        with _step(progress, f"building a replay of at least {opts.events:,} canonical events"):
            messages, copies = _replay(opts, ref.settings)
        feed_s = opts.kills * SLOT_S + TAIL_S
        rate = opts.rate or len(messages) / feed_s
        console.log(f"replay: {copies} copies of a {opts.patients}-patient cohort = {len(messages):,} raw messages, "
                    f"fed at {rate:,.0f}/s (~{len(messages) / rate:,.0f} s)")
        phase("replay")

        with _step(progress, "starting ingest + reference worker, the mirror, chaos worker + archiver"):
            for run in (ref, chaos):
                stack.callback(run.close)
                run.open()
            mirror = TopicMirror(ref.settings, ref.topics.canonical, chaos.topics.canonical,
                                 ref.topics.partitions).start()
            stack.callback(mirror.stop)
            for run in (ref, chaos):
                run.wait_ready(deadline)
        phase("start")

        feed = _Feed(ref.settings, ref.topics, messages, rate).start()
        feed_task = progress.add_task("feed", total=len(messages))
        kill_task = progress.add_task(f"worker kills (seed {opts.seed})", total=opts.kills)

        def tick() -> None:
            """Between checks: keep archiving and tailing the tables, fail fast, show progress."""
            for run in (ref, chaos):
                run.poll()
            mirror.check()
            progress.update(feed_task, completed=feed.sent)
            if feed.error is not None:
                raise feed.error

        kills = _chaos(ref, chaos, feed, mirror, opts, deadline, tick, progress, kill_task, console)
        phase("feed_and_kills")

        with _step(progress, "waiting for both workers to apply everything"):
            published = feed.join(deadline)
            progress.update(feed_task, completed=len(messages))
            ends, chaos_ends = _drain(ref, chaos, mirror, published["end_offsets"], deadline, tick, console)
        mirror.stop()
        mirror.check()
        raw_ends = published["end_offsets"]  # (topic, partition) -> offset after the last raw message
        raw_committed = committed_offsets(ref.settings, ref.group("ingest"), list(raw_ends))
        raw_uncommitted = {f"{t}:{p}": n - max(raw_committed.get((t, p), 0), 0)
                           for (t, p), n in sorted(raw_ends.items()) if raw_committed.get((t, p), 0) < n}
        committed = {}
        for run in (ref, chaos):
            run.close()  # SIGTERM: each service publishes its final counters (and commits what it can)
            committed[run.name] = {p: n for (_, p), n in committed_offsets(
                run.settings, run.group("worker"), [(run.topics.canonical, p) for p in ends]).items()}
        phase("drain")

        from streams.stats import read_stats, summarize

        with _step(progress, "reading back alerts, features, scores, table changelogs and counters"):
            results = {run.name: collect_results(run.settings, run.topics, timeout_s=120) for run in (ref, chaos)}
            stats = summarize(read_stats(ref.settings, ref.topics, timeout_s=60))
        phase("read_back")

        with _step(progress, "nightly rebuild + parity of the chaos run's archive"):
            from batch.nightly import run_nightly

            nightly = run_nightly(chaos.settings, full=True, report=False)
        phase("nightly")

    acct = {
        "raw": raw_accounting(stats, published, raw_uncommitted,
                              # a restarted ingest (killed, or exited on its own) counted only since its start
                              ingest_killed=any("ingest" in k["services"] for k in kills)
                              or bool(ref.unplanned.get("ingest"))),
        "mirror": mirror_accounting(ends, mirror.copied, chaos_ends, mirror.shifted),
        **{name: canonical_accounting(ends, results[name].next_offsets, committed[name]) for name in results},
    }
    figures = _figures(opts, messages, copies, rate, kills, compare(results["reference"], results["chaos"]), acct,
                       nightly, chaos, {run.name: dict(run.unplanned) for run in (ref, chaos)}, phases,
                       time.monotonic() - started, data_dir)
    print_report(console, figures)
    return figures


def _drain(ref: _Run, chaos: _Run, mirror: TopicMirror, raw_end_offsets: dict, deadline: float, tick,
           console: Console) -> tuple[dict[int, int], dict[int, int]]:
    """Wait on the pipeline's own progress: ingest committed every raw message (so every canonical
    batch is written), the mirror read the canonical topic to its end and copied all of it, both
    tables applied all of it (their markers), the archiver read the chaos topics to their end.
    Returns the canonical end offset per partition, and what the archiver read of the chaos copy.

    A worker that does not catch up is reported, not waited for until the deadline: the accounting
    check then names the partitions behind."""
    wait_for_commits(ref.settings, ref.group("ingest"), raw_end_offsets, deadline=deadline, on_wait=tick)
    while mirror.quiet_for() < QUIET_S:  # the ingest is done writing: nothing new is coming
        _until(deadline, "the canonical topic did not go quiet")
        tick()
    ends = {p: mirror.read.get(p, 0) for p in range(ref.topics.partitions)}
    while not mirror.caught_up(ends):
        _until(deadline, "the mirror did not copy the whole canonical topic")
        tick()
    apply_deadline = min(deadline, time.monotonic() + APPLY_WAIT_S)
    while not (ref.markers.reached(ends) and chaos.markers.reached(ends)):
        if time.monotonic() >= apply_deadline:
            console.log(f"[red]a worker has not applied the whole canonical topic after {APPLY_WAIT_S:.0f} s[/]; "
                        f"see {ref.logs.parent}")
            break
        tick()
    canonical = chaos.topics.canonical
    while any(chaos.archiver.seen_offsets.get((canonical, p), 0) < n for p, n in ends.items()):
        _until(deadline, "the chaos archiver did not read the whole chaos canonical topic")
        tick()
    _wait_for_quiet(chaos.archiver, quiet_s=2.0, deadline=deadline)  # the outputs too
    chaos.archiver.flush()
    return ends, {p: n for (t, p), n in chaos.archiver.seen_offsets.items() if t == canonical}


def _until(deadline: float, what: str) -> None:
    if time.monotonic() >= deadline:
        raise TimeoutError(what)


def _chaos(ref: _Run, chaos: _Run, feed: _Feed, mirror: TopicMirror, opts: SoakOptions, deadline: float, tick,
           progress, kill_task, console: Console) -> list[dict]:
    """SIGKILL the chaos worker (and maybe the shared ingest) at each kill moment, restart it, and
    time how long until the restarted worker's table applies new messages."""
    rng = random.Random(f"soak-{opts.seed}")
    total = len(feed.messages)
    kills = []
    for k, moment in enumerate(kill_moments(opts.kills, opts.seed)):
        while feed.sent < moment * total and not feed.done:  # a random moment of this kill's slice
            tick()
        with_ingest = opts.kill_ingest and rng.random() < 0.5
        sent, mid_stream = feed.sent, not feed.done
        victims = [(chaos, "worker"), (ref, "ingest")] if with_ingest else [(chaos, "worker")]
        rng.shuffle(victims)  # with ingest: either may die first
        killed = [run.procs[service] for run, service in victims]
        for proc in killed:
            kill_service(proc)
        killed_at = time.monotonic()
        held_at_kill = sum(mirror.read.values())
        barriers_at_kill = dict(chaos.markers.barriers)
        applied_at_kill = chaos.markers.total()
        reference_applied = ref.markers.total()  # the undisturbed worker's progress, for comparison
        for run, service in victims:
            run.start(service)
        # proof the kill was one: each victim died of the SIGKILL (not before it, on its own), and
        # a new process took its place
        sigkilled = all(proc.returncode == -signal.SIGKILL for proc in killed)
        restarted = all(run.procs[service].pid != proc.pid for (run, service), proc in zip(victims, killed))
        while not chaos.markers.applied_since(barriers_at_kill):
            _until(deadline, f"the chaos worker did not apply anything new after kill {k + 1}: see {chaos.logs}")
            if feed.done and mirror.quiet_for() >= QUIET_S and sum(mirror.read.values()) == held_at_kill:
                break  # killed at the very end: nothing new to apply
            tick()
        recovery = time.monotonic() - killed_at
        kills.append({"kill": k + 1, "services": sorted(s for _, s in victims), "raw_sent": sent,
                      "mid_stream": mid_stream, "sigkilled": sigkilled, "restarted": restarted,
                      "canonical_at_kill": held_at_kill,
                      "applied_at_kill": applied_at_kill, "reference_applied_at_kill": reference_applied,
                      "applied_after": chaos.markers.total(),
                      "recovery_s": round(recovery, 2)})
        progress.update(kill_task, completed=k + 1)
        console.log(f"kill {k + 1}: SIGKILL {' + '.join(s for _, s in victims)} at {sent:,}/{total:,} raw messages "
                    f"fed, {applied_at_kill:,} of {held_at_kill:,} canonical messages applied (reference: "
                    f"{reference_applied:,}); the restarted worker applied new messages {recovery:.1f} s later")
    return kills


def _figures(opts, messages, copies, rate, kills, cmp, acct, nightly, chaos, unplanned, phases, seconds,
             data_dir) -> dict:
    parity = nightly.get("parity", {})
    ready = [s for n in range(1, chaos.starts.get("worker", 1))
             for s in recovery_seconds(chaos.log_path("worker", n)) if chaos.log_path("worker", n).exists()]
    workers = [acct["reference"], acct["chaos"]]
    checks = soak_checks(kills, cmp, acct, nightly, unplanned)
    recoveries = [k["recovery_s"] for k in kills]
    return {
        "events": acct["raw"]["canonical_events"],
        "events_target": opts.events,
        "canonical_messages": acct["reference"]["canonical_messages"],
        "raw_messages": len(messages),
        "replay_copies": copies, "cohort_patients": opts.patients,
        "patients": copies * opts.patients,
        "feed_rate_per_s": round(rate, 1),
        "kills": sum(1 for k in kills if "worker" in k["services"]),
        "kills_mid_stream": sum(1 for k in kills if k["mid_stream"]),
        "kills_verified": sum(1 for k in kills if k["sigkilled"] and k["restarted"]),
        "ingest_kills": sum(1 for k in kills if "ingest" in k["services"]),
        "restarts": sum(len(k["services"]) for k in kills),
        "unplanned_restarts": unplanned,
        "seed": opts.seed,
        "alerts": cmp["alerts"],
        "alerts_compared": cmp["alerts_compared"],
        "alerts_lost": cmp["alerts_lost"],
        "alerts_extra": len(cmp["alerts_extra_ids"]),
        "alerts_differing": len(cmp["alerts_differing_ids"]),
        "losses": cmp["alerts_lost"] + sum(len(w["canonical_unapplied"]) for w in workers),
        "duplicates_delivered": cmp["duplicates_delivered"],
        "duplicate_alert_ids": cmp["duplicate_alert_ids"],
        "duplicates_differing": len(cmp["duplicates_differing_ids"]),
        "reference_duplicates_differing": len(cmp["reference_duplicates_differing_ids"]),
        "snapshots": cmp["snapshots"],
        "snapshots_missing": len(cmp["snapshots_missing_ids"]),
        "snapshots_extra": len(cmp["snapshots_extra_ids"]),
        "scores_missing": len(cmp["scores_missing_ids"]),
        "scores_extra": len(cmp["scores_extra_ids"]),
        "feature_values_compared": cmp["feature_values_compared"],
        "feature_mismatches": len(cmp["feature_mismatch_ids"]),
        "snapshots_differing": len(cmp["snapshots_differing_ids"]),
        "scores_differing": len(cmp["scores_differing_ids"]),
        "state_patients": cmp["patients"],
        "state_differing": sum(len(cmp[k]) for k in ("state_missing_ids", "state_extra_ids", "state_differing_ids")),
        "mirror_exact": acct["mirror"]["exact"],
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
        "details": {k: cmp[k][:SHOW_IDS] for k in ("alerts_missing_ids", "alerts_extra_ids", "alerts_differing_ids",
                                                    "duplicates_differing_ids", "reference_duplicates_differing_ids",
                                                    "snapshots_missing_ids",
                                                    "snapshots_extra_ids", "scores_missing_ids", "scores_extra_ids",
                                                    "feature_mismatch_ids", "snapshots_differing_ids",
                                                    "scores_differing_ids", "state_missing_ids", "state_extra_ids",
                                                    "state_differing_ids")},
    }


def print_report(console: Console, f: dict) -> None:
    t = Table(title="wardwatch soak: SIGKILLed worker vs undisturbed worker on one canonical stream (embedded broker)")
    t.add_column("check")
    t.add_column("result", justify="center")
    t.add_column("figures")
    ok = {True: "[green]pass[/]", False: "[red]FAIL[/]"}
    c, acct = f["checks"], f["accounting"]
    raw, mirror = acct["raw"], acct["mirror"]
    t.add_row("0. kills mid-stream", ok[c["kills_mid_stream"]],
              f"{f['kills_mid_stream']} of {len(f['kill_log'])} kills while data flowed, {f['kills_verified']} "
              f"died of the SIGKILL and were replaced; kill -> the restarted "
              f"worker applies new messages (s): {', '.join(f'{s:.1f}' for s in f['recovery_s'])}")
    t.add_row("   reference undisturbed", ok[c["reference_undisturbed"]],
              f"restarts of services that exited on their own: {f['unplanned_restarts']}")
    t.add_row("1. no alert lost", ok[c["no_alert_lost"]],
              f"{f['alerts']:,} alert ids in the reference, {f['alerts_lost']} lost, {f['alerts_extra']} extra")
    t.add_row("2. duplicates identical", ok[c["duplicates_identical"]],
              f"{f['duplicates_delivered']:,} repeat deliveries of {f['duplicate_alert_ids']:,} alert ids, "
              f"ids published again with other contents: {f['duplicates_differing']} (reference: "
              f"{f['reference_duplicates_differing']})")
    t.add_row("3. accounting", ok[c["accounting"]],
              f"{sum(raw['messages_in'].values()):,} raw in (of {sum(raw['messages_published'].values()):,} fed), "
              f"balanced {raw['balanced']}, dead-lettered {sum(raw['dead_lettered'].values()):,}; "
              f"{f['canonical_messages']:,} canonical messages, mirror exact "
              f"{mirror['exact']}; partitions unapplied: reference {len(acct['reference']['canonical_unapplied'])}, "
              f"chaos {len(acct['chaos']['canonical_unapplied'])} (uncommitted: "
              f"{len(acct['reference']['canonical_uncommitted'])}, {len(acct['chaos']['canonical_uncommitted'])})")
    t.add_row("4. same scoring", ok[c["same_scoring"]],
              f"{f['snapshots']:,} snapshot ids ({f['snapshots_missing']} missing, {f['snapshots_extra']} extra), "
              f"{f['feature_values_compared']:,} feature values compared, {f['feature_mismatches']} mismatched, "
              f"{f['snapshots_differing']} records differing; scores {f['scores_missing']} missing, "
              f"{f['scores_extra']} extra, {f['scores_differing']} differing; "
              f"{f['alerts_differing']} of {f['alerts_compared']:,} alerts differing; final table: "
              f"{f['state_differing']} of {f['state_patients']:,} patients differing")
    t.add_row("5. parity (nightly on the chaos archive)", ok[c["parity"]],
              f"{f['parity_points']:,} points, {f['parity_values']:,} values, {f['parity_mismatched']} mismatched")
    console.print(t)
    console.print(f"{f['events']:,} canonical events ({f['raw_messages']:,} raw messages, {f['patients']:,} patients); "
                  f"{f['kills']} worker kills ({f['kills_mid_stream']} mid-stream), {f['ingest_kills']} ingest kills, "
                  f"{f['restarts']} restarts; {f['seconds']:.0f} s in all {f['phases_s']}")
    if not f["ok"]:
        for name, ids in f["details"].items():
            if ids:
                console.print(f"[red]{name}[/] (first {len(ids)}): {', '.join(ids)}")
        console.print(f"[red]soak FAILED[/]: service logs are in {f['logs']} (reference/ and chaos/; "
                      f"worker-<n>.log is the n-th restart)")
    else:
        console.print(f"[green]soak passed[/]: nothing lost. Logs: {f['logs']}")


def write_json(figures: dict, path: Path) -> None:
    write_atomically(path, orjson.dumps(figures, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
