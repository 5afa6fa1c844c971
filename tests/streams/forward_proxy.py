"""A real plain-HTTP forward proxy for tests: 127.0.0.1, a free port. It takes requests in absolute form
("GET http://host:port/path"), as clients send them to an HTTP proxy, and forwards them to `routes`[host:port]
(default: that host and port) with http.client, answering with the upstream's answer. Every request it gets is
kept in `requests` as (method, absolute URL, Proxy-Authorization header). With `credentials` ("user:password")
a request without them in Proxy-Authorization (Basic) is answered 407 and not forwarded. No CONNECT (https
targets): the tests reach plain-http servers on loopback ports. GET and PUT."""

from __future__ import annotations

import base64
import http.client
from urllib.parse import urlsplit

from tests.streams.local_http import QuietHandler, serve

_HOP_BY_HOP = {"proxy-authorization", "proxy-connection", "connection", "keep-alive", "transfer-encoding"}


class ForwardProxy:
    def __init__(self, routes: dict[str, tuple[str, int]] | None = None, credentials: str | None = None):
        self.routes = routes or {}
        self.requests: list[tuple[str, str, str | None]] = []
        expected = f"Basic {base64.b64encode(credentials.encode()).decode()}" if credentials else None
        proxy = self

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self.forward("GET")

            def do_PUT(self):
                self.forward("PUT")

            def forward(self, method: str):
                sent = self.headers.get("Proxy-Authorization")
                proxy.requests.append((method, self.path, sent))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                target = urlsplit(self.path)
                if target.scheme != "http" or not target.hostname:
                    return self.answer(400, b"absolute http URL expected")
                if expected is not None and sent != expected:
                    return self.answer(407, b"proxy authentication required",
                                        {"Proxy-Authenticate": 'Basic realm="test"'})
                host, port = proxy.routes.get(target.netloc, (target.hostname, target.port or 80))
                upstream = http.client.HTTPConnection(host, port, timeout=10)
                try:
                    path = target.path + (f"?{target.query}" if target.query else "")
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    upstream.request(method, path or "/", body=body or None, headers=headers)
                    response = upstream.getresponse()
                    body = response.read()
                    keep = {k: v for k, v in response.getheaders()
                            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"}
                    self.answer(response.status, body, keep | {"Via": "1.1 test-proxy"})
                finally:
                    upstream.close()

        self._httpd = serve(Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()
