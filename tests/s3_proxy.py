"""A real HTTP hop in front of the test S3 server that breaks the way S3 breaks.

It forwards every request to the real server, except that it can throttle (every n-th
request answered `503 SlowDown`, as S3 does under load) and can go away and come back
(`stop()` closes its port: connections are refused, like a server that is down).
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from tests.conftest import free_port

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class FaultyS3:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlparse(upstream)
        self.port = free_port()
        self.slowdown_every = 0  # 0: never throttle
        self.seen = 0
        self.throttled = 0
        self.attempts: list[str] = []  # botocore's amz-sdk-request header: "attempt=2; max=8"
        self.puts: list[str] = []  # paths of successful PUTs
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def _throttle(self) -> bool:
        with self._lock:
            self.seen += 1
            if self.slowdown_every and self.seen % self.slowdown_every == 0:
                self.throttled += 1
                return True
            return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # botocore's Expect: 100-continue needs it

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                # No kept-alive connections: when the proxy stops, every client must reconnect.
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self.close_connection = True

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.attempts.append(self.headers.get("amz-sdk-request", ""))
                if proxy._throttle():
                    self._answer(503, [("Content-Type", "application/xml")], SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                if self.command == "PUT" and response.status == 200:
                    proxy.puts.append(self.path)
                self._answer(response.status, response.getheaders(), data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        return Handler
