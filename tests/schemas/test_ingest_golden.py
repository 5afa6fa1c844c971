"""Golden outcomes of the ingest parsers: schemas.cdc.parse_cdc and schemas.fhir.parse_notification
must give, for every message of a stored corpus, exactly the outcome they gave when the fixture was
made: the same type (Parsed / Rejected / NeedsFetch / Control / Ignored), the same dead-letter reason,
detail and exception, and byte for byte the same canonical events (streams.ingest.encode_events).

The messages (tests/fixtures/ingest_golden/corpus.jsonl.gz, stored so the test needs no clinosim):
- the replay of the 8-patient clinosim cohort (seed 7) with its faults (malformed JSON, a bad
  resource, an impossible value, redeliveries, amendments, retractions, preliminary results and
  their final versions, context rows);
- every raw-message fixture of tests/fixtures/ingest (CDC and FHIR, good and bad);
- hostile_fhir(): hand-written invalid notifications (wrong types, missing required fields, bad
  dates, unknown resourceType, unknown fields, a Bundle with one invalid entry, ...);
then, made here from those (mutants()): every value of a few good notifications and change events
replaced by a value of each wrong kind, every key dropped, an unknown key added to every object.

The outcome of each message is one line of tests/fixtures/ingest_golden/golden.jsonl.gz (the events
as a sha256 of their bytes); FHIR messages also pin schemas.fhir.read_status. This is what proves a
speed-up of the parsers changed no output and no dead-letter decision. When outcomes are meant to
change, regenerate after checking the reason:

    .venv/bin/python -m tests.schemas.test_ingest_golden             # golden from the corpus
    .venv/bin/python -m tests.schemas.test_ingest_golden --corpus    # the corpus too (needs clinosim)
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson

from schemas.cdc import parse_cdc
from schemas.fhir import parse_notification, read_status
from schemas.ingest_outcome import Control, Ignored, NeedsFetch, Parsed, Rejected
from streams.ingest import encode_events
from tests.fixtures.ingest.corpus import CDC_PREFIX, cdc_messages, cdc_names, fhir_bundle, fhir_names, raw_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ingest_golden"
CORPUS = FIXTURES / "corpus.jsonl.gz"
GOLDEN = FIXTURES / "golden.jsonl.gz"
FHIR_TOPIC = "ww.fhir.notifications"

# what replaces a value in the mutants: each kind of wrong JSON value, and strings a FHIR or
# Debezium type could mistake for one of its own
WRONG_VALUES = (None, True, 0, -7, 2.5, 1e300, 2**70, "", " ", "x", "2024-13-45T25:61:00Z", "2024-06-15T14:07:00",
                "2024-06", [], [{}], {}, {"x": 1})


@dataclasses.dataclass(frozen=True)
class Message:
    source: str  # "cdc" | "fhir"
    topic: str
    key: bytes | None
    value: bytes | None


def outcome_of(m: Message) -> list:
    """The parser's outcome as a JSON-able list: everything a user (or the dead-letter topic) sees."""
    if m.source == "cdc":
        outcome = parse_cdc(m.topic, m.key, m.value, partition=3, offset=41, cdc_topic_prefix=CDC_PREFIX)
    else:
        outcome = parse_notification(m.value, topic=m.topic, partition=3, offset=41)
    if isinstance(outcome, Parsed):
        encoded = encode_events(outcome)
        events = (["Rejected", encoded.rejection.reason.value, encoded.rejection.detail, encoded.rejection.exception]
                  if isinstance(encoded, Rejected) else
                  [len(encoded), hashlib.sha256(b"\n".join(p.encode() + b" " + e for p, e in encoded)).hexdigest()])
        line = ["Parsed", events, outcome.subscription, outcome.event_numbers, outcome.skipped]
    elif isinstance(outcome, Rejected):
        r = outcome.rejection
        line = [type(outcome).__name__, r.reason.value, r.detail, r.exception,
                # the references to fetch, then the Patients whose MRN must be read ("Patient/<id>")
                list(outcome.references) + list(outcome.patients) if isinstance(outcome, NeedsFetch) else None]
    elif isinstance(outcome, (Control, Ignored)):
        line = [type(outcome).__name__, outcome.kind, outcome.detail]
    else:
        raise AssertionError(f"not an outcome: {outcome!r}")
    if m.source == "fhir":
        status = read_status(m.value)
        line.append(dataclasses.asdict(status) if status is not None else None)
    return line


# --- the corpus ----------------------------------------------------------------------------------


