"""The benchmark's baseline: the cheapest possible relay on the same broker, in the same run.

A plain confluent-kafka loop that does no clinical work at all:

    <prefix>.bench.<run>.in   key: {"patient_id"}  value: Debezium JSON (~1 KB)
                              headers: ww.produced_ns (feeder's wall clock), ww.seq (0..n-1)
        |  relay: consume in batches -> orjson.loads -> orjson.dumps -> produce (headers copied)
        v
    <prefix>.bench.<run>.out  same key, value and headers
        |  sink: a separate consumer; latency = receive time - ww.produced_ns
        v
    {"baseline_events_per_s", "baseline_latency_ms_p50", "baseline_latency_ms_p99", ...}

Two modes, both used by `wardwatch bench`:
- capacity (no rate): the input topic is filled *before* the relay starts, so events/s is the relay's
  own rate over its active span (first message consumed -> output flushed). Fed live by one producer,
  the relay would only measure that producer (a 68k-message run measured 16k/s live and ~4x that
  pre-filled).
- live (a rate): the relay and the sink join their groups first, then the feeder offers that many
  messages/s; the latency is the hop latency of a live feed at that load, next to the pipeline's.
Whatever the pipeline does on top of this costs the difference.

The relay runs in a process of its own, as the pipeline's ingest and worker do; the feeder and the
sink share the benchmark's process, as the pipeline's feeder and score collector do. (A relay thread
next to them shared their GIL: at 1k/s that alone added ~15 ms to its p99.)
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import orjson

from schemas.codes import CDC_TABLES
from wardwatch.settings import Settings

log = logging.getLogger(__name__)

PRODUCED_NS_HEADER = "ww.produced_ns"
SEQ_HEADER = "ww.seq"
CONSUME_BATCH = 500
# consume() returns when it has CONSUME_BATCH messages or when POLL_S runs out: a long POLL_S would
# hold every message of a slow feed for up to that long (200 ms measured ~240 ms p50 at 1k/s)
POLL_S = 0.005
N_PATIENTS = 64  # keys spread over the partitions like a ward's worth of patients
FLUSH_S = 30.0


# --- pure helpers ---------------------------------------------------------------------------------


def debezium_vital_signs(n: int, *, seed: int = 0, start_ms: int = 1_767_225_600_000) -> list[bytes]:
    """n Debezium create events (schemas.enable=false) for the vital_signs table, ~1 KB each.

    Column names come from the CDC mapping in schemas.codes, so the pipeline could parse them too.
    """
    mapping = CDC_TABLES["vital_signs"]
    rng = random.Random(seed)
    values = []
    for i in range(n):
        measured_us = (start_ms + i * 1000) * 1000
        commit_ms = start_ms + i * 1000 + rng.randint(50, 900)
        lsn = 24_023_128 + i * 712
        after = {
            "id": 1_000_000 + i,
            mapping.patient_column: f"P{i % N_PATIENTS:05d}",
            mapping.encounter_column: f"E{i % N_PATIENTS:05d}-1",
            mapping.time_column: measured_us,  # io.debezium.time.MicroTimestamp
            "heart_rate": rng.randint(55, 130),
            "respiratory_rate": rng.randint(10, 28),
            "spo2": rng.randint(88, 100),
            "oxygen_flow_rate_lpm": rng.choice([0, 0, 0, 2, 4]),
            "systolic_bp": rng.randint(85, 160),
            "diastolic_bp": rng.randint(45, 95),
            "temperature": round(rng.uniform(35.8, 39.4), 1),
            "consciousness_level": rng.choice([0, 0, 0, 0, 1]),
            "recorded_by": f"nurse-{rng.randint(1, 40):03d}",
            "device_id": f"monitor-{rng.randint(1, 24):02d}",
            "ward": "AMU-2",
            "bed": f"AMU-2-{i % 28 + 1:02d}",
            "position": rng.choice(["sitting", "lying", "standing"]),
            "pain_score": rng.randint(0, 6),
            "entry_method": "device",
            "source_system": "bedside-monitor-gateway",
            "note": rng.choice(["Routine observations.", "Obs repeated after analgesia.",
                                "Patient asleep, obs taken without waking."]),
            "created_at": measured_us + 30_000_000,
            "updated_at": measured_us + 30_000_000,
        }
        value = {
            "before": None,
            "after": after,
            "source": {
                "version": "2.7.3.Final",
                "connector": "postgresql",
                "name": "ehr",
                "ts_ms": commit_ms,
                "snapshot": "false",
                "db": "ehr",
                "sequence": f'["{lsn - 712}","{lsn}"]',
                "schema": "public",
                "table": mapping.table,
                "txId": 7_800 + i,
                "lsn": lsn,
                "xmin": None,
            },
            "op": "c",
            "ts_ms": commit_ms + 12,
            "ts_us": (commit_ms + 12) * 1000,
            "ts_ns": (commit_ms + 12) * 1_000_000,
            "transaction": {"id": f"{7_800 + i}:{lsn}", "total_order": 1, "data_collection_order": 1},
        }
        values.append(orjson.dumps(value))
    return values


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(relayed: int, relay_s: float, latencies_ns: list[int]) -> dict:
    """The baseline's figures; nan latencies (and 0 events/s) when nothing made it through."""
    latencies_ms = [ns / 1e6 for ns in latencies_ns]
    return {
        "baseline_events_per_s": relayed / relay_s if relayed and relay_s > 0 else 0.0,
        "baseline_latency_ms_p50": percentile(latencies_ms, 50) if latencies_ms else math.nan,
        "baseline_latency_ms_p99": percentile(latencies_ms, 99) if latencies_ms else math.nan,
        "baseline_latency_ms_max": max(latencies_ms) if latencies_ms else math.nan,
        "n": len(latencies_ns),
    }


