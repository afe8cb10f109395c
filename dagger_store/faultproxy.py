"""A fault-injecting HTTP proxy on loopback, between s3fs and the moto S3 server (for tests).

Test kit, like ``testing.py``: the fault-injection tests (the ``fault_proxy`` fixture) and the
soak benchmark (``benchmarks/bench_soak.py``) use it; nothing in dagger imports it. Real parts, no
mocks: s3fs talks HTTP to this proxy on 127.0.0.1, the proxy talks HTTP to moto on 127.0.0.1, and
on some requests, chosen at rates a test sets, it misbehaves the way S3 and the network do:

``slowdown``   503 SlowDown with S3's XML error body; the request never reaches moto
``internal``   500 InternalError with S3's XML error body; the request never reaches moto
``reset``      the connection is reset (RST: SO_LINGER 0, then close) without an answer
``hangup``     the connection is closed (FIN) without an answer
``truncate``   forwarded; the answer's headers promise the full Content-Length, then half the
               body is sent and the connection closed (only answers with a body; others pass)
``lost_put``   PUTs only: forwarded (the object lands in moto), then the connection is reset
               instead of answering: the client cannot know that its write happened

Which requests: ``inject(rates, methods=..., path=..., limit=...)``. Whether a request is
faulted is decided by a RNG seeded with (seed, method, path without its bucket, how many times
this method and path were asked before), so a run's faults do not depend on how threads
interleave (only on which requests are made), and a retry of a faulted request draws afresh.
The proxy counts requests by method and faults by kind.

Bounded: it listens on 127.0.0.1 only, forwards only to an ``http://127.0.0.1:PORT`` upstream,
and stops (``close``, or leaving its ``with`` block) at fixture teardown.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import random
import re
import socket
import struct
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

KINDS = ("slowdown", "internal", "reset", "hangup", "truncate", "lost_put")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
}


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of ``upstream`` (moto on 127.0.0.1).

    Parameters
    ----------
    upstream
        ``http://127.0.0.1:PORT``: anything else is refused.
    seed
        Seeds every fault decision (see the module docstring).
    """

    def __init__(self, upstream: str, seed: int = 0) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname != "127.0.0.1" or parts.port is None:
            raise ValueError(f"the proxy forwards only to http://127.0.0.1:PORT, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.seed = seed
        self.requests: Counter[str] = Counter()  # by method, every request that arrived
        self.faults: Counter[str] = Counter()  # by kind, every fault injected
        self.forwarded = 0
        self.in_flight = 0  # requests being forwarded now
        self.peak_in_flight = 0  # the most at once since the proxy started (or was reset)
        self._seen: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._rates: dict[str, float] = {}
        self._methods: frozenset[str] | None = None
        self._path: re.Pattern[str] | None = None
        self._limit: int | None = None
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fault-proxy", daemon=True
        )
        self._thread.start()

    def inject(
        self,
        rates: Mapping[str, float] | None = None,
        *,
        methods: Iterable[str] | None = None,
        path: str | None = None,
        limit: int | None = None,
    ) -> None:
        """Inject faults at ``rates`` (kind -> probability per request; their sum at most 1).

        Only on requests whose method is in ``methods`` and whose path (with query) matches the
        regular expression ``path``, when given; at most ``limit`` faults from now on, when
        given. ``inject()`` stops injecting.
        """
        rates = dict(rates or {})
        unknown = set(rates) - set(KINDS)
        if unknown or sum(rates.values()) > 1 or any(r < 0 for r in rates.values()):
            raise ValueError(f"rates are kinds of {KINDS} with probabilities summing to <= 1")
        with self._lock:
            self._rates = rates
            self._methods = None if methods is None else frozenset(m.upper() for m in methods)
            self._path = None if path is None else re.compile(path)
            self._limit = limit

    def close(self) -> None:
        """Stop listening and serving; handler threads are daemons and end with their sockets."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests[method] += 1
            occurrence = self._seen[method, path]
            self._seen[method, path] += 1
            if not self._rates or self._limit == 0:
                return None
            if self._methods is not None and method not in self._methods:
                return None
            if self._path is not None and not self._path.search(path):
                return None
            # Not the bucket (a fresh random name per test): the same request, the same fate.
            where = path.split("/", 2)[-1]
            draw = random.Random(f"{self.seed}:{method}:{where}:{occurrence}").random()
            for kind, rate in self._rates.items():
                if kind == "lost_put" and method != "PUT":
                    continue
                if draw < rate:
                    if self._limit is not None:
                        self._limit -= 1
                    return kind
                draw -= rate
            return None

    def _count(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> Any:
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                connection.putheader(name, value)
            if method not in ("GET", "HEAD") or body:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            response = connection.getresponse()
            data = response.read()
            with self._lock:
                self.forwarded += 1
            return response.status, response.reason, response.getheaders(), data
        finally:
            connection.close()
            with self._lock:
                self.in_flight -= 1


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up, or a connection we reset on purpose: nothing to report


class _Handler(http.server.BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 does: aiohttp pools its connections

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _handle(self) -> None:
        proxy = self.proxy
        body = self._body()
        method = self.command
        kind = proxy._decide(method, self.path)
        if kind in ("slowdown", "internal"):
            proxy._count(kind)
            return self._error(*_ERRORS[kind])
        if kind == "reset":
            proxy._count(kind)
            return self._drop(rst=True)
        if kind == "hangup":
            proxy._count(kind)
            return self._drop(rst=False)
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        try:
            status, reason, upstream_headers, data = proxy._forward(
                method, self.path, headers, body
            )
        except OSError:
            return self._error(502, "Bad Gateway", "InternalError", "the proxy's upstream failed")
        if kind == "lost_put":
            proxy._count(kind)
            return self._drop(rst=True)
        truncate = kind == "truncate" and method != "HEAD" and len(data) >= 2
        if truncate:
            proxy._count("truncate")
        self.send_response_only(status, reason)
        for name, value in upstream_headers:
            lowered = name.lower()
            if lowered in _HOP_BY_HOP or (lowered == "content-length" and method != "HEAD"):
                continue
            self.send_header(name, value)
        if method != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if truncate:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._drop(rst=False)
        if method != "HEAD":
            self.wfile.write(data)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _error(self, status: int, reason: str, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            "<RequestId>FAULTPROXY</RequestId><HostId>fault-proxy</HostId></Error>"
        ).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self, *, rst: bool) -> None:
        self.close_connection = True
        try:
            self.wfile.flush()
            if rst:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            # The fd stays open while rfile/wfile hold it: close them all, so the RST goes now.
            self.rfile.close()
            self.wfile.close()
            self.connection.close()
        except OSError:
            pass

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # the socket was closed on purpose
            super().finish()
