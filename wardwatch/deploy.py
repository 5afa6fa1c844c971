"""Deployment artefacts generated from wardwatch's own settings and mappings (one source of truth).

docker-compose.yml runs these through `wardwatch deploy ...` (wardwatch/deploy_cli.py), so the
topics, the Debezium connector and the FHIR subscriptions can never disagree with the code:

    topic_specs(settings)                 every topic of streams.topics with partitions and configs
    connector_config(settings, db)        the Debezium PostgreSQL connector (JSON for Kafka Connect)
    subscription_resources(settings, ...) R4B SubscriptionTopics + backport Subscriptions (rest-hook)
    prometheus_config(settings)           a scrape config for every service's metrics port
    next_run(now, at)                     when the nightly scheduler runs `wardwatch batch nightly` next

The functions here are pure; the few that talk to a server (`create_topics`, `put_connector`,
`put_fhir_resources`) are marked and take everything they need as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

from schemas import codes
from schemas.deadletter import VALUE_OMITTED_HEADER, Stage
from streams.topics import topic_configs, topics_for
from wardwatch.settings import Settings


class DeployError(RuntimeError):
    """A deployment step cannot continue; the message says what to do."""


# --- topics --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic of streams.topics: compacted state topics, raw topics with a bounded retention
    (they are the replay source), outputs with the broker default (the archiver lands them)."""
    topics = topics_for(settings)
    configs = topic_configs(settings, topics)
    return [TopicSpec(name, topics.partitions, configs[name]) for name in topics.all]


def partition_mismatches(specs: list[TopicSpec], existing: dict[str, int]) -> list[str]:
    """Existing topics whose partition count differs from the spec (per-patient ordering and the
    worker's state depend on it); `existing` maps topic -> partition count."""
    return [f"topic {s.name} has {existing[s.name]} partitions, expected {s.partitions}"
            for s in specs if s.name in existing and existing[s.name] != s.partitions]


def create_topics(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """(Talks to Kafka.) Create the missing topics with their configs; returns the names created.
    Raises DeployError when an existing topic has another partition count."""
    from confluent_kafka.admin import AdminClient, NewTopic

    specs = topic_specs(settings)
    try:
        admin = AdminClient(settings.kafka_client_config())
        metadata = admin.list_topics(timeout=timeout_s)
    except Exception as exc:
        raise DeployError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc}; "
                          "check WARDWATCH_BOOTSTRAP_SERVERS and that the broker is up") from exc
    existing = {name: len(t.partitions) for name, t in metadata.topics.items()}
    problems = partition_mismatches(specs, existing)
    if problems:
        # recreating a topic would throw its backlog (CDC and raw inputs not yet read) away: never advise it
        raise DeployError("; ".join(problems) + ": set WARDWATCH_PARTITIONS back to the topics' count, or, for more "
                          "partitions, move to a new set of topics (new WARDWATCH_TOPIC_PREFIX, "
                          "WARDWATCH_CDC_TOPIC_PREFIX and WARDWATCH_GROUP_PREFIX: docs/operations.md, \"More "
                          "partitions: a new set of topics\"); do not delete these topics, that loses their backlog")
    wanted = [NewTopic(s.name, num_partitions=s.partitions, replication_factor=settings.replication_factor,
                       config=s.config)
              for s in specs if s.name not in existing]
    created = []
    for topic, fut in (admin.create_topics(wanted, operation_timeout=timeout_s).items() if wanted else []):
        try:
            fut.result(timeout=timeout_s)
            created.append(topic)
        except Exception as exc:  # a concurrent creator won: fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc).upper().replace(" ", "_"):
                raise DeployError(f"could not create topic {topic}: {exc}") from exc
    return created


# --- Debezium connector --------------------------------------------------------------------------