# --- wiring ---------------------------------------------------------------------------------------


@dataclass
class _RelayResult:
    relayed: int = 0
    started: float | None = None  # perf_counter at the first consumed message
    finished: float | None = None  # perf_counter after the final flush
    error: BaseException | None = None


@dataclass
class _SinkResult:
    latencies_ns: list[int] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    error: BaseException | None = None


def _consumer_config(settings: Settings, group_id: str) -> dict:
    return {
        **settings.kafka_client_config(),
        "group.id": group_id,
        "auto.offset.reset": "earliest",  # nothing is lost even if a join finishes late
        "enable.auto.commit": False,  # a fresh group per run: offsets are never reused
        "session.timeout.ms": int(settings.session_timeout_s * 1000),
        "heartbeat.interval.ms": int(settings.heartbeat_interval_s * 1000),
        # low-latency fetches, as an alerting pipeline would use: the embedded broker answers a fetch
        # only when fetch.wait.max.ms expires, so librdkafka's 500 ms default would be in every hop
        # (10 ms, as wardwatch's own consumers use)
        "fetch.wait.max.ms": 10,
    }


def _producer_config(settings: Settings) -> dict:
    return {**settings.kafka_client_config(), "linger.ms": 5, "message.timeout.ms": 30_000}


def _header(headers: list[tuple[str, bytes]] | None, name: str) -> bytes | None:
    return next((v for k, v in headers or () if k == name), None)


def _produce(producer, topic: str, value: bytes, key: bytes | None, headers, on_delivery) -> None:
    """Produce, waiting for room in the local queue instead of failing when it is full."""
    while True:
        try:
            producer.produce(topic, value, key=key, headers=headers, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.05)


def _create_topics(settings: Settings, names: list[str], timeout_s: float) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(settings.kafka_client_config())
    new = [NewTopic(t, num_partitions=settings.partitions, replication_factor=1) for t in names]
    for fut in admin.create_topics(new, operation_timeout=timeout_s).values():
        fut.result(timeout=timeout_s)  # fresh names: any error is real


def _delete_topics(settings: Settings, names: list[str], timeout_s: float = 10.0) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_client_config())  # held: the futures need the live handle
    try:
        for fut in admin.delete_topics(names, operation_timeout=timeout_s).values():
            fut.result(timeout=timeout_s)
    except Exception as exc:  # leftovers on a test broker are harmless; say so and move on
        log.warning("could not delete benchmark topics: %s", exc)


def _delivery_counter(failures: list[str]):
    def on_delivery(err, _msg):
        if err is not None:
            failures.append(str(err))
    return on_delivery


