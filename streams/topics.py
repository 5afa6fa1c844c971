"""Every wardwatch topic, in one place: name, key, value shape and partition count.

The dataflow (each hop is a real Kafka topic):

    <cdc prefix>.<table>  key: {"patient_id"} (Debezium message.key.columns)  value: Debezium JSON
        (one topic per table of schemas.codes.CDC_TABLES: vital_signs, lab_results, encounters, patients)
    <prefix>.fhir.notifications  key: patient id  value: FHIR notification Bundle JSON
        |  (the rest-hook receiver writes here; the subscription watcher reads it for gaps)
        |  -> <prefix>.fhir.gaps  key: subscription  value: gap / missed-heartbeat record
        |  -> <prefix>.fhir.subscription-state  (compacted) key: subscription  value: tracker state
        |  ingest worker (confluent-kafka, batched): parse, validate, normalize
        v
    <prefix>.canonical      key: patient id  value: JSON array of CanonicalEvent dicts (one patient)
    <prefix>.deadletter     key: original key  value: original bytes, headers: reason, stage, ...
        |  patient agent (faust): dedupe, order, lateness, features, scoring, alert policy
        v
    <prefix>.late           key: patient id  value: {"event": CanonicalEvent, "late_by_ms": int}
    <prefix>.features       key: patient id  value: feature snapshot at a scoring point
    <prefix>.scores         key: patient id  value: score record (every score, model or rule path)
    <prefix>.alerts         key: patient id  value: {"header": {...}, "resource": RiskAssessment}
    <prefix>.scores.shadow  key: patient id  value: score record of the shadow (candidate) model; never alerts
    <prefix>.stats          (compacted) key: service instance  value: that instance's counters snapshot
        |  archiver (confluent-kafka): every output topic -> Parquet
        v
    data/archive/<topic>/date=YYYY-MM-DD/*.parquet  ->  batch nightly  ->  data/wardwatch.duckdb
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas import codes
from wardwatch.settings import Settings

CDC_TABLES = tuple(codes.CDC_TABLES)  # one raw Debezium topic per mapped EHR table
COMPACTED = {"cleanup.policy": "compact"}


@dataclass(frozen=True, slots=True)
class Topics:
    cdc: dict[str, str]  # table -> raw Debezium topic
    fhir: str
    canonical: str
    deadletter: str
    late: str
    features: str
    scores: str
    alerts: str
    partitions: int
    gaps: str = ""
    subscription_state: str = ""
    scores_shadow: str = ""
    stats: str = ""

    @property
    def raw(self) -> list[str]:
        return [*self.cdc.values(), self.fhir]

    @property
    def outputs(self) -> list[str]:
        """Topics the archiver lands in Parquet."""
        return [self.canonical, self.deadletter, self.late, self.features, self.scores, self.alerts,
                self.scores_shadow, self.gaps]

    @property
    def compacted(self) -> list[str]:
        """Topics that hold the latest value per key (state), not a history."""
        return [self.subscription_state, self.stats]

    @property
    def all(self) -> list[str]:
        return [*self.raw, *self.outputs, *self.compacted]


def topics_for(settings: Settings) -> Topics:
    p = settings.topic_prefix
    return Topics(
        cdc={t: f"{settings.cdc_topic_prefix}.{t}" for t in CDC_TABLES},
        fhir=f"{p}.fhir.notifications",
        canonical=f"{p}.canonical",
        deadletter=f"{p}.deadletter",
        late=f"{p}.late",
        features=f"{p}.features",
        scores=f"{p}.scores",
        alerts=f"{p}.alerts",
        partitions=settings.partitions,
        gaps=f"{p}.fhir.gaps",
        subscription_state=f"{p}.fhir.subscription-state",
        scores_shadow=f"{p}.scores.shadow",
        stats=f"{p}.stats",
    )


def topic_configs(settings: Settings, topics: Topics) -> dict[str, dict[str, str]]:
    """The broker configs of every topic, in one place (ensure_topics and `wardwatch deploy topics`):
    compacted state topics; raw topics with a bounded retention (they are the replay source); the
    topics that take a whole raw message (notifications, dead letters) sized for the largest one."""
    retention = {"cleanup.policy": "delete", "retention.ms": str(settings.raw_retention_hours * 3_600_000)}
    large = {"max.message.bytes": str(settings.max_message_bytes)}
    configs: dict[str, dict[str, str]] = {}
    for name in topics.all:
        config = dict(COMPACTED) if name in topics.compacted else dict(retention) if name in topics.raw else {}
        if name in (topics.fhir, topics.deadletter):
            config.update(large)
        configs[name] = config
    return configs


def ensure_topics(settings: Settings, topics: Topics, timeout_s: float = 30.0) -> None:
    """Create every topic explicitly with its partition count (auto-creation would pick 4)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(settings.kafka_client_config())
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    configs = topic_configs(settings, topics)
    wanted = [NewTopic(t, num_partitions=topics.partitions, replication_factor=settings.replication_factor,
                       config=configs[t])
              for t in topics.all if t not in existing]
    if not wanted:
        return
    for topic, fut in admin.create_topics(wanted, operation_timeout=timeout_s).items():
        try:
            fut.result(timeout=timeout_s)
        except Exception as exc:  # already exists is fine (a concurrent creator won)
            if "TOPIC_ALREADY_EXISTS" not in str(exc).upper().replace(" ", "_"):
                raise RuntimeError(f"could not create topic {topic}: {exc}") from exc