# Debezium modes the CDC parser (schemas/cdc.py) decodes: `precise` numerics arrive as Connect
# Decimal (base64 + scale in the schema), `adaptive` timestamps as MicroTimestamp; the JSON
# converter with schemas enabled carries those semantic types to the parser.
DECIMAL_HANDLING_MODE = "precise"
TIME_PRECISION_MODE = "adaptive"
HEARTBEAT_INTERVAL_MS = 10_000
CONNECTOR_NAME = "wardwatch-ehr"
PUBLICATION_NAME = "wardwatch"
SLOT_NAME = "wardwatch"


@dataclass(frozen=True, slots=True)
class EhrDatabase:
    """Where Debezium reads the EHR. The password is a Kafka Connect config-provider reference by
    default, so the secret stays in Connect's environment instead of its REST API."""
    host: str = "postgres"
    port: int = 5432
    name: str = "hospital"
    user: str = "debezium"
    password: str = "${env:DEBEZIUM_DB_PASSWORD}"


def cdc_prefix_parts(settings: Settings) -> tuple[str, str]:
    """settings.cdc_topic_prefix "<topic.prefix>.<schema>" -> (topic.prefix, schema): Debezium
    names topics <topic.prefix>.<schema>.<table>."""
    server, dot, schema = settings.cdc_topic_prefix.rpartition(".")
    if not dot or not server or not schema:
        raise DeployError(f"WARDWATCH_CDC_TOPIC_PREFIX={settings.cdc_topic_prefix!r} must be "
                          "<debezium topic.prefix>.<database schema>, e.g. ehr.public")
    return server, schema


def connector_config(settings: Settings, db: EhrDatabase = EhrDatabase()) -> dict[str, Any]:
    """The Debezium PostgreSQL connector for every table of schemas.codes.CDC_TABLES, keyed by
    patient so one patient's changes stay in one partition in commit order."""
    server, schema = cdc_prefix_parts(settings)
    tables = [f"{schema}.{t}" for t in codes.CDC_TABLES]
    key_columns = ";".join(f"{schema}.{t}:{m.patient_column}" for t, m in codes.CDC_TABLES.items())
    return {
        "name": CONNECTOR_NAME,
        "config": {
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "tasks.max": "1",
            "plugin.name": "pgoutput",
            "publication.name": PUBLICATION_NAME,
            "publication.autocreate.mode": "filtered",  # a publication of exactly the included tables
            "slot.name": SLOT_NAME,
            "database.hostname": db.host,
            "database.port": str(db.port),
            "database.dbname": db.name,
            "database.user": db.user,
            "database.password": db.password,
            "topic.prefix": server,
            "schema.include.list": schema,
            "table.include.list": ",".join(tables),
            "message.key.columns": key_columns,
            "key.converter": "org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable": "true",
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter.schemas.enable": "true",
            "decimal.handling.mode": DECIMAL_HANDLING_MODE,
            "time.precision.mode": TIME_PRECISION_MODE,
            "heartbeat.interval.ms": str(HEARTBEAT_INTERVAL_MS),
            "tombstones.on.delete": "true",
            "snapshot.mode": "initial",
            # the broker does not auto-create topics: Connect creates the heartbeat topic itself
            # (the CDC topics already exist, made by `wardwatch deploy topics`)
            "topic.creation.default.partitions": "1",
            "topic.creation.default.replication.factor": str(settings.replication_factor),
        },
    }