def _relay(settings: Settings, group_id: str, src: str, dst: str, n: int,
           ready, stop, result: _RelayResult) -> None:
    from confluent_kafka import Consumer, KafkaException, Producer

    consumer = Consumer(_consumer_config(settings, group_id))
    producer = Producer(_producer_config(settings))
    failures: list[str] = []
    on_delivery = _delivery_counter(failures)
    try:
        consumer.subscribe([src], on_assign=lambda *_: ready.set())
        while result.relayed < n and not stop.is_set():
            for msg in consumer.consume(num_messages=CONSUME_BATCH, timeout=POLL_S):
                if msg.error():
                    raise KafkaException(msg.error())
                if result.started is None:
                    result.started = time.perf_counter()
                value = orjson.dumps(orjson.loads(msg.value()))
                _produce(producer, dst, value, msg.key(), msg.headers(), on_delivery)
                result.relayed += 1
            producer.poll(0)
        if producer.flush(FLUSH_S):
            raise RuntimeError("relay could not flush its output")
        result.finished = time.perf_counter()
        if failures:
            raise RuntimeError(f"relay: {len(failures)} deliveries failed, first: {failures[0]}")
    except BaseException as exc:  # handed to the caller's thread
        result.error = exc
    finally:
        consumer.close()


def _await_relay(relay, results, deadline: float) -> _RelayResult:
    """The relay process's result, or one carrying why there is none (it died, or the deadline came)."""
    while not results.poll(min(0.2, _remaining(deadline))):
        if not relay.is_alive() and not results.poll():
            return _RelayResult(error=RuntimeError(f"the baseline relay process exited with code {relay.exitcode} "
                                                   "before relaying everything"))
        if _remaining(deadline) <= 0:
            return _RelayResult(error=TimeoutError("the baseline relay did not finish before the deadline"))
    return results.recv()


def _relay_process(settings: Settings, group_id: str, src: str, dst: str, n: int, ready, stop, results) -> None:
    """The relay's own process: runs _relay and sends its _RelayResult back (errors as text: an
    exception from librdkafka need not pickle)."""
    result = _RelayResult()
    _relay(settings, group_id, src, dst, n, ready, stop, result)
    if result.error is not None:
        result.error = RuntimeError(f"baseline relay: {type(result.error).__name__}: {result.error}")
    results.send(result)