def _b(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _unb(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def load_corpus() -> list[Message]:
    rows = [orjson.loads(line) for line in gzip.decompress(CORPUS.read_bytes()).splitlines()]
    return [Message(source, topic, _unb(key), _unb(value)) for source, topic, key, value in rows]


def all_messages() -> list[Message]:
    stored = load_corpus()
    return stored + list(mutants(stored))


def fixture_messages() -> list[Message]:
    cdc = [Message("cdc", m.topic, m.key, m.value) for name in cdc_names() for m in cdc_messages(name)]
    cdc += [Message("cdc", f"{CDC_PREFIX}.vital_signs", None, raw_file("cdc", name))
            for name in ("malformed.txt", "invalid_utf8.bin")]
    fhir = [Message("fhir", FHIR_TOPIC, None, fhir_bundle(name)) for name in fhir_names()]
    fhir += [Message("fhir", FHIR_TOPIC, None, raw_file("fhir", name))
             for name in ("malformed.txt", "invalid_utf8.bin")]
    fhir.append(Message("fhir", FHIR_TOPIC, None, None))
    return cdc + fhir


def _bundle(*resources: dict, bundle_type: str = "history") -> dict:
    status = {"resourceType": "SubscriptionStatus", "id": "s", "status": "active", "type": "event-notification",
              "eventsSinceSubscriptionStart": "9",
              "notificationEvent": [{"eventNumber": "9", "timestamp": "2024-06-15T14:07:01Z"}],
              "subscription": {"reference": "Subscription/ww"}}
    return {"resourceType": "Bundle", "type": bundle_type, "timestamp": "2024-06-15T14:07:01Z",
            "entry": [{"resource": status}] + [{"fullUrl": f"urn:uuid:{i}", "resource": r}
                                              for i, r in enumerate(resources)]}


def _heart_rate(**changes) -> dict:
    obs = {"resourceType": "Observation", "id": "hr-1", "meta": {"versionId": "1"}, "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "subject": {"reference": "Patient/p1", "identifier": {"value": "MRN-9"}},
           "effectiveDateTime": "2024-06-15T14:06:00Z", "issued": "2024-06-15T14:06:30Z",
           "valueQuantity": {"value": 80, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}
    obs.update(changes)
    return {k: v for k, v in obs.items() if v is not None}


def hostile_fhir() -> list[bytes]:
    """Invalid notifications fhir.resources (or the mapping) must reject, and their neighbours."""
    enc = {"resourceType": "Encounter", "id": "e1", "status": "in-progress",
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
           "subject": {"reference": "Patient/p1"}, "period": {"start": "2024-06-15T08:00:00Z"}}
    r5_enc = {**{k: v for k, v in enc.items() if k not in ("class", "period")}, "class": [{"text": "inpatient"}],
              "actualPeriod": enc["period"]}
    pat = {"resourceType": "Patient", "id": "p1", "meta": {"lastUpdated": "2024-06-15T08:00:00Z"},
           "gender": "female", "birthDate": "1950-02-03"}
    bundles = [
        _bundle(_heart_rate()),
        _bundle(_heart_rate(status=7)),  # wrong types
        _bundle(_heart_rate(valueQuantity={"value": "eighty", "code": "/min"})),
        _bundle(_heart_rate(valueQuantity={"value": True, "code": "/min"})),
        _bundle(_heart_rate(code={"coding": {"system": "http://loinc.org", "code": "8867-4"}})),
        _bundle(_heart_rate(subject="Patient/p1")),
        _bundle(_heart_rate(meta={"versionId": 1})),
        _bundle(_heart_rate(id=42)),
        _bundle(_heart_rate(id="has spaces")),
        _bundle(_heart_rate(status=None)),  # missing required fields
        _bundle(_heart_rate(status="")),
        _bundle(_heart_rate(status="done")),
        _bundle({**_heart_rate(), "code": {"text": "heart rate"}}),
        _bundle(_heart_rate(effectiveDateTime="2024-02-30T10:00:00Z")),  # bad dates
        _bundle(_heart_rate(effectiveDateTime="2024-06-15 14:06:00")),
        _bundle(_heart_rate(effectiveDateTime="2024-06-15T14:06:00")),  # no zone: FHIR requires one
        _bundle(_heart_rate(effectiveDateTime="2024-06-15")),
        _bundle(_heart_rate(issued="2024-06-15")),
        _bundle(_heart_rate(effectiveDateTime=None, effectivePeriod={"start": "2024-06-15T14:06:00Z",
                                                                      "end": "last week"})),
        _bundle(_heart_rate(meta={"lastUpdated": "soon"}, issued=None)),
        _bundle({**_heart_rate(), "resourceType": "Observatoin"}),  # unknown resourceType
        _bundle({**_heart_rate(), "resourceType": "Encounter"}),
        _bundle({**_heart_rate(), "wardwatchScore": 3}),  # unknown fields
        _bundle(_heart_rate(valueQuantity={"value": 80, "code": "/min", "precision": 2})),
        _bundle(_heart_rate(subject={"reference": "Patient/p1", "display": "x", "note": "y"})),
        _bundle({**_heart_rate(), "_status": {"extension": [{"url": "http://x", "valueString": "y"}]}}),
        _bundle({**_heart_rate(), "_status": {"bogus": 1}}),
        _bundle(_heart_rate(valueQuantity=None, valueString="80", valueInteger=80)),  # two value[x]
        _bundle(_heart_rate(effectiveInstant="2024-06-15T14:06:00Z")),
        _bundle(_heart_rate(contained=[{"resourceType": "Patient", "id": "p", "gender": 1}])),
        _bundle(_heart_rate(), _heart_rate(id="hr-2", valueQuantity={"value": 81, "unit": "/min",
                                                                     "code": "/min", "comparator": "about"})),
        _bundle(_heart_rate(), {"resourceType": "Observation", "id": "other", "status": "final"}),  # unmapped, invalid
        _bundle(_heart_rate(), {"resourceType": "Basic", "id": "b", "code": 3}),  # an unvalidated type
        _bundle(_heart_rate(), {**enc, "status": "walking"}),  # a Bundle with an invalid entry
        _bundle(_heart_rate(), {**enc, "period": {"start": "2024-06-15T08:00:00Z", "end": "2024-06-14"}}),
        _bundle({**enc, "class": [{"code": "IMP"}]}),
        _bundle(enc, bundle_type="subscription-notification"),  # R5: class is a list there
        _bundle({**enc, "class": [{"coding": [{"code": "IMP"}]}]}, bundle_type="subscription-notification"),
        _bundle({**pat, "birthDate": "1950-02-30"}),
        _bundle({**pat, "birthDate": "50-02-03"}),
        _bundle({**pat, "birthDate": 1950}),
        _bundle({**pat, "gender": "f"}),
        _bundle({**pat, "deceasedBoolean": "no"}),
        _bundle(pat, _heart_rate(), bundle_type="searchset"),
        _bundle(_heart_rate(), bundle_type="subscription-notification"),
        _bundle(_heart_rate(component=[{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                                        "valueQuantity": {"value": "high"}}])),
        _bundle(_heart_rate(component=[{"valueQuantity": {"value": 120}}])),  # a component without code
        # elements a validator could check apart from the rest, next to what is checked across elements
        _bundle(_heart_rate(category=[{"text": "vital-signs"}], status=None, _status={"extension": []})),
        _bundle(_heart_rate(category=[{"text": "vital-signs"}], valueString="80")),
        _bundle(_heart_rate(category=[None], performer=[{"reference": "Practitioner/1"}])),
        _bundle(_heart_rate(subject={"reference": "Patient/p1"}, code=None)),
        _bundle(_heart_rate(referenceRange=[{"low": {"value": 2**70}}])),
        _bundle(r5_enc, bundle_type="subscription-notification"),
        _bundle({**r5_enc, "class_fhir": [{"text": "x"}]},  # a second key for `class`
                bundle_type="subscription-notification"),
        _bundle({**enc, "subject": {"reference": "Patient/p1"}, "subject_fhir": {"reference": "Patient/p1"}}),
        _bundle({**enc, "serviceProvider": {"reference": "Organization/1"}, "class": None}),
    ]
    out = [json.dumps(b).encode() for b in bundles]  # orjson cannot write 2**70
    bad_status = _bundle(_heart_rate())
    bad_status["entry"][0]["resource"]["eventsSinceSubscriptionStart"] = "nine"
    out.append(orjson.dumps(bad_status))
    bad_entry = _bundle(_heart_rate())
    bad_entry["entry"].append("not an entry")
    out.append(orjson.dumps(bad_entry))
    out.append(orjson.dumps({**_bundle(_heart_rate()), "type": 3}))
    out.append(b'{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Observation"}}]}')
    out.append(b'{"resourceType": "Bundle", "entry": "x"}')
    out.append(b'["Bundle"]')
    out.append(b'{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "SubscriptionStatus", '
               b'"type": "heartbeat", "eventsSinceSubscriptionStart": 1e400}}]}')
    return out


def _slots(doc) -> list[tuple[tuple, object]]:
    """(path, value) of every value of a JSON document, depth first."""
    out = []

    def walk(node, path):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append(((*path, k), v))
            walk(v, (*path, k))

    walk(doc, ())
    return out


def _mutated(doc: bytes, path: tuple, change) -> bytes:
    copied = orjson.loads(doc)  # a fresh copy, faster than copy.deepcopy
    node = copied
    for k in path[:-1]:
        node = node[k]
    change(node, path[-1])
    return json.dumps(copied, separators=(",", ":")).encode()  # orjson cannot write 2**70


def _mutations(doc: bytes) -> Iterator[bytes]:
    """doc with each value replaced by each of WRONG_VALUES, each key or item dropped, and an
    unknown key added to each object."""
    doc = orjson.loads(doc)
    original = orjson.dumps(doc)
    for path, value in _slots(doc):
        for wrong in WRONG_VALUES:
            if type(wrong) is not type(value) or wrong != value:
                yield _mutated(original, path, lambda node, k, w=wrong: node.__setitem__(k, w))
        yield _mutated(original, path, lambda node, k: node.__delitem__(k))
        if isinstance(value, dict):
            yield _mutated(original, path, lambda node, k: node[k].__setitem__("wardwatchUnknown", "1"))


# the stored messages the mutants are made from: good ones of every kind the parsers map
MUTATED_FHIR = ("r4b_full_resource_hr9", "r4b_mixed", "r4b_patient", "r4b_encounter_transferred",
                "r5_encounter_discharged", "r5_labs_event", "r4_parameters_event", "r4b_entered_in_error")
MUTATED_CDC = ("create_schema_wrapped", "lab_create_schema_wrapped", "patient_create_schema_wrapped",
               "update_full", "encounter_snapshot_iso", "zoned_variable_scale")


def mutants(stored: list[Message]) -> Iterator[Message]:
    for name in MUTATED_FHIR:
        for value in _mutations(fhir_bundle(name)):
            yield Message("fhir", FHIR_TOPIC, None, value)
    # a replayed lab notification and vitals change event, as the pipeline's own sources write them
    replayed = [next(m for m in stored if m.source == "fhir" and m.value and b'"Observation"' in m.value),
                next(m for m in stored if m.topic.endswith(".vital_signs") and m.value and b'"op":"c"' in m.value)]
    for m in replayed:
        for value in _mutations(m.value):
            yield Message(m.source, m.topic, m.key, value)
    for name in MUTATED_CDC:
        for m in cdc_messages(name)[:1]:
            for value in _mutations(m.value):
                yield Message("cdc", m.topic, m.key, value)


# --- the test ------------------------------------------------------------------------------------


def test_ingest_outcomes_are_the_golden_ones():
    messages = all_messages()
    golden = gzip.decompress(GOLDEN.read_bytes()).splitlines()
    assert len(messages) == len(golden), "corpus and golden out of step: regenerate (module docstring)"
    kinds = Counter()
    differing, internal_errors = [], []
    for i, (m, expected) in enumerate(zip(messages, golden, strict=True)):
        got = orjson.dumps(outcome_of(m))
        if b'"internal_error"' in got:  # a parser bug, never an outcome to keep as golden
            internal_errors.append((i, m.source, got.decode()[:200]))
        kinds[(m.source, orjson.loads(expected)[0])] += 1
        if got != expected:
            differing.append((i, m.source, got.decode()[:300], expected.decode()[:300]))
    # the corpus exercises every outcome of both parsers, or the comparison would prove little
    assert {k for k, n in kinds.items() if n >= 3} >= {
        ("cdc", "Parsed"), ("cdc", "Rejected"), ("cdc", "Control"), ("cdc", "Ignored"), ("fhir", "Parsed"),
        ("fhir", "Rejected"), ("fhir", "Control"), ("fhir", "Ignored"), ("fhir", "NeedsFetch")}, kinds
    assert not internal_errors, f"{len(internal_errors)} messages hit a parser bug, e.g. {internal_errors[:3]}"
    assert not differing, (f"{len(differing)} of {len(messages)} outcomes differ from the golden ones, e.g. "
                           f"{differing[:3]}; if that is intended, regenerate: see this module's docstring")


def make_corpus() -> None:
    """The replay of the cached 8-patient cohort with faults, the fixtures, hostile_fhir()."""
    from streams.replay import build_replay, generate_cohort

    cohort = generate_cohort(Path("data/cache").resolve(), patients=8, seed=7)
    replay = build_replay(cohort, faults=True, seed=7)
    messages = [Message(m.kind, f"{CDC_PREFIX}.{m.table}" if m.kind == "cdc" else FHIR_TOPIC, m.key, m.value)
                for m in replay.messages]
    messages += fixture_messages()
    messages += [Message("fhir", FHIR_TOPIC, None, value) for value in hostile_fhir()]
    rows = [orjson.dumps([m.source, m.topic, _b(m.key), _b(m.value)]) for m in messages]
    FIXTURES.mkdir(parents=True, exist_ok=True)
    CORPUS.write_bytes(gzip.compress(b"\n".join(rows), compresslevel=9, mtime=0))


def make_golden() -> None:
    messages = all_messages()
    lines = [orjson.dumps(outcome_of(m)) for m in messages]
    GOLDEN.write_bytes(gzip.compress(b"\n".join(lines), compresslevel=9, mtime=0))
    counts = Counter((m.source, orjson.loads(line)[0]) for m, line in zip(messages, lines))
    print(f"{len(messages)} messages: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
    if "--corpus" in sys.argv[1:]:
        make_corpus()
    make_golden()
