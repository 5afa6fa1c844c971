"""Bad input at volume (issue #8): more than 10,000 malformed or hostile messages mixed into a valid
replay, on the CDC and FHIR raw topics, through the real `wardwatch ingest` and `wardwatch worker`.

Neither service may crash, every input must be accounted for (`wardwatch stats --json` and the
dead-letter topic), and the valid messages must yield exactly the canonical events they yield
without the bad ones, none of them late.

The bad inputs are hand-written (huge payloads near the broker's message limit, 100k levels of
nesting, invalid UTF-8, wrong types, unknown codes, future and ancient times, NaN/Infinity literals,
Debezium envelopes with fields missing, FHIR bundles of the wrong resource types) plus
hypothesis-generated (random bytes, random JSON, valid messages with one field replaced by a hostile
value). Any of them that parse are about fuzz patients (FZ-*), never about a patient of the replay:
a well-formed message about a real patient is not bad input, it is data.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streams.replay import RawMessage
from schemas.ingest_outcome import Parsed
from tests.integration.pipeline import (Pipeline, archived, archived_events, cohort, parse_offline, publish_messages,
                                        record_figures, reference_events, rejected_count, stats_json,
                                        valid_replay)

DEADLINE_S = 240
HYPOTHESIS_PER_KIND = 1700  # x 6 kinds (3 per source) + the hand-written ones: > 10,000
NEAR_LIMIT = 950_000  # bytes: under the producer's and broker's 1 MB default message limit
TABLES = ("vital_signs", "lab_results", "encounters", "patients")


# --- hand-written hostile inputs -----------------------------------------------------------------


def _bare(op: str | None = "c", after: dict | None = None, before: dict | None = None, **extra) -> dict:
    env = {"before": before, "after": after, "source": {"connector": "postgresql", "db": "ehr", "schema": "public",
                                                        "lsn": 1000 + len(str(after)), "ts_ms": 1718467200000,
                                                        "txId": 7},
           "op": op, "ts_ms": 1718467200000, **extra}
    return {k: v for k, v in env.items() if v is not ...}


def _vitals(n: int, **columns) -> dict:
    return {"id": 10**9 + n, "patient_id": f"FZ-{n:05d}", "encounter_id": None,
            "measured_at": 1718467200000000, "heart_rate": 80, **columns}


def _cdc(table: str, value: bytes | None, n: int, key: bytes | None = b"") -> RawMessage:
    return RawMessage("cdc", table, orjson.dumps({"patient_id": f"FZ-{n:05d}"}) if key == b"" else key, value)


def _fhir(value: bytes, key: bytes | None = None) -> RawMessage:
    return RawMessage("fhir", None, key, value)


def _js(obj) -> bytes:
    """Python's json writes NaN and Infinity as the bare literals a careless producer sends."""
    return json.dumps(obj).encode()


