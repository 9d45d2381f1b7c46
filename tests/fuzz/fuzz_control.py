#!/usr/bin/env python3
"""Fuzz target `control`: one control-socket request line through ControlServer.handle,
with the daemon's own method table (Daemon.methods()) on a daemon that has no
controllers and makes none: creating a controller or adding a namespace parses and
checks everything as the daemon does (ControllerSettings.from_params,
NamespaceRequest.from_params, nsid assignment) and stops short of opening storage or
sockets; the other methods run as they are.

Input: a mode byte, then bytes. Mode 0: the bytes are the request line. Mode 1: they
are the params of a request for one of the table's methods (the mode byte's upper
bits choose it), so that the fuzzer spends its time inside the methods.

Invariants: handle() raises nothing; it answers None only for a notification (a
request object without "id") whose method ran; otherwise one line that is strict
JSON (no NaN/Infinity, no newline): a JSON-RPC 2.0 response object with the
request's id, and exactly one of "result" and "error" ({code, message}, one of the
codes control.py defines, never INTERNAL_ERROR: that is a method's bug); a spec a
method accepted reads back as the same spec from its text().
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from typing import Any

import fuzzing

with fuzzing.instrumented(__name__):
    from nvme_mdev import control
    from nvme_mdev.config import NamespaceSpec
    from nvme_mdev.daemon import ControllerSettings, Daemon, NamespaceRequest

_CODES = frozenset(
    {
        control.PARSE_ERROR,
        control.INVALID_REQUEST,
        control.METHOD_NOT_FOUND,
        control.INVALID_PARAMS,
        control.REQUEST_FAILED,
    }
)


def _check_spec(spec: NamespaceSpec) -> None:
    again = NamespaceSpec.parse(spec.text())
    if spec.passthrough:  # the host's LBA format: bs is not part of the text
        again = dataclasses.replace(again, block_size=spec.block_size)
    assert again == spec, f"{spec} reads back from {spec.text()!r} as {again}"


class DryDaemon(Daemon):
    """A Daemon whose controllers and namespaces are checked, never made."""

    def create_controller(self, settings: ControllerSettings) -> dict[str, Any]:
        nsids = self._assign_nsids(settings)
        for request in settings.namespaces:
            _check_spec(request.spec)
        return {
            "name": settings.name,
            "socket": settings.socket,
            "nsids": nsids,
            "namespaces": [r.spec.text() for r in settings.namespaces],
        }

    def add_namespace(self, controller: str | None, req: NamespaceRequest) -> dict[str, Any]:
        self._controller(controller)  # there are none: a ConfigError
        raise AssertionError("unreachable: a controller in a daemon that makes none")


_DIR = tempfile.mkdtemp(prefix="fuzz-control-", dir="/tmp")
DAEMON = DryDaemon()
SERVER = control.ControlServer(os.path.join(_DIR, "control.sock"), DAEMON.methods())
METHODS = sorted(SERVER.methods)


@atexit.register
def _cleanup() -> None:
    SERVER.stop()
    shutil.rmtree(_DIR, ignore_errors=True)


class NotStrictJson(AssertionError):
    pass


def _strict(constant: str) -> Any:
    raise NotStrictJson(f"reply is not strict JSON: {constant}")


def _valid_id(rid: object) -> bool:
    """An id JSON-RPC 2.0 allows (String, Number, Null) that JSON can carry back."""
    if isinstance(rid, float):
        return math.isfinite(rid)
    return rid is None or (isinstance(rid, str | int) and not isinstance(rid, bool))


def check(line: bytes) -> None:
    reply = SERVER.handle(line)
    try:
        request: Any = json.loads(line)
    except (ValueError, RecursionError):
        request = None
    is_request = isinstance(request, dict) and request.get("jsonrpc") == "2.0"
    if reply is None:
        assert is_request and "id" not in request, "no reply to a request with an id"
        return
    assert isinstance(reply, bytes) and b"\n" not in reply and b"\r" not in reply
    try:
        doc = json.loads(reply, parse_constant=_strict)
    except NotStrictJson:
        raise AssertionError(f"the reply is not strict JSON: {reply!r}") from None
    assert isinstance(doc, dict) and doc.get("jsonrpc") == "2.0", doc
    assert ("result" in doc) != ("error" in doc), doc
    assert set(doc) == {"jsonrpc", "id", "result" if "result" in doc else "error"}, doc
    if is_request and "result" in doc:
        assert doc["id"] == request.get("id"), (doc, request)
    if is_request and "id" in request and _valid_id(request["id"]):
        assert doc["id"] == request["id"], (doc["id"], request["id"])
    if "error" in doc:
        error = doc["error"]
        assert isinstance(error, dict) and set(error) == {"code", "message"}, error
        assert isinstance(error["message"], str), error
        assert error["code"] in _CODES, f"error {error['code']}: {error['message']}"


def fuzz(data: bytes) -> None:
    # handle() logs a method's unexpected exception: the reply's INTERNAL_ERROR says it.
    with fuzzing.logs_to("nvme_mdev", logging.CRITICAL):
        _fuzz(data)


def _fuzz(data: bytes) -> None:
    source = fuzzing.Input(data)
    mode = source.u8()
    rest = source.rest()
    if mode & 1:
        method = METHODS[(mode >> 1) % len(METHODS)]
        line = b'{"jsonrpc": "2.0", "id": 1, "method": "%s", "params": %s}' % (
            method.encode(),
            rest,
        )
    else:
        line = rest
    check(line)


if __name__ == "__main__":
    fuzzing.main(fuzz)
    sys.exit(0)
