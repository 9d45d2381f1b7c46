"""The supervisor may die too: under systemd it keeps its last checkpoint in the service
manager's file descriptor store, and the supervisor systemd starts next recovers from it.

systemd's side is played by a notify socket that does what systemd does with the
messages (READY, MAINPID, FDSTORE with FDNAME and FDPOLL, FDSTOREREMOVE) and a launcher
that starts the next supervisor as systemd would: the stored fds from 3 on, named in
LISTEN_FDNAMES, for the pid in LISTEN_PID."""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_upgrade import alive

from nvme_mdev.control import ControlError, call
from nvme_mdev.nvme.spec import FeatureId, Reg
from nvme_mdev.nvme_host import NvmeHost, read_write

CLI = [sys.executable, "-m", "nvme_mdev.cli"]
INTERRUPTED = 0x21  # Command Interrupted, Do Not Retry clear

#: starts a program as systemd starts a service that has stored fds
_LAUNCH = r"""
import fcntl, os, sys
stored = [(name, int(fd)) for name, fd in (a.split("=") for a in sys.argv[1].split(","))]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1000) for _, fd in stored]  # (out of 3.. 's way)
for _, fd in stored:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(stored)),
                  LISTEN_FDNAMES=":".join(name for name, _ in stored))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


class ServiceManager:
    """systemd's notify socket, as far as a Type=notify service with an fd store sees it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.store: dict[str, list[int]] = {}
        self.states: list[dict[str, str]] = []
        self.changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(253 * 4))
            except OSError:
                return
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
            state = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.changed:
                name = state.get("FDNAME", "stored")
                if state.get("FDSTORE") == "1":
                    # (a stored socket whose peer closed would be dropped unless FDPOLL=0)
                    assert state.get("FDPOLL") == "0", state
                    self.store.setdefault(name, []).extend(fds)
                else:
                    for fd in fds:
                        os.close(fd)
                if state.get("FDSTOREREMOVE") == "1":
                    for fd in self.store.pop(name, []):
                        os.close(fd)
                self.states.append(state)
                self.changed.notify_all()

    def stored(self) -> int:
        """How many FDSTORE messages came so far."""
        with self.changed:
            return sum(1 for s in self.states if s.get("FDSTORE") == "1")

    def sync(self) -> None:
        """Until every message sent before this call has been taken (a datagram of our
        own behind them)."""
        marker = f"TEST-SYNC={time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(marker.encode(), str(self.path))
        name, value = marker.split("=")
        with self.changed:
            assert self.changed.wait_for(lambda: {name: value} in self.states, 30)

    def take_store(self) -> list[tuple[str, int]]:
        """The stored fds, for the next start (the store keeps none of its own)."""
        with self.changed:
            fds = [(name, fd) for name, held in self.store.items() for fd in held]
            self.store.clear()
            return fds

    def close(self) -> None:
        self.sock.close()
        for held in self.store.values():
            for fd in held:
                os.close(fd)


def test_a_new_supervisor_recovers_from_the_fd_store(tmp_path: Path) -> None:
    """Both the supervisor and its worker die (SIGKILL, as systemd kills what is left of
    a failed service); the next supervisor, given the fd store, goes on: commands that
    were in flight complete (or are interrupted and succeed when retried), acknowledged
    writes read back, features stay set, the controller never resets; and it supervises:
    a worker killed after that is replaced as well."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    sock = tmp_path / "nvme.sock"
    control = f"{sock}.ctl"
    manager = ServiceManager(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": str(manager.path)}
    serve = ["serve", "--socket", str(sock), "--supervised", "--poll-timeout-ms", "20", str(image)]
    first = subprocess.Popen([*CLI, *serve], env=env)
    second: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(control):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with NvmeHost(str(sock)) as host:
            host.enable()
            q = host.create_queue_pair(1, entries=64)
            before = manager.stored()
            assert host.set_features(FeatureId.INTERRUPT_COALESCING, 0x0105).ok
            # The change was kept in the store before its completion came: no waiting.
            manager.sync()
            assert manager.stored() > before
            assert list(manager.store) == [f"nvme-mdev-checkpoint-{manager.stored()}"]
            assert not any("MAINPID" in s for s in manager.states)  # the supervisor is main
            assert any(s.get("READY") == "1" for s in manager.states)

            written: dict[int, int] = {}
            for round_, kill_supervisor in enumerate((True, False)):
                worker = int(call(control, "list")["pid"])
                submitted = {}
                for j in range(16):
                    lba = j * 8
                    buf = host.alloc(4096)
                    host.ram.write(buf, bytes([round_ + 1, j]) * 2048)
                    submitted[q.submit(read_write(0x01, 1, buf, lba, 8))] = (lba, buf)
                if kill_supervisor:
                    os.kill(first.pid, signal.SIGKILL)
                    first.wait()
                    os.kill(worker, signal.SIGKILL)
                    while alive(worker):
                        time.sleep(0.01)
                    stored = manager.take_store()
                    # (and one before it, if the supervisor died before removing it)
                    names = [name for name, _ in stored]
                    assert f"nvme-mdev-checkpoint-{manager.stored()}" in names, names
                    second = subprocess.Popen(
                        [sys.executable, "-c", _LAUNCH,
                         ",".join(f"{name}={fd}" for name, fd in stored),
                         "-m", "nvme_mdev.cli", *serve],
                        env=env, pass_fds=[fd for _, fd in stored],
                    )  # fmt: skip
                    for _, fd in stored:
                        os.close(fd)
                else:
                    os.kill(worker, signal.SIGKILL)
                for c in q.wait(16, timeout=60):
                    lba, buf = submitted.pop(c.cid)
                    if c.status & 0x7FF == INTERRUPTED:
                        assert not c.status & 0x4000
                        assert q.command(read_write(0x01, 1, buf, lba, 8), timeout=60).ok
                    else:
                        assert c.ok, hex(c.status)
                    written[lba] = round_ + 1
                assert host.reg32(Reg.CSTS) & 0b11 == 0b01  # ready, no fatal status
                deadline = time.monotonic() + 30
                while int(call(control, "list")["pid"]) == worker:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            for lba, tag in written.items():
                back = host.alloc(4096)
                assert q.command(read_write(0x02, 1, back, lba, 8), timeout=60).ok
                assert host.ram.read(back, 4096) == bytes([tag, lba // 8]) * 2048
            c, _ = host.get_features(FeatureId.INTERRUPT_COALESCING)
            assert c.ok and c.dw0 == 0x0105
        assert second is not None and second.poll() is None
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if os.path.exists(control):  # (a worker left behind by a failure)
            with contextlib.suppress(ControlError, OSError):
                os.kill(int(call(control, "list", timeout=2)["pid"]), signal.SIGKILL)
        manager.close()
