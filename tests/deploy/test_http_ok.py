"""deploy/http-ok.sh: the healthcheck of the Connect and FHIR containers, against a real HTTP server."""

from __future__ import annotations

import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "http-ok.sh"


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        status = {"/ready": 200, "/starting": 503}.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_port
    httpd.shutdown()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)


def test_a_2xx_answer_is_healthy(server):
    assert run("127.0.0.1", str(server), "/ready").returncode == 0


@pytest.mark.parametrize("path, status", [("/starting", "503"), ("/missing", "404")])
def test_any_other_status_is_unhealthy_and_named(server, path, status):
    result = run("127.0.0.1", str(server), path)
    assert result.returncode != 0
    assert f"answered {status}" in result.stderr


def test_a_closed_port_is_unhealthy():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        assert run("127.0.0.1", str(port), "/").returncode != 0
