"""`nvme-mdev serve` as a user runs it: errors on one line, clean exit on signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nvme_mdev.nvme_host import NvmeHost, read_write

SERVE = [sys.executable, "-m", "nvme_mdev.cli", "serve"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=30)


def start(sock: Path, *paths: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*SERVE, "--socket", str(sock), *paths], stderr=subprocess.PIPE, text=True
    )
    for _ in range(200):
        if sock.exists():
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(proc.stderr.read() if proc.stderr else "no socket")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/missing.img"], "missing.img: No such file or directory"),
        (["{image},bs=1000"], "block size 1000"),
        (["{image},rw=1"], "unknown option"),
        (["{tmp}"], "not a regular file or block device"),
        (["--max-io-queues", "0", "{image}"], "max_io_queues"),
    ],
)
def test_bad_configuration_is_one_line(
    tmp_path: Path, image: Path, args: list[str], message: str
) -> None:
    argv = [a.format(tmp=tmp_path, image=image) for a in args]
    result = run("--socket", str(tmp_path / "s.sock"), *argv)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "s.sock").exists()


def test_socket_in_use_is_refused(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "s.sock"
    proc = start(sock, str(image))
    try:
        result = run("--socket", str(sock), f"{image},ro")  # (writing it would be refused)
        assert result.returncode == 2
        assert "in use" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_two_processes_may_not_write_the_same_bytes(tmp_path: Path, image: Path) -> None:
    """A second `serve` on an image another one writes: refused in one line, unless it
    takes other bytes of the file or only reads."""
    first = start(tmp_path / "a.sock", f"{image},size=8M")
    try:
        result = run("--socket", str(tmp_path / "b.sock"), str(image))
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "written by a namespace of another nvme-mdev process" in lines[0]
        for spec in (f"{image},offset=8M", f"{image},ro"):
            other = start(tmp_path / "c.sock", spec)
            other.terminate()
            assert other.wait(10) == 0
    finally:
        first.terminate()
        first.wait(10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero_after_writes_are_durable(
    tmp_path: Path, image: Path, signum: int
) -> None:
    sock = tmp_path / "s.sock"
    proc = start(sock, str(image))
    with NvmeHost(str(sock)) as host:
        host.enable()
        q = host.create_queue_pair(1)
        buf = host.alloc(4096)
        host.ram.write(buf, b"\xa5" * 4096)
        assert q.command(read_write(0x01, 1, buf, 100, 8)).ok
        proc.send_signal(signum)
        assert proc.wait(15) == 0
    assert not sock.exists()
    assert image.read_bytes()[100 * 512 : 100 * 512 + 4096] == b"\xa5" * 4096
    assert os.path.getsize(image) == 16 << 20
