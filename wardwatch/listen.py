"""HTTP services on a port the operator may leave to the system, and how a parent learns which one.

A port picked free in advance (bind port 0, read it, close it) and bound later by a child process
can be taken in between, e.g. by another test's embedded broker on a busy CI machine. Instead, a
service whose port setting is 0 binds a free port itself and keeps it; every service logs

    <what> listening on http://HOST:PORT<path> ...

once its port is bound (so the line never names a port it does not hold), and
`wait_for_listening` reads the port back from the child's log. A configured port (not 0) is bound
as before: web.run_app(host, port).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from pathlib import Path

LISTENING = re.compile(r"listening on http://(?:\[[^\]]*\]|[^\s/\[\]\"]+?):(\d+)")


def is_loopback(host: str) -> bool:
    """Only this host can connect to a service bound to `host` (a host name other than localhost may
    resolve to any interface)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address


def bind_free_port(host: str) -> socket.socket:
    """A listening socket on `host` and a port the system picks; it stays ours until closed."""
    family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(address)
        sock.listen(128)  # connections wait in the backlog until the server serves them
    except BaseException:
        sock.close()
        raise
    return sock


def log_listening(log, what: str, host: str, port: int, after: str = "") -> None:
    """The line wait_for_listening reads (WARNING: shown at every log level but ERROR)."""
    log.warning("%s listening on http://%s:%d%s", what, url_host(host), port, after, extra={"port": port})


class ListenError(RuntimeError):
    """The service could not bind its address (a port in use, an address not on this host)."""


def run_http(app, host: str, port: int, *, log, what: str, after: str = "") -> None:
    """Serve `app` (aiohttp) until SIGINT/SIGTERM; port 0: any free port. Logs `<what> listening on
    http://host:port<after>` once the port is bound (log_listening). Raises ListenError, saying why in
    one line, when the address cannot be bound."""
    from aiohttp import web

    bound: list[int] = []

    def listening(port_: int) -> None:
        bound.append(port_)
        log_listening(log, what, host, port_, after)

    try:
        if port == 0:
            sock = bind_free_port(host)
            listening(sock.getsockname()[1])
            web.run_app(app, sock=sock, print=None, access_log=None)
        else:  # run_app's print runs once its sites are started
            web.run_app(app, host=host, port=port, print=lambda _message: listening(port), access_log=None)
    except OSError as exc:
        if bound:  # not a bind failure
            raise
        # asyncio's message repeats the address as a tuple; the errno's own text is the reason
        why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else str(exc)
        raise ListenError(f"{what} cannot listen on {url_host(host)}:{port}: {why}") from exc


def listening_port(text: str) -> int | None:
    """The port of the first `listening on http://HOST:PORT` in a log text, or None."""
    match = LISTENING.search(text)
    return int(match.group(1)) if match else None


def wait_for_listening(proc, log_path: Path, *, offset: int = 0, timeout_s: float = 60.0) -> int:
    """Block until the child `proc` logged (in log_path, after byte `offset`) the port it listens
    on; returns it. Raises RuntimeError when the child exits first, TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = log_path.read_bytes()[offset:].decode(errors="replace") if log_path.exists() else ""
        port = listening_port(text)
        if port is not None:
            return port
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with code {proc.returncode} before listening: see {log_path}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the service did not listen within {timeout_s:.0f}s: see {log_path}")
        time.sleep(0.05)
