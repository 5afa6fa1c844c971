"""A real FHIR read server for tests: 127.0.0.1, a free port, resources from
tests/fixtures/ingest/fhir/server/<Type>/<id>.json, scripted answers and stalls per path."""

from __future__ import annotations

import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.fixtures.ingest.corpus import HERE

SERVED = HERE / "fhir" / "server"


class FhirServer:
    """GET /fhir/<Type>/<id> from the fixture directory; `script` queues (status, body) or (status, body,
    extra headers) answers per path first. `stall` makes every answer wait (released at teardown) to
    provoke client timeouts."""

    def __init__(self):
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header)
        self.script: dict[str, deque] = {}
        self.stall = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Authorization")))
                if server.stall.is_set():
                    server.release.wait(10)
                status, body, *extra = server.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/fhir"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def answer(self, path: str) -> tuple[int, bytes]:
        if self.script.get(path):
            return self.script[path].popleft()
        file = SERVED / (path.removeprefix("/fhir/") + ".json")
        return (200, file.read_bytes()) if file.is_file() else (404, b'{"resourceType": "OperationOutcome"}')

    def stop(self):
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
