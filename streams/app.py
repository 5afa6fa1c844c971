"""Wiring: the faust worker that owns per-patient state. Logic lives in streams/patient_agent.py.

    canonical (key patient, value JSON array of events of that patient)
        -> agent `patients` (take_events batches; one table write per patient per batch)
        -> late / features / scores / alerts (confluent-kafka producer, flushed before the batch is acked)
        -> deadletter (undecodable canonical messages)

State: table `patient_state` (changelog-backed) holds PatientRecord bytes per patient. It uses the
producer's partitioner for its changelog, so every producer of `canonical` must use murmur2 (the
Java/aiokafka default) for the changelog partition to equal the source partition.
"""

from __future__ import annotations

import logging
import time

import faust
from confluent_kafka import Producer

from schemas.deadletter import Stage, deadletter_headers
from streams.alerting import AlertPolicy
from streams.patient_agent import CanonicalMessage, PatientProcessor, PatientRecord
from streams.scoring import Scorer
from streams.topics import Topics, ensure_topics, topics_for
from wardwatch.settings import Settings

log = logging.getLogger("wardwatch.worker")

MODEL_RELOAD_CHECK_S = 2.0  # how often the worker looks for a promoted model


def _produced_ns(headers) -> int | None:
    if not headers:
        return None
    items = headers.items() if isinstance(headers, dict) else headers
    for k, v in items:
        if k == "ww.produced_ns" and v:
            try:
                return int(v)
            except ValueError:
                return None
    return None


def create_app(settings: Settings, topics: Topics | None = None) -> faust.App:
    topics = topics or topics_for(settings)
    app = faust.App(
        f"{settings.group_prefix}-worker",
        broker=f"kafka://{settings.bootstrap_servers}",
        store="memory://",  # the changelog topic is the durable copy
        topic_partitions=topics.partitions,
        topic_allow_declare=True,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        web_enabled=settings.worker_web_port is not None,
        web_port=settings.worker_web_port or 6066,
        web_bind="127.0.0.1",
        producer_linger_ms=1,
        stream_wait_empty=False,
        table_cleanup_interval=3600.0,
        consumer_auto_offset_reset="earliest",
    )
    canonical = app.topic(topics.canonical, key_type=bytes, value_type=bytes, key_serializer="raw",
                          value_serializer="raw", partitions=topics.partitions)
    table = app.Table("patient_state", default=None, partitions=topics.partitions, use_partitioner=True,
                      key_type=str, value_type=bytes)

    scorer = Scorer(settings.model_dir, settings)
    processor = PatientProcessor(settings, scorer, AlertPolicy.from_settings(settings))
    producer = Producer({**settings.kafka_client_config(), "linger.ms": 2, "partitioner": "murmur2_random",
                         "enable.idempotence": False, "acks": "all"})
    next_reload_check = [0.0]  # monotonic time of the next look at the registry's `current` pointer
    parsed: dict[str, tuple[bytes, PatientRecord]] = {}  # read-through cache: table bytes -> parsed record

    def load(patient: str) -> PatientRecord | None:
        raw = table.get(patient)
        if raw is None:
            return None
        hit = parsed.get(patient)
        if hit is not None and hit[0] is raw:  # same bytes object the table holds: still valid
            return hit[1]
        rec = PatientRecord.from_bytes(raw)
        parsed[patient] = (raw, rec)
        return rec

    def send(topic: str, records) -> None:
        for key, value, headers in records:
            producer.produce(topic, key=key, value=value, headers=headers)

    @app.agent(canonical, name="patients")
    async def patients(stream):
        async for events in stream.take_events(settings.worker_batch_size, within=settings.worker_batch_within_s):
            if time.monotonic() >= next_reload_check[0]:  # a file read, not per batch on the hot path
                scorer.reload_if_changed()
                next_reload_check[0] = time.monotonic() + MODEL_RELOAD_CHECK_S
            msgs = [CanonicalMessage(ev.message.partition, ev.message.offset, ev.value,
                                     _produced_ns(ev.message.headers), ev.key) for ev in events]
            records, out = processor.process(msgs, load)
            send(topics.late, out.late)
            send(topics.features, out.features)
            send(topics.scores, out.scores)
            send(topics.alerts, out.alerts)
            for msg, rejection in out.rejected:
                producer.produce(topics.deadletter, key=msg.key, value=msg.value, headers=deadletter_headers(
                    rejection, Stage.PATIENT_STATE, topics.canonical, msg.partition, msg.offset))
            # outputs are durable before the batch is acked (at-least-once; ids make repeats idempotent)
            if producer.flush(30) != 0:
                raise RuntimeError("output producer could not deliver within 30 s: is the broker up?")
            for patient, rec in records.items():
                raw = rec.to_bytes()
                table[patient] = raw
                parsed[patient] = (raw, rec)

    @app.on_rebalance_complete.connect
    async def _forget_cache(sender, **kwargs):  # another worker may have changed a patient we held
        parsed.clear()

    return app


def run_worker(settings: Settings, loglevel: str = "WARN") -> None:
    """Blocking: run the faust worker until SIGTERM/SIGINT."""
    topics = topics_for(settings)
    ensure_topics(settings, topics)
    app = create_app(settings, topics)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