def put_connector(connect_url: str, connector: dict[str, Any], timeout_s: float = 120.0) -> str:
    """(Talks to Kafka Connect.) Create or update the connector (PUT is idempotent), then wait until
    it and its task run; returns the connector state."""
    import time as clock

    import httpx

    name = connector["name"]
    base = connect_url.rstrip("/")
    deadline = clock.monotonic() + timeout_s
    with httpx.Client(timeout=10.0) as http:
        send_until_success(deadline, lambda: http.put(f"{base}/connectors/{name}/config", json=connector["config"]),
                     what=f"PUT the connector to Kafka Connect at {base}")
        state = "UNKNOWN"
        while clock.monotonic() < deadline:
            resp = http.get(f"{base}/connectors/{name}/status")
            if resp.status_code == 200:
                status = resp.json()
                tasks = [t.get("state") for t in status.get("tasks", [])]
                state = status.get("connector", {}).get("state", "UNKNOWN")
                if "FAILED" in tasks or state == "FAILED":
                    trace = next((t.get("trace", "") for t in status.get("tasks", []) if t.get("trace")), "")
                    raise DeployError(f"connector {name} failed: {trace[:500]} (see the connect service's log)")
                if state == "RUNNING" and tasks and all(t == "RUNNING" for t in tasks):
                    return state
            clock.sleep(1.0)
    raise DeployError(f"connector {name} is {state} after {timeout_s:.0f} s: see the connect service's log")


# --- FHIR subscriptions --------------------------------------------------------------------------

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
TOPIC_BASE = "http://wardwatch.example.org/fhir/SubscriptionTopic"
NOTIFICATIONS_PATH = "/fhir/notifications"
SUBSCRIBED_RESOURCES = ("Observation", "Encounter", "Patient")  # what schemas/fhir.py reads


def receiver_url(settings: Settings, host: str = "receiver") -> str:
    """The rest-hook endpoint of `wardwatch receiver` as the FHIR server reaches it."""
    return f"http://{host}:{settings.receiver_port}{NOTIFICATIONS_PATH}"


def subscription_topic(resource: str) -> dict[str, Any]:
    """An R4B SubscriptionTopic: every create, update and delete of one resource type."""
    slug = resource.lower()
    return {
        "resourceType": "SubscriptionTopic",
        "id": f"wardwatch-{slug}",
        "url": f"{TOPIC_BASE}/{slug}",
        "status": "active",
        "title": f"wardwatch {resource} changes",
        "description": f"Every create, update and delete of a {resource} (wardwatch early warning)",
        "resourceTrigger": [{"description": f"{resource} changed", "resource": resource,
                             "supportedInteraction": ["create", "update", "delete"]}],
        "notificationShape": [{"resource": resource}],
    }


def subscription(settings: Settings, resource: str, endpoint: str, heartbeat_s: int = 60,
                 timeout_s: int = 30, max_count: int = 20) -> dict[str, Any]:
    """An R4B backport Subscription to one topic: full resources, rest-hook to the receiver, a
    heartbeat so a silent channel is noticed (the subscriptions watcher expects it)."""
    headers = ([f"Authorization: Bearer {settings.receiver_token.get_secret_value()}"]
               if settings.receiver_token else [])
    return {
        "resourceType": "Subscription",
        "id": f"wardwatch-{resource.lower()}",
        "meta": {"profile": [f"{BACKPORT}/backport-subscription"]},
        "status": "requested",
        "reason": f"wardwatch: {resource} changes for the early-warning pipeline",
        "criteria": f"{TOPIC_BASE}/{resource.lower()}",
        "_criteria": {"extension": [{"url": f"{BACKPORT}/backport-filter-criteria", "valueString": f"{resource}?"}]},
        "channel": {
            "extension": [
                {"url": f"{BACKPORT}/backport-heartbeat-period", "valueUnsignedInt": heartbeat_s},
                {"url": f"{BACKPORT}/backport-timeout", "valueUnsignedInt": timeout_s},
                {"url": f"{BACKPORT}/backport-max-count", "valuePositiveInt": max_count},
            ],
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": f"{BACKPORT}/backport-payload-content", "valueCode": "full-resource"}]},
            **({"header": headers} if headers else {}),
        },
    }


def subscription_resources(settings: Settings, endpoint: str | None = None,
                           heartbeat_s: int = 60) -> list[dict[str, Any]]:
    """The topics first (a Subscription names its topic), then one Subscription per resource type."""
    endpoint = endpoint or receiver_url(settings)
    return ([subscription_topic(r) for r in SUBSCRIBED_RESOURCES]
            + [subscription(settings, r, endpoint, heartbeat_s) for r in SUBSCRIBED_RESOURCES])


