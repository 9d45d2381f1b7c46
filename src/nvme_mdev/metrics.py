"""Statistics over HTTP for Prometheus: GET /metrics answers the text format.

A scraper that connects and stalls (half a request, or a reply it never reads) is
cut off after `timeout` seconds, and at most `max_connections` are served at once
(one more gets 503 and is closed), so stalled clients cannot pile up threads.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .statistics import prometheus_text

log = logging.getLogger(__name__)

Snapshots = Callable[[], dict[str, dict[str, Any]]]

#: seconds one connection may last, from connecting to the reply's last byte
#: (Prometheus's own scrape timeout is 10 s by default)
TIMEOUT = 10.0
#: connections served at once; each holds a thread
MAX_CONNECTIONS = 16

_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\n"
    b"Content-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        listener: socket.socket | None = None,
    ) -> None:
        self.max_connections = max_connections
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__(address, handler, bind_and_activate=listener is None)
        if listener is not None:  # a predecessor's: serve on it, bind nothing
            self.socket.close()
            self.socket = listener
            self.server_address = listener.getsockname()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            busy = self._active >= self.max_connections
            if not busy:
                self._active += 1
        if busy:
            # Non-blocking: the serving loop must not wait on a client it turns away.
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts its thread
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._active_lock:
            self._active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client cut off (timed out, or gone mid-reply) is not worth a traceback.
        log.debug("metrics: connection from %s ended with an error", client_address)


class MetricsServer:
    def __init__(
        self,
        address: str,
        snapshots: Snapshots,
        *,
        timeout: float = TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        listener: socket.socket | None = None,
    ) -> None:
        """`listener`: serve on this listening socket (bound to `address`) instead of
        binding one."""
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9464")

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                super().setup()
                # One deadline for the whole connection: a per-read timeout alone
                # would let a client that sends a byte now and then stay for ever.
                self._ended = False
                self._ended_lock = threading.Lock()
                self._watchdog = threading.Timer(timeout, self._cut_off)
                self._watchdog.daemon = True
                self._watchdog.start()

            def _cut_off(self) -> None:
                with self._ended_lock:
                    if not self._ended:  # (not once finish() has run: the fd may be reused)
                        with contextlib.suppress(OSError):
                            self.connection.shutdown(socket.SHUT_RDWR)

            def finish(self) -> None:
                with self._ended_lock:
                    self._ended = True
                self._watchdog.cancel()
                super().finish()

            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is here")
                    return
                body = prometheus_text(snapshots()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a scrape every few seconds is not news

        self._httpd = _Server(
            (host.strip("[]") or "127.0.0.1", int(port)), Handler, max_connections, listener
        )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics", daemon=True
        )

    @classmethod
    def from_listener(cls, listener: socket.socket, snapshots: Snapshots) -> MetricsServer:
        """Serve on the socket a predecessor process listened on (upgrade in place)."""
        host, port = listener.getsockname()[:2]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return cls(address, snapshots, listener=listener)

    @property
    def listener(self) -> socket.socket:
        return self._httpd.socket

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
