"""The control socket: JSON-RPC 2.0 over a UNIX stream socket, one JSON object
per line each way. Owner-only (0600), like the vfio-user socket: whoever can
talk to it can reconfigure the device.

The server knows nothing of controllers: its owner hands it a table of methods,
each taking the request's params (a dict) and returning something JSON can encode.

What a client can do to the server, and no more: every line gets one reply (a line
that is not JSON, is nested too deeply, or is too long gets an error; the rest of a
too-long line is dropped unread, never run); a client holds only its own connection
and thread, and one that stops in the middle of a line (or stops taking replies) is
cut off after `request_timeout`; at most `max_connections` are served at once, and
one more is told the server is busy and closed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .vfio_user.server import listen_unix

log = logging.getLogger(__name__)

Method = Callable[[dict[str, Any]], Any]

# JSON-RPC 2.0 error codes (section 5.1)
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: the method ran and refused: bad arguments for this device, a conflict, ...
REQUEST_FAILED = -32000
#: too many connections are open: this one is closed unserved
SERVER_BUSY = -32001
#: a request line begun and not finished in time: the connection is closed
REQUEST_TIMEOUT_ERROR = -32002

#: the longest request line, in bytes (without its newline)
MAX_REQUEST = 1 << 20
#: control connections served at once; each holds a thread, so there is a limit
MAX_CONNECTIONS = 64
#: seconds a client has to finish a request line once it has begun one, and to take
#: a reply: a client that stalls holds its own connection only, and not for ever.
#: Between requests a connection may stay idle as long as it likes.
REQUEST_TIMEOUT = 10.0


def default_control_path() -> str:
    """The daemon's control socket unless told otherwise ($NVME_MDEV_CONTROL)."""
    return os.environ.get("NVME_MDEV_CONTROL", "/run/nvme-mdev/control.sock")


class ControlError(Exception):
    """A method's refusal, sent to the client as a JSON-RPC error."""

    def __init__(self, message: str, code: int = REQUEST_FAILED) -> None:
        super().__init__(message)
        self.code = code


class ControlServer:
    def __init__(
        self,
        path: str,
        methods: dict[str, Method],
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        listener: socket.socket | None = None,
    ) -> None:
        """`listener`: the socket a predecessor process listened on (upgrade in place)."""
        self.path = path
        self.methods = methods
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        # SocketInUse if it is taken; the backlog lets a burst of CLI calls queue.
        self._listener = listener or listen_unix(path, backlog=MAX_CONNECTIONS)
        #: (thread, action): run once that thread's connection has sent its reply
        self._after_reply: tuple[int, Callable[[], None]] | None = None
        self._running = False
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._connections = 0
        self._connections_lock = threading.Lock()

    @property
    def listener(self) -> socket.socket:
        return self._listener

    def exit_after_reply(self, action: Callable[[], None]) -> None:
        """Called by a method: run `action` once its reply has been sent."""
        self._after_reply = (threading.get_ident(), action)

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self._thread.ident is not None:  # stopped before it started: nothing to join
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        while self._running:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with self._connections_lock:
                busy = self._connections >= self.max_connections
                if not busy:
                    self._connections += 1
            if busy:
                self._refuse(conn)
                continue
            try:
                threading.Thread(
                    target=self._serve, args=(conn,), name="control-conn", daemon=True
                ).start()
            except RuntimeError:  # no thread to be had: the same answer as a full house
                self._release()
                self._refuse(conn)

    def _refuse(self, conn: socket.socket) -> None:
        """One error line and close. Never blocks the accept loop: a fresh socket's
        buffer takes one short line, and if it does not, the close says enough."""
        with conn, contextlib.suppress(OSError):
            conn.setblocking(False)
            message = f"server busy: {self.max_connections} control connections open; try later"
            conn.sendall(_error(None, SERVER_BUSY, message) + b"\n")

    def _release(self) -> None:
        with self._connections_lock:
            self._connections -= 1

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._converse(conn)
        finally:
            self._release()

    def _converse(self, conn: socket.socket) -> None:
        lines = _LineReader(conn, MAX_REQUEST, self.request_timeout)
        while True:
            try:
                line = lines.next()
            except RequestTooLong:
                reply: bytes | None = _error(
                    None, INVALID_REQUEST, f"request too long (more than {MAX_REQUEST} bytes)"
                )
            except TimeoutError:
                message = f"request not finished within {self.request_timeout:g} s"
                self._send(conn, _error(None, REQUEST_TIMEOUT_ERROR, message))
                return
            except OSError:
                return
            else:
                if line is None:
                    return
                reply = self._handle_guarded(line)
            if reply is not None and not self._send(conn, reply):
                return
            after = self._after_reply
            if after is not None and after[0] == threading.get_ident():
                after[1]()

    def _send(self, conn: socket.socket, reply: bytes) -> bool:
        """The reply sent; False if the client is gone or does not take it in time."""
        try:
            conn.settimeout(self.request_timeout)
            conn.sendall(reply + b"\n")
        except OSError:
            return False
        return True

    def _handle_guarded(self, line: bytes) -> bytes | None:
        # Whatever a line does to handle(), its sender gets a reply and keeps its
        # connection: a bug here must not look like a dead server.
        try:
            return self.handle(line)
        except Exception as exc:
            log.exception("control request failed")
            return _error(None, INTERNAL_ERROR, f"internal error: {exc}")

    def handle(self, line: bytes) -> bytes | None:
        """One request line → one reply line (None for a notification)."""
        if len(line) > MAX_REQUEST:
            return _error(None, INVALID_REQUEST, "request too long")
        try:
            # NaN and Infinity are not JSON (nor is 1e400, a float only as infinity):
            # taken, an id would be echoed as them.
            request = json.loads(line, parse_constant=_not_json, parse_float=_finite)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(None, PARSE_ERROR, f"not JSON: {exc}")
        except RecursionError:  # '[[[[...': the decoder recurses once per level
            return _error(None, PARSE_ERROR, "not JSON this server reads: nested too deeply")
        if not isinstance(request, dict) or request.get("jsonrpc") != "2.0":
            return _error(None, INVALID_REQUEST, "expected a JSON-RPC 2.0 request object")
        rid = request.get("id")
        method_name = request.get("method")
        params = request.get("params", {})
        if not isinstance(method_name, str):
            return _error(rid, INVALID_REQUEST, "method must be a string")
        reply = self._call(rid, method_name, params)
        # A well-formed request without an id is a notification: it runs, and JSON-RPC
        # 2.0 forbids any reply to it, an error included.
        return None if "id" not in request else reply

    def _call(self, rid: Any, method_name: str, params: Any) -> bytes:
        if not isinstance(params, dict):
            return _error(rid, INVALID_PARAMS, "params must be an object")
        method = self.methods.get(method_name)
        if method is None:
            return _error(rid, METHOD_NOT_FOUND, f"no method {method_name!r}")
        try:
            result = method(params)
        except ControlError as exc:
            return _error(rid, exc.code, str(exc))
        except (TypeError, ValueError, KeyError) as exc:
            return _error(rid, INVALID_PARAMS, f"{method_name}: {exc}")
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("control method %s failed", method_name)
            return _error(rid, INTERNAL_ERROR, f"{method_name}: {exc}")
        return json.dumps({"jsonrpc": "2.0", "id": rid, "result": result}).encode()


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is too large a number")
    return value