def without_secrets(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The resources as printed for a reader: each channel's Authorization header (the receiver token)
    masked, as `wardwatch config show` masks it; --apply sends the real one."""
    def masked(header: str) -> str:
        name, _, _ = header.partition(":")
        return f"{name}: Bearer ********" if name.strip().lower() == "authorization" else header

    return [{**r, "channel": {**r["channel"], "header": [masked(h) for h in r["channel"]["header"]]}}
            if "header" in r.get("channel", {}) else r for r in resources]


def put_fhir_resources(fhir_url: str, resources: list[dict[str, Any]], timeout_s: float = 180.0, *,
                       token: str | None = None, proxy: str | None = None) -> None:
    """(Talks to the FHIR server.) PUT each resource by id (idempotent: a rerun updates in place),
    retrying while the server starts. `token`: sent as `Authorization: Bearer`; `proxy`: the only proxy (none
    from the environment, HTTP_PROXY and the like: the Subscriptions carry the receiver token, and `token`).
    The caller passes them for WARDWATCH_FHIR_SERVER_URL only (fhir_access)."""
    import time as clock

    import httpx

    base = fhir_url.rstrip("/")
    deadline = clock.monotonic() + timeout_s
    headers = {"Content-Type": "application/fhir+json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    # a transport of its own: httpx then takes no proxy from the environment (as streams/fhir_fetch.py)
    # the Subscriptions' channel headers hold the receiver token: never in an error a server's answer echoes
    # (and the proxy's password, as in the URL and decoded: a proxy's refusal or an error may quote either)
    password = urlsplit(proxy).password if proxy else None
    secrets = (token, password, unquote(password) if password else None,
               *(h.partition(":")[2].strip().removeprefix("Bearer ").strip()
                 for r in resources for h in r.get("channel", {}).get("header", [])))
    with httpx.Client(timeout=30.0, headers=headers, transport=httpx.HTTPTransport(proxy=proxy)) as http:
        for r in resources:
            send_until_success(deadline, lambda r=r: http.put(f"{base}/{r['resourceType']}/{r['id']}", json=r),
                               what=f"PUT {r['resourceType']}/{r['id']} to the FHIR server at {base}", secrets=secrets)


def fhir_access(settings: Settings, fhir_url: str) -> dict[str, str | None]:
    """put_fhir_resources' `token` and `proxy` for `fhir_url`: WARDWATCH_FHIR_AUTH_TOKEN and
    WARDWATCH_FHIR_PROXY_URL when it is WARDWATCH_FHIR_SERVER_URL (the server they are for: the token goes to no
    other, and compose's own HAPI server is reached directly even when the EHR's is behind a proxy); else none."""
    if not settings.fhir_server_url or fhir_url.rstrip("/") != settings.fhir_server_url.rstrip("/"):
        return {"token": None, "proxy": None}
    return {"token": settings.fhir_auth_token.get_secret_value() if settings.fhir_auth_token else None,
            "proxy": settings.fhir_proxy_url.get_secret_value() if settings.fhir_proxy_url else None}


def send_until_success(deadline: float, send, what: str, secrets: tuple[str | None, ...] = ()):
    """Send until a 2xx; connection errors and 5xx are retried (the server may still be starting),
    a 4xx is a configuration error and fails at once with the server's answer. `secrets` (tokens the request
    carries) are masked in the error: a server's 4xx may echo the resource it refused, headers included."""
    import time as clock

    import httpx

    def masked(text: str) -> str:
        for secret in secrets:
            if secret:
                text = text.replace(secret, "********")
        return text

    last = "no answer"
    while clock.monotonic() < deadline:
        try:
            resp = send()
        except httpx.HTTPError as exc:
            last = masked(f"{type(exc).__name__}: {exc}")
        else:
            if resp.is_success:
                return resp
            if 400 <= resp.status_code < 500:
                raise DeployError(f"could not {what}: HTTP {resp.status_code}: {masked(resp.text)[:500]}")
            last = f"HTTP {resp.status_code}"
        clock.sleep(2.0)
    raise DeployError(f"could not {what} before the deadline ({last}): is the server up and reachable?")


