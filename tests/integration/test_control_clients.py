"""Hostile and careless control-socket clients against a daemon that serves a VM: each
test is that client, over the real socket, and then checks that the socket still
answers and the VM's disk still works. A client can lose its own connection and
nothing more."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_daemon import CLI, DaemonProcess, image, write_read

from nvme_mdev.control import (
    INVALID_REQUEST,
    MAX_CONNECTIONS,
    MAX_REQUEST,
    PARSE_ERROR,
    REQUEST_FAILED,
    REQUEST_TIMEOUT_ERROR,
    SERVER_BUSY,
    ControlError,
    ControlServer,
    call,
)
from nvme_mdev.daemon import Daemon
from nvme_mdev.nvme_host import NvmeHost

#: how long a test waits for a reply that must come (never a window it asserts)
PATIENCE = 30.0


def request(rid: Any, method: str, params: dict[str, Any] | None = None) -> bytes:
    """One JSON-RPC request line, without its newline."""
    return json.dumps(
        {"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}
    ).encode()


def not_json(constant: str) -> Any:
    pytest.fail(f"the reply holds {constant}, which is not JSON")


class Client:
    """One raw connection to a control socket: lines out, lines in."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))  # (blocking: waits for room in the listen queue)
        self.sock.settimeout(PATIENCE)
        self.rfile = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        line = self.rfile.readline()
        assert line, "the server closed the connection without a reply"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def closed(self) -> bool:
        """True once the server has closed the connection (waits for it)."""
        return self.rfile.readline() == b""

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path)
    d.ok(
        "controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
        "--ns", str(image(tmp_path, "vm.img")),
    )  # fmt: skip
    yield d
    d.stop()


@pytest.fixture
def victim(daemon: DaemonProcess, tmp_path: Path) -> Iterator[NvmeHost]:
    """The VM whose disk must keep working, connected before the hostile client acts."""
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        assert write_read(host, 1, 0, b"\x11" * 4096) == b"\x11" * 4096
        yield host


def still_serving(daemon: DaemonProcess, victim: NvmeHost) -> None:
    assert daemon.proc.poll() is None, daemon.log()
    assert write_read(victim, 1, 8, b"\x5a" * 4096) == b"\x5a" * 4096
    assert [c["name"] for c in call(str(daemon.control), "list")["controllers"]] == ["vm"]


def test_deeply_nested_json_gets_a_parse_error_and_the_connection_keeps_working(
    daemon: DaemonProcess, victim: NvmeHost
) -> None:
    client = Client(daemon.control)
    try:
        for opener in (b"[", b'{"a":'):
            client.send(opener * 100_000 + b"\n")
            reply = client.reply()
            assert reply["id"] is None and reply["error"]["code"] == PARSE_ERROR
            assert "nested too deeply" in reply["error"]["message"]
        client.send(request(7, "list") + b"\n")  # the same connection
        reply = client.reply()
        assert reply["id"] == 7 and [c["name"] for c in reply["result"]["controllers"]] == ["vm"]
    finally:
        client.close()
    still_serving(daemon, victim)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    """The daemon's control socket in this process, with no controllers."""
    server = ControlServer(str(tmp_path / "c.sock"), Daemon().methods())
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_not_json(server: ControlServer, constant: bytes) -> None:
    """Python's decoder takes them; taken, an id would come back as them, which no
    strict JSON parser reads."""
    client = Client(Path(server.path))
    try:
        for line in (
            b'{"jsonrpc": "2.0", "id": %s, "method": "list"}\n' % constant,
            b'{"jsonrpc": "2.0", "id": 1, "method": "iothread", "params": {"x": %s}}\n' % constant,
        ):
            client.send(line)
            reply = json.loads(client.rfile.readline(), parse_constant=not_json)
            assert reply["id"] is None and reply["error"]["code"] == PARSE_ERROR
    finally:
        client.close()


def test_the_rest_of_a_too_long_line_is_dropped_not_run(
    daemon: DaemonProcess, victim: NvmeHost, tmp_path: Path
) -> None:
    # Past the limit, the over-long line carries a request of its own: it must not run.
    smuggled = request(
        "smuggled", "controller_create", {"name": "evil", "socket": str(tmp_path / "evil.sock")}
    )
    client = Client(daemon.control)
    try:
        client.send(b"x" * (MAX_REQUEST + 1) + smuggled + b"\n" + request(2, "list") + b"\n")
        reply = client.reply()
        assert reply["id"] is None and reply["error"]["code"] == INVALID_REQUEST
        assert "too long" in reply["error"]["message"]
        reply = client.reply()  # the next line's reply comes next: nothing in between
        assert reply["id"] == 2, reply
        assert [c["name"] for c in reply["result"]["controllers"]] == ["vm"]
        # Several limits long, and a line that then fits: still one error, then service.
        client.send(b"y" * (5 * MAX_REQUEST) + b"\n")
        client.send(request(3, "list") + b"\n")
        assert client.reply()["error"]["code"] == INVALID_REQUEST
        assert client.reply()["id"] == 3
    finally:
        client.close()
    assert not (tmp_path / "evil.sock").exists()
    still_serving(daemon, victim)


