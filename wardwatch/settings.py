"""One frozen settings object, read from the environment (prefix WARDWATCH_) once at startup.

Pass it down; never call os.getenv deep in modules.
"""

from __future__ import annotations

import difflib
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import SplitResult, urlsplit
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# JWS algorithms a CDS client may sign with: asymmetric only. CDS Hooks forbids `none` (no integrity)
# and every symmetric (HMAC) one: the service would have to hold the client's signing secret
ASYMMETRIC_JWS_ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                             "EdDSA")



def iana_zone(value: str) -> str:
    """`value` when it names an IANA time zone (zoneinfo knows it), else ValueError saying what is wanted."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError("not an IANA time zone name such as UTC, Europe/Berlin or America/New_York "
                         "(an offset such as +02:00 has no DST rules)") from exc
    return value


def _http_url(value: str, user: bool = False) -> SplitResult | None:
    """The parts of an http(s) URL with a host, a numeric port (if any) and no user (unless `user`); else None."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or ("@" in parts.netloc and not user):
        return None
    return parts


def _is_web_origin(value: str) -> bool:
    """scheme://host[:port] as a browser's `Origin` header writes it: http(s), a host, nothing after."""
    parts = _http_url(value)
    return parts is not None and value == f"{parts.scheme}://{parts.netloc}" and "*" not in value


def _base_url(value: str) -> tuple[str, SplitResult]:
    """`value` without a trailing slash, and its parts, when it is a FHIR base URL: http(s), a host, a path at
    most, no user, query or fragment; else ValueError."""
    base = value.rstrip("/")
    parts = _http_url(base)
    if (parts is None or parts.query or parts.fragment or "?" in base or "#" in base
            or any(c.isspace() for c in base)):
        raise ValueError(f"{value}: not a FHIR base URL such as https://ehr.example.org/fhir/r4 "
                         "(http(s), a host, a path; no user, query or fragment)")
    return base, parts


def fhir_base_url(value: str) -> str:
    """`value` without a trailing slash when it is a FHIR server's base URL the CDS service may read from:
    https (http only on a loopback host), a host, a path at most, no user, query or fragment; else ValueError."""
    from wardwatch.listen import is_loopback

    base, parts = _base_url(value)
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(f"{value}: http to another host than this one would send the EHR's access token in clear; "
                         "use https (http is accepted for a loopback host only)")
    return base


# RFC 3986: scheme ":" then the rest (http://..., urn:oid:..., urn:uuid:...); a URI holds no whitespace
# upper bounds of the alert calm rule's settings: beyond them an episode would in practice never resolve (or a
# re-alert never page), which a typo (milliseconds for seconds) would otherwise cause without a word
MAX_CALM_POINTS = 96
MAX_ALERT_HOLD_S = 86_400
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s]+$")