# --- Prometheus ----------------------------------------------------------------------------------

DEFAULT_METRICS_PORT = 9108  # compose sets WARDWATCH_METRICS_PORT to this in every container
# every long-running wardwatch service serves /metrics on settings.metrics_port
METRICS_SERVICES = ("ingest", "worker", "receiver", "subscriptions", "cds", "archiver")


def prometheus_config(settings: Settings, services: tuple[str, ...] = METRICS_SERVICES) -> dict[str, Any]:
    """One scrape job per service; DNS service discovery finds every replica of a scaled service."""
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "scrape_configs": [
            {"job_name": name,
             "dns_sd_configs": [{"names": [name], "type": "A", "port": settings.metrics_port or DEFAULT_METRICS_PORT}]}
            for name in services
        ],
    }


def render_prometheus_config(settings: Settings) -> str:
    import yaml

    header = ("# Generated by `wardwatch deploy prometheus` from wardwatch's settings; do not edit by hand\n"
              "# (tests/test_compose.py fails when it drifts from the generator).\n")
    return header + yaml.safe_dump(prometheus_config(settings), sort_keys=False)


# --- nightly scheduler ---------------------------------------------------------------------------


def parse_clock_time(text: str) -> time:
    """"HH:MM" (24 h) -> time; a clear error otherwise."""
    try:
        hour, minute = (int(part) for part in text.split(":"))
        return time(hour, minute)
    except (ValueError, TypeError):
        raise DeployError(f"{text!r} is not a time of day: use HH:MM, e.g. 02:30") from None


def next_run(now: datetime, at: time) -> datetime:
    """The first moment at `at` strictly after `now` (same timezone as `now`)."""
    candidate = now.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    return candidate if candidate > now else candidate + timedelta(days=1)


# --- dead-letter redrive -------------------------------------------------------------------------

SOURCE_TOPIC_HEADER = "ww.source.topic"
REASON_HEADER = "ww.reason"
STAGE_HEADER = "ww.stage"
REDRIVEN_HEADER = "ww.redriven-from"


def redrive_target(headers: dict[str, bytes], redrivable: set[str], reasons: set[str] | None,
                   posted_to: str | None = None) -> str | None:
    """The topic a dead letter goes back to (the one it came from), or None to leave it: another
    reason than asked for, or a source that is not a wardwatch input topic. A notification the
    receiver refused came over HTTP, not from a topic: it goes to `posted_to`, the notifications
    topic the receiver would have written it to (a FHIR server does not resend what got a 400)."""
    reason = headers.get(REASON_HEADER, b"").decode(errors="replace")
    source = headers.get(SOURCE_TOPIC_HEADER, b"").decode(errors="replace")
    if not source and headers.get(STAGE_HEADER) == Stage.RECEIVER.value.encode():
        source = posted_to or ""
    if reasons and reason not in reasons:
        return None
    return source if source in redrivable else None


def redrive_group(settings: Settings, reasons: set[str] | None) -> str:
    """The redrive consumer group: one per choice of reasons. A group remembers what it read, not only
    what it sent back, so with one group for all, `--reason unknown_unit` moved past the fetch_failed
    dead letters it kept, and a later `--reason fetch_failed` never saw them."""
    base = f"{settings.group_prefix}-redrive"
    return f"{base}-{'+'.join(sorted(reasons))}" if reasons else base