class RequestTooLong(Exception):
    """A request line longer than the limit (its bytes have been read and dropped)."""


class _LineReader:
    """Request lines from a socket, each at most `limit` bytes. A longer line is read
    to its end and dropped as it comes (never held whole), then reported once by
    RequestTooLong; the next line is read as usual. A line once begun must end within
    `timeout` seconds (TimeoutError); waiting for a line to begin has no limit."""

    def __init__(self, sock: socket.socket, limit: int, timeout: float) -> None:
        self._sock = sock
        self._limit = limit
        self._timeout = timeout
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no newline
        self._dropping = False  # inside a too-long line: its bytes are thrown away
        self._deadline: float | None = None  # when the line begun must have ended

    def next(self) -> bytes | None:
        """The next line without its newline; None at the end of the stream (a line
        left unfinished there is dropped)."""
        while True:
            # Only new bytes are searched: a line sent a byte at a time costs no more.
            end = self._buffer.find(b"\n", self._scanned)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self._scanned = 0
                self._deadline = None
                if self._dropping or end > self._limit:
                    self._dropping = False
                    raise RequestTooLong
                return line
            self._scanned = len(self._buffer)
            if self._dropping or len(self._buffer) > self._limit:
                self._dropping = True
                self._buffer.clear()
                self._scanned = 0
            if self._deadline is None and (self._buffer or self._dropping):
                self._deadline = time.monotonic() + self._timeout
            if self._deadline is None:
                self._sock.settimeout(None)
            else:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._sock.settimeout(left)
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                return None
            self._buffer += chunk


def _error(rid: Any, code: int, message: str) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}
    ).encode()


def call(
    path: str, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0
) -> Any:
    """One request to a control socket; raises ControlError with the server's message."""
    request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            break
        except BlockingIOError:
            # The listen queue is full (a burst of clients): wait for room, as a
            # blocking connect would, but not past the timeout.
            sock.close()
            if time.monotonic() >= deadline:
                raise ControlError(f"{path}: the server is not accepting connections") from None
            time.sleep(0.005)
        except OSError as exc:
            sock.close()
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
    with sock:
        # A server that turned us away as busy may have closed before we wrote: its
        # one line, already sent, says so; read it all the same.
        with contextlib.suppress(OSError):
            sock.sendall(json.dumps(request).encode() + b"\n")
        try:
            with sock.makefile("rb") as rfile:
                line = rfile.readline(MAX_REQUEST * 16)
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
    if not line:
        raise ControlError(f"{path}: the server closed the connection")
    reply = json.loads(line)
    if "error" in reply:
        raise ControlError(reply["error"]["message"], reply["error"]["code"])
    return reply["result"]
