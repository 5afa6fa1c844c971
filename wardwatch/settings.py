"""One frozen settings object, read from the environment (prefix WARDWATCH_) once at startup.

Pass it down; never call os.getenv deep in modules.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WARDWATCH_", frozen=True, extra="ignore")

    # Kafka
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    topic_prefix: str = Field("ww", description="Prefix of every wardwatch topic (lets tests and tenants share a broker)")
    group_prefix: str = Field("wardwatch", description="Prefix of every consumer group id")
    partitions: int = Field(4, ge=1, description="Partition count of the per-patient topics")
    kafka_security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    kafka_sasl_mechanism: str | None = Field(None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None

    # consumer-group timing; Tansu holds JoinGroup ~half the session timeout, so keep it short
    session_timeout_s: float = Field(6.0, description="Consumer group session timeout (seconds)")
    heartbeat_interval_s: float = Field(2.0, description="Consumer group heartbeat interval (seconds)")

    # ingest
    ingest_batch_size: int = Field(5000, ge=1, description="Max raw messages the ingest worker reads per poll")
    ingest_linger_ms: int = Field(5, ge=0, description="Producer linger for canonical micro-batches (ms)")
    cdc_topic_prefix: str = Field("ehr.public", description="Debezium topic prefix: <prefix>.<table>")

    # patient state
    allowed_lateness_s: int = Field(12 * 3600, ge=0, description="Event-time lateness bound; older events go to the late topic")
    dedupe_horizon_s: int = Field(48 * 3600, ge=0, description="Event-time horizon for dedupe keys before they expire")
    cross_source_tolerance: float = Field(0.05, ge=0, description="Max abs difference for the same measurement via CDC and FHIR")

    # scoring
    model_dir: Path = Field(Path("models"), description="Model registry directory (holds `current`)")
    alert_threshold: float = Field(0.5, description="Model probability at/above which an alert episode opens")
    alert_reset: float = Field(0.4, description="Probability below which an open alert episode resolves (hysteresis)")

    # batch / archive
    data_dir: Path = Field(Path("data"), description="Where the archive (Parquet) and the DuckDB file live")

    # worker
    worker_batch_size: int = Field(2000, ge=1, description="Max canonical messages the worker takes per batch")
    worker_batch_within_s: float = Field(0.005, gt=0, description="Max wait to fill a worker batch (seconds)")
    worker_web_port: int | None = Field(None, description="faust web port; None disables the web server")

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def duckdb_path(self) -> Path:
        return self.data_dir / "wardwatch.duckdb"

    def kafka_client_config(self) -> dict[str, str]:
        """librdkafka settings shared by every confluent-kafka client (security included)."""
        conf = {"bootstrap.servers": self.bootstrap_servers, "security.protocol": self.kafka_security_protocol}
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username or ""
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else ""
        if self.kafka_ssl_cafile:
            conf["ssl.ca.location"] = str(self.kafka_ssl_cafile)
        return conf


def load_settings(**overrides) -> Settings:
    """Read the environment once; explicit overrides win (used by the CLI and tests)."""
    return Settings(**overrides)
