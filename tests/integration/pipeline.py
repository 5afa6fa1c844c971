"""The real pipeline for reliability tests: `wardwatch ingest` and `wardwatch worker` as child
processes, the archiver in-process (as the demo runs it), and readers for what they produced.

    with Pipeline(settings, logs) as pipe:            # topics created, groups joined
        published = publish_messages(settings, pipe.topics, messages, rate=2000)
        pipe.wait_processed(published["end_offsets"], deadline)   # on committed offsets, not a timer
    archived(settings, "canonical")                   # the archive, as a polars DataFrame
    stats_json(settings)                              # what `wardwatch stats --json` prints

Raw messages are streams.replay.RawMessage (kind, table, key, value); `reference_events` parses them
offline with the ingest parsers, the oracle the archived canonical events are compared with.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson
import polars as pl

from schemas.cdc import parse_cdc
from schemas.fhir import parse_notification
from schemas.ingest_outcome import Parsed, Rejected
from streams.archiver import Archiver, part_files
from streams.ingest import encode_events
from streams.replay import RawMessage, Replay, build_replay, generate_cohort, publish
from streams.topics import Topics, ensure_topics, topics_for
from wardwatch.demo import _wait_for_quiet, _wait_until_processed
from wardwatch.procs import (check_alive, settings_env, start_service, stop_service, total_committed,
                             wait_for_group)
from wardwatch.settings import Settings

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "reliability"


def cohort(request, patients: int = 3, seed: int = 11) -> Path:
    """A clinosim cohort in pytest's cache (it survives between runs: clinosim runs once per machine)."""
    return generate_cohort(request.getfixturevalue("cohort_cache"), patients=patients, seed=seed)


def valid_replay(cohort_dir: Path, settings: Settings, seed: int = 11) -> Replay:
    """A replay without injected faults: every message is valid and on time."""
    return build_replay(cohort_dir, faults=False, seed=seed, allowed_lateness_s=settings.allowed_lateness_s,
                        late_by_s=settings.allowed_lateness_s + 4 * 3600)


def publish_messages(settings: Settings, topics: Topics, messages: list[RawMessage], *,
                     rate: float | None = None) -> dict:
    """streams.replay.publish for any list of raw messages (counts per source and end offsets)."""
    return publish(Replay(messages, {}), settings, topics, rate=rate)


def parse_offline(message: RawMessage, topics: Topics, settings: Settings):
    """The outcome the ingest worker computes for `message` (position -1: offsets are not known offline)."""
    if message.kind == "cdc":
        outcome = parse_cdc(topics.cdc[message.table], message.key, message.value, partition=-1, offset=-1,
                            cdc_topic_prefix=settings.cdc_topic_prefix)
    else:
        outcome = parse_notification(message.value, topic=topics.fhir, partition=-1, offset=-1)
    if isinstance(outcome, Parsed) and isinstance(encoded := encode_events(outcome), Rejected):
        return encoded  # parsed, but an event cannot be written: the ingest dead-letters the message
    return outcome


def reference_events(messages: list[RawMessage], topics: Topics, settings: Settings) -> dict[tuple[str, str], dict]:
    """(patient, event_id) -> the event's clinical content, for every event the messages parse into."""
    events = {}
    for m in messages:
        outcome = parse_offline(m, topics, settings)
        if isinstance(outcome, Parsed):
            for e in outcome.events:
                events[(e.patient_id, e.event_id)] = event_content(e.to_dict())
    return events


def rejected_count(messages: list[RawMessage], topics: Topics, settings: Settings) -> int:
    return sum(isinstance(parse_offline(m, topics, settings), Rejected) for m in messages)


CONTENT = ("patient_id", "code", "value", "unit", "effective_ms", "issued_ms", "status", "source", "fact_id",
           "version", "encounter_id", "value_text")


def event_content(d: dict) -> dict:
    """What a consumer of an event relies on (provenance holds Kafka positions, which differ per run)."""
    return {k: (str(d[k]) if k in ("status", "source") else d[k]) for k in CONTENT}


