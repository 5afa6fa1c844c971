"""The canonical codec: the exact JSON of an event, and decode(encode(x)) == x.

Expected bytes are written by hand from the format in schemas/canonical.py (field order, enum values,
event_id = blake2b-96 of "<fact_id>|<version>"), not copied from the encoder's output.
"""

from __future__ import annotations

import dataclasses
import hashlib

import orjson
import pytest

from schemas.canonical import CanonicalEvent, Source, Status, decode_batch, encode_batch, make_event_id
from schemas.codes import ACVPU, ACVPU_ORDINAL, CONSCIOUSNESS, CONTEXT

HEART_RATE_ID = hashlib.blake2b(b"cdc:vital_signs:42:8867-4|7", digest_size=12).hexdigest()


def heart_rate(**changes) -> CanonicalEvent:
    event = CanonicalEvent(patient_id="p1", code="8867-4", value=72.0, unit="/min", effective_ms=1_718_460_396_123,
                           issued_ms=1_718_460_400_500, status=Status.FINAL, source=Source.CDC,
                           fact_id="cdc:vital_signs:42:8867-4", version=7, encounter_id="e1",
                           provenance={"table": "vital_signs", "pk": "42", "offset": 3})
    return dataclasses.replace(event, **changes)


def events_of_every_kind() -> list[CanonicalEvent]:
    return [
        heart_rate(),
        heart_rate(value=None, status=Status.ENTERED_IN_ERROR, version=8),  # a retraction
        heart_rate(code="9269-2", value=2.0, value_text="V", unit="{score}"),  # consciousness: ordinal + letter
        CanonicalEvent("p1", "location", None, None, 1_718_460_000_000, 1_718_460_000_000, Status.FINAL, Source.FHIR,
                       "fhir:Encounter:enc-1:location:1718460000000", 3, None, CONTEXT, "Ward 7 \u00e9", {}),
        heart_rate(provenance={"nested": {"list": [1, None, "x"]}, "snapshot": False}),
    ]


def test_an_event_is_written_as_this_exact_json():
    expected = (
        '{"patient_id":"p1","code":"8867-4","value":72.0,"unit":"/min","effective_ms":1718460396123,'
        '"issued_ms":1718460400500,"status":"final","source":"cdc","fact_id":"cdc:vital_signs:42:8867-4",'
        '"version":7,"encounter_id":"e1","code_system":"http://loinc.org","value_text":null,'
        '"provenance":{"table":"vital_signs","pk":"42","offset":3},"event_id":"' + HEART_RATE_ID + '"}'
    ).encode()
    assert heart_rate().to_json() == expected
    assert encode_batch([heart_rate(), heart_rate()]) == b"[" + expected + b"," + expected + b"]"
    assert orjson.dumps(heart_rate().to_dict()) == expected


def test_a_hand_written_message_decodes_to_the_event_with_its_id_recomputed():
    raw = (b'[{"patient_id":"p1","code":"8867-4","value":72.0,"unit":"/min","effective_ms":1718460396123,'
           b'"issued_ms":1718460400500,"status":"final","source":"cdc","fact_id":"cdc:vital_signs:42:8867-4",'
           b'"version":7,"encounter_id":"e1","provenance":{"table":"vital_signs","pk":"42","offset":3},'
           b'"event_id":"not trusted"}]')  # code_system and value_text left out: their defaults
    (event,) = decode_batch(raw)
    assert event == heart_rate()
    assert event.event_id == HEART_RATE_ID
    assert event.status is Status.FINAL and event.source is Source.CDC


def test_every_kind_of_event_survives_a_round_trip_unchanged():
    events = events_of_every_kind()
    decoded = decode_batch(encode_batch(events))
    assert decoded == events
    assert [repr(e) for e in decoded] == [repr(e) for e in events]
    assert [e.event_id for e in decoded] == [make_event_id(e.fact_id, e.version) for e in events]
    assert all(type(e) is CanonicalEvent for e in decoded)
    assert encode_batch(decoded) == encode_batch(events)


