"""Container healthcheck for the wardwatch services: exit 0 when the service can do its work.

Each service runs as the container's main process, so "the process is alive" is already the
container's state. What this adds is what the process needs from outside, read from the same
WARDWATCH_* settings the service uses: the broker answers, every wardwatch topic exists, and the
data directory is writable and the model directory readable (the usual failure of a volume mounted
with the wrong owner). It prints the problems, never any message content.

    python /opt/wardwatch/healthcheck.py      (the Dockerfile copies it there)
"""

from __future__ import annotations

import os
import sys

from streams.topics import topics_for
from wardwatch.settings import Settings

TIMEOUT_S = 5.0


def problems(settings: Settings) -> list[str]:
    """Everything that stops a wardwatch service from working; empty when healthy."""
    found = []
    if not os.access(settings.data_dir, os.W_OK):
        found.append(f"data dir {settings.data_dir} is not writable")
    if not os.access(settings.model_dir, os.R_OK):
        found.append(f"model dir {settings.model_dir} is not readable")
    try:
        existing = _topic_names(settings)
    except Exception as exc:  # unreachable broker, bad credentials, DNS
        return [*found, f"broker {settings.bootstrap_servers} unreachable: {exc}"]
    missing = sorted(set(topics_for(settings).all) - existing)
    if missing:
        found.append(f"missing topics: {', '.join(missing)}")
    return found


def _topic_names(settings: Settings) -> set[str]:
    from confluent_kafka.admin import AdminClient

    conf = {**settings.kafka_client_config(), "socket.connection.setup.timeout.ms": int(TIMEOUT_S * 1000)}
    return set(AdminClient(conf).list_topics(timeout=TIMEOUT_S).topics)


def main() -> int:
    found = problems(Settings())
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
