"""Container healthcheck for the wardwatch services: exit 0 when the service can do its work.

Each service runs as the container's main process, so "the process is alive" is already the
container's state. What this adds is what the process needs from outside, read from the same
WARDWATCH_* settings the service uses: the broker answers, every wardwatch topic exists, and the
data directory is writable and the model directory readable (the usual failure of a volume mounted
with the wrong owner). It prints the problems, never any message content.

    python /opt/wardwatch/healthcheck.py      (the Dockerfile copies it there)
    python /opt/wardwatch/healthcheck.py --port-setting receiver_port   also: that port accepts connections
    python /opt/wardwatch/healthcheck.py --no-broker                     only the directories
    python /opt/wardwatch/healthcheck.py --no-broker --nightly           and the scheduler's last nightly runs
                                                                         (wardwatch/nightly_status.py)
    python /opt/wardwatch/healthcheck.py --ready                         also: the service's own /readyz says 200
                                                                         (the worker's: consuming, not stalled)
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from pydantic import ValidationError

from streams.topics import topics_for
from wardwatch.settings import Settings, settings_errors, unknown_variables

TIMEOUT_S = 5.0

# librdkafka logs every failed connection attempt to stderr (one line per 50 ms, ~100 in TIMEOUT_S);
# Docker keeps only the first 4 KB of a healthcheck's output, so they would push out the one line
# that says why (`docker inspect` .State.Health)
_quiet = logging.getLogger("wardwatch.healthcheck.librdkafka")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def problems(settings: Settings, *, broker: bool = True, port_setting: str | None = None,
             nightly: bool = False, ready: bool = False) -> list[str]:
    """Everything that stops a wardwatch service from working; empty when healthy.

    port_setting names a Settings field holding a port the service listens on (e.g. receiver_port):
    the check then also connects to it on this host. nightly: the scheduler's last run failed, or
    none succeeded for 26 h (its status file in the data dir). ready: the service's /readyz on
    settings.metrics_port answers 200 (the worker's is 503 while it recovers or its consumption
    watchdog sees messages waiting that it does not apply; the receiver's while it cannot write; the
    CDS service's until it has re-read the scores topic after a start).
    """
    found = []
    if not os.access(settings.data_dir, os.W_OK):
        found.append(f"data dir {settings.data_dir} is not writable")
    if not os.access(settings.model_dir, os.R_OK):
        found.append(f"model dir {settings.model_dir} is not readable")
    if port_setting:
        found += _not_listening(settings, port_setting)
    if nightly:
        found += _nightly_problems(settings)
    if ready:
        found += _not_ready(settings)
    if not broker:
        return found
    try:
        existing = _topic_names(settings)
    except Exception as exc:  # unreachable broker, bad credentials, DNS
        return [*found, f"broker {settings.bootstrap_servers} unreachable: {exc}"]
    missing = sorted(set(topics_for(settings).all) - existing)
    if missing:
        found.append(f"missing topics: {', '.join(missing)}")
    return found


def _nightly_problems(settings: Settings) -> list[str]:
    from datetime import datetime, timezone

    from wardwatch import nightly_status

    path = nightly_status.status_path(settings)
    try:
        status = nightly_status.read_status(path)
        return nightly_status.problems(status, datetime.now(timezone.utc))
    except (OSError, ValueError, TypeError) as exc:  # TypeError: a time without its zone, or not a string
        return [f"cannot read the nightly status {path}: {exc}"]


def _not_ready(settings: Settings) -> list[str]:
    import urllib.error
    import urllib.request

    if settings.metrics_port is None:  # the service serves no /readyz: nothing to ask
        return []
    url = f"http://127.0.0.1:{settings.metrics_port}/readyz"
    # no proxy: urlopen would send this local request to an HTTP(S)_PROXY set for the container
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S):
            return []
    except urllib.error.HTTPError as exc:
        return [f"not ready: {url} answers {exc.code} (the service's log says why)"]
    except OSError as exc:
        return [f"not ready: nothing answers {url}: {getattr(exc, 'reason', exc)}"]


def _not_listening(settings: Settings, port_setting: str) -> list[str]:
    port = getattr(settings, port_setting)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S):
            return []
    except OSError as exc:
        return [f"nothing listens on port {port} ({port_setting}): {exc.strerror or exc}"]


def _topic_names(settings: Settings) -> set[str]:
    from confluent_kafka.admin import AdminClient

    conf = {**settings.kafka_client_config(), "socket.connection.setup.timeout.ms": int(TIMEOUT_S * 1000),
            "logger": _quiet}
    return set(AdminClient(conf).list_topics(timeout=TIMEOUT_S).topics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="wardwatch container healthcheck")
    parser.add_argument("--no-broker", action="store_true", help="skip the broker and topic checks")
    parser.add_argument("--port-setting", help="Settings field of a port this service must be listening on",
                        choices=sorted(name for name in Settings.model_fields if name.endswith("_port")))
    parser.add_argument("--nightly", action="store_true",
                        help="also unhealthy when the scheduler's last nightly failed or none succeeded for 26 h")
    parser.add_argument("--ready", action="store_true",
                        help="also unhealthy when the service's /readyz (on WARDWATCH_METRICS_PORT) does not answer 200")
    args = parser.parse_args(argv)
    # unhealthy, and why in one line each, on whatever makes the service itself stop (wardwatch/cli.py)
    found = [f"invalid settings: {line}" for line in unknown_variables(os.environ)]
    try:
        settings = Settings()
    except ValidationError as exc:
        found += [f"invalid settings: {line}" for line in settings_errors(exc)]
    else:
        if not found:
            found = problems(settings, broker=not args.no_broker, port_setting=args.port_setting,
                             nightly=args.nightly, ready=args.ready)
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
