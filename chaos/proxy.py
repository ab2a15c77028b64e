"""A real HTTP hop in front of an S3 server that breaks the way S3 breaks: the tests' and the
chaos run's one fault proxy."""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)
INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message><RequestId>proxy</RequestId></Error>"
)
ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>proxy</RequestId></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultyS3:
    """It forwards every request to the real server, except that it can throttle (every n-th
    request answered `503 SlowDown`, as S3 does under load), fail (every n-th answered `500
    InternalError`), answer late (`delay_s` before each answer), refuse or hold some PUTs, and
    go away and come back (`stop()` closes its port: connections are refused, like a server
    that is down).
    """

    def __init__(self, upstream: str, port: int | None = None) -> None:
        self.upstream = urlparse(upstream)
        self.port = port or free_port()
        self.slowdown_every = 0  # 0: never throttle
        self.error_every = 0  # 0: never fail
        self.delay_s = 0.0
        self.seen = 0
        self.throttled = 0
        self.attempts: list[str] = []  # botocore's amz-sdk-request header: "attempt=2; max=8"
        self.puts: list[str] = []  # paths of successful PUTs
        self.refuse_puts = ""  # PUTs of paths ending so are answered 403 AccessDenied
        self.hold_puts = ""  # PUTs of paths ending so hang until `release` is set, then get a 503
        self.held: list[str] = []
        self.release = threading.Event()
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
        self._server = None

    @property
    def up(self) -> bool:
        return self._server is not None

    def _breaks(self) -> bytes | None:
        """The error this request gets from the every-n-th knobs, if any."""
        with self._lock:
            self.seen += 1
            if self.slowdown_every and self.seen % self.slowdown_every == 0:
                self.throttled += 1
                return SLOW_DOWN
            if self.error_every and self.seen % self.error_every == 0:
                return INTERNAL_ERROR
            return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # botocore's Expect: 100-continue needs it

            def log_message(self, format: str, *args: object) -> None:
                pass

            def handle(self) -> None:
                # A client that gave up (its own timeout, a killed process) is no news: no traceback.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    super().handle()

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
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                if (error := proxy._breaks()) is not None:
                    self._answer(503 if error is SLOW_DOWN else 500, [("Content-Type", "application/xml")], error)
                    return
                if proxy.refuse_puts and self.command == "PUT" and self.path.endswith(proxy.refuse_puts):
                    self._answer(403, [("Content-Type", "application/xml")], ACCESS_DENIED)
                    return
                if proxy.hold_puts and self.command == "PUT" and self.path.endswith(proxy.hold_puts):
                    proxy.held.append(self.path)
                    proxy.release.wait()
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