def identifier_system(value: str) -> str:
    """`value` when it is an identifier system URI (FHIR Identifier.system), else ValueError saying what is wanted."""
    if not value.strip():
        raise ValueError("set but empty: give the MRN's identifier system URI, or unset the variable")
    if not _URI.match(value):
        raise ValueError("not a URI such as http://hospital.example.org/identifiers/mrn or urn:oid:2.16.840.1.113883.19.5 "
                         "(compared exactly with the identifiers' `system`: no spaces)")
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WARDWATCH_", frozen=True, extra="ignore")

    # Kafka
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    topic_prefix: str = Field("ww", description="Prefix of every wardwatch topic (lets tests and tenants share a broker)")
    group_prefix: str = Field("wardwatch", description="Prefix of every consumer group id")
    partitions: int = Field(4, ge=1, description="Partition count of the per-patient topics")
    replication_factor: int = Field(1, ge=1, description="Replication factor of every topic wardwatch creates (its own, the CDC topics, the worker's changelog, the connector's heartbeat topic); at most the number of brokers, e.g. 3 on a production cluster")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    # the mechanisms both clients have: this librdkafka build has no GSSAPI, and OAUTHBEARER needs a token source
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None

    # consumer-group timing; Tansu holds JoinGroup ~half the session timeout, so keep it short
    session_timeout_s: float = Field(6.0, gt=0, description="Consumer group session timeout (seconds)")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="Consumer group heartbeat interval (seconds; below the session timeout)")
    # static group membership (KIP-345) for the ingest and the worker: a restarted process with the same
    # id takes its partitions back at once instead of waiting out its dead predecessor's session
    static_membership: bool = Field(False, description="Join the ingest and worker groups as a static member (group.instance.id); needs an id unique per process within each group")
    instance_id: str | None = Field(None, description="The static member id (default: the host name, which a compose replica keeps across container restarts)")

    # ingest
    ingest_batch_size: int = Field(5000, ge=1, description="Max raw messages the ingest worker reads per poll")
    ingest_linger_ms: int = Field(100, ge=0, description="Producer linger for canonical micro-batches (ms). Every poll is flushed at once whatever the linger: a long one only keeps a poll's messages in one produce request")
    ingest_max_skew_s: float | None = Field(None, ge=0, description="Event-time alignment: how far (event time) a raw partition may be read ahead of the slowest active one; below allowed_lateness_s, or a backlog makes vitals late. Default: half of allowed_lateness_s. 0: off")
    ingest_idle_s: float = Field(2.0, gt=0, description="Event-time alignment: a raw partition that delivered nothing for this long (wall clock) holds no other back")
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024 * 1024, description="Largest message wardwatch writes (producer message.max.bytes; raw notifications and dead-letter topics are created with it)")
    canonical_max_message_bytes: int = Field(512 * 1024, ge=1024, description="Max bytes of one canonical micro-batch message (below the broker's message.max.bytes)")
    cdc_topic_prefix: str = Field("ehr.public", description="Debezium topic prefix: <prefix>.<table>")
    cdc_timezone: str = Field("UTC", description="IANA time zone (e.g. Europe/Berlin) of the EHR database's `timestamp` (without time zone) columns, which Debezium sends as wall-clock time: a database keeping local time needs its zone, or every CDC time is off by the UTC offset. DST by zoneinfo: a time in the repeated fall-back hour is its first occurrence, one in the skipped spring-forward hour takes the offset before the jump. `timestamptz` columns are unaffected")

    # FHIR server (id-only notifications are fetched from it) and subscription tracking
    fhir_server_url: str | None = Field(None, description="FHIR base URL, e.g. https://ehr.example.org/fhir; None: id-only notifications are dead-lettered")
    fhir_auth_token: SecretStr | None = Field(None, description="Bearer token for the FHIR server, if it needs one (with an http:// WARDWATCH_FHIR_SERVER_URL, only on a loopback host or with WARDWATCH_FHIR_ALLOW_PLAIN_HTTP=true)")
    fhir_allow_plain_http: bool = Field(False, description="Let the ingest send WARDWATCH_FHIR_AUTH_TOKEN to an http:// (not https) WARDWATCH_FHIR_SERVER_URL on another host than this one: anyone on the network path reads the token and the patient data. Only for a server on a network segment you trust (e.g. a compose network)")
    fhir_proxy_url: SecretStr | None = Field(None, description="HTTP(S) proxy through which the ingest (WARDWATCH_FHIR_SERVER_URL) and the CDS service (WARDWATCH_CDS_FHIR_SERVERS) reach FHIR servers, e.g. http://user:password@proxy.hospital.example:3128 (a secret: it may hold the proxy's credentials). Unset: they connect directly; HTTP_PROXY, HTTPS_PROXY and the like from the environment are never used (they would receive the bearer tokens)")
    fhir_patient_ids_are_mrns: bool = Field(False, description="Set only for a FHIR facade whose Patient.id is the EHR's patient key (the MRN the CDC rows carry). Otherwise a subject naming its Patient by the server's id alone (no identifier, no Patient in the notification) is keyed by the MRN read from WARDWATCH_FHIR_SERVER_URL (Patient/<id>, cached), else dead-lettered no_fhir_server, and a Patient without an MRN (identifier typed MR) is dead-lettered missing_patient: a server's own ids (HAPI: 1, 2, 3, ...) can equal another patient's MRN and merge the two patients' readings and alerts; the CDS service likewise keys a call by its prefetched Patient's MRN, not context.patientId")
    mrn_system: str | None = Field(None, description="The identifier system (URI) of the EHR's MRN, e.g. urn:oid:2.16.840.1.113883.19.5: set it in production. A FHIR subject's `identifier` is then the MRN only when its `system` is this one (one of another namespace, a national number or an insurer's id, may equal another patient's MRN and merge the two patients: it is taken for no identifier, and the subject's Patient reference decides), and a Patient's MRN is its identifier typed MR of this system (the CDS service's prefetched Patient too). None: a subject's identifier is the MRN whatever its system, and a Patient's any identifier typed MR")
    fhir_patient_cache_ttl_s: float = Field(3600.0, ge=0, description="How long the ingest keeps the MRN it read from the FHIR server for a subject named by Patient id alone (seconds, monotonic clock): a patient merge or an MRN corrected on the server applies to notifications read after that at the latest, without a restart; 0: read the Patient for every notification")
    fhir_timeout_s: float = Field(5.0, gt=0, description="Timeout of one FHIR GET (seconds)")
    fhir_retries: int = Field(3, ge=0, description="Retries of a FHIR GET after a timeout, connection error, 429 or 5xx")
    fhir_retry_backoff_s: float = Field(0.5, ge=0, description="First retry delay (seconds); doubles each retry, up to 10 s a wait (a 429/503's Retry-After instead, bounded the same)")
    fhir_unavailable_pause_s: float = Field(30.0, ge=0, description="After a FHIR GET fails every retry (timeouts, connection errors, 408/429/5xx), id-only notifications are dead-lettered fetch_failed at once for this long (redrive them once the server is back) instead of each waiting out its own retries, so a FHIR outage does not hold up the CDC vital signs the same ingest worker reads; longer when the last answer was a 429/503 whose Retry-After asked for longer (at most 600 s); 0: off")
    fhir_history_max_pages: int = Field(10, ge=1, description="Pages of a resource's history read to find the version before a delete (each page is a blocking GET of the ingest worker; 10 is 200 versions at HAPI's default page size); beyond them the notification is dead-lettered fetch_failed")
    fhir_gap_grace_s: float = Field(300.0, ge=0, description="Event time a missing notification may be late before its gap is reported")
    fhir_heartbeat_period_s: float = Field(60.0, gt=0, description="The subscriptions' heartbeat period (seconds)")
    fhir_heartbeat_missed_periods: int = Field(3, ge=1, description="Silent heartbeat periods before a subscription is reported heartbeat-missed")

    # patient state
    allowed_lateness_s: int = Field(12 * 3600, ge=0, description="Event-time lateness bound; older events go to the late topic")
    dedupe_horizon_s: int = Field(48 * 3600, ge=0, description="Event-time horizon for dedupe keys before they expire")
    cross_source_tolerance: float = Field(0.05, ge=0, description="Max abs difference for the same measurement via CDC and FHIR")

    # scoring
    model_dir: Path = Field(Path("models"), description="Model registry directory (holds `current`)")
    alert_threshold: float = Field(0.5, ge=0, le=1, description="Model probability at/above which an alert episode opens (above the high tier's 0.7 it is where high starts too)")
    alert_reset: float = Field(0.4, ge=0, le=1, description="Probability below which an open alert episode resolves (hysteresis; at most alert_threshold)")
    scoring_min_interval_s: int = Field(300, ge=0, description="Event time between two vitals scoring points of a patient (seconds; 0: every new vitals set); sooner only for a reading raising its parameter's NEWS2 points (schemas/cadence.py)")
    # the calm rule of the alert policy (streams/alerting.py): a trade-off for the ward's clinical owners (README)
    alert_resolve_after: int = Field(2, description="Consecutive calm scoring points (tier none/low, model risk below WARDWATCH_ALERT_RESET, at distinct times) that resolve an alert episode. More: a patient hovering at the NEWS2 threshold is paged less often, but a new deterioration to the tier already alerted inside the still-open episode is not paged (a higher tier still escalates)")
    alert_calm_for_s: int | None = Field(None, description="Event time (seconds) a patient must also have been calm since the episode's last non-calm point before it resolves. Unset: WARDWATCH_ALERT_RESOLVE_AFTER x WARDWATCH_SCORING_MIN_INTERVAL_S, what that many regular rounds take")
    alert_suppression_s: int = Field(1800, description="Re-alert hold-off (seconds): an episode opening at medium within this long of the last alerted resolution pages at its first scoring point after it, if still medium/high (deferred, not dropped); a high point (NEWS2 >= 7, an emergency trigger) pages at once, whatever the hold-off; 0: off")
    shadow_model_dir: Path | None = Field(
        None, description="Registry of the shadow (candidate) model: its `current` names the version to shadow-score. "
                          "None: the main registry's `candidate` pointer, if any")

    # CDS Hooks service (wardwatch cds)
    cds_host: str = Field("127.0.0.1", description="Address the CDS Hooks service listens on")
    cds_port: int = Field(8082, ge=0, le=65535, description="Port of the CDS Hooks service (0: any free port, logged once bound)")
    # client authentication (CDS Hooks "Trusting CDS Clients"): the EHR signs a short-lived JWT per call
    cds_jwks_file: Path | None = Field(None, description="JWK Set (JSON file) of the public keys of the CDS clients (EHRs) trusted to call the service: every service call must then carry `Authorization: Bearer <JWT>` signed by one of them. None: no token is checked, which `wardwatch cds` accepts only on a loopback WARDWATCH_CDS_HOST or with WARDWATCH_CDS_ALLOW_ANONYMOUS")
    cds_issuers: Annotated[list[str], NoDecode] = Field(
        [], description="The `iss` values accepted in CDS clients' tokens, comma-separated (required with WARDWATCH_CDS_JWKS_FILE)")
    cds_audience: str | None = Field(None, description="The `aud` a CDS client's token must carry: the URL of this service's endpoint as the EHR calls it, https://<host>/cds-services/wardwatch-deterioration (required with WARDWATCH_CDS_JWKS_FILE)")
    cds_jwks_check_s: float = Field(5.0, gt=0, le=300, description="How often, at most, `wardwatch cds` looks whether WARDWATCH_CDS_JWKS_FILE changed (seconds): a changed file's keys replace the old ones without a restart (a key removed from it stops verifying within this time); an unreadable or invalid new file keeps the last good keys")
    cds_algorithms: Annotated[list[str], NoDecode] = Field(
        ["ES384", "RS384"], description="JWS algorithms accepted for CDS clients' tokens, comma-separated: asymmetric only (default: ES384 and RS384, the ones CDS Hooks recommends)")
    cds_cors_origins: Annotated[list[str], NoDecode] = Field(
        [], description="Web origins (scheme://host[:port]) of browser-based CDS clients allowed to call the service across origins (CORS), comma-separated. Empty: no CORS headers, so a browser withholds the answers from a web app on another origin (EHRs calling from their servers need none). Never `*`: name each origin")
    cds_fhir_servers: Annotated[list[str], NoDecode] = Field(
        [], description="Base URLs of the EHR FHIR servers the CDS service may read a call's Patient from (comma-separated, compared with the call's `fhirServer` after dropping a trailing slash; https, or http on a loopback host). A call sent without its prefetched Patient but with `fhirServer` and `fhirAuthorization` then has its Patient read from there (GET Patient/<context.patientId> with the call's access token) for its MRN. Empty (the default): the service never calls a FHIR server, and such a call is a 412")
    cds_fhir_timeout_s: float = Field(5.0, gt=0, le=30, description="Time the CDS service gives a FHIR server to answer the read of a call's Patient, connection and body included (seconds); keep it well under the EHR's own timeout for the CDS call. Past it the call is a 412")
    cds_read_timeout_s: float = Field(30.0, gt=0, description="Max time to receive a CDS call's whole body once its headers are in (seconds); then 408 and the connection is closed, so a client that stalls mid-body (or trickles it, which anyone can without WARDWATCH_CDS_JWKS_FILE) does not hold a connection for ever")
    cds_allow_anonymous: bool = Field(False, description="Without WARDWATCH_CDS_JWKS_FILE, let `wardwatch cds` listen on a non-loopback address anyway: anyone who reaches the port reads any patient's latest risk")

    # batch / archive
    data_dir: Path = Field(Path("data"), description="Where the archive (Parquet) and the DuckDB file live")

    # promotion gate (batch/retrain.py): a new model must beat NEWS2 and be non-inferior to `current` on held-out patients
    gate_min_auroc_gain: float = Field(0.0, description="Min AUROC gain over NEWS2 to promote a new model "
                                                        "(0 or more: 0 promotes a model at least as good)")
    gate_min_auprc_gain: float = Field(0.0, description="Min AUPRC gain over NEWS2 to promote a new model "
                                                        "(0 or more: 0 promotes a model at least as good)")
    # against `current`: non-inferiority, the low end of the paired gain's 95 % interval at least -margin
    gate_noninferiority_auroc: float = Field(0.02, description="How much lower the AUROC of a new model may possibly "
                                             "be than the current model's (low end of the 95 % interval of the "
                                             "paired gain) and still replace it (0 or more)")
    gate_noninferiority_auprc: float = Field(0.05, description="How much lower the AUPRC of a new model may possibly "
                                             "be than the current model's (low end of the 95 % interval of the "
                                             "paired gain) and still replace it (0 or more)")
    # de-identified export (batch/export.py): keys the HMAC of ids and the per-patient date shift
    deid_secret: SecretStr | None = Field(None, description="Secret for the de-identified export; keep it outside the export")

    # consumption watchdogs (streams/watchdog.py)
    stall_timeout_s: float = Field(300.0, ge=0, description="A consumer service (worker, ingest, archiver, subscription watcher) whose input partitions have messages waiting and apply none for this long (seconds) is not ready (/readyz 503) and exits, so that its restart resumes (the worker's rebalances and table recoveries count only while they make no progress either); 0: no watchdog")

    # worker
    worker_batch_size: int = Field(2000, ge=1, description="Max canonical messages the worker takes per batch")
    worker_batch_within_s: float = Field(0.005, gt=0, description="Max wait to fill a worker batch (seconds)")
    state_write_format: int = Field(4, ge=3, le=4, description="Format of the patient state the worker writes to its table (streams/state.py): 4, the current one; 3, the one releases before format 4 read (every dedupe key written, records about half as large again), for an upgrade you may have to roll back: run the new release with 3 until you keep it, then set 4 (docs/operations.md, \"Upgrade and roll back wardwatch\"). Either is read by this release")
    worker_parsed_cache_patients: int = Field(5000, ge=1, description="Parsed patient records the worker keeps in memory beyond the table's bytes (most recently active)")
    worker_fetch_wait_ms: int = Field(10, ge=1, description="The worker consumer's fetch.max.wait.ms (faust hard-codes 1500; a broker that holds fetches that long adds it to every event's latency)")
    worker_web_port: int | None = Field(None, description="faust web port; None disables the web server")

    # rest-hook receiver (streams/receiver.py)
    receiver_host: str = Field("127.0.0.1", description="Address the rest-hook receiver binds (0.0.0.0 for all)")
    receiver_port: int = Field(8081, ge=0, le=65535, description="Port of the rest-hook receiver (0: any free port, logged once bound)")
    receiver_token: SecretStr | None = Field(None, description="Bearer token the FHIR server must send; None disables the check, which `wardwatch receiver` accepts only on a loopback WARDWATCH_RECEIVER_HOST or with WARDWATCH_RECEIVER_ALLOW_ANONYMOUS")
    receiver_allow_anonymous: bool = Field(False, description="Without WARDWATCH_RECEIVER_TOKEN, let `wardwatch receiver` listen on a non-loopback address anyway: anyone who reaches the port can post notifications, i.e. vital signs and lab results into every patient's record and risk")
    receiver_max_bytes: int = Field(5 * 1024 * 1024, ge=1, description="Largest notification body accepted (bytes); larger -> 413")
    receiver_max_inflight: int = Field(64, ge=1, description="Requests handled at once; more -> 503 with Retry-After")
    receiver_ack_timeout_s: float = Field(10.0, gt=0, description="Max wait for the broker to acknowledge a write; then 503")
    receiver_read_timeout_s: float = Field(30.0, gt=0, description="Max time to receive a notification's whole body once its headers are in (seconds); then 408 and the connection is closed, so a sender that stalls mid-body (a hung FHIR server connection, a slow-drip client) does not hold one of WARDWATCH_RECEIVER_MAX_INFLIGHT's places for ever")

    # deployment (wardwatch/deploy.py, docker-compose.yml)
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Port of the Prometheus /metrics, /healthz and /readyz endpoints (None: off; compose sets 9108, one per container)")
    metrics_host: str = Field("127.0.0.1", description="Bind address of the metrics endpoint (compose: 0.0.0.0)")
    json_logs: bool = Field(True, description="Log one JSON object per line (false: plain text for a terminal)")
    log_level: Literal["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level of the wardwatch services")
    raw_retention_hours: int = Field(7 * 24, ge=1, description="Retention of the raw CDC and FHIR topics (hours); replays and gap recovery reach back this far")
    nightly_at: str = Field("02:30", pattern=r"^\d{2}:\d{2}$", description="Time of day (HH:MM, container time) `wardwatch deploy scheduler` runs the nightly batch")

    # counters published to the stats topic (streams/stats.py)
    commit_interval_s: float = Field(0.1, gt=0, description="How often the ingest and the worker commit consumer offsets, at most (seconds): each commit is a broker request, and a restart re-reads at most this much (deduplicated downstream)")
    stats_interval_s: float = Field(2.0, gt=0, description="How often a service publishes its counters snapshot (seconds)")

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def duckdb_path(self) -> Path:
        return self.data_dir / "wardwatch.duckdb"

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", "log_level", mode="before")
    @classmethod
    def _upper_case(cls, value):
        # librdkafka and logging take these in any case; checked against the list after
        return value.upper() if isinstance(value, str) else value

    @field_validator("receiver_token", "fhir_auth_token")
    @classmethod
    def _token_not_blank(cls, value):
        # an empty value (WARDWATCH_RECEIVER_TOKEN= in wardwatch.env, or a ${TOKEN} the shell left unset)
        # would silently mean "no token": an open receiver, or "Bearer " sent to the FHIR server
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("set but empty: give the token, or unset the variable for none")
        return value

    @field_validator("data_dir", "model_dir", "shadow_model_dir", "cds_jwks_file", mode="before")
    @classmethod
    def _path_not_blank(cls, value):
        # WARDWATCH_DATA_DIR= (or a ${DIR} the shell left unset) would silently mean the current directory
        if isinstance(value, str) and not value.strip():
            raise ValueError("set but empty: give a path, or unset the variable for the default")
        return value

    @field_validator("nightly_at")
    @classmethod
    def _clock_time(cls, value):
        # the pattern lets 25:00 or 07:60 through: the scheduler then stopped at start, and compose restarted it
        # for ever, with a line that did not name the variable
        hour, minute = (int(part) for part in value.split(":"))
        if hour > 23 or minute > 59:
            raise ValueError("not a time of day: HH:MM from 00:00 to 23:59, e.g. 02:30")
        return value

    @field_validator("mrn_system")
    @classmethod
    def _identifier_system(cls, value):
        # checked at startup: a blank or mistyped system would match no identifier, and every subject would then
        # be keyed by its Patient reference's MRN or dead-lettered; say so now rather than in the dead letters
        return value if value is None else identifier_system(value)

    @field_validator("cdc_timezone")
    @classmethod
    def _iana_zone(cls, value):
        # checked at startup: a typo would otherwise dead-letter every CDC message (internal_error) or, read
        # as UTC, shift every reading by hours without a word
        return iana_zone(value)

    @field_validator("alert_resolve_after")
    @classmethod
    def _resolve_after_positive(cls, value):
        if value < 1:  # 0 would resolve an episode on the very point that opened it
            raise ValueError("must be 1 or more: the consecutive calm scoring points that resolve an alert "
                             "episode (default 2); to make resolving stricter raise it, or set WARDWATCH_ALERT_CALM_FOR_S")
        if value > MAX_CALM_POINTS:  # an episode that can never resolve never pages its patient again
            raise ValueError(f"must be at most {MAX_CALM_POINTS} calm scoring points (a day of 15-minute rounds): "
                             "an episode needing more would not resolve before the patient's next deterioration, which "
                             "would then page nothing; to require a long calm, set WARDWATCH_ALERT_CALM_FOR_S")
        return value

    @field_validator("alert_calm_for_s", mode="before")
    @classmethod
    def _calm_for_empty_is_unset(cls, value):
        # `WARDWATCH_ALERT_CALM_FOR_S=` in an env file means "not set" (the default rule), not "no integer"
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("alert_calm_for_s")
    @classmethod
    def _calm_for_not_negative(cls, value):
        if value is not None and value < 0:
            raise ValueError("must be 0 or more seconds of event time (0: no time condition); "
                             "leave WARDWATCH_ALERT_CALM_FOR_S unset for WARDWATCH_ALERT_RESOLVE_AFTER scoring intervals")
        if value is not None and value > MAX_ALERT_HOLD_S:  # typically milliseconds typed for seconds
            raise ValueError(f"must be at most {MAX_ALERT_HOLD_S} seconds (24 h; is it in milliseconds?): an episode "
                             "calm for longer would not resolve, and its patient's next deterioration would page nothing")
        return value

    @field_validator("alert_suppression_s")
    @classmethod
    def _suppression_not_negative(cls, value):
        if value < 0:
            raise ValueError("must be 0 or more seconds of event time (0: no re-alert hold-off; default 1800)")
        if value > MAX_ALERT_HOLD_S:  # typically milliseconds typed for seconds
            raise ValueError(f"must be at most {MAX_ALERT_HOLD_S} seconds (24 h; is it in milliseconds?): the hold-off "
                             "defers the page of a patient deteriorating again after a resolved alert")
        return value

    @field_validator("gate_min_auroc_gain", "gate_min_auprc_gain")
    @classmethod
    def _gain_not_negative(cls, value):
        # a negative margin lets the gate promote a model worse than NEWS2: a worse model is never served
        # automatically (`wardwatch model promote` records a human's reason)
        if not value >= 0:  # NaN too: the gate's `gain < NaN` is never true, it would promote anything
            raise ValueError("must be 0 or more: a negative margin would promote a model worse than NEWS2; "
                             "promote one by hand with `wardwatch model promote VERSION --reason`")
        return value

    @field_validator("gate_noninferiority_auroc", "gate_noninferiority_auprc")
    @classmethod
    def _margin_in_range(cls, value):
        # NaN would never compare below the interval (anything passes); 1 or more allows any model at all
        if not 0 <= value < 1:
            raise ValueError("must be from 0 (the gain over the current model shown not negative) to below 1 "
                             "(1 would let any model replace it)")
        return value

    @field_validator("cds_issuers", "cds_algorithms", "cds_cors_origins", "cds_fhir_servers", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        # an environment variable holds "a,b" (NoDecode: not JSON); blanks between commas are dropped
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("cds_cors_origins")
    @classmethod
    def _web_origins(cls, value):
        # an origin is what a browser sends in `Origin`: compared exactly, so a path or a slash would never match
        refused = [origin for origin in value if not _is_web_origin(origin)]
        if refused:
            raise ValueError(f"{', '.join(refused)}: not a web origin; name each as scheme://host[:port] "
                             "(http or https, no path, no trailing slash, no wildcard)")
        return value

    @field_validator("cds_fhir_servers")
    @classmethod
    def _fhir_base_urls(cls, value):
        # the only servers the service ever sends an EHR's access token to: checked here, not per call
        return [fhir_base_url(url) for url in value]

    @field_validator("fhir_server_url")
    @classmethod
    def _fhir_server_url(cls, value):
        # the ingest joins resource paths to it and sends the token there: a typo (ftp://, a query, a user) must
        # stop the ingest at start, not dead-letter every id-only notification fetch_failed
        return None if value is None or not value.strip() else _base_url(value.strip())[0]

    @field_validator("fhir_proxy_url")
    @classmethod
    def _proxy_url(cls, value):
        # the value is never shown: it may hold the proxy's password
        if value is None:
            return value
        url = value.get_secret_value().strip()
        parts = _http_url(url, user=True)
        if (parts is None or parts.path not in ("", "/") or parts.query or parts.fragment
                or any(c.isspace() for c in url)):
            raise ValueError("not a proxy URL such as http://proxy.hospital.example:3128 or "
                             "http://user:password@proxy.hospital.example:3128 (http or https, a host, a port; no "
                             "path, query or fragment; percent-encode reserved characters of the credentials)")
        return SecretStr(url)

    @field_validator("cds_algorithms")
    @classmethod
    def _asymmetric_only(cls, value):
        refused = [alg for alg in value if alg not in ASYMMETRIC_JWS_ALGORITHMS]
        if refused:
            raise ValueError(f"{', '.join(refused)} refused: CDS Hooks allows only asymmetric signatures "
                             f"({', '.join(ASYMMETRIC_JWS_ALGORITHMS)}), never none or HMAC")
        if not value:
            raise ValueError("empty: no CDS client could sign a token the service accepts")
        return value

    @model_validator(mode="after")
    def _settings_agree(self) -> "Settings":
        # pairs that only make sense together: say which two variables disagree
        if self.alert_reset > self.alert_threshold:
            raise ValueError(f"WARDWATCH_ALERT_RESET={self.alert_reset} is above WARDWATCH_ALERT_THRESHOLD="
                             f"{self.alert_threshold}: an episode would resolve at probabilities that open one")
        if self.dedupe_horizon_s <= self.allowed_lateness_s:  # the worker refused it on every batch, in a loop
            raise ValueError(f"WARDWATCH_DEDUPE_HORIZON_S={self.dedupe_horizon_s} must be above "
                             f"WARDWATCH_ALLOWED_LATENESS_S={self.allowed_lateness_s}: a redelivery arriving after "
                             "its dedupe key expired must be late, or it enters the state again as a new reading")
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError(f"WARDWATCH_HEARTBEAT_INTERVAL_S={self.heartbeat_interval_s} must be below "
                             f"WARDWATCH_SESSION_TIMEOUT_S={self.session_timeout_s} (Kafka drops a member that "
                             f"misses heartbeats for a session timeout)")
        protocol = self.kafka_security_protocol
        # without these, librdkafka refuses the config in a traceback, or the credentials are never sent
        if protocol.startswith("SASL_") and not self.kafka_sasl_mechanism:
            raise ValueError(f"WARDWATCH_KAFKA_SECURITY_PROTOCOL={protocol} needs WARDWATCH_KAFKA_SASL_MECHANISM "
                             "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
        sasl_set = [v for v, on in (("WARDWATCH_KAFKA_SASL_MECHANISM", self.kafka_sasl_mechanism),
                                    ("WARDWATCH_KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                                    ("WARDWATCH_KAFKA_SASL_PASSWORD", self.kafka_sasl_password)) if on]
        if sasl_set and not protocol.startswith("SASL_"):
            raise ValueError(f"{', '.join(sasl_set)} set, but WARDWATCH_KAFKA_SECURITY_PROTOCOL={protocol} never "
                             "sends SASL credentials: set it to SASL_SSL (or SASL_PLAINTEXT)")
        if self.kafka_ssl_cafile and protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(f"WARDWATCH_KAFKA_SSL_CAFILE set, but WARDWATCH_KAFKA_SECURITY_PROTOCOL={protocol} does "
                             "not use TLS: set it to SSL or SASL_SSL")
        if self.kafka_ssl_cafile and not self.kafka_ssl_cafile.is_file():
            raise ValueError(f"WARDWATCH_KAFKA_SSL_CAFILE={self.kafka_ssl_cafile} is not a file (in a container: "
                             "mount the CA certificate there)")
        # the ingest's FHIR token in clear on the network: as the CDS servers list, https or a loopback host
        if self.fhir_auth_token is not None and self.fhir_server_url and not self.fhir_allow_plain_http:
            from wardwatch.listen import is_loopback

            parts = urlsplit(self.fhir_server_url.strip())
            if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
                raise ValueError(f"WARDWATCH_FHIR_AUTH_TOKEN set with WARDWATCH_FHIR_SERVER_URL on http:// to another "
                                 f"host ({parts.hostname}): the token would cross the network in clear; use the "
                                 "server's https URL, or set WARDWATCH_FHIR_ALLOW_PLAIN_HTTP=true if the network "
                                 "path is trusted (e.g. a compose network)")
        # CDS client authentication: a token is only as good as the checks of who issued it and for whom
        if self.cds_jwks_file is not None:
            missing = [v for v, on in (("WARDWATCH_CDS_ISSUERS", self.cds_issuers),
                                       ("WARDWATCH_CDS_AUDIENCE", self.cds_audience)) if not on]
            if missing:
                raise ValueError(f"WARDWATCH_CDS_JWKS_FILE set without {' and '.join(missing)}: the CDS service "
                                 "must know which issuers it trusts and the URL their tokens are for")
            if self.cds_allow_anonymous:
                raise ValueError("WARDWATCH_CDS_ALLOW_ANONYMOUS=true and WARDWATCH_CDS_JWKS_FILE set: the service "
                                 "requires tokens when it has the clients' keys; unset one of them")
        else:
            orphans = [v for v, on in (("WARDWATCH_CDS_ISSUERS", self.cds_issuers),
                                       ("WARDWATCH_CDS_AUDIENCE", self.cds_audience)) if on]
            if orphans:
                raise ValueError(f"{', '.join(orphans)} set, but no WARDWATCH_CDS_JWKS_FILE: without the clients' "
                                 "public keys the CDS service checks no token; set it too")
        return self

    def group_instance_id(self) -> str | None:
        """The group.instance.id of this process's ingest or worker consumer (None: dynamic membership)."""
        if not self.static_membership:
            return None
        return self.instance_id or socket.gethostname()

    def ingest_max_skew(self) -> float:
        """The ingest's event-time alignment bound in seconds (0: off): half the allowed lateness
        unless set."""
        return self.allowed_lateness_s / 2 if self.ingest_max_skew_s is None else self.ingest_max_skew_s

    def kafka_client_config(self, client: str | None = None) -> dict[str, str]:
        """librdkafka settings shared by every confluent-kafka client (security included). `client`
        names it to the broker (client.id `wardwatch-<client>`): per-client request metrics and logs."""
        conf = {"bootstrap.servers": self.bootstrap_servers, "security.protocol": self.kafka_security_protocol}
        if client:
            conf["client.id"] = f"wardwatch-{client}"
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


# WARDWATCH_* names docker-compose.yml substitutes itself (from the shell or .env), not settings: a shell
# that exports them for `docker compose` may run wardwatch commands too
COMPOSE_VARIABLES = frozenset({"WARDWATCH_VERSION", "WARDWATCH_WORKER_REPLICAS"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per WARDWATCH_* variable that names no setting, with the closest one. pydantic reads
    only the names it knows, so a typo would be silently ignored: WARDWATCH_RECEIVER_TOKN leaves the
    receiver open to anyone, WARDWATCH_PARTITONS=8 creates 4-partition topics."""
    known = {f"WARDWATCH_{name.upper()}" for name in Settings.model_fields}
    lines = []
    for variable in sorted(environ):
        upper = variable.upper()  # pydantic-settings matches names case-insensitively
        if not upper.startswith("WARDWATCH_") or upper in known or upper in COMPOSE_VARIABLES:
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}?" if close else "`wardwatch config show` lists the settings"
        lines.append(f"{variable} is not a wardwatch setting ({hint}); rename or unset it")
    return lines


def describe_settings(settings: Settings) -> list[dict]:
    """Every setting with its environment variable, value (secrets masked), source and meaning."""
    import os

    rows = []
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = "********" if value.get_secret_value() else ""
        elif isinstance(value, Path):
            value = str(value)
        variable = f"WARDWATCH_{name.upper()}"
        rows.append({"name": name, "variable": variable, "value": value,
                     "source": "environment" if variable in os.environ else "default",
                     "description": field.description or ""})
    return rows


def settings_errors(exc: ValidationError) -> list[str]:
    """One line per invalid setting, named by its environment variable, with what it should be
    (a secret's value is never shown)."""
    fields = Settings.model_fields
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        field = fields.get(name)
        if field is None:  # a check across settings (_settings_agree): its message names them
            lines.append(error["msg"].removeprefix("Value error, "))
            continue
        secret = "SecretStr" in str(field.annotation)
        shown = "(secret)" if secret else repr(error.get("input"))
        meaning = f" ({field.description})" if field.description else ""
        lines.append(f"WARDWATCH_{name.upper()}={shown}: {error['msg']}{meaning}")
    return lines
