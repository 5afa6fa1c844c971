"""`wardwatch bench`: the whole streaming pipeline against the plain baseline relay, in one run.

    embedded broker (one for both measurements)
      1. baseline  benchmarks.baseline.run_baseline: consume -> orjson -> produce, fed with the
                   same raw message values the pipeline gets, as many of them
      2. pipeline  replay (clinosim cohort, no faults, repeated with fresh patient ids)
                     -> `wardwatch ingest` + `wardwatch worker` (child processes, fresh prefixes)
                     -> scores and alerts topics, read by a confluent-kafka consumer in this process

    pipeline events/s = raw messages / (last score record received - first measured message produced)
    latency           = score record received - its `ww.produced_ns` header (the raw message's
                        produce time, carried by ingest onto the canonical message, then by the worker)
    alert latency     = alert record received - its `ww.produced_ns` header: event-to-alert, from the
                        raw message whose scoring point raised (amended, resolved) the alert to the
                        alert record a clinicians' app reads; the worker produces it in the same batch
                        as that point's score record

Order of the phases: the unpaced backlog; the paced loads (`--rates`) up to its events/s; the search
for the max sustained rate; the paced loads beyond its events/s last, since an overload leaves the
embedded broker slower (each stored record batch makes its fetches dearer). Max sustained rate:
paced phases from 20% of the backlog's events/s up by 25% a step, until one is not sustained (it
fell behind, its latency grew, or it routed events late: `sustained`), or by halves below the first
if even that one is not (`next_search_rate`); the highest sustained one is reported, and the relay
is then measured at that rate too. Every phase replays the cohort's days shifted to after the
previous phase's (`Epochs`), as a live feed's event time would go on.

The pipeline is warmed up first (the replay's first messages, renamed `-warmup` and excluded from the
figures) so the children's startup and group joins are not measured; the measured feed then goes as
fast as one producer can.
Completion is "no new score for `quiet_s` after the feed ended" (scoring points per message depend
on the ingest batching, so there is no exact count to wait for), bounded by a hard deadline; a run
the deadline cut short reports `went_quiet: False`, its events/s then being an overstatement.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from benchmarks.baseline import POLL_S, PRODUCED_NS_HEADER, percentile, run_baseline
from streams.replay import RawMessage, Replay, build_replay, generate_cohort, load_patient_refs, publish
from streams.topics import Topics, ensure_topics, topics_for
from wardwatch.broker import EmbeddedBroker
from wardwatch.demo import seed_models
from wardwatch.procs import check_alive, start_service, stop_service
from wardwatch.settings import Settings

log = logging.getLogger(__name__)

WARMUP_SUFFIX = "-warmup"
WARMUP_MESSAGES = 20  # a few keyed messages are enough for one score record
WARMUP_RATE = 100  # raw messages/s
GROWTH_SLACK_MS = 20.0  # latency jitter at a steady load, not a queue (backlog_grew)
MAX_LATE_SHARE = 0.01  # of a phase's events, for the phase to count as sustained
SEARCH_TRIES = 8  # 20% of capacity up to 90% of it takes 7
SEARCH_DOWN_TRIES = 3  # halvings below the lowest of them, when even that was not sustained


# --- pure helpers ---------------------------------------------------------------------------------


def id_pattern(ids: list[str]) -> re.Pattern[bytes]:
    """Matches any of `ids` as a whole token: "C0-0001" matches in "ENC-C0-0001-6324" (the encounter
    key embeds the MRN) but never inside "C0-00012" or "XC0-0001"."""
    if not ids:
        raise ValueError("no patient ids to rewrite")
    alternatives = b"|".join(re.escape(i.encode()) for i in sorted(ids, key=len, reverse=True))
    return re.compile(rb"(?<!\w)(" + alternatives + rb")(?!\w)")


def with_suffix(messages: list[RawMessage], pattern: re.Pattern[bytes], suffix: str) -> list[RawMessage]:
    """The same messages with every patient id (MRN, Patient resource id, and so the encounter keys
    that embed the MRN) renamed `<id><suffix>`: new patients, identical clinical content."""
    repl = rb"\1" + suffix.encode()

    def rename(raw: bytes | None) -> bytes | None:
        return None if raw is None else pattern.sub(repl, raw)

    return [RawMessage(m.kind, m.table, rename(m.key), rename(m.value)) for m in messages]


def repeated(messages: list[RawMessage], pattern: re.Pattern[bytes], repeat: int) -> list[RawMessage]:
    """`repeat` copies of the replay, copy r with patient ids suffixed `-r<r>`, interleaved."""
    return interleaved([with_suffix(messages, pattern, f"-r{r}") for r in range(repeat)])


def interleaved(copies: list[list[RawMessage]]) -> list[RawMessage]:
    """Copies of one replay (each in event-time order, all with the same times) merged message by
    message: one ward of concurrent patients in event-time order. Back to back, each copy would replay
    days of its patients' history within a few hundred messages, and the ordinary skew between the
    raw topics in one ingest poll would be days of event time: most events late, and cheap (measured:
    75% of a backlog's events late, against none interleaved)."""
    return [m for step in zip(*copies, strict=True) for m in step]


@dataclass(frozen=True, slots=True)
class ScoreArrival:
    received_ns: int
    produced_ns: int | None  # the ww.produced_ns header, None when a hop dropped it
    patient_id: str
    path: str | None  # "model" | "rule"


@dataclass(frozen=True, slots=True)
class AlertArrival:
    received_ns: int
    produced_ns: int | None  # the ww.produced_ns header of the message that triggered the alert
    patient_id: str  # the record's key


def alert_figures(arrivals: list[AlertArrival]) -> dict:
    """Event-to-alert latency in ms over a phase's alert records (every kind: open, escalate, amend,
    resolve); the latencies are None when no alert record (with a produce time) arrived."""
    latencies_ms = [(a.received_ns - a.produced_ns) / 1e6 for a in arrivals if a.produced_ns is not None]
    return {
        "n_alerts": len(arrivals),
        "alert_latency_ms_p50": percentile(latencies_ms, 50) if latencies_ms else None,
        "alert_latency_ms_p99": percentile(latencies_ms, 99) if latencies_ms else None,
        "alert_latency_ms_max": max(latencies_ms) if latencies_ms else None,
    }


def pipeline_figures(n_events: int, first_produced_ns: int, fed_ns: int, arrivals: list[ScoreArrival]) -> dict:
    """Events/s over the span from the first measured produce to the last score; latency in ms.

    fed_ns: when the feed had produced its last message. A `ww.produced_ns` later than that cannot
    be a raw message's produce time: some hop re-stamped the header, so the latency misses a hop.
    """
    latencies_ms = [(a.received_ns - a.produced_ns) / 1e6 for a in arrivals if a.produced_ns is not None]
    span_s = (max(a.received_ns for a in arrivals) - first_produced_ns) / 1e9 if arrivals else 0.0
    nan = float("nan")
    return {
        "pipeline_events_per_s": n_events / span_s if span_s > 0 else 0.0,
        "latency_ms_p50": percentile(latencies_ms, 50) if latencies_ms else nan,
        "latency_ms_p99": percentile(latencies_ms, 99) if latencies_ms else nan,
        "latency_ms_max": max(latencies_ms) if latencies_ms else nan,
        "n_events": n_events,
        "n_scores": len(arrivals),
        "n_scores_without_produced_ns": sum(1 for a in arrivals if a.produced_ns is None),
        "n_scores_restamped": sum(1 for a in arrivals if a.produced_ns is not None and a.produced_ns > fed_ns),
        "n_patients": len({a.patient_id for a in arrivals}),
        "scoring_paths": dict(Counter(a.path or "unknown" for a in arrivals)),
        "pipeline_span_s": span_s,
    }


def late_share(counters: dict) -> float | None:
    """The share of the worker's canonical events that were late (applied ones: accepted + late)."""
    accepted, late = counters.get("accepted", 0), counters.get("late", 0)
    return late / (accepted + late) if accepted + late else None


def backlog_grew(arrivals: list[ScoreArrival]) -> bool:
    """True when a phase's latency grew over it, i.e. a queue built up: the median latency of the
    last quarter of its messages (by produce time) is over twice the first quarter's plus slack.
    Too few stamped scores to tell count as grown."""
    stamped = sorted((a for a in arrivals if a.produced_ns is not None), key=lambda a: a.produced_ns)
    if len(stamped) < 8:
        return True
    quarter = len(stamped) // 4
    first = percentile([(a.received_ns - a.produced_ns) / 1e6 for a in stamped[:quarter]], 50)
    last = percentile([(a.received_ns - a.produced_ns) / 1e6 for a in stamped[-quarter:]], 50)
    return last > 2 * first + GROWTH_SLACK_MS


def search_rates(capacity_per_s: float, tries: int = SEARCH_TRIES) -> list[int]:
    """Offered loads to try, lowest first: 20% of the unpaced capacity, then 25% more each time, up to
    90% of it, rounded down to 100 msg/s (to 10 below 1,000/s of capacity). Lowest first, because a
    phase the pipeline could not sustain leaves work behind that the next phase would be measured on."""
    step = 100 if capacity_per_s >= 1000 else 10
    rates, rate = [], 0.2 * capacity_per_s
    while len(rates) < tries and rate <= 0.9 * capacity_per_s:
        rounded = int(rate // step) * step
        if rounded > 0 and rounded not in rates:
            rates.append(rounded)
        rate *= 1.25
    return rates


def next_search_rate(capacity_per_s: float, tried: list[tuple[int, bool]], *, tries: int = SEARCH_TRIES,
                     down_tries: int = SEARCH_DOWN_TRIES) -> int | None:
    """The next offered load of the max-sustained-rate search, or None when it is over. `tried`: the
    loads tried so far, in order, with whether each was sustained. Up search_rates() while each is
    sustained; the first that is not ends it. If even the lowest is not, down by halves until one is
    (that is the max) or down_tries more have failed: the embedded broker slows over a run, and a
    search that finds nothing says less than a lower rate that was sustained."""
    up = search_rates(capacity_per_s, tries)
    if not tried:
        return up[0] if up else None
    if any(ok for _, ok in tried):  # climbing
        rate, ok = tried[-1]
        later = [r for r in up if r > rate]
        return later[0] if ok and later and all(ok for _, ok in tried) else None
    if len(tried) > down_tries:
        return None
    half = tried[-1][0] / 2
    step = 100 if half >= 1000 else 10
    lower = int(half // step) * step
    return lower if lower > 0 else None


def split_by_capacity(rates: list[int], capacity_per_s: float) -> tuple[list[int], list[int]]:
    """The paced rates to run before the max-sustained-rate search (at most the backlog's events/s)
    and after it (overloads). The embedded broker's fetches slow down with every record batch its
    partitions hold (README, "The embedded broker"), and an overload adds many of them: a search run
    after a 10k/s phase once failed at 700/s where a 1k/s phase before it was sustained."""
    return [rate for rate in rates if rate <= capacity_per_s], [rate for rate in rates if rate > capacity_per_s]


def epoch_step_s(replay: Replay) -> int:
    """How far apart in event time to put successive replays of one cohort: its time span plus a day
    (more than the allowed lateness and the alignment skew), in whole days."""
    start_us, end_us = replay.manifest["time_span_us"]
    return ((end_us - start_us) // 86_400_000_000 + 2) * 86_400


class Epochs:
    """The cohort's replays one after another in event time, as a live feed's would be: the n-th call
    of next() gives the replay shifted by n steps. Each phase of the bench takes the next one when it
    runs: had every phase replayed the same days, event time would go back by weeks at each phase, the
    ingest's event-time alignment (whose partition clocks only go forward) would let any raw partition
    run ahead, and under an overload vitals would reach the worker late (measured: 22-35% of a 10k/s
    phase's events, against none with epochs)."""

    def __init__(self, build, first: Replay):
        self.build, self.step_s, self.used = build, epoch_step_s(first), 1

    def next(self) -> Replay:
        replay = self.build(self.used * self.step_s)
        self.used += 1
        return replay


def event_span_ms(replay: Replay) -> list[int]:
    start_us, end_us = replay.manifest["time_span_us"]
    return [start_us // 1000, end_us // 1000]


def machine_facts() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def combine(pipeline: dict, baseline: dict, facts: dict) -> dict:
    base_rate = baseline["baseline_events_per_s"]
    return {
        **pipeline,
        "baseline_events_per_s": base_rate,
        "ratio": pipeline["pipeline_events_per_s"] / base_rate if base_rate > 0 else float("nan"),
        "baseline_n": baseline["n"],
        "baseline_feed_per_s": baseline.get("feed_per_s"),
        **facts,
    }


# --- wiring: the scores consumer ------------------------------------------------------------------


@dataclass
class ScoreCollector:
    """A background consumer of the scores topic (and of the alerts topic, when given) that timestamps
    each record as it is handed over. `arrivals` are the score records, `alerts` the alert records."""

    settings: Settings
    topic: str
    alerts_topic: str | None = None
    arrivals: list[ScoreArrival] = field(default_factory=list)
    alerts: list[AlertArrival] = field(default_factory=list)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-scores", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(10.0, self.settings.session_timeout_s * 2))

    def snapshot(self) -> list[ScoreArrival]:
        """A copy of the arrivals so far (raises the consumer's error, if it failed)."""
        return self.wait_for(lambda _: True, 0)

    def alert_snapshot(self) -> list[AlertArrival]:
        """A copy of the alert arrivals so far (raises the consumer's error, if it failed)."""
        with self._changed:
            if self.error is not None:
                raise self.error
            return list(self.alerts)

    def wait_for(self, predicate, timeout_s: float) -> list[ScoreArrival] | None:
        """A copy of the arrivals once predicate(arrivals) holds, or None after timeout_s."""
        with self._changed:
            ok = self._changed.wait_for(lambda: self.error is not None or predicate(self.arrivals),
                                        max(0.0, timeout_s))
            if self.error is not None:
                raise self.error
            return list(self.arrivals) if ok else None

    def _run(self) -> None:
        from confluent_kafka import Consumer, KafkaException

        consumer = Consumer({
            **self.settings.kafka_client_config(),
            "group.id": f"{self.settings.group_prefix}.bench.scores",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": int(self.settings.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(self.settings.heartbeat_interval_s * 1000),
            "fetch.wait.max.ms": 10,  # as the baseline's sink: no 500 ms fetch hold in the latency
        })
        try:
            consumer.subscribe([self.topic, *filter(None, [self.alerts_topic])])
            while not self._stop.is_set():
                # a short timeout: consume() holds what it has until 500 records or the timeout, and
                # that wait would count as pipeline latency
                batch = consumer.consume(num_messages=500, timeout=POLL_S)
                received_ns = time.time_ns()
                got, alerts = [], []
                for msg in batch:
                    if msg.error():
                        raise KafkaException(msg.error())
                    produced = next((v for k, v in msg.headers() or () if k == PRODUCED_NS_HEADER), None)
                    produced_ns = int(produced) if produced else None
                    if msg.topic() == self.alerts_topic:  # keyed by patient id (streams/topics.py)
                        alerts.append(AlertArrival(received_ns, produced_ns, (msg.key() or b"").decode()))
                        continue
                    record = orjson.loads(msg.value())
                    got.append(ScoreArrival(received_ns, produced_ns, record["patient_id"], record.get("path")))
                if got or alerts:
                    with self._changed:
                        self.arrivals.extend(got)
                        self.alerts.extend(alerts)
                        self._changed.notify_all()
        except BaseException as exc:  # handed to the caller's thread
            with self._changed:
                self.error = exc
                self._changed.notify_all()
        finally:
            consumer.close()


# --- wiring: the run ------------------------------------------------------------------------------

CHECK_EVERY_S = 0.5  # how often a wait also checks that the child services are still running


def _is_measured(a: ScoreArrival | AlertArrival) -> bool:
    return not a.patient_id.endswith(WARMUP_SUFFIX)


def _phase_suffix(tag: str, rate: int, copy: int) -> str:
    return f"-{tag}{rate}c{copy}"


def paced_messages(messages: list[RawMessage], pattern: re.Pattern[bytes], rate: int, seconds: float,
                   tag: str = "p") -> list[RawMessage]:
    """About `rate * seconds` raw messages: copies of the replay with fresh patient ids per copy
    (`-<tag><rate>c<copy>`: a phase's tag and rate make its patients its own)."""
    want = max(1, int(rate * seconds))
    copies = -(-want // len(messages))  # enough copies, interleaved: every copy is cut at the same time
    return interleaved([with_suffix(messages, pattern, _phase_suffix(tag, rate, c)) for c in range(copies)])[:want]


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (Linux /proc), None where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far (Linux /proc), None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float | None]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


class CpuSampler:
    """Samples the CPU time of the pipeline's processes in the background, so that a phase's CPU can
    be read over its working span (first produce to last score) rather than up to the end of its
    drain, whose idle polling would count as work."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.2):
        self.pids, self.interval_s = pids, interval_s
        self.samples: list[tuple[int, dict[str, float | None]]] = []  # (time.time_ns, snapshot)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time_ns(), cpu_snapshot(self.pids)))
            if self._stop.wait(self.interval_s):
                return

    def at(self, t_ns: int) -> dict[str, float | None]:
        """The snapshot taken last at or before t_ns (the first one if none)."""
        samples = list(self.samples)
        before = [snap for ts, snap in samples if ts <= t_ns]
        return before[-1] if before else samples[0][1]

    def per_message(self, start_ns: int, end_ns: int, messages: int) -> dict:
        return cpu_per_message(self.at(start_ns), self.at(end_ns), messages)


def cpu_per_message(before: dict[str, float | None], after: dict[str, float | None], messages: int) -> dict:
    """CPU µs per raw message of each process over a phase: where the time goes, whatever else the
    machine ran meanwhile (latency and events/s move with a busy machine; CPU per message hardly does)."""
    return {name: round((after[name] - before[name]) / messages * 1e6, 1)
            if messages and before.get(name) is not None and after.get(name) is not None else None
            for name in before}


def memory_figures(rss_warm: int | None, rss_end: int | None, patients: int) -> dict:
    """Worker RSS growth per 10k patients of live state (None when RSS could not be read)."""
    if rss_warm is None or rss_end is None or patients <= 0:
        return {"worker_rss_mb": None, "worker_rss_mb_per_10k_patients": None, "patients_in_state": patients}
    return {"worker_rss_mb": round(rss_end / 2**20, 1),
            "worker_rss_mb_per_10k_patients": round((rss_end - rss_warm) / 2**20 / patients * 10_000, 1),
            "patients_in_state": patients}


def _wait_for_warmup(collector: ScoreCollector, *, deadline: float, procs: dict, logs: Path) -> None:
    """The first score proves ingest and worker have joined their groups and are processing."""
    while collector.wait_for(lambda arrivals: len(arrivals) > 0, CHECK_EVERY_S) is None:
        check_alive(procs, logs)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no warm-up score before the deadline: see the logs in {logs}")


def _wait_until_quiet(collector: ScoreCollector, *, quiet_s: float, deadline: float, procs: dict,
                      logs: Path) -> tuple[list[ScoreArrival], bool]:
    """The measured scores, and whether none arrived for quiet_s after the feed ended (False: the
    deadline came first, so the run is partial)."""
    seen = collector.snapshot()
    scored = any(map(_is_measured, seen))  # before the first measured score there is nothing to time out
    last_new = time.monotonic()
    while (now := time.monotonic()) < deadline:
        if scored and now - last_new >= quiet_s:
            return [a for a in seen if _is_measured(a)], True
        wait_s = min(CHECK_EVERY_S, deadline - now, last_new + quiet_s - now if scored else CHECK_EVERY_S)
        count = len(seen)
        newer = collector.wait_for(lambda arrivals: len(arrivals) > count, wait_s)
        if newer is not None:
            scored = scored or any(map(_is_measured, newer[count:]))
            seen, last_new = newer, time.monotonic()
        check_alive(procs, logs)
    log.warning("pipeline benchmark hit its deadline before the scores went quiet")
    return [a for a in collector.snapshot() if _is_measured(a)], False


def worker_outcomes(settings: Settings, topics: Topics) -> dict:
    """The worker's accepted and late event counts so far, from the stats topic. Late events are cheap
    and unscored, so events/s must say how many there were: a backlog read out of step across the raw
    topics made half of them late before the ingest aligned its partitions in event time."""
    from streams.stats import read_stats, summarize

    counters = summarize(read_stats(settings, topics)).get("services", {}).get("worker", {}).get("counters", {})
    return {"worker_accepted": counters.get("accepted", 0), "worker_late": counters.get("late", 0),
            "late_share": late_share(counters)}


def _wait_until_drained(settings: Settings, topics: Topics, *, deadline: float, procs: dict, logs: Path) -> dict:
    """The worker's outcome counts once they stop moving. Scores go quiet before the work does: late
    events are applied without a score, and the next phase must not be measured on this one's tail.
    The counters are published every stats interval, so they are polled at that pace."""
    last = worker_outcomes(settings, topics)
    while time.monotonic() < deadline:
        time.sleep(settings.stats_interval_s + 1.0)
        check_alive(procs, logs)
        now = worker_outcomes(settings, topics)
        if now == last:
            return now
        last = now
    log.warning("pipeline benchmark hit its deadline before the worker's counters settled")
    return last


def _bench_settings(bootstrap: str, data_dir: Path) -> Settings:
    run = uuid.uuid4().hex[:8]  # fresh topics and groups: nothing from an earlier run is re-read
    return Settings(bootstrap_servers=bootstrap, data_dir=data_dir, model_dir=data_dir / "models",
                    topic_prefix=f"bench{run}", cdc_topic_prefix=f"bench{run}.ehr.public",
                    group_prefix=f"bench{run}")


def _run_paced(settings: Settings, topics: Topics, collector: ScoreCollector, messages: list[RawMessage],
               rate: int, *, quiet_s: float, deadline: float, procs: dict, logs: Path, tag: str = "p",
               cpu: CpuSampler | None = None) -> dict:
    """Offer `messages` (made by paced_messages with this tag and rate) at `rate` msg/s and report the
    latency of their scores."""
    tag = f"-{tag}{rate}c"
    before, alerts_before = len(collector.snapshot()), len(collector.alert_snapshot())
    outcomes_before = worker_outcomes(settings, topics)
    started_ns = time.time_ns()
    sent = publish(Replay(messages, {}), settings, topics, rate=rate)
    fed_ns = time.time_ns()
    _wait_until_quiet(collector, quiet_s=quiet_s, deadline=deadline, procs=procs, logs=logs)
    outcomes = _wait_until_drained(settings, topics, deadline=deadline, procs=procs, logs=logs)
    phase_late = late_share({"accepted": outcomes["worker_accepted"] - outcomes_before["worker_accepted"],
                             "late": outcomes["worker_late"] - outcomes_before["worker_late"]})
    arrivals = [a for a in collector.snapshot()[before:] if tag in a.patient_id]
    figures = pipeline_figures(len(messages), started_ns, fed_ns, arrivals)
    alerts = [a for a in collector.alert_snapshot()[alerts_before:] if tag in a.patient_id]
    worked_ns = max((a.received_ns for a in arrivals), default=fed_ns)
    achieved = len(messages) / sent["seconds"] if sent["seconds"] > 0 else float("nan")
    return {"offered_per_s": rate, "achieved_offer_per_s": round(achieved, 1),
            "latency_ms_p50": figures["latency_ms_p50"], "latency_ms_p99": figures["latency_ms_p99"],
            "latency_ms_max": figures["latency_ms_max"], "n_events": len(messages), "n_scores": len(arrivals),
            # the pipeline kept up when its output rate matched the offer over the phase
            "kept_up": figures["pipeline_events_per_s"] >= 0.9 * min(rate, achieved),
            "latency_grew": backlog_grew(arrivals),
            # event-to-alert: the alert records of the phase's patients (their scores' batches)
            **alert_figures(alerts),
            # late events are cheap and unscored: a phase that made them did not do the whole work
            "late_share": phase_late,
            "cpu_us_per_msg": cpu.per_message(started_ns, worked_ns, len(messages)) if cpu else None}


def sustained(phase: dict) -> bool:
    """The pipeline kept up with the phase's offer, its latency did not grow, and it routed (almost)
    none of the phase's events late."""
    return phase["kept_up"] and not phase["latency_grew"] and (phase.get("late_share") or 0.0) < MAX_LATE_SHARE


def sustained_verdict(phase: dict) -> str:
    """`sustained` in words: yes, or no and every reason why."""
    if sustained(phase):
        return "yes"
    late = phase.get("late_share") or 0.0
    reasons = [*(["fell behind"] if not phase["kept_up"] else []),
               *(["latency grew"] if phase["latency_grew"] else []),
               *([f"{late:.0%} late"] if late >= MAX_LATE_SHARE else [])]
    return "no: " + ", ".join(reasons)


def _run_pipeline(settings: Settings, topics: Topics, warmup: list[RawMessage], measured: list[RawMessage],
                  *, quiet_s: float, deadline: float, console: Console, rates: list[int] = (),
                  phase_feed=None, find_sustained: bool = False, broker_pid: int | None = None) -> dict:
    """phase_feed(rate, tag) -> (messages, event span): the feed of a paced phase (tag "p") or of a
    max-sustained-rate try (tag "s"), made when the phase is about to run."""
    logs = settings.data_dir / "logs"
    with ExitStack() as stack:
        collector = ScoreCollector(settings, topics.scores, topics.alerts)
        collector.start()
        stack.callback(collector.stop)
        procs = {}
        for name in ("ingest", "worker"):
            procs[name] = start_service([name], settings, logs / f"{name}.log")
            stack.callback(stop_service, procs[name])

        with console.status("warming up: waiting for ingest and worker to score a warm-up patient"):
            started = time.monotonic()
            # paced: all at once, its days of history could reach the worker out of step across the raw
            # topics, and a vitals row that arrives late is not scored
            publish(Replay(warmup, {}), settings, topics, rate=WARMUP_RATE)
            _wait_for_warmup(collector, deadline=deadline, procs=procs, logs=logs)
        console.log(f"pipeline warm ({time.monotonic() - started:.1f} s to the first score)")
        pids = {name: proc.pid for name, proc in procs.items()} | ({"broker": broker_pid} if broker_pid else {})
        cpu = stack.enter_context(CpuSampler(pids))

        with console.status(f"feeding {len(measured)} raw messages and waiting for the scores to go quiet"):
            first_produced_ns = time.time_ns()  # publish stamps each message just after this
            publish(Replay(measured, {}), settings, topics)
            fed_ns = time.time_ns()
            rss_warm = rss_bytes(procs["worker"].pid)
            arrivals, went_quiet = _wait_until_quiet(collector, quiet_s=quiet_s, deadline=deadline, procs=procs,
                                                     logs=logs)
            outcomes = _wait_until_drained(settings, topics, deadline=deadline, procs=procs, logs=logs)
        result = {**pipeline_figures(len(measured), first_produced_ns, fed_ns, arrivals), "went_quiet": went_quiet,
                  **alert_figures([a for a in collector.alert_snapshot() if _is_measured(a)]),
                  **outcomes, "cpu_us_per_msg": cpu.per_message(
                      first_produced_ns, max((a.received_ns for a in arrivals), default=fed_ns), len(measured))}
        phases = []

        def run_phase(rate: int, tag: str) -> dict:
            messages, span = phase_feed(rate, tag)
            phase = _run_paced(settings, topics, collector, messages, rate, quiet_s=quiet_s, deadline=deadline,
                               procs=procs, logs=logs, tag=tag, cpu=cpu)
            return {**phase, "event_span_ms": span}

        def run_paced(rate: int) -> None:
            with console.status(f"paced load: {rate:,} raw messages/s"):
                phases.append(run_phase(rate, "p"))
            console.log(f"paced {rate:,}/s: p50 {phases[-1]['latency_ms_p50']:.1f} ms, "
                        f"p99 {phases[-1]['latency_ms_p99']:.1f} ms")

        capacity = result["pipeline_events_per_s"]
        within, beyond = split_by_capacity(rates, capacity)
        for rate in within:
            run_paced(rate)
        result["sustained"], result["sustained_tried_per_s"], result["search_phases"] = None, [], []
        tried: list[tuple[int, bool]] = []
        while find_sustained and (rate := next_search_rate(capacity, tried)) is not None:
            result["sustained_tried_per_s"].append(rate)
            with console.status(f"max sustained rate: trying {rate:,} raw messages/s"):
                phase = run_phase(rate, "s")
            ok = sustained(phase)
            tried.append((rate, ok))
            result["search_phases"].append(phase)  # every phase tried, the failed ones included
            console.log(f"{rate:,}/s: p50 {phase['latency_ms_p50']:.1f} ms, p99 {phase['latency_ms_p99']:.1f} ms, "
                        f"{sustained_verdict(phase)}")
            if ok:
                result["sustained"] = phase
        for rate in beyond:
            run_paced(rate)
        phases.sort(key=lambda phase: phase["offered_per_s"])  # by offered load, whatever order they ran in
        patients = len({a.patient_id for a in collector.snapshot()})
        result["paced"] = phases
        result.update(memory_figures(rss_warm, rss_bytes(procs["worker"].pid), patients))
    return result


def run_bench(*, patients: int = 8, repeat: int = 60, console: Console | None = None, seed: int = 7,
              data_dir: Path = Path("data/bench"), cache_dir: Path = Path("data/cache"),
              quiet_s: float = 5.0, timeout_s: float = 900.0, rates: tuple[int, ...] = (1000, 10000),
              paced_s: float = 10.0, state_patients: int = 1000, find_sustained: bool = True) -> dict:
    """Measure the baseline and the pipeline on one embedded broker; print and return the figures.

    data_dir is wiped first and holds the broker and service logs and the scoring model.
    """
    console = console or Console()
    if patients < 1 or repeat < 1:
        raise ValueError("patients and repeat must be at least 1")
    deadline = time.monotonic() + timeout_s
    data_dir = data_dir.resolve()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    (data_dir / "logs").mkdir(parents=True)

    with console.status(f"generating {patients} patients with clinosim (cached)"):
        cohort = generate_cohort(cache_dir.resolve(), patients=patients, seed=seed)
    with EmbeddedBroker.start(log_path=data_dir / "logs" / "broker.log") as broker:
        settings = _bench_settings(broker.bootstrap, data_dir)
        seed_models(settings.model_dir)

        def build(shift_s: int) -> Replay:
            return build_replay(cohort, faults=False, seed=seed, allowed_lateness_s=settings.allowed_lateness_s,
                                late_by_s=settings.allowed_lateness_s + 3600, shift_s=shift_s)

        replay = build(0)  # the warm-up's: later feeds follow it in event time (Epochs)
        epochs = Epochs(build, replay)
        mrns = replay.manifest["patients"]
        refs = load_patient_refs(cohort)
        pattern = id_pattern([*mrns, *(refs[m].removeprefix("Patient/") for m in mrns if m in refs)])
        warmup = with_suffix([m for m in replay.messages if m.key][:WARMUP_MESSAGES], pattern, WARMUP_SUFFIX)
        backlog = epochs.next()
        measured = repeated(backlog.messages, pattern, repeat)

        payloads = [m.value for m in measured if m.value]
        with console.status(f"baseline: relaying {len(measured)} pre-filled messages through a plain loop"):
            baseline = run_baseline(settings, len(measured), payloads=payloads,
                                    timeout_s=max(30.0, min(300.0, deadline - time.monotonic())))
        console.log(f"baseline: {baseline['baseline_events_per_s']:.0f} events/s")
        baseline_paced = {}
        for rate in rates:
            with console.status(f"baseline latency: {rate:,} messages/s for {paced_s:.0f} s"):
                baseline_paced[rate] = run_baseline(settings, int(rate * paced_s), payloads=payloads, rate=rate,
                                                    timeout_s=max(30.0, min(300.0, deadline - time.monotonic())))

        topics = topics_for(settings)
        ensure_topics(settings, topics)

        def phase_feed(rate: int, tag: str) -> tuple[list[RawMessage], list[int]]:
            feed = epochs.next()
            return paced_messages(feed.messages, pattern, rate, paced_s, tag=tag), event_span_ms(feed)

        pipeline = _run_pipeline(settings, topics, warmup, measured, quiet_s=quiet_s, deadline=deadline,
                                 console=console, rates=list(rates), phase_feed=phase_feed,
                                 find_sustained=find_sustained, broker_pid=broker.pid)
        pipeline["event_span_ms"] = event_span_ms(backlog)
        if pipeline["sustained"] is not None:
            rate = pipeline["sustained"]["offered_per_s"]
            with console.status(f"baseline latency: {rate:,} messages/s for {paced_s:.0f} s"):
                baseline_paced[rate] = run_baseline(settings, int(rate * paced_s), payloads=payloads, rate=rate,
                                                    timeout_s=max(30.0, min(300.0, deadline - time.monotonic())))

    for phase in [*pipeline["paced"], *filter(None, [pipeline["sustained"]])]:
        base = baseline_paced[phase["offered_per_s"]]
        phase.update({f"baseline_{k}": base[f"baseline_{k}"]
                      for k in ("latency_ms_p50", "latency_ms_p99", "latency_ms_max")})
    result = combine(pipeline, baseline, machine_facts())
    result.update({"patients": patients, "repeat": repeat, "seed": seed})
    if state_patients:
        from benchmarks.memory import state_memory

        with console.status(f"memory of live state: {state_patients} patients in a clean process"):
            result.update(state_memory(state_patients, cache_dir=cache_dir, model_dir=data_dir / "models"))
    print_table(console, result)
    return result


def _ms(value: float | None) -> str:
    """A latency cell: "none" when the phase had no alert record to time."""
    return "none" if value is None else f"{value:,.1f}"


def print_table(console: Console, r: dict) -> None:
    t = Table(title="wardwatch bench (embedded broker)")
    t.add_column("")
    t.add_column("pipeline", justify="right")
    t.add_column("baseline", justify="right")
    t.add_row("events/s", f"{r['pipeline_events_per_s']:,.0f}", f"{r['baseline_events_per_s']:,.0f}")
    # unpaced, the input is a backlog: these latencies are mostly queueing (the paced table has hop latency)
    t.add_row("backlog latency p50 (ms)", f"{r['latency_ms_p50']:,.1f}", "")
    t.add_row("backlog latency p99 (ms)", f"{r['latency_ms_p99']:,.1f}", "")
    t.add_row("raw messages in", f"{r['n_events']:,}", f"{r['baseline_n']:,}")
    t.add_row("score records out", f"{r['n_scores']:,}", "")
    if "n_alerts" in r:  # event-to-alert (the alert records of the backlog's patients)
        t.add_row("alert records out", f"{r['n_alerts']:,}", "")
        t.add_row("backlog alert latency p50 (ms)", _ms(r["alert_latency_ms_p50"]), "")
        t.add_row("backlog alert latency p99 (ms)", _ms(r["alert_latency_ms_p99"]), "")
    console.print(t)
    if r.get("late_share") is not None:
        why = ("; read out of step across the raw topics, they went to the late topic, unscored, which "
               "flatters events/s") if r["worker_late"] else ""
        console.print(f"late canonical events in the backlog: {r['worker_late']:,} of "
                      f"{r['worker_late'] + r['worker_accepted']:,} ({r['late_share']:.0%}{why})")
    if r.get("paced") or r.get("sustained"):
        pt = Table(title="latency at an offered load (raw produce -> score record; max: the highest load tried "
                         "that was sustained)")
        for col in ("offered/s", "achieved offer/s", "p50 ms", "p99 ms", "max ms", "sustained",
                    "baseline p50 ms", "baseline p99 ms"):
            pt.add_column(col, justify="right")
        max_row = [{**r["sustained"], "label": f"{r['sustained']['offered_per_s']:,} max"}
                   ] if r.get("sustained") else []
        for ph in [*r["paced"], *max_row]:
            pt.add_row(ph.get("label", f"{ph['offered_per_s']:,}"), f"{ph['achieved_offer_per_s']:,.0f}",
                       f"{ph['latency_ms_p50']:,.1f}", f"{ph['latency_ms_p99']:,.1f}", f"{ph['latency_ms_max']:,.1f}",
                       sustained_verdict(ph),
                       f"{ph.get('baseline_latency_ms_p50', float('nan')):,.1f}",
                       f"{ph.get('baseline_latency_ms_p99', float('nan')):,.1f}")
        console.print(pt)
        at = Table(title="event-to-alert latency at an offered load (raw produce -> alert record, every kind; "
                         "none: the phase raised no alert)")
        for col in ("offered/s", "alert records", "alert p50 ms", "alert p99 ms", "alert max ms"):
            at.add_column(col, justify="right")
        for ph in [*r["paced"], *max_row]:
            if "n_alerts" in ph:
                at.add_row(ph.get("label", f"{ph['offered_per_s']:,}"), f"{ph['n_alerts']:,}",
                           _ms(ph["alert_latency_ms_p50"]), _ms(ph["alert_latency_ms_p99"]),
                           _ms(ph["alert_latency_ms_max"]))
        if at.row_count:
            console.print(at)
    phases = [*r.get("paced", []), *filter(None, [r.get("sustained")])]
    cpu_rows = [("backlog", r.get("cpu_us_per_msg")),
                *((f"{ph['offered_per_s']:,}/s", ph.get("cpu_us_per_msg")) for ph in phases)]
    if any(cpu for _, cpu in cpu_rows):
        ct = Table(title="CPU per raw message (µs, each process; the machine has "
                         f"{r['cpu_count']} cores for all of them and the load generator)")
        names = sorted({n for _, cpu in cpu_rows if cpu for n in cpu})
        ct.add_column("phase")
        for n in names:
            ct.add_column(n, justify="right")
        for label, cpu in cpu_rows:
            if cpu:
                ct.add_row(label, *(f"{cpu[n]:,.0f}" if cpu.get(n) is not None else "" for n in names))
        console.print(ct)
    if r.get("sustained_tried_per_s") and r.get("sustained") is None:
        tried = ", ".join(f"{rate:,}" for rate in r["sustained_tried_per_s"])
        console.print(f"[yellow]none of the offered loads tried was sustained ({tried} msg/s)[/]")
    if r.get("worker_rss_mb") is not None:
        console.print(f"worker RSS at the end: {r['worker_rss_mb']} MB with {r['patients_in_state']:,} patients "
                      f"(includes the fetch buffers of any backlog)")
    if r.get("state_rss_mb_per_10k_patients") is not None:
        console.print(f"live patient state: {r['state_rss_mb_per_10k_patients']} MB RSS per 10k patients "
                      f"(record bytes {r['state_table_mb_per_10k_patients']} MB; measured on {r['state_patients']:,} "
                      f"patients with full windows, all parsed in memory)")
    if not r["went_quiet"]:
        console.print(f"[yellow]the deadline came before the scores went quiet: events/s counts all "
                      f"{r['n_events']:,} raw messages over a partial span, so it overstates the pipeline[/]")
    if r["n_scores_restamped"] or r["n_scores_without_produced_ns"]:
        console.print(f"[yellow]{r['n_scores_restamped']} score records carry a ww.produced_ns stamped after the "
                      f"feed ended and {r['n_scores_without_produced_ns']} carry none: the pipeline latency does "
                      f"not start at the raw produce for those (is ingest forwarding the raw header?)[/]")
    console.print(f"pipeline / baseline throughput: {r['ratio']:.2f}   "
                  f"({r['n_patients']} patients, scoring paths {r['scoring_paths']}, "
                  f"{r['cpu_count']} CPUs, Python {r['python_version']}, {r['timestamp']})")