def test_decoded_events_are_still_frozen():
    decoded = decode_batch(encode_batch([heart_rate()]))[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.value = 0.0
    with pytest.raises((AttributeError, TypeError)):  # (a derived property: Python 3.11 says TypeError)
        decoded.event_id = "forged"
    assert decoded.event_id == make_event_id(decoded.fact_id, decoded.version)


def test_every_field_is_written():  # a field added to the dataclass must reach to_dict() and the decoders
    written = set(heart_rate(version_codes=("8867-4",)).to_dict())
    assert written == {f.name for f in dataclasses.fields(CanonicalEvent)} - {"_event_id"} | {"event_id"}


def test_version_codes_are_written_only_when_set_and_read_back_from_old_and_new_json():
    # a CDC event (and one archived before the field) has none: its JSON is as before
    assert "version_codes" not in heart_rate().to_dict()
    assert decode_batch(encode_batch([heart_rate()]))[0].version_codes is None
    fhir = heart_rate(source=Source.FHIR, version_codes=("59408-5", "3151-8"))
    decoded = decode_batch(encode_batch([fhir]))[0]
    assert decoded.version_codes == ("59408-5", "3151-8") and decoded == fhir
    with pytest.raises(ValueError, match="version_codes"):
        CanonicalEvent.from_dict({**fhir.to_dict(), "version_codes": [42]})


def test_a_new_version_gets_a_new_event_id_and_equality_ignores_nothing_else():
    first = heart_rate()
    assert first.event_id == HEART_RATE_ID  # (read before the copy: the copy must not inherit it)
    amended = dataclasses.replace(first, version=8, status=Status.AMENDED)
    assert amended.event_id == hashlib.blake2b(b"cdc:vital_signs:42:8867-4|8", digest_size=12).hexdigest()
    assert amended != first
    assert heart_rate(value=73.0) != first


@pytest.mark.parametrize("change, error", [
    ({"status": "bogus"}, ValueError), ({"source": ["cdc"]}, ValueError), ({"version": "seven"}, ValueError),
    # fields that decode but would fail the worker's table keys and outputs, or the archive's columns
    ({"patient_id": 42}, ValueError), ({"patient_id": True}, ValueError), ({"patient_id": ""}, ValueError),
    ({"value": "80"}, ValueError), ({"value": True}, ValueError), ({"value": 2**60}, ValueError),
    ({"effective_ms": 1e20}, ValueError), ({"issued_ms": -(2**60)}, ValueError), ({"version": -1}, ValueError),
    ({"fact_id": 7}, ValueError), ({"unit": 5}, ValueError), ({"encounter_id": ["e1"]}, ValueError),
    ({"code_system": None}, ValueError), ({"value_text": 3}, ValueError), ({"provenance": [1]}, ValueError)])
def test_an_undecodable_event_raises_for_the_worker_to_dead_letter(change, error):
    raw = orjson.dumps([{**heart_rate().to_dict(), **change}])
    with pytest.raises(error):
        decode_batch(raw)


def test_a_consciousness_value_decodes_only_as_an_acvpu_ordinal():
    """NEWS2 reads the level as ACVPU[int(value)]: 5 raised IndexError in the worker, and -1 (U: 3
    points) or 2.5 (V) would score a level nobody charted. The ingest's values (schemas/cdc.py,
    schemas/fhir.py: float ordinals 0.0 .. 4.0, None for a retraction) must still decode."""
    def consciousness(value):
        return heart_rate(code=CONSCIOUSNESS, unit="{score}", value=value,
                          value_text=ACVPU[int(value)] if value in range(len(ACVPU)) else None)

    written = [consciousness(float(ACVPU_ORDINAL[letter])) for letter in ACVPU] + [consciousness(None)]
    assert decode_batch(encode_batch(written)) == written
    assert decode_batch(orjson.dumps([consciousness(2).to_dict()]))[0].value == 2  # an int ordinal is one too
    for value in (5.0, -1.0, 2.5):
        with pytest.raises(ValueError, match="field value: a float"):
            decode_batch(orjson.dumps([consciousness(value).to_dict()]))


def test_an_event_missing_a_required_field_raises():
    d = heart_rate().to_dict()
    del d["fact_id"]
    with pytest.raises(KeyError):
        decode_batch(orjson.dumps([d]))


def test_the_error_names_the_field_and_its_type_but_not_the_value():  # the value may be clinical
    with pytest.raises(ValueError) as info:
        decode_batch(orjson.dumps([{**heart_rate().to_dict(), "value": "80"}]))
    assert "field value: a str" in str(info.value) and "80" not in str(info.value)
