"""schemas.cdc reuses the parsed schema of the topic's last message: outcomes are those of a full parse."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from schemas import cdc
from schemas.cdc import parse_cdc
from schemas.deadletter import Reason
from schemas.ingest_outcome import Parsed, Rejected
from tests.fixtures.ingest.corpus import CDC_PREFIX, cdc_message

FIXTURE = cdc_message("create_schema_wrapped")
BASE = dataclasses.replace(FIXTURE, value=orjson.dumps(orjson.loads(FIXTURE.value)))  # compact, as Debezium writes it
PAYLOAD_START = BASE.value.index(b',"payload":') + len(b',"payload":')


def parse(value: bytes):
    return parse_cdc(BASE.topic, BASE.key, value, partition=0, offset=5, cdc_topic_prefix=CDC_PREFIX)


def cold(value: bytes):
    cdc._LAST_SCHEMA.clear()
    return parse(value)


def warm(value: bytes):
    """After a message of the same topic and schema (the usual case)."""
    cdc._LAST_SCHEMA.clear()
    parse(BASE.value)
    return parse(value)


def with_payload(payload: bytes) -> bytes:
    return BASE.value[:PAYLOAD_START] + payload + b"}"


def test_a_compact_value_reuses_the_schema_and_parses_the_same():
    cdc._LAST_SCHEMA.clear()
    first = parse(BASE.value)
    assert BASE.value.startswith(cdc._LAST_SCHEMA[BASE.topic][0])
    assert parse(BASE.value) == first and isinstance(first, Parsed)
    assert parse(FIXTURE.value) == first  # the same message indented: parsed whole


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("value", [
    BASE.value,
    BASE.value + b" ",  # trailing whitespace
    BASE.value[:-1] + b',"extra":1}',  # a third member: not a schema wrapper any more
    BASE.value[:-1] + b',"payload":{"op":"m"}}',  # a second payload: the last one wins
    BASE.value[:-1] + b"}}",
    with_payload(b' {"op":"m"} '),
    with_payload(b'{"op":"m"},"schema":null'),
    with_payload(b'{"op":"c"'),  # unterminated
    with_payload(b'{"op":"m","x":' + deep(1023) + b"}"),  # the whole value nests deeper than orjson allows
    with_payload(b'{"op":"m","x":' + deep(900) + b"}"),
    with_payload(b"\xff"),
    with_payload(b"null"),
    BASE.value.replace(b'"optional":false', b'"optional":true', 1),  # another schema
])
def test_outcome_is_the_full_parse_outcome(value):
    assert warm(value) == cold(value)


def test_too_deep_a_payload_is_malformed_json_as_in_a_full_parse():
    value = with_payload(b'{"op":"m","x":' + deep(1023) + b"}")
    outcome = warm(value)
    assert isinstance(outcome, Rejected) and outcome.rejection.reason == Reason.MALFORMED_JSON


def test_a_schema_change_is_picked_up():
    changed = BASE.value.replace(b'"optional":false', b'"optional":true', 1)
    assert changed != BASE.value
    assert isinstance(warm(changed), Parsed)
    assert changed.startswith(cdc._LAST_SCHEMA[BASE.topic][0])  # the next message with it reuses it