class Pipeline:
    """ingest + worker child processes and an in-process archiver on `settings`' topics."""

    def __init__(self, settings: Settings, logs: Path, *, worker: bool = True, archive_from_start: bool = True):
        self.settings = settings
        self.archive_from_start = archive_from_start
        self.topics = topics_for(settings)
        self.logs = logs
        self.with_worker = worker
        self.procs: dict = {}
        self.archiver: Archiver | None = None

    def __enter__(self) -> "Pipeline":
        self.logs.mkdir(parents=True, exist_ok=True)
        ensure_topics(self.settings, self.topics)
        self.procs["ingest"] = start_service(["ingest"], self.settings, self.logs / "ingest.log")
        if self.with_worker:
            self.procs["worker"] = start_service(["worker"], self.settings, self.logs / "worker.log")
        if self.archive_from_start:
            self.start_archiver()
        # a live feed starts mid-stream: replay only once the consumer groups have their partitions
        for name, proc in self.procs.items():
            wait_for_group(self.settings, f"{self.settings.group_prefix}-{name}", alive=proc)
        return self

    def start_archiver(self, timeout_s: float = 60.0) -> None:
        """Start the archiver and wait until it has its partitions (from then on, "nothing new
        arrived for a while" means the topics are read to their end)."""
        if self.archiver is not None:
            return
        self.archiver = Archiver(self.settings, self.topics, flush_interval_s=2.0)
        deadline = time.monotonic() + timeout_s
        while not self.archiver.assigned.is_set():
            if time.monotonic() >= deadline:
                raise TimeoutError("the archiver got no partitions")
            self.archiver.poll_once(timeout_s=0.2)

    def check_alive(self) -> None:
        check_alive(self.procs, self.logs)

    def poll(self) -> None:
        """Keep archiving and fail fast if a service died (the on_wait of every wait)."""
        self.check_alive()
        if self.archiver is not None:
            self.archiver.poll_once(timeout_s=0.2)
        else:
            time.sleep(0.2)  # a polling period: the caller waits on a condition between polls

    def wait_processed(self, raw_end_offsets: dict, deadline: float) -> dict[str, int]:
        """Until ingest committed every raw message, the worker every canonical message, and the
        archiver read what they wrote (wardwatch.demo's wait on committed offsets)."""
        self.start_archiver()
        if self.with_worker:
            return _wait_until_processed(self.settings, self.archiver, raw_end_offsets, self.procs, self.logs,
                                         deadline)
        from wardwatch.procs import wait_for_commits

        wait_for_commits(self.settings, f"{self.settings.group_prefix}-ingest", raw_end_offsets,
                         deadline=deadline, on_wait=self.poll)
        _wait_for_quiet(self.archiver, quiet_s=1.0, deadline=deadline)
        self.archiver.flush()
        return dict(self.archiver.consumed)

    def total_committed(self, group: str, topics: list[str]) -> int:
        """How many messages of `topics` consumer group `<prefix>-<group>` has committed: a progress gauge."""
        return sum(total_committed(self.settings, f"{self.settings.group_prefix}-{group}", t, self.topics.partitions)
                   for t in topics)

    def stop(self) -> dict[str, int | None]:
        """Stop the services (SIGTERM: they publish their final counters); returns their exit codes."""
        codes = {name: stop_service(proc) for name, proc in self.procs.items()}
        if self.archiver is not None:
            self.archiver.close()
            self.archiver = None
        return codes

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def archived(settings: Settings, kind: str) -> pl.DataFrame:
    """Every archived row of `kind` (canonical, deadletter, late, features, ...)."""
    files = part_files(settings.archive_dir, kind)
    return pl.concat([pl.read_parquet(f) for f in files], how="vertical") if files else pl.DataFrame()


def archived_events(settings: Settings) -> dict[tuple[str, str], dict]:
    """(patient, event_id) -> content of every archived canonical event (an archiver re-read is one key)."""
    return {(row["patient_id"], row["event_id"]): event_content(row)
            for row in archived(settings, "canonical").iter_rows(named=True)}


def stats_json(settings: Settings) -> dict:
    """What an operator sees: the real `wardwatch stats --json`, configured by the environment."""
    env = {"PATH": "/usr/bin:/bin", **settings_env(settings)}
    result = subprocess.run([sys.executable, "-m", "wardwatch", "stats", "--json"], env=env,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    return orjson.loads(result.stdout)


def rss_kb(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/<pid>/status), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


def record_figures(test: str, figures: dict) -> None:
    """Print a test's measured figures and keep them for the README's reliability table."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    figures = {"test": test, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}
    text = orjson.dumps(figures, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    (RESULTS_DIR / f"{test}.json").write_bytes(text + b"\n")
    print(f"\n{test}: {text.decode()}")