def _sink(settings: Settings, group_id: str, topic: str, n: int,
          ready: threading.Event, stop: threading.Event, result: _SinkResult) -> None:
    from confluent_kafka import Consumer, KafkaException

    consumer = Consumer(_consumer_config(settings, group_id))
    try:
        consumer.subscribe([topic], on_assign=lambda *_: ready.set())
        while len(result.seen) < n and not stop.is_set():
            batch = consumer.consume(num_messages=CONSUME_BATCH, timeout=POLL_S)
            received_ns = time.time_ns()
            for msg in batch:
                if msg.error():
                    raise KafkaException(msg.error())
                seq = int(_header(msg.headers(), SEQ_HEADER))
                if seq in result.seen:  # a redelivery is not a second message
                    continue
                result.seen.add(seq)
                result.latencies_ns.append(received_ns - int(_header(msg.headers(), PRODUCED_NS_HEADER)))
    except BaseException as exc:
        result.error = exc
    finally:
        consumer.close()


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def run_baseline(settings: Settings, n_messages: int, *, payloads: list[bytes] | None = None,
                 rate: float | None = None, timeout_s: float = 120.0) -> dict:
    """Relay n_messages through a plain consume-loads-dumps-produce loop and measure it.

    rate None (capacity): the input topic is filled first, then the relay starts, so events/s is what
    the relay can do, not how fast one producer feeds it. Its latencies would only be queueing time:
    they are reported as nan.
    rate r (live): the relay and the sink join first, then the feeder offers r messages/s; the
    latencies are the hop latency at that load.
    payloads: the raw values to send (cycled when fewer than n_messages), e.g. the pipeline
    benchmark's own input; by default ~1 KB Debezium vital-sign events.
    Returns {"baseline_events_per_s", "baseline_latency_ms_p50", "baseline_latency_ms_p99",
    "baseline_latency_ms_max", "n", "feed_per_s"}, n being the distinct messages that reached the
    output before timeout_s ran out.
    """
    if n_messages < 1:
        raise ValueError("n_messages must be at least 1")
    payloads = payloads or debezium_vital_signs(n_messages)
    deadline = time.monotonic() + timeout_s
    run = uuid.uuid4().hex[:8]
    src, dst = f"{settings.topic_prefix}.bench.{run}.in", f"{settings.topic_prefix}.bench.{run}.out"
    _create_topics(settings, [src, dst], timeout_s=min(30.0, timeout_s))

    # spawn, not fork: this process runs librdkafka and console threads that a fork would copy mid-state
    mp = multiprocessing.get_context("spawn")
    stop, relay_ready, sink_ready = mp.Event(), mp.Event(), threading.Event()
    from_relay, to_caller = mp.Pipe(duplex=False)
    sink_result = _SinkResult()
    group = f"{settings.group_prefix}.bench.{run}"
    relay = mp.Process(target=_relay_process, name="baseline-relay", daemon=True,
                       args=(settings, f"{group}.relay", src, dst, n_messages, relay_ready, stop, to_caller))
    sink = threading.Thread(target=_sink, name="baseline-sink", daemon=True,
                            args=(settings, f"{group}.sink", dst, n_messages, sink_ready, stop, sink_result))
    relay_result = _RelayResult(error=RuntimeError("the baseline relay did not start"))
    try:
        if rate is None:
            feed_s = _feed(settings, src, payloads, n_messages, None, deadline)
            relay.start()
            sink.start()
        else:
            relay.start()
            sink.start()
            # feed only once both consumers own their partitions, so no join time lands in a latency
            if not (relay_ready.wait(_remaining(deadline)) and sink_ready.wait(_remaining(deadline))):
                raise TimeoutError("baseline consumers did not get their partitions in time")
            feed_s = _feed(settings, src, payloads, n_messages, rate, deadline)
        relay_result = _await_relay(relay, from_relay, deadline)
        sink.join(_remaining(deadline))
    finally:
        stop.set()  # ends the loops at once if the deadline passed
        grace_s = max(10.0, settings.session_timeout_s * 2)  # consumer close leaves the group
        if sink.ident is not None:  # started (capacity mode starts it only after the feed)
            sink.join(timeout=grace_s)
        if relay.pid is not None:
            relay.join(timeout=grace_s)
            if relay.exitcode is None:
                relay.kill()
        _delete_topics(settings, [src, dst])

    for err in (relay_result.error, sink_result.error):
        if err is not None:
            raise err
    if len(sink_result.seen) < n_messages:
        log.warning("baseline timed out: %d of %d messages reached the output", len(sink_result.seen), n_messages)
    relay_s = (relay_result.finished or 0.0) - (relay_result.started or 0.0)
    figures = summarize(relay_result.relayed, relay_s, [] if rate is None else sink_result.latencies_ns)
    figures["n"] = len(sink_result.seen)
    figures["feed_per_s"] = n_messages / feed_s if feed_s > 0 else float("nan")
    return figures


def _feed(settings: Settings, topic: str, payloads: list[bytes], n: int, rate: float | None,
          deadline: float) -> float:
    """Produce n messages (at `rate` per second, or as fast as possible); returns the seconds it took."""
    from confluent_kafka import Producer

    feeder = Producer(_producer_config(settings))
    failures: list[str] = []
    on_delivery = _delivery_counter(failures)
    started = time.perf_counter()
    for i in range(n):
        if rate is not None:
            ahead = started + i / rate - time.perf_counter()
            if ahead > 0.001:  # sleep in steps of a millisecond or more; the loop itself is faster
                time.sleep(ahead)
        key = orjson.dumps({"patient_id": f"P{i % N_PATIENTS:05d}"})
        headers = [(PRODUCED_NS_HEADER, str(time.time_ns()).encode()), (SEQ_HEADER, str(i).encode())]
        _produce(feeder, topic, payloads[i % len(payloads)], key, headers, on_delivery)
        feeder.poll(0)
    if feeder.flush(_remaining(deadline)) or failures:
        raise RuntimeError(f"feeder: {len(failures)} deliveries failed or unflushed")
    return time.perf_counter() - started
