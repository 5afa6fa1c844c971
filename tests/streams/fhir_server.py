"""A real FHIR read server for tests: 127.0.0.1, a free port, resources from
tests/fixtures/ingest/fhir/server/<Type>/<id>.json, scripted answers and stalls per path, and instance
histories served by pages with `next` links, as real servers page them."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from tests.fixtures.ingest.corpus import HERE
from tests.streams.local_http import QuietHandler, serve

SERVED = HERE / "fhir" / "server"


class FhirServer:
    """GET /fhir/<Type>/<id> from the fixture directory; `script` queues (status, body) or (status, body,
    extra headers) answers per path (with its query) first. `histories` holds instance histories by path
    ("/fhir/<Type>/<id>/_history": entries newest first), served `page_size` entries a page, page n+1 at
    `next_link(path, n + 1)` (default: an absolute URL on this server, ?_page=n+1, like HAPI's). `stall`
    makes every answer wait (released at teardown) to provoke client timeouts."""

    def __init__(self):
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header)
        self.script: dict[str, deque] = {}
        self.histories: dict[str, list[dict]] = {}
        self.page_size = 20  # HAPI FHIR's default
        self.next_link: Callable[[str, int], str] = lambda path, page: f"{self.origin}{path}?_page={page}"
        self.stall = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(QuietHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Authorization")))
                if server.stall.is_set():
                    server.release.wait(10)
                status, body, *extra = server.answer(self.path)
                self.answer(status, body, {"Content-Type": "application/fhir+json", **(extra[0] if extra else {})})

        self._httpd = serve(Handler)
        self.origin = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self.url = f"{self.origin}/fhir"

    def answer(self, path: str) -> tuple[int, bytes]:
        if self.script.get(path):
            return self.script[path].popleft()
        url = urlsplit(path)
        if url.path in self.histories:
            return 200, self.history_page(url.path, int(parse_qs(url.query).get("_page", ["1"])[0]))
        file = SERVED / (path.removeprefix("/fhir/") + ".json")
        return (200, file.read_bytes()) if file.is_file() else (404, b'{"resourceType": "OperationOutcome"}')

    def history_page(self, path: str, page: int) -> bytes:
        entries = self.histories[path]
        start = (page - 1) * self.page_size
        bundle = {"resourceType": "Bundle", "type": "history", "total": len(entries),
                  "link": [{"relation": "self", "url": f"{self.origin}{path}?_page={page}"}],
                  "entry": entries[start:start + self.page_size]}
        if start + self.page_size < len(entries):
            bundle["link"].append({"relation": "next", "url": self.next_link(path, page + 1)})
        return json.dumps(bundle).encode()

    def stop(self):
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
