"""The control plane of a running `nvme-mdev serve`: statistics (CLI, JSON, Prometheus
over HTTP), I/O thread pinning and poll timeout changed at run time, and the
JSON-RPC socket's answers to bad requests."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvme_mdev.control import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    ControlError,
    call,
)
from nvme_mdev.nvme_host import NvmeHost, NvmeHostError, read_write

CLI = [sys.executable, "-m", "nvme_mdev.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, tmp: Path, *extra: str) -> None:
        self.sock = tmp / "s.sock"
        self.control = tmp / "s.sock.ctl"
        image = tmp / "disk.img"
        image.write_bytes(b"")
        os.truncate(image, 16 << 20)
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--socket", str(self.sock), *extra, str(image)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(300):
            if self.control.exists():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise AssertionError(self.proc.stderr.read() if self.proc.stderr else "no control socket")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args, "--control", str(self.control)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def io_thread_tid(self) -> int:
        tid = call(str(self.control), "iothread")["tid"]
        assert (Path(f"/proc/{self.proc.pid}/task") / str(tid)).is_dir()
        return int(tid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.stop()


def do_io(sock: Path, writes: int, reads: int) -> None:
    with NvmeHost(str(sock)) as host:
        host.enable()
        q = host.create_queue_pair(1)
        buf = host.alloc(4096)
        for i in range(writes):
            assert q.command(read_write(0x01, 1, buf, i * 8, 8)).ok
        for i in range(reads):
            assert q.command(read_write(0x02, 1, buf, i * 8, 8)).ok


def test_stats_show_what_the_guest_did(served: Served) -> None:
    assert stat.S_IMODE(served.control.stat().st_mode) == 0o600
    do_io(served.sock, writes=5, reads=3)
    result = served.cli("stats", "--json")
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    (q1,) = snap["queues"]
    assert q1["qid"] == 1
    assert q1["by_opcode"]["write"] == {"commands": 5, "bytes": 5 * 4096}
    assert q1["by_opcode"]["read"] == {"commands": 3, "bytes": 3 * 4096}
    assert sum(n for _, n in q1["latency_histogram"]) == 8
    assert sum(snap["interrupts"].values()) >= 8  # one per command at QD1 (and the admin's)
    assert snap["io_thread"]["polling_s"] > 0
    table = served.cli("stats")
    assert table.returncode == 0 and "write" in table.stdout and "I/O thread" in table.stdout


def test_prometheus_text_from_the_cli(served: Served) -> None:
    do_io(served.sock, writes=2, reads=0)
    result = served.cli("stats", "--prometheus")
    assert result.returncode == 0, result.stderr
    assert 'nvme_mdev_commands_total{controller="nvme-mdev",qid="1",opcode="write"} 2' in (
        result.stdout.splitlines()
    )


def test_metrics_over_http(tmp_path: Path) -> None:
    port = free_port()
    s = Served(tmp_path, "--metrics", f"127.0.0.1:{port}")
    try:
        do_io(s.sock, writes=1, reads=1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = r.read().decode()
        assert 'opcode="read"} 1' in body and "nvme_mdev_io_thread_parks_total" in body
    finally:
        s.stop()


def test_iothread_pinned_and_unpinned_at_run_time(served: Served) -> None:
    tid = served.io_thread_tid()
    result = served.cli("iothread", "--cpu", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cpus"] == [0]
    assert os.sched_getaffinity(tid) == {0}
    result = served.cli("iothread", "--cpu", "any", "--poll-timeout-ms", "0", "--json")
    assert json.loads(result.stdout) == {
        "tid": tid,
        "cpus": None,
        "poll_timeout_ms": 0,
        "data_plane": "native",
    }
    assert os.sched_getaffinity(tid) == os.sched_getaffinity(0)
    do_io(served.sock, writes=1, reads=1)  # still serving with a changed thread


def test_pinning_to_a_missing_cpu_is_refused_in_one_line(served: Served) -> None:
    result = served.cli("iothread", "--cpu", "4095")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "4095" in result.stderr


def test_serve_pins_at_start(tmp_path: Path) -> None:
    s = Served(tmp_path, "--iothread-cpu", "0")
    try:
        assert os.sched_getaffinity(s.io_thread_tid()) == {0}
    finally:
        s.stop()


def test_serve_refuses_a_missing_cpu(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    result = subprocess.run(
        [*CLI, "serve", "--socket", str(tmp_path / "s.sock"), "--iothread-cpu", "4095", str(image)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--iothread-cpu" in result.stderr
    assert not (tmp_path / "s.sock").exists()


def raw(path: Path, line: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(line + b"\n")
        reply: dict[str, object] = json.loads(s.makefile("rb").readline())
        return reply


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", PARSE_ERROR),
        (b"[1, 2]", INVALID_REQUEST),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "stats"}', INVALID_REQUEST),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "format_host_disk"}', METHOD_NOT_FOUND),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "stats", "params": [1]}', INVALID_PARAMS),
        (
            b'{"jsonrpc": "2.0", "id": 1, "method": "iothread", "params": {"cpus": ["x"]}}',
            INVALID_PARAMS,
        ),
    ],
)
def test_bad_requests_get_json_rpc_errors(served: Served, line: bytes, code: int) -> None:
    reply = raw(served.control, line)
    assert reply["jsonrpc"] == "2.0"
    assert isinstance(reply["error"], dict) and reply["error"]["code"] == code
    assert call(str(served.control), "stats")["queues"] == []  # and the socket still serves


def test_notifications_get_no_reply_not_even_an_error(served: Served) -> None:
    """JSON-RPC 2.0: a request without an id is a notification, and the server never
    answers one, also when it fails; so the first reply is the one to the request."""
    notifications = [
        b'{"jsonrpc": "2.0", "method": "format_host_disk"}',
        b'{"jsonrpc": "2.0", "method": "stats", "params": [1]}',
        b'{"jsonrpc": "2.0", "method": "iothread", "params": {"cpus": ["x"]}}',
        b'{"jsonrpc": "2.0", "method": "stats"}',
    ]
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(served.control))
        s.sendall(b"\n".join([*notifications, b'{"jsonrpc": "2.0", "id": 7, "method": "stats"}']))
        s.sendall(b"\n")
        reply = json.loads(s.makefile("rb").readline())
    assert reply["id"] == 7 and "result" in reply


def test_control_error_for_a_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="No such file"):
        call(str(tmp_path / "nothing.ctl"), "stats")


def test_mapped_doorbells_never_trap(tmp_path: Path) -> None:
    s = Served(tmp_path, "--mmap-doorbells")
    try:
        with NvmeHost(str(s.sock)) as host:
            host.map_doorbells()
            host.enable()
            q = host.create_queue_pair(1)
            buf = host.alloc(4096)
            for i in range(20):
                assert q.command(read_write(0x01, 1, buf, i * 8, 8)).ok
        snap = call(str(s.control), "stats")
        assert snap["queues"][0]["by_opcode"]["write"]["commands"] == 20
        assert snap["doorbell_traps"] == 0
    finally:
        s.stop()


def test_mapping_doorbells_needs_the_option(served: Served) -> None:
    with NvmeHost(str(served.sock)) as host, pytest.raises(NvmeHostError, match="mmap-doorbells"):
        host.map_doorbells()