def test_connections_past_the_limit_are_told_the_server_is_busy(
    daemon: DaemonProcess, victim: NvmeHost
) -> None:
    held = [Client(daemon.control) for _ in range(MAX_CONNECTIONS)]
    try:
        for i, client in enumerate(held):  # each served: each counted by the server
            client.send(request(i, "list") + b"\n")
            assert client.reply()["id"] == i
        extra = Client(daemon.control)
        try:
            reply = extra.reply()
            assert reply["error"]["code"] == SERVER_BUSY and "busy" in reply["error"]["message"]
            assert extra.closed()
        finally:
            extra.close()
        # The connections being served keep being served.
        held[0].send(request("again", "list") + b"\n")
        assert held[0].reply()["id"] == "again"
        assert write_read(victim, 1, 16, b"\x22" * 4096) == b"\x22" * 4096
    finally:
        for client in held:
            client.close()
    # The slots come back as their clients leave (the server sees each close in turn).
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        try:
            result = call(str(daemon.control), "list")
        except ControlError as exc:
            assert "busy" in str(exc)
            continue
        assert [c["name"] for c in result["controllers"]] == ["vm"]
        break
    else:
        pytest.fail("the server stayed busy after every client left")
    still_serving(daemon, victim)


def test_clients_stalled_mid_line_hold_only_their_own_connections(
    daemon: DaemonProcess, victim: NvmeHost
) -> None:
    stalled = [Client(daemon.control) for _ in range(5)]
    try:
        for client in stalled:
            client.send(b'{"jsonrpc": "2.0", "id": 1, "meth')
        for _ in range(3):
            still_serving(daemon, victim)
    finally:
        for client in stalled:
            client.close()


@pytest.fixture
def short_timeout(tmp_path: Path) -> Iterator[ControlServer]:
    server = ControlServer(str(tmp_path / "c.sock"), Daemon().methods(), request_timeout=0.3)
    server.start()
    yield server
    server.stop()


def test_a_line_left_unfinished_is_cut_off(short_timeout: ControlServer) -> None:
    client = Client(Path(short_timeout.path))
    try:
        client.send(b'{"jsonrpc": "2.0", "id": 1, "meth')
        reply = client.reply()
        assert reply["error"]["code"] == REQUEST_TIMEOUT_ERROR
        assert "not finished" in reply["error"]["message"]
        assert client.closed()
    finally:
        client.close()
    assert call(short_timeout.path, "list")["controllers"] == []


def test_a_line_dripped_a_byte_at_a_time_is_cut_off(short_timeout: ControlServer) -> None:
    """The limit is on the whole line, not on each read: dripping does not extend it."""
    client = Client(Path(short_timeout.path))
    try:
        for byte in b'{"jsonrpc": "2.0", "id": 1, "method": "list"' * 100:
            try:
                client.send(bytes([byte]))
            except BrokenPipeError:  # cut off between two bytes: its reply is there
                break
            readable, _, _ = select.select([client.sock], [], [], 0.05)
            if readable:
                break
        else:
            pytest.fail("a dripping client was never cut off")
        assert client.reply()["error"]["code"] == REQUEST_TIMEOUT_ERROR
        assert client.closed()
    finally:
        client.close()


def test_an_idle_connection_between_requests_is_kept(short_timeout: ControlServer) -> None:
    """Only a line begun must end in time: a client may wait between requests."""
    client = Client(Path(short_timeout.path))
    try:
        client.send(request(1, "list") + b"\n")
        assert client.reply()["id"] == 1
        # Idle for longer than the limit: select waits for anything the server sends.
        readable, _, _ = select.select([client.sock], [], [], 1.0)
        assert not readable
        client.send(request(2, "list") + b"\n")
        assert client.reply()["id"] == 2
    finally:
        client.close()


def test_a_namespace_too_large_for_nvme_is_refused(
    daemon: DaemonProcess, victim: NvmeHost, tmp_path: Path
) -> None:
    daemon.ok("controller", "create", "other", "--socket", str(tmp_path / "other.sock"))
    message = daemon.refused("ns", "add", "other", "null:1000000000000000000000000T")
    assert "too large" in message and "give at most 8388607T" in message
    # The same as JSON-RPC, with the size as a number of bytes: an error reply.
    with pytest.raises(ControlError, match="too large") as info:
        call(
            str(daemon.control),
            "namespace_add",
            {"controller": "other", "spec": str(image(tmp_path, "o.img")), "size": 10**30},
        )
    assert info.value.code == REQUEST_FAILED
    with pytest.raises(ControlError, match="too large"):
        call(
            str(daemon.control),
            "controller_create",
            {"name": "big", "socket": str(tmp_path / "big.sock"), "namespaces": ["null:9999999T"]},
        )
    # What is in range works, and the guest reads its size from Identify Namespace.
    largest = daemon.ok("ns", "add", "other", "null:8388607T")
    assert largest["blocks"] == (8388607 << 40) // 512
    with NvmeHost(str(tmp_path / "other.sock")) as host:
        host.enable()
        assert int.from_bytes(host.identify(0, nsid=1)[:8], "little") == largest["blocks"]
    assert not (tmp_path / "big.sock").exists()
    assert daemon.proc.poll() is None, daemon.log()
    assert write_read(victim, 1, 8, b"\x5a" * 4096) == b"\x5a" * 4096
    listing = call(str(daemon.control), "list")["controllers"]
    assert [c["name"] for c in listing] == ["other", "vm"]


def test_serve_refuses_a_namespace_too_large_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [*CLI, "serve", "--socket", str(tmp_path / "s.sock"), "null:1000000000000000000000000T"],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "too large; give at most 8388607T" in result.stderr
    assert not (tmp_path / "s.sock").exists()
