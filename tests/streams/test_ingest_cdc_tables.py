"""Every EHR table through the real broker: Debezium messages of vital_signs, lab_results,
encounters and patients -> the ingest worker -> canonical events and dead letters.

The expected events are written out by hand from the fixtures' clinical meaning (tests/fixtures/ingest/cdc).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from schemas import codes
from schemas.canonical import Source, decode_batch
from streams.ingest import IngestWorker
from streams.topics import ensure_topics, topics_for
from tests.fixtures.ingest.corpus import cdc_messages, raw_file

DEADLINE_S = 90
FIXTURES = ("create_bare", "lab_create_schema_wrapped", "lab_creatinine_umol_bare", "lab_amended",
            "lab_delete_key_only", "lab_unmapped_code", "lab_absurd_value", "lab_unknown_unit",
            "encounter_lifecycle", "encounter_pk_change", "patient_create_schema_wrapped", "patient_bare")


def utc_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 1000)


ADMIT_MS, TRANSFER_MS = utc_ms("2024-06-15T12:54:00"), utc_ms("2024-06-16T03:10:00")
VITALS = ("8867-4", "9279-1", "59408-5", "3151-8", "8480-6", "8462-4", "8310-5", "80288-4")

# (fact id, status) of every event each patient's record must receive, by hand from the fixtures
EXPECTED = {
    "MRN-0001": Counter({
        ("cdc:lab_results:501:2524-7", "final"): 1,  # lactate 4.2
        ("cdc:lab_results:503:2524-7", "amended"): 1,  # lactate 2.1 -> 3.4
        # the delete under REPLICA IDENTITY DEFAULT: every lab code of row 503 is retracted
        **{(f"cdc:lab_results:503:{c}", "entered-in-error"): 1 for c in ("2524-7", "6690-2", "2160-0", "777-3")},
        # admitted (4E), transferred (ICU), discharged: the admission is re-stated by both updates
        ("cdc:encounters:ENC-0001:admission", "final"): 3,
        (f"cdc:encounters:ENC-0001:location:{ADMIT_MS}", "final"): 1,
        (f"cdc:encounters:ENC-0001:location:{TRANSFER_MS}", "final"): 1,
        ("cdc:encounters:ENC-0001:discharge", "final"): 1,
        # primary key change ENC-0001-A -> ENC-0001-B
        ("cdc:encounters:ENC-0001-A:admission", "entered-in-error"): 1,
        ("cdc:encounters:ENC-0001-A:discharge", "entered-in-error"): 1,
        ("cdc:encounters:ENC-0001-B:admission", "final"): 1,
        (f"cdc:encounters:ENC-0001-B:location:{ADMIT_MS}", "final"): 1,
        ("cdc:patients:MRN-0001:sex", "final"): 1,
        ("cdc:patients:MRN-0001:birth-year", "final"): 1,
    }),
    "MRN-0002": Counter({
        **{(f"cdc:vital_signs:7:{c}", "final"): 1 for c in VITALS},  # one wide row, eight vitals
        ("cdc:lab_results:502:2160-0", "final"): 1,  # creatinine 176.84 umol/L = 2.0 mg/dL
        ("cdc:patients:MRN-0002:sex", "final"): 1,
        ("cdc:patients:MRN-0002:birth-year", "final"): 1,
    }),
}
EXPECTED_EVENTS = sum(sum(c.values()) for c in EXPECTED.values())


def _raw(settings, topics) -> list[tuple[str, bytes | None, bytes | None]]:
    raw = [(m.topic, m.key, m.value) for name in FIXTURES
           for m in cdc_messages(name, prefix=settings.cdc_topic_prefix)]
    raw.append((topics.cdc["patients"], b'{"patient_id": "MRN-0003"}', raw_file("cdc", "malformed.txt")))
    return raw


def _consume_until(reader, done, worker, thread) -> tuple[list, list]:
    canonical, dead = [], []
    deadline = time.monotonic() + DEADLINE_S
    while not done(canonical, dead):
        assert time.monotonic() < deadline, f"timed out: {worker.counters.snapshot()}"
        assert thread.is_alive(), "ingest worker died"
        for msg in reader.consume(num_messages=100, timeout=0.5):
            assert msg.error() is None, msg.error()
            (canonical if msg.topic().endswith(".canonical") else dead).append(msg)
    return canonical, dead


@pytest.mark.integration
def test_every_ehr_table_reaches_the_canonical_topic_and_bad_rows_the_dead_letter_topic(settings):
    topics = topics_for(settings)
    assert set(topics.cdc) == {"vital_signs", "lab_results", "encounters", "patients"}
    ensure_topics(settings, topics)
    raw = _raw(settings, topics)
    producer = Producer(settings.kafka_client_config())
    for topic, key, value in raw:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0

    worker = IngestWorker(settings, topics)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    reader = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-reader",
                       "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    reader.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                   for t in (topics.canonical, topics.deadletter) for p in range(topics.partitions)])

    def done(canonical, dead):  # everything consumed by the worker, and all of its output read back
        return (worker.counters.snapshot()["cdc"]["messages_in"] >= len(raw)
                and sum(len(decode_batch(m.value())) for m in canonical) >= worker.counters.snapshot()["cdc"]["events_out"]
                and len(dead) >= sum(worker.counters.snapshot()["cdc"]["dead_lettered"].values()))
    try:
        canonical, dead = _consume_until(reader, done, worker, thread)
    finally:
        stop.set()
        thread.join(30)
        reader.close()
    assert not thread.is_alive()

    # accounting: 2 tombstones, 1 unmapped lab code, 3 dead letters, the rest parsed
    snap = worker.counters.snapshot()["cdc"]
    assert snap["messages_in"] == len(raw) and worker.counters.balanced()
    assert snap["control"] == {"tombstone": 2} and snap["ignored"] == {"unmapped_code": 1}
    assert snap["dead_lettered"] == {"implausible_value": 1, "unknown_unit": 1, "malformed_json": 1}

    # canonical: exactly the expected facts, each batch keyed by its patient
    received = defaultdict(list)
    for msg in canonical:
        events = decode_batch(msg.value())
        assert {e.patient_id for e in events} == {msg.key().decode()}
        received[msg.key().decode()] += events
    assert {p: Counter((e.fact_id, e.status.value) for e in events) for p, events in received.items()} == EXPECTED
    assert sum(map(len, received.values())) == EXPECTED_EVENTS

    mrn1 = received["MRN-0001"]
    context = [e for e in mrn1 if e.fact_id.startswith(("cdc:encounters:", "cdc:patients:"))]
    assert context and all(e.code_system == codes.CONTEXT and e.source is Source.CDC for e in context)
    wards = {e.effective_ms: e.value_text for e in context if e.code == codes.LOCATION and e.encounter_id == "ENC-0001"}
    assert wards == {ADMIT_MS: "4E", TRANSFER_MS: "ICU"}
    # one encounter's changes share a partition: its versions arrive in commit order
    admissions = [e.version for e in context if e.fact_id == "cdc:encounters:ENC-0001:admission"]
    assert admissions == sorted(admissions)
    (creatinine,) = [e for e in received["MRN-0002"] if e.code == codes.CREATININE]
    assert (creatinine.value, creatinine.unit) == (2.0, "mg/dL")
    # every CDC event carries its Kafka origin
    for e in mrn1 + received["MRN-0002"]:
        assert e.provenance["topic"] == topics.cdc[e.provenance["table"]] and e.provenance["offset"] >= 0

    # dead letters: the original bytes, reason and origin in the headers
    originals = {(t, v) for t, _k, v in raw}
    reasons = Counter()
    for msg in dead:
        headers = {k: v.decode() for k, v in msg.headers()}
        assert (headers["ww.source.topic"], msg.value()) in originals and headers["ww.stage"] == "ingest.cdc"
        reasons[(headers["ww.source.topic"].rsplit(".", 1)[1], headers["ww.reason"])] += 1
    assert reasons == Counter({("lab_results", "implausible_value"): 1, ("lab_results", "unknown_unit"): 1,
                               ("patients", "malformed_json"): 1})
