"""The coordinator's HTTP endpoint for people and Prometheus: ``/`` (the status page),
``/status.json`` (the same view as data), ``/metrics`` and ``/healthz``.

Served from a daemon thread; it only reads the newest ``FleetView`` the round loop published
(one reference, swapped whole) and the metrics registry (thread-safe), so a slow browser never
holds up a round. Listening beyond loopback requires a bearer token (``[metrics] token_file``):
every request must carry ``Authorization: Bearer <token>``, or the cookie a browser gets by
opening ``/?token=<token>`` once (HttpOnly, SameSite=Strict). TLS belongs to a reverse proxy in
front (docs/OPERATIONS.md).
"""

from __future__ import annotations

import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from fedprune.common.configkit import ConfigError
from fedprune.coordinator.fleet_view import FleetView
from fedprune.coordinator.metrics import CONTENT_TYPE, Metrics
from fedprune.coordinator.status_page import CONTENT_SECURITY_POLICY, render_page

COOKIE = "fedprune_token"


class OperatorServer:
    """Port 0 picks a free port. A port it cannot bind is a ConfigError naming ``[metrics] port``
    (exit 78, so systemd stops retrying)."""

    def __init__(self, metrics: Metrics, view: Callable[[], FleetView | None], host: str = "127.0.0.1",
                 port: int = 0, token: str | None = None) -> None:
        handler = _handler(metrics, view, token)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(
                f"[metrics] port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); another process "
                "may hold it: set [metrics] port to a free port, 0 for any free one, or -1 to turn it off"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="operator-http", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "OperatorServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def read_token(path) -> str:
    """The bearer token from ``[metrics] token_file``: its first line, at least 16 characters."""
    try:
        lines = path.read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"[metrics] token_file {str(path)!r}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ConfigError(f"[metrics] token_file {str(path)!r}: expected a token of at least 16 characters on its "
                          "first line, e.g. from `openssl rand -hex 32`")
    return token


def _handler(metrics: Metrics, view: Callable[[], FleetView | None], token: str | None):
    class Handler(BaseHTTPRequestHandler):
        server_version = "fedprune"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urlsplit(self.path)
            path = url.path.rstrip("/") or "/"
            if path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
                return
            if token is not None and not self._authorised():
                offered = parse_qs(url.query).get("token", [""])[0]
                if path == "/" and offered and hmac.compare_digest(offered.encode(), token.encode()):
                    self._send(303, b"", "text/plain", {"Location": "./", "Set-Cookie":
                               f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"})
                    return
                self._send(401, b"a bearer token is required ([metrics] token_file)\n", "text/plain; charset=utf-8",
                           {"WWW-Authenticate": 'Bearer realm="fedprune"'})
                return
            if path == "/metrics":
                self._send(200, metrics.render(), CONTENT_TYPE)
            elif path in ("/", "/status.json"):
                current = view()
                if current is None:
                    self._send(503, b"the coordinator is starting\n", "text/plain; charset=utf-8", {"Retry-After": "2"})
                elif path == "/":
                    self._send(200, render_page(current).encode(), "text/html; charset=utf-8",
                               {"Content-Security-Policy": CONTENT_SECURITY_POLICY})
                else:
                    self._send(200, json.dumps(current.to_dict()).encode(), "application/json")
            else:
                self._send(404, b"served here: /, /status.json, /metrics, /healthz\n", "text/plain; charset=utf-8")

        def _authorised(self) -> bool:
            header = self.headers.get("Authorization", "")
            if header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
                return True
            for part in self.headers.get("Cookie", "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE and hmac.compare_digest(value.encode(), token.encode()):
                    return True
            return False

        def _send(self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    return Handler
