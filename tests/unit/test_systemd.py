"""sd_notify and LISTEN_FDS as nvme-mdev speaks them (src/nvme_mdev/systemd.py)."""

from __future__ import annotations

import array
import os
import socket
from pathlib import Path

import pytest

from nvme_mdev import systemd


def test_notify_is_silent_without_a_service_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.under_systemd()
    assert systemd.notify("READY=1") is False


def test_notify_sends_the_state_and_the_fds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        r, w = os.pipe()
        try:
            assert systemd.notify("FDSTORE=1\nFDNAME=x", [r])
            data, ancdata, _, _ = manager.recvmsg(100, socket.CMSG_SPACE(4))
            assert data == b"FDSTORE=1\nFDNAME=x"
            ((level, kind, payload),) = ancdata
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            (passed,) = array.array("i", payload)
            os.write(w, b"same pipe")
            assert os.read(passed, 100) == b"same pipe"
            os.close(passed)
        finally:
            os.close(r)
            os.close(w)
        assert systemd.notify("READY=1")
        assert manager.recv(100) == b"READY=1"


def test_a_missing_notify_socket_is_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize("pid", ["1", "x", ""])
def test_fds_meant_for_another_process_are_not_taken(
    monkeypatch: pytest.MonkeyPatch, pid: str
) -> None:
    monkeypatch.setenv("LISTEN_PID", pid)
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "a:b")
    assert systemd.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


def test_fds_for_us_are_named_and_not_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    # Put two pipes' ends at 3 and 4, as systemd would (saving what was there).
    saved = [os.dup(3), os.dup(4)]
    r, w = os.pipe()
    try:
        os.dup2(r, 3)
        os.dup2(w, 4)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "2")
        monkeypatch.setenv("LISTEN_FDNAMES", "reader")  # (the second has no name)
        assert systemd.listen_fds() == [("reader", 3), ("unknown", 4)]
        assert not os.get_inheritable(3) and not os.get_inheritable(4)
        assert "LISTEN_FDS" not in os.environ
    finally:
        os.dup2(saved[0], 3)
        os.dup2(saved[1], 4)
        for fd in (*saved, r, w):
            os.close(fd)
