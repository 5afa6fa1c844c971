"""One knob faust does not expose: the worker consumer's fetch.max.wait.ms.

faust-streaming creates its aiokafka consumer with `fetch_max_wait_ms=1500` hard-coded
(faust/transport/drivers/aiokafka.py, `_create_worker_consumer`). A broker that holds a fetch until
that wait expires when fewer than fetch.min.bytes are ready (Tansu does; Kafka does so for an idle
partition) then adds up to 1.5 s to every event's latency. We set the attribute aiokafka reads when
it builds its fetcher at start, right after faust constructs the consumer. Idempotent; call once
before the app starts.
"""

from __future__ import annotations

from faust.transport.drivers import aiokafka as faust_aiokafka

_ORIGINAL = faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer
_wait_ms: list[int] = [1500]


def _create_worker_consumer(self, transport):
    consumer = _ORIGINAL(self, transport)
    if not hasattr(consumer, "_fetch_max_wait_ms"):  # aiokafka renamed it: fail loudly, not slowly
        raise RuntimeError("aiokafka's consumer has no _fetch_max_wait_ms: review streams/faust_tuning.py")
    consumer._fetch_max_wait_ms = _wait_ms[0]  # read by aiokafka's Fetcher in consumer.start()
    return consumer


def set_fetch_max_wait_ms(wait_ms: int) -> None:
    _wait_ms[0] = int(wait_ms)
    faust_aiokafka.AIOKafkaConsumerThread._create_worker_consumer = _create_worker_consumer


def broker_credentials(settings):
    """faust's broker_credentials from the same settings every confluent-kafka client reads
    (Settings.kafka_client_config): PLAINTEXT -> None, SSL -> SSLCredentials, SASL_* -> SASLCredentials
    (with a TLS context for SASL_SSL). One source of truth, so the worker can never talk to the
    broker differently from ingest, the receiver or the archiver."""
    import ssl

    import faust

    # Settings guarantees one of the four protocols, and a mechanism with SASL_*
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    password = settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
    return faust.SASLCredentials(username=settings.kafka_sasl_username, password=password, ssl_context=context,
                                 mechanism=settings.kafka_sasl_mechanism)
