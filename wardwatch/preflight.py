"""Checks a command runs before it starts work, so a newcomer's mistake costs one clear line.

Without them a wrong WARDWATCH_BOOTSTRAP_SERVERS makes the ingest and the worker retry for ever,
the archiver die in a traceback after 30 s, and librdkafka print a line to stderr every 50 ms.
"""

from __future__ import annotations

import logging

from wardwatch.settings import Settings

BROKER_WAIT_S = 15.0
# the compose Kafka's listener for tools on the host (docker-compose.yml: KAFKA_HOST_PORT, default)
COMPOSE_KAFKA_HOST_PORT = 29092

_quiet = logging.getLogger("wardwatch.preflight.librdkafka")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False  # librdkafka's connection errors: the one-line message below says it all


def broker_problem(settings: Settings, timeout_s: float | None = None) -> str | None:
    """None when the broker answers a metadata request within timeout_s (default BROKER_WAIT_S); else
    what to do, in one line."""
    timeout_s = BROKER_WAIT_S if timeout_s is None else timeout_s
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        admin = AdminClient(settings.kafka_client_config("preflight") | {"logger": _quiet})
    except KafkaException as exc:  # librdkafka refused the settings themselves, e.g. a CA file it cannot load
        return (f"the Kafka client settings are refused ({_why(exc)}): check WARDWATCH_KAFKA_SECURITY_PROTOCOL, "
                "WARDWATCH_KAFKA_SASL_* and WARDWATCH_KAFKA_SSL_CAFILE")
    try:
        admin.list_topics(timeout=timeout_s)
        return None
    except KafkaException as exc:
        why = _why(exc)
    return (f"cannot reach the Kafka broker at {settings.bootstrap_servers} within {timeout_s:g} s ({why}): "
            "start it (`wardwatch broker` runs an embedded one on 127.0.0.1:9092; docker-compose.yml's `kafka` "
            f"serves this host on localhost:{COMPOSE_KAFKA_HOST_PORT}, its containers on kafka:9092) "
            "or point WARDWATCH_BOOTSTRAP_SERVERS at it (and check WARDWATCH_KAFKA_SECURITY_PROTOCOL / SASL)")


def _why(exc: Exception) -> str:
    error = exc.args[0] if exc.args else exc
    return error.str() if hasattr(error, "str") else str(error)