def _observation(n: int, **fields) -> dict:
    obs = {"resourceType": "Observation", "id": f"fz-{n}", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "subject": {"identifier": {"system": "http://hospital.example.org/identifiers/mrn", "value": f"FZ-{n:05d}"}},
           "effectiveDateTime": "2024-06-15T12:00:00Z", "issued": "2024-06-15T12:00:00Z",
           "valueQuantity": {"value": 80, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
           "meta": {"versionId": "1"}}
    obs.update(fields)
    return {k: v for k, v in obs.items() if v is not ...}


def _bundle(n: int, *resources, bundle_type: str = "history", status_type: str = "event-notification") -> dict:
    status = {"resourceType": "SubscriptionStatus", "status": "active", "type": status_type,
              "eventsSinceSubscriptionStart": str(n),
              "notificationEvent": [{"eventNumber": str(n), "focus": {"reference": f"Observation/fz-{n}"}}],
              "subscription": {"reference": "Subscription/ww-fuzz"},
              "topic": "http://hospital.example.org/fhir/SubscriptionTopic/vital-signs"}
    return {"resourceType": "Bundle", "type": bundle_type,
            "entry": [{"resource": status}, *({"resource": r} for r in resources)]}


def hand_written() -> list[RawMessage]:
    out: list[RawMessage] = []
    deep = [b"[" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"[" * 1000 + b"]" * 1000,
            b'{"payload":' + b"[" * 900 + b"]" * 900 + b"}"]
    garbage = [b"", b" ", b"null", b"0", b"[]", b"{}", b'"text"', b"true", b"\x00" * 64, b"{not json",
               b"\xff\xfe\xfd", b'{"op":"c","after":{"patient_id":"\xc3\x28"}}', b'"\xed\xa0\x80"',
               b'{"a":"\\ud800"}', b"\xef\xbb\xbf{}", b"1e999999", b"NaN", b"-Infinity"]
    huge = [b'{"payload":"' + b"A" * NEAR_LIMIT + b'"}', b"\x80" * NEAR_LIMIT,
            b"[" + b"1," * (NEAR_LIMIT // 2) + b"1]"]
    for i, value in enumerate(deep + garbage + huge):
        out.append(_cdc(TABLES[i % len(TABLES)], value, i))
        out.append(_fhir(value))
    n = 100
    times = [-1, 0, 2**63 - 1, 2**64, -(2**63), 32503680000000000, -2208988800000000, "9999-12-31T23:59:59Z",
             "0001-01-01T00:00:00Z", "2024-13-45T99:99:99Z", "yesterday", 1.5e300, True, None, [], {}]
    for t in times:
        n += 1
        out.append(_cdc("vital_signs", _js(_bare(after=_vitals(n, measured_at=t))), n))
        out.append(_fhir(_js(_bundle(n, _observation(n, effectiveDateTime=t)))))
    for v in (float("nan"), float("inf"), float("-inf"), "80", "eighty", True, [80], {"v": 80}, 10**30, -5,
              1e308, "", None, 5000):
        n += 1
        out.append(_cdc("vital_signs", _js(_bare(after=_vitals(n, heart_rate=v, respiratory_rate=v))), n))
        out.append(_fhir(_js(_bundle(n, _observation(n, valueQuantity={"value": v, "unit": "/min",
                                                                            "code": "/min"})))))
    for code in ("0000-0", "", "8867-4-x", "DROP TABLE", None, 8867):  # unknown / wrong-typed codes
        n += 1
        out.append(_cdc("lab_results", _js(_bare(after={"id": 10**9 + n, "patient_id": f"FZ-{n:05d}",
                                                         "loinc_code": code, "value": 1.0, "unit": "mmol/L",
                                                         "collected_at": 1718467200000000, "status": "final"})), n))
        out.append(_fhir(_js(_bundle(n, _observation(n, code={"coding": [{"system": "http://loinc.org",
                                                                            "code": code}]})))))
    envelopes = [  # Debezium envelopes with fields missing or wrong
        {"after": _vitals(1)}, {"op": "c"}, {"op": "c", "after": None}, {"op": "u", "after": _vitals(2)},
        {"op": "d"}, {"op": "x", "after": _vitals(3)}, {"op": "c", "after": _vitals(4), "source": None},
        {"op": "c", "after": {"id": 1}}, {"op": "c", "after": {"patient_id": None, "measured_at": 1}},
        {"op": "c", "after": "not an object"}, {"op": "c", "after": []}, {"payload": None}, {"schema": {}},
        {"schema": None, "payload": {"op": "c"}}, {"schema": [], "payload": _bare(after=_vitals(5))},
        {"op": ["c"], "after": _vitals(6)}, {"op": "c", "after": _vitals(7, id=None)},
        {"op": "c", "after": _vitals(8), "source": {"lsn": "not a number"}},
        {"op": "c", "after": _vitals(9), "source": {"lsn": 2**70}},
        {"op": "c", "after": _vitals(10, patient_id=["FZ"])},
        {"op": "c", "after": _vitals(11, patient_id="x" * 100_000)},
    ]
    for table in TABLES:
        for env in envelopes:
            n += 1
            out.append(_cdc(table, _js(env), n))
    resources = [{"resourceType": "Patient"}, {"resourceType": "Medication", "id": "m"}, {"resourceType": None},
                 {"resourceType": "Observation"}, {}, [], "Observation", {"resourceType": "Bundle", "entry": []}]
    for i, r in enumerate(resources):
        n += 1
        out += [_fhir(_js(r)), _fhir(_js(_bundle(n, r))),
                _fhir(_js({"resourceType": "Bundle", "type": "history", "entry": [{"resource": r}]})),
                _fhir(_js(_bundle(n, _observation(n), bundle_type=["searchset", "collection", None, 7][i % 4]))),
                _fhir(_js(_bundle(n, _observation(n), status_type=["unknown", None, 3, "query-event"][i % 4])))]
    out.append(_fhir(_js({"resourceType": "Bundle", "type": "history"})))
    out.append(_fhir(_js({"resourceType": "Bundle", "type": "history", "entry": None})))
    out.append(_fhir(_js(_bundle(n, *[_observation(n + k, id=f"fz-big-{k}", note=[{"text": "x" * 4000}])
                                      for k in range(200)]))))  # ~0.9 MB of one bundle
    return out


# --- hypothesis-generated ------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12)


def _examples(strategy, n: int) -> list:
    """n examples of a strategy, reproducibly (derandomized; generate only: nothing to shrink)."""
    drawn: list = []

    @hsettings(max_examples=n, phases=[Phase.generate], database=None, deadline=None, derandomize=True,
               suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example) -> None:
        drawn.append(example)

    collect()
    return drawn


def _paths(obj, prefix=()):
    """Every path into a JSON object (dict keys and list indices), for replacing one value."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _replace(obj, path, value):
    if not path:
        return value
    copy = obj.copy()
    copy[path[0]] = _replace(obj[path[0]], path[1:], value)
    return copy


def fuzz_identity(message: RawMessage, patients: list[str]) -> RawMessage:
    """The same message about fuzz patients (FZ-*) instead of the replay's, so a mutation that still
    parses adds facts to patients nobody else writes to."""
    key, value = message.key, message.value
    for i, patient in enumerate(patients):
        fuzz = f"FZ-{i:05d}".encode()
        key = key.replace(patient.encode(), fuzz) if key else key
        value = value.replace(patient.encode(), fuzz) if value else value
    return RawMessage(message.kind, message.table, key, value)


def mutations(valid: list[RawMessage], patients: list[str], n: int, seed: int) -> list[RawMessage]:
    """Valid messages, each with one value (anywhere in the JSON) replaced by a hypothesis value."""
    rng = random.Random(seed)
    replacements = _examples(json_values, n)
    out = []
    for value in replacements:
        base = fuzz_identity(rng.choice(valid), patients)
        doc = orjson.loads(base.value)
        # not inside a Debezium `schema`: the parser reads types from it but need not check all of it
        path = rng.choice([p for p in _paths(doc) if p[:1] != ("schema",)])
        out.append(RawMessage(base.kind, base.table, base.key, _js(_replace(doc, path, value))))
    return out


def hypothesis_inputs(valid: list[RawMessage], patients: list[str]) -> list[RawMessage]:
    cdc = [m for m in valid if m.kind == "cdc" and m.value is not None]
    fhir = [m for m in valid if m.kind == "fhir" and b"Observation" in m.value]
    raw_bytes = _examples(st.binary(max_size=300), HYPOTHESIS_PER_KIND)
    raw_json = _examples(json_values, HYPOTHESIS_PER_KIND)
    out = [_cdc(TABLES[i % len(TABLES)], b, i, key=b) for i, b in enumerate(raw_bytes)]
    out += [_fhir(b) for b in raw_bytes]
    out += [_cdc(TABLES[i % len(TABLES)], _js(v), i) for i, v in enumerate(raw_json)]
    out += [_fhir(_js(v)) for v in raw_json]
    out += mutations(cdc, patients, HYPOTHESIS_PER_KIND, seed=1)
    out += mutations(fhir, patients, HYPOTHESIS_PER_KIND, seed=2)
    return out


def mix(valid: list[RawMessage], bad: list[RawMessage], seed: int = 5) -> list[RawMessage]:
    """Bad messages spread among the valid ones, which keep their own order."""
    rng = random.Random(seed)
    slots = sorted(rng.randrange(len(valid) + 1) for _ in bad)
    shuffled = bad[:]
    rng.shuffle(shuffled)
    out, b = [], 0
    for i, m in enumerate(valid):
        while b < len(slots) and slots[b] == i:
            out.append(shuffled[b])
            b += 1
        out.append(m)
    return out + shuffled[b:]


# --- the test ------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_ten_thousand_bad_inputs_crash_nothing_lose_nothing_and_leave_valid_events_alone(settings, request,
                                                                                          tmp_path):
    settings = settings.model_copy(update={"stats_interval_s": 0.5})
    replay = valid_replay(cohort(request), settings)
    patients = replay.manifest["patients"]
    bad = hand_written() + hypothesis_inputs(replay.messages, patients)
    messages = mix(replay.messages, bad)
    with Pipeline(settings, tmp_path / "logs") as pipe:
        topics = pipe.topics
        expected = reference_events(replay.messages, topics, settings)  # what a clean run ingests
        expected_dead = rejected_count(bad, topics, settings)
        started = time.monotonic()
        published = publish_messages(settings, topics, messages, rate=1000)  # a replay compresses days into seconds: keep cross-topic skew small
        pipe.wait_processed(published["end_offsets"], deadline=time.monotonic() + DEADLINE_S)
        seconds = time.monotonic() - started
        pipe.check_alive()  # zero crashes: both services are still running after all of it
        codes = pipe.stop()
    assert codes == {"ingest": 0, "worker": 0}, pipe.log_tail("ingest") + pipe.log_tail("worker")

    # every input is accounted for, per source, as the operator's `wardwatch stats` shows it
    ingest = stats_json(settings)["services"]["ingest"]
    counters = ingest["counters"]
    by_source = Counter(m.kind for m in messages)
    for source in ("cdc", "fhir"):
        assert counters[source]["messages_in"] == published[source] == by_source[source]
        assert ingest["balanced"][source] is True
    dead_counted = sum(sum(counters[s]["dead_lettered"].values()) for s in ("cdc", "fhir"))
    dead = archived(settings, "deadletter")
    assert dead.height == dead_counted == expected_dead  # each one on the dead-letter topic, once
    assert set(dead["stage"]) <= {"ingest.cdc", "ingest.fhir"} and dead["reason"].null_count() == 0

    # the valid messages' events are all there, unchanged, and none went late
    events = archived_events(settings)
    real = {k: v for k, v in events.items() if k[0] in patients}
    assert real == expected
    late = archived(settings, "late")
    late_real = late.filter(late["patient_id"].is_in(patients)).height if late.height else 0
    assert late_real == 0

    record_figures("bad_input_volume", {
        "valid_messages": len(replay.messages), "bad_inputs": len(bad),
        "bad_inputs_hand_written": len(bad) - 6 * HYPOTHESIS_PER_KIND,
        "bad_inputs_hypothesis": 6 * HYPOTHESIS_PER_KIND,
        "messages_in": {s: counters[s]["messages_in"] for s in ("cdc", "fhir")},
        "dead_lettered": dead_counted, "dead_letter_reasons": dict(Counter(dead["reason"])),
        "bad_inputs_parsed_as_fuzz_patient_events": sum(isinstance(parse_offline(m, topics, settings), Parsed)
                                                        for m in bad),
        "valid_events": len(expected), "valid_events_lost_or_changed": sum(real.get(k) != v for k, v in expected.items()),
        "valid_events_late": late_real, "crashes": 0, "seconds": round(seconds, 1),
    })


def future_dated_copy(message: RawMessage, row_id: int, measured_at_us: int) -> RawMessage:
    """A valid vital-signs insert of the same patient, as another row measured at `measured_at_us`."""
    doc = orjson.loads(message.value)
    after = doc["payload"]["after"]
    after.update(id=row_id, measured_at=measured_at_us)
    doc["payload"]["source"]["lsn"] = doc["payload"]["source"]["lsn"] + 1
    return RawMessage(message.kind, message.table, message.key, orjson.dumps(doc))


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_row_dated_decades_ahead_does_not_make_the_patients_later_events_late(settings, request, tmp_path):
    replay = valid_replay(cohort(request), settings)
    vitals = [m for m in replay.messages if m.table == "vital_signs"]
    patient = orjson.loads(vitals[0].key)["payload"]["patient_id"]
    future = future_dated_copy(vitals[0], row_id=10**9, measured_at_us=4_070_908_800_000_000)  # 2099-01-01
    first = replay.messages.index(vitals[0])
    messages = replay.messages[:first + 1] + [future] + replay.messages[first + 1:]
    with Pipeline(settings, tmp_path / "logs") as pipe:
        expected = reference_events(replay.messages, pipe.topics, settings)
        published = publish_messages(settings, pipe.topics, messages, rate=2000)
        pipe.wait_processed(published["end_offsets"], deadline=time.monotonic() + DEADLINE_S)
        pipe.check_alive()
    dead = archived(settings, "deadletter")
    assert list(dead["reason"]) == ["future_time"]  # the 2099 row, and nothing else
    late = archived(settings, "late")
    mine = late.filter(late["patient_id"] == patient) if late.height else late
    print(f"\n{mine.height} of {sum(k[0] == patient for k in expected)} valid events of the patient went late "
          "after one row dated 2099")
    # taken, the 2099 row would have set the patient's clock 75 years ahead: every later event late by decades.
    # A few FHIR labs can still arrive days behind the CDC rows when the loaded machine delivers one raw
    # partition's batch late (the ingest's alignment cannot wait for data it has not seen): hours to days,
    # never years (a CI run at 619de0c: 4 of 491, 23-71 h)
    assert mine.height == 0 or mine["late_by_ms"].max() < 30 * 24 * 3_600_000, mine["late_by_ms"].to_list()


def encounter_with_long_text(n: int, text_bytes: int) -> RawMessage:
    """A well-formed encounters insert (of a fuzz patient) whose encounter class is `text_bytes` long."""
    after = {"encounter_id": f"E-FZ-{n}", "patient_id": f"FZ-{n:05d}", "admitted_at": 1718467200000000,
             "encounter_class": "x" * text_bytes, "ward": "W1", "updated_at": 1718467200000000,
             "discharged_at": None}
    return _cdc("encounters", _js(_bare(after=after)), n)


def publish_oversized(settings, topic: str, message: RawMessage) -> dict[tuple[str, int], int]:
    """Produce one message larger than a default client's 1 MB limit, as a producer configured for
    large rows does (Debezium with a raised max.request.size); the embedded broker accepts it."""
    from confluent_kafka import Producer

    ends = {}
    producer = Producer({**settings.kafka_client_config(), "message.max.bytes": 10_000_000,
                         "partitioner": "murmur2_random"})
    producer.produce(topic, key=message.key, value=message.value,
                     on_delivery=lambda err, msg: err or ends.update({(msg.topic(), msg.partition()): msg.offset() + 1}))
    assert producer.flush(30) == 0 and ends, "the broker did not take the large message"
    return ends


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_raw_message_over_the_clients_size_limit_does_not_stop_ingest(settings, request, tmp_path):
    replay = valid_replay(cohort(request), settings)
    huge = encounter_with_long_text(1, 1_500_000)
    with Pipeline(settings, tmp_path / "logs", worker=False) as pipe:
        ends = publish_oversized(settings, pipe.topics.cdc["encounters"], huge)
        published = publish_messages(settings, pipe.topics, replay.messages, rate=2000)
        for tp, end in ends.items():
            published["end_offsets"][tp] = max(end, published["end_offsets"].get(tp, 0))
        try:
            pipe.wait_processed(published["end_offsets"], deadline=time.monotonic() + 90)
        finally:
            print("\n" + pipe.log_tail("ingest", 800))
        pipe.check_alive()
    counters = stats_json(settings)["services"]["ingest"]["counters"]
    assert counters["cdc"]["messages_in"] == published["cdc"] + 1
