"""The control socket: JSON-RPC 2.0 over a UNIX stream socket, one JSON object
per line each way. Owner-only (0600), like the vfio-user socket: whoever can
talk to it can reconfigure the device.

The server knows nothing of controllers: its owner hands it a table of methods,
each taking the request's params (a dict) and returning something JSON can encode.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
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

MAX_REQUEST = 1 << 20


def default_control_path() -> str:
    """The daemon's control socket unless told otherwise ($NVME_MDEV_CONTROL)."""
    return os.environ.get("NVME_MDEV_CONTROL", "/run/nvme-mdev/control.sock")


class ControlError(Exception):
    """A method's refusal, sent to the client as a JSON-RPC error."""

    def __init__(self, message: str, code: int = REQUEST_FAILED) -> None:
        super().__init__(message)
        self.code = code


class ControlServer:
    def __init__(self, path: str, methods: dict[str, Method]) -> None:
        self.path = path
        self.methods = methods
        self._listener = listen_unix(path)  # SocketInUse if it is taken
        self._running = False
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)

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
            threading.Thread(
                target=self._serve, args=(conn,), name="control-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rfile:
            while True:
                line = rfile.readline(MAX_REQUEST + 1)
                if not line:
                    return
                reply = self.handle(line)
                if reply is not None:
                    try:
                        conn.sendall(reply + b"\n")
                    except OSError:
                        return

    def handle(self, line: bytes) -> bytes | None:
        """One request line → one reply line (None for a notification)."""
        if len(line) > MAX_REQUEST:
            return _error(None, INVALID_REQUEST, "request too long")
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(None, PARSE_ERROR, f"not JSON: {exc}")
        if not isinstance(request, dict) or request.get("jsonrpc") != "2.0":
            return _error(None, INVALID_REQUEST, "expected a JSON-RPC 2.0 request object")
        rid = request.get("id")
        method_name = request.get("method")
        params = request.get("params", {})
        if not isinstance(method_name, str):
            return _error(rid, INVALID_REQUEST, "method must be a string")
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
        if "id" not in request:
            return None
        return json.dumps({"jsonrpc": "2.0", "id": rid, "result": result}).encode()


def _error(rid: Any, code: int, message: str) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}
    ).encode()


def call(
    path: str, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0
) -> Any:
    """One request to a control socket; raises ControlError with the server's message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
        request = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as rfile:
            line = rfile.readline(MAX_REQUEST * 16)
    if not line:
        raise ControlError(f"{path}: the server closed the connection")
    reply = json.loads(line)
    if "error" in reply:
        raise ControlError(reply["error"]["message"], reply["error"]["code"])
    return reply["result"]