def redrive_deadletters(settings: Settings, reasons: set[str] | None, *, dry_run: bool = False,
                        idle_s: float = 5.0, timeout_s: float = 600.0) -> dict[str, int]:
    """(Talks to Kafka.) Send dead letters back to their source topic, original key and value, after
    the fix that makes them parse. A consumer group per choice of reasons (redrive_group) remembers
    what was handled, so a second run for the same reasons never sends the same dead letter twice; the pipeline's dedupe makes a
    redrive of already-processed facts harmless. Stops when no dead letter arrived for idle_s.

    A run handles the dead letters written before it started (by their timestamps; in each partition it
    stops at the first one written since): a message that fails again is dead-lettered again while the
    run goes on, and reading on would send it back again and again until the timeout. Those are left (not
    committed) for the next run. (Not the end offsets at the start: the embedded broker reports them low.)
    Clocks apart by more than the time a message takes through the ingest could still resend one a few times.
    The producer partitions by key as the Java clients do (murmur2), as every other writer of these
    topics: a canonical message must land on its patient's partition, where its state is.
    Returns counts: redriven, skipped (kept: other reason or source), omitted (kept: the dead letter
    does not hold the original bytes, too large to copy; its ww.source.* headers say where it is)."""
    import time as clock

    from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

    topics = topics_for(settings)
    redrivable = {*topics.raw, topics.canonical}
    consumer = Consumer({**settings.kafka_client_config(), "group.id": redrive_group(settings, reasons),
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "session.timeout.ms": int(settings.session_timeout_s * 1000),
                         "heartbeat.interval.ms": int(settings.heartbeat_interval_s * 1000),
                         "fetch.wait.max.ms": 10})
    producer = Producer({**settings.kafka_client_config(), "enable.idempotence": True, "linger.ms": 5,
                         "partitioner": "murmur2_random"})  # the key's partition, as the ingest and the feeders
    counts = {"redriven": 0, "skipped": 0, "omitted": 0}
    assigned = []  # the idle clock starts once the group has given us the partitions
    consumer.subscribe([topics.deadletter], on_assign=lambda c, parts: assigned.append(clock.monotonic()))
    deadline = clock.monotonic() + timeout_s
    idle_since = None
    try:
        started_ms = int(clock.time() * 1000)  # the dead letters of this run: those written before it
        fenced: set[int] = set()  # partitions read up to a dead letter written since the run started
        while clock.monotonic() < deadline and (idle_since is None or clock.monotonic() - idle_since < idle_s):
            batch = consumer.consume(500, timeout=0.5)
            if idle_since is None and assigned:
                idle_since = assigned[0]
            handled: dict[int, int] = {}  # partition -> next offset to commit
            for msg in batch:
                if msg.error():
                    raise DeployError(f"reading {topics.deadletter} failed: {msg.error()}")
                if msg.partition() in fenced or msg.timestamp()[1] >= started_ms:
                    fenced.add(msg.partition())  # dead-lettered since the run started (perhaps by it): the next run's
                    continue
                idle_since = clock.monotonic()
                handled[msg.partition()] = msg.offset() + 1
                headers = dict(msg.headers() or [])
                target = redrive_target(headers, redrivable, reasons, topics.fhir)
                if target is None:
                    counts["skipped"] += 1
                    continue
                if VALUE_OMITTED_HEADER in headers:  # a null value would be a tombstone, not the message
                    counts["omitted"] += 1
                    continue
                counts["redriven"] += 1
                if not dry_run:
                    origin = f"{msg.topic()}:{msg.partition()}:{msg.offset()}".encode()
                    producer.produce(target, value=msg.value(), key=msg.key(), headers=[(REDRIVEN_HEADER, origin)])
            if not dry_run and handled:
                if producer.flush(30) > 0:
                    raise DeployError("the broker did not acknowledge the redriven messages; nothing committed, run again")
                # only after the broker has them: never lost; and never past the run's end offsets
                consumer.commit(offsets=[TopicPartition(topics.deadletter, p, o) for p, o in handled.items()],
                                asynchronous=False)
    except KafkaException as exc:
        raise DeployError(f"Kafka error during redrive: {exc}") from exc
    finally:
        consumer.close()
    return counts

