import os

import pytest
from confluent_kafka import Consumer, Producer

from wardwatch.broker import BrokerError, EmbeddedBroker


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_broker_serves_produce_and_consume_then_stops_by_pid(tmp_path):
    with EmbeddedBroker.start(log_path=tmp_path / "log") as b:
        assert b.bootstrap.startswith("127.0.0.1:")
        p = Producer({"bootstrap.servers": b.bootstrap})
        p.produce("smoke", key=b"k", value=b"hello")
        assert p.flush(10) == 0
        c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": "g", "auto.offset.reset": "earliest",
                      "session.timeout.ms": 6000, "heartbeat.interval.ms": 2000})
        c.subscribe(["smoke"])
        got = None
        for _ in range(100):
            m = c.poll(0.5)
            if m is not None and not m.error():
                got = m.value()
                break
        c.close()
        assert got == b"hello"
        pid = b.pid
    assert not _alive(pid)


def test_broker_is_stopped_when_the_body_raises():
    with pytest.raises(KeyboardInterrupt):
        with EmbeddedBroker.start() as b:
            pid = b.pid
            raise KeyboardInterrupt  # what Ctrl-C raises
    assert not _alive(pid)


def test_port_in_use_is_a_clear_error():
    with EmbeddedBroker.start() as b:
        with pytest.raises(BrokerError):
            EmbeddedBroker.start(port=b.port, timeout_s=5)


@pytest.mark.timeout(60)
def test_a_free_port_taken_before_the_broker_binds_it_is_replaced_by_another(monkeypatch):
    import socket

    from wardwatch import broker as broker_module

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # another process wins the race for the port
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks = iter([taken.getsockname()[1]])
    real_free_port = broker_module.free_port
    monkeypatch.setattr(broker_module, "free_port", lambda: next(picks, None) or real_free_port())
    try:
        with EmbeddedBroker.start(timeout_s=20) as b:
            assert b.port != taken.getsockname()[1]
            assert b.running
    finally:
        taken.close()


def test_pause_and_resume():
    with EmbeddedBroker.start() as b:
        b.pause()
        b.resume()
        assert b.running


def test_a_closed_port_refuses_connections_and_no_server_can_take_it_while_held():
    import socket

    from wardwatch.broker import closed_port

    with closed_port() as port:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        with socket.socket() as server:  # as a broker binds: SO_REUSEADDR, then listen
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError):
                server.bind(("127.0.0.1", port))
                server.listen()
