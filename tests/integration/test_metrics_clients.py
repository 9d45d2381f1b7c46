"""The Prometheus endpoint against clients that connect and stall: each test is that
client over a real TCP socket; scrapes keep being answered."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from nvme_mdev.metrics import MetricsServer

#: how long a test waits for what must happen (never a window it asserts)
PATIENCE = 30.0


def snapshots() -> dict[str, dict[str, Any]]:
    return {}


def serve(**limits: Any) -> MetricsServer:
    server = MetricsServer("127.0.0.1:0", snapshots, **limits)
    server.start()
    return server


def stall(server: MetricsServer) -> socket.socket:
    """A client that sends half a request and then nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE)
    sock.sendall(b"GET /metr")
    return sock


def scrape(server: MetricsServer) -> int:
    url = f"http://127.0.0.1:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=PATIENCE) as reply:
        reply.read()
        return int(reply.status)


def wait_closed(sock: socket.socket) -> None:
    """Returns once the server has ended the connection; TimeoutError if it never does."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass


@pytest.fixture
def stalled() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def test_a_stalled_client_is_cut_off_after_the_timeout(stalled: list[socket.socket]) -> None:
    server = serve(timeout=0.3)
    try:
        stalled.append(stall(server))
        wait_closed(stalled[0])
        assert scrape(server) == 200
    finally:
        server.stop()


def test_a_dripping_client_is_cut_off_too(stalled: list[socket.socket]) -> None:
    """The timeout is on the whole connection: a byte now and then does not extend it."""
    server = serve(timeout=0.3)
    try:
        sock = stall(server)
        stalled.append(sock)
        sock.settimeout(0.05)
        for _ in range(2000):
            try:
                sock.sendall(b"x")
                if sock.recv(4096) == b"":
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        else:
            pytest.fail("a dripping client was never cut off")
    finally:
        server.stop()


def test_scrapes_are_served_while_clients_stall(stalled: list[socket.socket]) -> None:
    server = serve(timeout=PATIENCE * 10, max_connections=8)
    try:
        stalled.extend(stall(server) for _ in range(4))
        for _ in range(3):
            assert scrape(server) == 200
    finally:
        server.stop()


def test_connections_past_the_limit_get_503(stalled: list[socket.socket]) -> None:
    server = serve(timeout=PATIENCE * 10, max_connections=2)
    try:
        stalled.extend(stall(server) for _ in range(2))
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(server)
        assert refused.value.code == 503
        stalled.pop().close()  # one leaves: its place is free again, soon
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            try:
                if scrape(server) == 200:
                    break
            except urllib.error.HTTPError as exc:
                assert exc.code == 503
            except urllib.error.URLError:
                pass  # turned away before the request was written
        else:
            pytest.fail("the server stayed full after a client left")
    finally:
        server.stop()


def test_a_successor_serves_on_its_predecessors_listener_and_binds_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    bound: list[Any] = []
    real_bind = socket.socket.bind

    def bind(sock: socket.socket, address: Any) -> None:
        bound.append(address)
        real_bind(sock, address)

    monkeypatch.setattr(socket.socket, "bind", bind)
    server = MetricsServer.from_listener(listener, snapshots)
    server.start()
    try:
        assert bound == []  # not even a port of its own for a moment
        assert server.port == listener.getsockname()[1]
        assert scrape(server) == 200
    finally:
        server.stop()
