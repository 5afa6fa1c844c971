"""wardwatch/deploy.py: the generated deployment artefacts agree with the code that consumes them."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, time, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
from fhir.resources.R4B.subscription import Subscription
from fhir.resources.R4B.subscriptiontopic import SubscriptionTopic

from schemas import codes
from schemas.cdc import parse_cdc
from schemas.ingest_outcome import Parsed
from streams.topics import topics_for
from tests.streams.local_http import QuietHandler
from wardwatch.deploy import (BACKPORT, DeployError, EhrDatabase, cdc_prefix_parts, connector_config,
                              create_topics, next_run, parse_clock_time, partition_mismatches,
                              prometheus_config, put_fhir_resources, receiver_url, subscription_resources,
                              topic_specs, TopicSpec)
from wardwatch.settings import Settings

pytestmark = pytest.mark.usefixtures("clean_env")  # no WARDWATCH_* of the shell


# --- topics ----------------------------------------------------------------------------------------


def test_topic_specs_cover_every_topic_with_its_cleanup_policy():
    settings = Settings(partitions=6, raw_retention_hours=48)
    topics = topics_for(settings)
    specs = {s.name: s for s in topic_specs(settings)}

    assert sorted(specs) == sorted(topics.all)
    assert {s.partitions for s in specs.values()} == {6}
    for name in topics.compacted:
        assert specs[name].config == {"cleanup.policy": "compact"}
    for name in topics.raw:
        assert specs[name].config["cleanup.policy"] == "delete"
        assert specs[name].config["retention.ms"] == str(48 * 3600 * 1000)
    assert specs[topics.canonical].config == {}
    # the topics that take a whole raw message are sized like the producers that write to them
    for name in (topics.fhir, topics.deadletter):
        assert specs[name].config["max.message.bytes"] == str(settings.max_message_bytes)
    assert "max.message.bytes" not in specs[topics.cdc["vital_signs"]].config


def test_partition_mismatches_name_the_topic_and_both_counts():
    specs = [TopicSpec("a", 4, {}), TopicSpec("b", 4, {})]
    assert partition_mismatches(specs, {"a": 4, "b": 2, "other": 9}) == ["topic b has 2 partitions, expected 4"]


@pytest.mark.integration
def test_create_topics_creates_all_then_is_idempotent(settings):
    from confluent_kafka.admin import AdminClient

    created = create_topics(settings)

    assert sorted(created) == sorted(topics_for(settings).all)
    metadata = AdminClient(settings.kafka_client_config()).list_topics(timeout=10)
    for name in topics_for(settings).all:
        assert len(metadata.topics[name].partitions) == settings.partitions
    assert create_topics(settings) == []


@pytest.mark.integration
def test_create_topics_refuses_a_topic_with_another_partition_count(settings):
    create_topics(settings.model_copy(update={"partitions": 2}))

    with pytest.raises(DeployError, match=r"has 2 partitions, expected 4.*WARDWATCH_PARTITIONS") as refused:
        create_topics(settings)
    # the way to more partitions that keeps the backlog, never "recreate these topics" (which loses it)
    assert "More partitions: a new set of topics" in str(refused.value) and "recreate" not in str(refused.value)


# --- Debezium connector ----------------------------------------------------------------------------


def test_connector_topics_are_the_topics_ingest_reads():
    for prefix in ("ehr.public", "north.ehr.clinical"):
        settings = Settings(cdc_topic_prefix=prefix)
        config = connector_config(settings)["config"]
        server, schema = config["topic.prefix"], config["schema.include.list"]
        debezium_topics = {t.split(".", 1)[1]: f"{server}.{t}" for t in config["table.include.list"].split(",")}
        assert {t: f"{server}.{schema}.{t}" for t in codes.CDC_TABLES} == topics_for(settings).cdc
        assert debezium_topics == topics_for(settings).cdc


def test_connector_keys_every_table_by_patient():
    config = connector_config(Settings())["config"]
    keys = dict(entry.split(":") for entry in config["message.key.columns"].split(";"))

    assert keys == {f"public.{t}": "patient_id" for t in codes.CDC_TABLES}
    assert config["table.include.list"].split(",") == [f"public.{t}" for t in codes.CDC_TABLES]


def test_connector_uses_pgoutput_json_with_schemas_and_a_heartbeat():
    config = connector_config(Settings(), EhrDatabase(host="db", password="${env:X}"))["config"]

    assert config["plugin.name"] == "pgoutput"
    assert config["publication.autocreate.mode"] == "filtered"
    for side in ("key", "value"):
        assert config[f"{side}.converter"] == "org.apache.kafka.connect.json.JsonConverter"
        assert config[f"{side}.converter.schemas.enable"] == "true"
    assert int(config["heartbeat.interval.ms"]) > 0
    assert config["database.hostname"] == "db" and config["database.password"] == "${env:X}"


def column(field: str, type_: str, **extra) -> dict:
    return {"field": field, "type": type_, "optional": True, **extra}


def decimal(field: str, scale: int) -> dict:
    return column(field, "bytes", name="org.apache.kafka.connect.data.Decimal", parameters={"scale": str(scale)})


def test_a_change_event_in_the_connectors_modes_parses():
    """A Debezium event as this connector config produces it (precise decimals as base64 Connect
    Decimal with the scale in the schema, adaptive timestamps as MicroTimestamp, schemas enabled,
    key = patient_id) decodes to the values that were written."""
    settings = Settings()
    config = connector_config(settings)["config"]
    assert config["decimal.handling.mode"] == "precise" and config["time.precision.mode"] == "adaptive"
    measured = datetime(2024, 6, 15, 9, tzinfo=UTC)
    row_schema = {"type": "struct", "fields": [
        column("id", "int64"), column("patient_id", "string"), column("encounter_id", "string"),
        column("measured_at", "int64", name="io.debezium.time.MicroTimestamp"),
        decimal("spo2", 1), decimal("temperature", 1)]}
    value = {"schema": {"type": "struct", "fields": [{**row_schema, "field": "before"}, {**row_schema, "field": "after"}]},
             "payload": {"before": None, "op": "c", "ts_ms": 1718442001000,
                         "after": {"id": 7, "patient_id": "P-1", "encounter_id": "E-1",
                                   "measured_at": int(measured.timestamp()) * 1_000_000,
                                   "spo2": "A6c=",           # 935, scale 1
                                   "temperature": "AYE="},   # 385, scale 1
                         "source": {"lsn": 100, "ts_ms": 1718442001000, "table": "vital_signs", "snapshot": "false"}}}
    key = {"schema": {"type": "struct", "fields": [column("patient_id", "string")]}, "payload": {"patient_id": "P-1"}}
    topic = f"{config['topic.prefix']}.{config['schema.include.list']}.vital_signs"

    outcome = parse_cdc(topic, orjson.dumps(key), orjson.dumps(value), partition=0, offset=0,
                        cdc_topic_prefix=settings.cdc_topic_prefix)

    assert isinstance(outcome, Parsed), outcome
    values = {e.code: e.value for e in outcome.events}
    assert values == {codes.SPO2: 93.5, codes.TEMPERATURE: 38.5}
    assert {e.effective_ms for e in outcome.events} == {int(measured.timestamp() * 1000)}
    assert {e.patient_id for e in outcome.events} == {"P-1"}


def test_a_cdc_prefix_without_a_schema_is_refused_with_the_fix():
    with pytest.raises(DeployError, match="<debezium topic.prefix>.<database schema>"):
        cdc_prefix_parts(Settings(cdc_topic_prefix="ehr"))


# --- FHIR subscriptions ----------------------------------------------------------------------------


def test_subscriptions_validate_and_point_at_the_receiver():
    settings = Settings(receiver_port=9000)
    resources = subscription_resources(settings, receiver_url(settings), heartbeat_s=45)
    topics = [SubscriptionTopic.model_validate(r) for r in resources if r["resourceType"] == "SubscriptionTopic"]
    subs = [r for r in resources if r["resourceType"] == "Subscription"]
    for r in subs:
        Subscription.model_validate(r)

    assert sorted(t.resourceTrigger[0].resource for t in topics) == ["Encounter", "Observation", "Patient"]
    assert {s["criteria"] for s in subs} == {t.url for t in topics}
    for s in subs:
        channel = s["channel"]
        assert channel["type"] == "rest-hook"
        assert channel["endpoint"] == "http://receiver:9000/fhir/notifications"
        assert channel["_payload"]["extension"][0]["valueCode"] == "full-resource"
        extensions = {e["url"].removeprefix(f"{BACKPORT}/"): e for e in channel["extension"]}
        assert extensions["backport-heartbeat-period"]["valueUnsignedInt"] == 45
        assert "header" not in channel
    # a Subscription names its topic, so the topics go to the server first
    assert [r["resourceType"] for r in resources] == ["SubscriptionTopic"] * 3 + ["Subscription"] * 3


def test_a_receiver_token_becomes_the_channel_authorization_header():
    subs = subscription_resources(Settings(receiver_token="s3cret"))
    assert {tuple(s["channel"]["header"]) for s in subs if s["resourceType"] == "Subscription"} == {
        ("Authorization: Bearer s3cret",)}


class _FhirStub(BaseHTTPRequestHandler):
    """Answers 503 to the first request (a server still starting), then 201, recording the PUTs."""
    calls: list[tuple[str, dict]] = []

    def do_PUT(self):  # noqa: N802
        body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append((self.path, body))
        self.send_response(503 if len(type(self).calls) == 1 else 201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_put_fhir_resources_retries_a_starting_server_and_puts_by_id():
    _FhirStub.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FhirStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        resources = subscription_resources(Settings())
        put_fhir_resources(f"http://127.0.0.1:{server.server_port}/fhir/", resources, timeout_s=30)
    finally:
        server.shutdown()
    paths = [path for path, _ in _FhirStub.calls]
    assert paths[0] == paths[1] == "/fhir/SubscriptionTopic/wardwatch-observation"  # retried after the 503
    assert paths[1:] == [f"/fhir/{r['resourceType']}/{r['id']}" for r in resources]


class _FhirRecorder(BaseHTTPRequestHandler):
    calls: list[tuple[str, str | None]] = []

    def do_PUT(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append((self.path, self.headers.get("Authorization")))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_put_fhir_resources_to_the_fhir_server_url_uses_its_token_and_proxy_and_never_an_environment_proxy(
        monkeypatch):
    """`deploy subscriptions --apply` to WARDWATCH_FHIR_SERVER_URL: the ingest's token and
    WARDWATCH_FHIR_PROXY_URL (credentials to the proxy only), as the ingest reaches that server. To any other
    URL (compose's own HAPI server): direct, no token. HTTP_PROXY is never used: the Subscriptions carry the
    receiver token."""
    from tests.streams.forward_proxy import ForwardProxy
    from wardwatch.deploy import fhir_access

    _FhirRecorder.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FhirRecorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = ForwardProxy(routes={"ehr.example:8443": ("127.0.0.1", server.server_port)}, credentials="ward:pa ss")
    monkeypatch.setenv("HTTP_PROXY", proxy.url)  # a proxy from the environment: must never be used
    monkeypatch.setenv("NO_PROXY", "")
    try:
        settings = Settings(fhir_server_url="http://ehr.example:8443/fhir", fhir_auth_token="ehr-token-1",
                            fhir_allow_plain_http=True, receiver_token="rx-token-123456",
                            fhir_proxy_url=f"http://ward:pa%20ss@{proxy.url.removeprefix('http://')}")
        resources = subscription_resources(settings)
        put_fhir_resources("http://ehr.example:8443/fhir/", resources, timeout_s=30,
                           **fhir_access(settings, "http://ehr.example:8443/fhir/"))
        assert [auth for _, _, auth in proxy.requests] == ["Basic d2FyZDpwYSBzcw=="] * len(resources)  # ward:pa ss
        assert [auth for _, auth in _FhirRecorder.calls] == ["Bearer ehr-token-1"] * len(resources)

        proxy.requests.clear()
        _FhirRecorder.calls = []
        local = f"http://127.0.0.1:{server.server_port}/fhir"
        put_fhir_resources(local, resources, timeout_s=30, **fhir_access(settings, local))
        assert proxy.requests == []  # neither WARDWATCH_FHIR_PROXY_URL nor HTTP_PROXY
        assert [auth for _, auth in _FhirRecorder.calls] == [None] * len(resources)  # the token is not sent there
    finally:
        proxy.stop()
        server.shutdown()
        server.server_close()


# --- Prometheus, scheduler -------------------------------------------------------------------------


def test_prometheus_scrapes_every_service_on_the_metrics_port():
    config = prometheus_config(Settings(metrics_port=9200), services=("ingest", "worker"))
    assert [(job["job_name"], job["dns_sd_configs"][0]["names"], job["dns_sd_configs"][0]["port"])
            for job in config["scrape_configs"]] == [("ingest", ["ingest"], 9200), ("worker", ["worker"], 9200)]


@pytest.mark.parametrize("now, expected", [
    (datetime(2026, 3, 1, 1, 0), datetime(2026, 3, 1, 2, 30)),     # later today
    (datetime(2026, 3, 1, 2, 30), datetime(2026, 3, 2, 2, 30)),    # exactly now: tomorrow
    (datetime(2026, 12, 31, 23, 0), datetime(2027, 1, 1, 2, 30)),  # across the year
])
def test_next_run_is_the_next_occurrence_of_the_time_of_day(now, expected):
    assert next_run(now, time(2, 30)) == expected


def test_next_run_keeps_the_timezone():
    tz = timezone(timedelta(hours=1))
    assert next_run(datetime(2026, 3, 1, 3, 0, tzinfo=tz), time(2, 30)) == datetime(2026, 3, 2, 2, 30, tzinfo=tz)


@pytest.mark.parametrize("text", ["2:30pm", "25:00", "", "02"])
def test_a_bad_schedule_time_says_the_format(text):
    with pytest.raises(DeployError, match="HH:MM"):
        parse_clock_time(text)


# --- dead-letter redrive ---------------------------------------------------------------------------


def test_redrive_target_is_the_source_topic_for_the_asked_reasons():
    from wardwatch.deploy import redrive_target

    headers = {"ww.reason": b"bad_value", "ww.source.topic": b"ehr.public.vital_signs"}
    inputs = {"ehr.public.vital_signs", "ww.fhir.notifications"}

    assert redrive_target(headers, inputs, None) == "ehr.public.vital_signs"
    assert redrive_target(headers, inputs, {"bad_value", "unknown_unit"}) == "ehr.public.vital_signs"
    assert redrive_target(headers, inputs, {"unknown_unit"}) is None
    assert redrive_target({**headers, "ww.source.topic": b"ww.alerts"}, inputs, None) is None  # not an input
    assert redrive_target({}, inputs, None) is None


def test_a_notification_the_receiver_refused_is_redriven_to_the_notifications_topic():
    # it came over HTTP (no ww.source.topic): it was kept for ever, and the FHIR server never resends a 400
    from wardwatch.deploy import redrive_target

    refused = {"ww.reason": b"unknown_unit", "ww.stage": b"receiver", "ww.source.http": b"POST /fhir/notifications"}
    inputs = {"ehr.public.vital_signs", "ww.fhir.notifications"}

    assert redrive_target(refused, inputs, {"unknown_unit"}, "ww.fhir.notifications") == "ww.fhir.notifications"
    assert redrive_target(refused, inputs, {"bad_value"}, "ww.fhir.notifications") is None
    assert redrive_target({**refused, "ww.stage": b"ingest.fhir"}, inputs, None, "ww.fhir.notifications") is None


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_redrive_sends_dead_letters_back_once(settings):
    import time as clock

    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    from wardwatch.deploy import redrive_deadletters

    topics = topics_for(settings)
    create_topics(settings)
    vitals = topics.cdc["vital_signs"]
    producer = Producer(settings.kafka_client_config())
    for i, (reason, source) in enumerate([("bad_value", vitals), ("unknown_unit", vitals), ("bad_value", "elsewhere")]):
        producer.produce(topics.deadletter, key=f"k{i}".encode(), value=f"v{i}".encode(),
                         headers=[("ww.reason", reason.encode()), ("ww.source.topic", source.encode())])
    assert producer.flush(10) == 0

    first = redrive_deadletters(settings, {"bad_value"}, idle_s=2)
    second = redrive_deadletters(settings, {"bad_value"}, idle_s=2)

    assert first == {"redriven": 1, "skipped": 2, "omitted": 0}
    assert second == {"redriven": 0, "skipped": 0, "omitted": 0}  # the group remembers what was handled
    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-check",
                         "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(vitals, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    seen, deadline = [], clock.monotonic() + 60
    try:
        while not seen and clock.monotonic() < deadline:
            seen += [m for m in consumer.consume(10, timeout=0.5) if not m.error()]
    finally:
        consumer.close()
    assert [(m.key(), m.value()) for m in seen] == [(b"k0", b"v0")]
    assert dict(seen[0].headers())["ww.redriven-from"].startswith(topics.deadletter.encode())


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_redrive_for_one_reason_leaves_the_others_for_a_later_redrive(settings):
    """One consumer group for every run moved past the dead letters a run kept: after `--reason
    bad_value`, `--reason unknown_unit` found nothing. A notification the receiver refused goes to
    the notifications topic."""
    from confluent_kafka import Producer

    from streams.receiver import receiver_deadletter_headers
    from schemas.deadletter import Reason, Rejection
    from wardwatch.deploy import redrive_deadletters

    topics = topics_for(settings)
    create_topics(settings)
    vitals = topics.cdc["vital_signs"]
    producer = Producer(settings.kafka_client_config())
    for i, reason in enumerate(["bad_value", "unknown_unit"]):
        producer.produce(topics.deadletter, key=f"k{i}".encode(), value=f"v{i}".encode(),
                         headers=[("ww.reason", reason.encode()), ("ww.source.topic", vitals.encode())])
    producer.produce(topics.deadletter, value=b"posted", headers=receiver_deadletter_headers(
        Rejection(Reason.UNKNOWN_UNIT, "heart rate: no conversion"), "/fhir/notifications"))
    assert producer.flush(10) == 0

    assert redrive_deadletters(settings, {"bad_value"}, idle_s=2) == {"redriven": 1, "skipped": 2, "omitted": 0}
    assert redrive_deadletters(settings, {"unknown_unit"}, idle_s=2) == {"redriven": 2, "skipped": 1, "omitted": 0}
    assert redrive_deadletters(settings, {"unknown_unit"}, idle_s=2) == {"redriven": 0, "skipped": 0, "omitted": 0}
    assert sorted((m.key(), m.value()) for m in read_all(settings, vitals)) == [(b"k0", b"v0"), (b"k1", b"v1")]
    assert [m.value() for m in read_all(settings, topics.fhir)] == [b"posted"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_redrive_does_not_resend_what_fails_again_while_it_runs(settings):
    """A dead letter whose fix is not deployed yet is dead-lettered again by the ingest while the redrive
    runs; the redrive read on into those and sent the message back again and again until its timeout.
    A run handles the dead letters there when it started; the new one is the next run's."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    from wardwatch.deploy import redrive_deadletters

    topics = topics_for(settings)
    create_topics(settings)
    vitals = topics.cdc["vital_signs"]
    headers = [("ww.reason", b"bad_value"), ("ww.source.topic", vitals.encode())]
    failed_again = []
    producer = Producer(settings.kafka_client_config())
    producer.produce(topics.deadletter, key=b"k0", value=b"v0", headers=headers)
    assert producer.flush(10) == 0

    stop = threading.Event()

    def failing_ingest():  # every message on the raw topic fails again: dead-lettered as it came
        consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-ingest",
                             "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
        consumer.assign([TopicPartition(vitals, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
        try:
            while not stop.is_set():
                for m in consumer.consume(10, timeout=0.2):
                    if not m.error():
                        producer.produce(topics.deadletter, key=m.key(), value=m.value(), headers=headers)
                        failed_again.append(m.offset())
                producer.flush(10)
        finally:
            consumer.close()

    ingest = threading.Thread(target=failing_ingest, daemon=True)
    ingest.start()
    try:
        counts = redrive_deadletters(settings, {"bad_value"}, idle_s=4, timeout_s=40)
    finally:
        stop.set()
        ingest.join(10)

    assert failed_again  # it did fail again while the redrive ran
    assert counts == {"redriven": 1, "skipped": 0, "omitted": 0}
    # the dead letter made again is left for the next run (after the fix), not lost to the group
    again = redrive_deadletters(settings, {"bad_value"}, dry_run=True, idle_s=2)
    assert again["redriven"] == len(failed_again) == 1


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_redriven_canonical_message_lands_on_its_patients_partition(settings):
    """Canonical messages are partitioned by patient with the Java clients' hash (murmur2): the patient's
    state lives on that partition. The redrive sent them with librdkafka's default hash instead."""
    from confluent_kafka import Producer

    from wardwatch.deploy import redrive_deadletters

    topics = topics_for(settings)
    create_topics(settings)
    patients = [f"P{i:04d}".encode() for i in range(12)]
    writer = Producer({**settings.kafka_client_config(), "partitioner": "murmur2_random"})  # as the ingest
    for key in patients:
        writer.produce(topics.canonical, key=key, value=b"before")
        writer.produce(topics.deadletter, key=key, value=b"again", headers=[
            ("ww.reason", b"internal_error"), ("ww.stage", b"patient_state"),
            ("ww.source.topic", topics.canonical.encode())])
    assert writer.flush(10) == 0

    assert redrive_deadletters(settings, None, idle_s=2)["redriven"] == len(patients)

    partitions: dict[bytes, set[int]] = {}
    for m in read_all(settings, topics.canonical):
        partitions.setdefault(m.key(), set()).add(m.partition())
    assert {key: len(ps) for key, ps in partitions.items()} == {key: 1 for key in patients}


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_dead_letter_without_its_original_is_not_redriven_as_a_tombstone(settings):
    """The ingest leaves out an original too large to copy (ww.value.omitted_bytes): sent back, the null value
    was a tombstone on the CDC topic, counted as a control message there, and the change was gone."""
    from confluent_kafka import Producer

    from wardwatch.deploy import redrive_deadletters

    topics = topics_for(settings)
    create_topics(settings)
    vitals = topics.cdc["vital_signs"]
    producer = Producer(settings.kafka_client_config())
    producer.produce(topics.deadletter, key=b"k0", value=None, headers=[
        ("ww.reason", b"fetch_failed"), ("ww.source.topic", vitals.encode()), ("ww.source.partition", b"0"),
        ("ww.source.offset", b"7"), ("ww.value.omitted_bytes", b"9000000")])
    assert producer.flush(10) == 0

    counts = redrive_deadletters(settings, None, idle_s=2)
    assert [m.value() for m in read_all(settings, vitals)] == []  # no tombstone in its place
    assert counts == {"redriven": 0, "skipped": 0, "omitted": 1}


def read_all(settings, topic: str, expected_quiet_s: float = 3.0) -> list:
    """Every message of a topic, read until it has been quiet for a while."""
    import time as clock

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({**settings.kafka_client_config(), "group.id": f"{settings.group_prefix}-check-{topic}",
                         "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    seen, quiet_since = [], clock.monotonic()
    try:
        while clock.monotonic() - quiet_since < expected_quiet_s:
            batch = [m for m in consumer.consume(10, timeout=0.5) if not m.error()]
            if batch:
                seen += batch
                quiet_since = clock.monotonic()
    finally:
        consumer.close()
    return seen


class _FhirEcho(QuietHandler):
    """Refuses every PUT with a 422 whose OperationOutcome quotes the resource it got, headers included, as
    some servers' validation messages do."""

    def do_PUT(self):
        sent = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        quoted = f"invalid channel.header {sent.get('channel', {}).get('header')} with {self.headers.get('Authorization')}"
        self.answer(422, json.dumps({"resourceType": "OperationOutcome", "issue": [{"diagnostics": quoted}]}).encode())


def test_a_refused_put_names_the_servers_answer_without_the_receiver_or_fhir_token():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FhirEcho)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        resources = subscription_resources(Settings(receiver_token="rx-token-123456"))
        subscription = [r for r in resources if r["resourceType"] == "Subscription"][:1]
        with pytest.raises(DeployError) as refused:
            put_fhir_resources(f"http://127.0.0.1:{server.server_port}/fhir", subscription, timeout_s=30,
                               token="ehr-token-1")
    finally:
        server.shutdown()
        server.server_close()
    message = str(refused.value)
    assert "HTTP 422" in message and "invalid" in message  # the server's answer, for the operator
    assert "rx-token-123456" not in message and "ehr-token-1" not in message


class _ProxyQuotingCredentials(QuietHandler):
    """A proxy refusing every request with a 400 that quotes the credentials it was sent (decoded)."""

    def do_PUT(self):
        import base64

        self.rfile.read(int(self.headers["Content-Length"]))
        sent = (self.headers.get("Proxy-Authorization") or "").removeprefix("Basic ")
        self.answer(400, f"refused for {base64.b64decode(sent).decode()} at {self.path}".encode())


def test_a_proxys_refusal_is_shown_without_the_proxy_password():
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyQuotingCredentials)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        resources = [r for r in subscription_resources(Settings()) if r["resourceType"] == "SubscriptionTopic"][:1]
        with pytest.raises(DeployError) as refused:
            put_fhir_resources("http://ehr.example:8080/fhir", resources, timeout_s=30,
                               proxy=f"http://ward:pa%20ss-w0rd@127.0.0.1:{proxy.server_port}")
    finally:
        proxy.shutdown()
        proxy.server_close()
    message = str(refused.value)
    assert "HTTP 400" in message and "refused for ward:" in message
    assert "pa ss-w0rd" not in message and "pa%20ss-w0rd" not in message
