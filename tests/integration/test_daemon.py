"""`nvme-mdev daemon` as a user runs it: a process of its own, driven by the CLI
(`controller create|delete|list`, `ns add|remove`), with the project's NVMe host
driver as the guest of each controller."""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nvme_mdev.backends import uring
from nvme_mdev.control import call
from nvme_mdev.nvme_host import Completion, NvmeHost, read_write

CLI = [sys.executable, "-m", "nvme_mdev.cli"]
MIB = 1 << 20
INACTIVE_NAMESPACE_DNR = 0x4002  # Invalid Field in Command, DNR: a removed NSID is inactive
NS_ATTRIBUTE_CHANGED = 0x2 | (0x04 << 16)


class DaemonProcess:
    def __init__(self, tmp: Path, *extra: str) -> None:
        self.tmp = tmp
        self.control = tmp / "control.sock"
        self.log_path = tmp / "daemon.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*CLI, "daemon", "--control", str(self.control), *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(500):
            if self.control.exists() or self.proc.poll() is not None:
                break
            time.sleep(0.02)
        if not self.control.exists():
            self.stop()
            raise AssertionError(self.log())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args, "--control", str(self.control)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ok(self, *args: str) -> dict[str, Any]:
        """Run a CLI command with --json; it must succeed."""
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr + self.log()
        reply: dict[str, Any] = json.loads(result.stdout)
        return reply

    def refused(self, *args: str) -> str:
        """Run a CLI command that must fail: its one-line error."""
        result = self.cli(*args)
        assert result.returncode == 1, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        return lines[0]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._log.close()
        return code


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path)
    yield d
    d.stop()


def image(tmp: Path, name: str, size: int = 64 * MIB) -> Path:
    path = tmp / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def write_read(host: NvmeHost, nsid: int, lba: int, data: bytes, block_size: int = 512) -> bytes:
    q = host.io.get(1) or host.create_queue_pair(1)
    buf = host.alloc(len(data))
    host.ram.write(buf, data)
    done = q.command(read_write(0x01, nsid, buf, lba, len(data) // block_size))
    assert done.ok, hex(done.status)
    host.ram.write(buf, bytes(len(data)))
    assert q.command(read_write(0x02, nsid, buf, lba, len(data) // block_size)).ok
    return host.ram.read(buf, len(data))


def test_two_controllers_share_a_file_through_windows(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    shared = image(tmp_path, "shared.img")
    a = daemon.ok(
        "controller", "create", "vm1", "--socket", str(tmp_path / "vm1.sock"),
        "--ns", f"{shared},size=32M", "--max-io-queues", "4", "--queue-depth", "256",
    )  # fmt: skip
    assert (a["name"], a["max_io_queues"], a["queue_depth"]) == ("vm1", 4, 256)
    assert a["namespaces"][0]["extent"] == {"store": str(shared), "start": 0, "end": 32 * MIB}
    b = daemon.ok(
        "controller", "create", "vm2", "--socket", str(tmp_path / "vm2.sock"),
        "--ns", f"{shared},offset=32M", "--serial", "SECOND", "--model", "Other model",
        "--io-engine", "sync",
    )  # fmt: skip
    assert (b["serial"], b["model"]) == ("SECOND", "Other model")
    assert b["io_engine"] == "sync"
    assert a["io_engine"] == ("uring" if uring.unavailable() is None else "sync")  # auto
    assert a["serial"] != b["serial"] and a["subsystem_nqn"] != b["subsystem_nqn"]
    for name in ("vm1.sock", "vm2.sock"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(daemon.control.stat().st_mode) == 0o600
    # Each controller is its own device, with its own I/O thread.
    with NvmeHost(str(tmp_path / "vm1.sock")) as h1, NvmeHost(str(tmp_path / "vm2.sock")) as h2:
        h1.enable()
        h2.enable()
        assert h1.identify(1)[24:35] == b"nvme-mdev v"
        assert h2.identify(1)[24:35] == b"Other model"
        assert write_read(h1, 1, 0, b"\x11" * 4096) == b"\x11" * 4096
        assert write_read(h2, 1, 0, b"\x22" * 4096) == b"\x22" * 4096
        # Namespace 1 of vm1 is 32 MiB; a read past it is refused, not spilled into vm2's.
        q = h1.io[1]
        buf = h1.alloc(4096)
        assert q.command(read_write(0x02, 1, buf, 32 * MIB // 512, 1)).status == 0x4080
    data = shared.read_bytes()
    assert data[:4096] == b"\x11" * 4096 and data[32 * MIB : 32 * MIB + 4096] == b"\x22" * 4096
    listing = daemon.ok("list")["controllers"]
    assert [c["name"] for c in listing] == ["vm1", "vm2"]
    tids = {c["iothread"]["tid"] for c in listing}
    assert len(tids) == 2 and all(
        (Path(f"/proc/{daemon.proc.pid}/task") / str(t)).is_dir() for t in tids
    )
    table = daemon.cli("controller", "list")
    assert table.returncode == 0 and "vm1:" in table.stdout and "offset=32M" in table.stdout
    # Deleting a controller removes its socket and frees its bytes for another.
    assert daemon.ok("controller", "delete", "vm1")["name"] == "vm1"
    assert not (tmp_path / "vm1.sock").exists()
    c = daemon.ok(
        "controller", "create", "vm3", "--socket", str(tmp_path / "vm3.sock"),
        "--ns", f"{shared},offset=16M,size=16M",
    )  # fmt: skip
    assert c["namespaces"][0]["size"] == 16 * MIB
    assert [c["name"] for c in daemon.ok("list")["controllers"]] == ["vm2", "vm3"]


def aer(host: NvmeHost) -> None:
    """Enable Namespace Attribute Notices and leave an AER waiting (as Linux does)."""
    assert host.admin_command([0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0B, 1 << 8]).ok
    assert host.admin is not None
    host.admin.submit([0x0C])


def event(host: NvmeHost) -> Completion:
    assert host.admin is not None
    (done,) = host.admin.wait(1, timeout=30)
    return done


def changed_namespaces(host: NvmeHost) -> list[int]:
    buf = host.alloc(4096)
    c = host.admin_command([0x02, 0xFFFFFFFF, 0, 0, 0, 0, buf, 0, 0, 0, 0x04 | (1023 << 16)])
    assert c.ok
    return [n for n in struct.unpack("<1024I", host.ram.read(buf, 4096)) if n]


def active_namespaces(host: NvmeHost) -> list[int]:
    return [n for n in struct.unpack("<1024I", host.identify(2)) if n]


def test_hot_add_and_remove_on_a_live_controller(daemon: DaemonProcess, tmp_path: Path) -> None:
    first, second = image(tmp_path, "a.img"), image(tmp_path, "b.img", 16 * MIB)
    daemon.ok(
        "controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"), "--ns", str(first)
    )
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        assert write_read(host, 1, 8, b"\x01" * 512) == b"\x01" * 512
        aer(host)
        added = daemon.ok("ns", "add", "vm", str(second), "--bs", "4096")
        assert (added["nsid"], added["block_size"], added["blocks"]) == (2, 4096, 4096)
        done = event(host)
        assert (done.dw0, done.status) == (NS_ATTRIBUTE_CHANGED, 0)
        assert changed_namespaces(host) == [2]
        assert active_namespaces(host) == [1, 2]
        assert write_read(host, 2, 3, b"\x02" * 4096, 4096) == b"\x02" * 4096
        assert second.read_bytes()[3 * 4096 : 4 * 4096] == b"\x02" * 4096
        aer(host)
        removed = daemon.ok("ns", "remove", "vm", "2")
        assert removed["nsid"] == 2
        assert event(host).dw0 == NS_ATTRIBUTE_CHANGED
        assert changed_namespaces(host) == [2]
        assert active_namespaces(host) == [1]
        buf = host.alloc(4096)
        assert host.io[1].command(read_write(0x02, 2, buf, 0, 1)).status == INACTIVE_NAMESPACE_DNR
        assert write_read(host, 1, 8, b"\x03" * 512) == b"\x03" * 512
        # The nsid is free again, and a chosen one is honoured.
        assert daemon.ok("ns", "add", "vm", str(second), "--nsid", "7", "--ro")["nsid"] == 7
        assert active_namespaces(host) == [1, 7]
    text = daemon.cli("ns", "remove", "vm", "7")
    assert text.returncode == 0 and "vm nsid 7 removed" in text.stdout


def test_remove_with_io_in_flight(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A guest keeps 16 commands in flight on the namespace being removed: each one
    completes, successfully or with Invalid Field (inactive NSID); none is lost or hangs."""
    daemon.ok(
        "controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
        "--ns", str(image(tmp_path, "a.img")), "--ns", str(image(tmp_path, "b.img")),
    )  # fmt: skip
    statuses: list[int] = []
    failure: list[BaseException] = []
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        q = host.create_queue_pair(1, entries=64)
        bufs = [host.alloc(4096) for _ in range(16)]
        started = threading.Event()

        def hammer() -> None:
            try:
                # Until the removal shows: a fixed round count ran out before a slow
                # `ns remove` arrived on a loaded machine.
                deadline = time.monotonic() + 120
                round_ = 0
                while time.monotonic() < deadline:
                    round_ += 1
                    cids = q.submit_batch(
                        read_write(0x01 if i % 2 else 0x02, 2, buf, (round_ * 16 + i) % 4096, 8)
                        for i, buf in enumerate(bufs)
                    )
                    done = q.wait(len(cids), timeout=30)
                    assert sorted(c.cid for c in done) == sorted(cids)
                    statuses.extend(c.status for c in done)
                    started.set()
                    if any(c.status for c in done):
                        return  # the namespace is gone
            except BaseException as exc:
                failure.append(exc)
                started.set()

        worker = threading.Thread(target=hammer)
        worker.start()
        assert started.wait(60)
        daemon.ok("ns", "remove", "vm", "2")
        worker.join(150)
        assert not worker.is_alive() and not failure, failure
        assert set(statuses) <= {0, INACTIVE_NAMESPACE_DNR}
        assert statuses[0] == 0 and statuses[-1] == INACTIVE_NAMESPACE_DNR
        assert write_read(host, 1, 0, b"\x05" * 4096) == b"\x05" * 4096


def test_refusals_are_one_line(daemon: DaemonProcess, tmp_path: Path) -> None:
    shared = image(tmp_path, "shared.img")
    sock = str(tmp_path / "vm.sock")
    daemon.ok("controller", "create", "vm", "--socket", sock, "--ns", f"{shared},size=8M")
    daemon.ok("controller", "create", "other", "--socket", str(tmp_path / "o.sock"))
    assert "controller vm already exists" in daemon.refused(
        "controller", "create", "vm", "--socket", str(tmp_path / "x.sock")
    )
    assert "in use by a running server" in daemon.refused(
        "controller", "create", "vm2", "--socket", sock
    )
    # Overlap with another controller's writable namespace: named, with the bytes.
    message = daemon.refused("ns", "add", "other", f"{shared},offset=4M,size=8M")
    assert "controller vm nsid 1" in message and "0 B..8 MiB" in message
    assert "4 MiB..12 MiB" in message
    assert "reaches past the end" in daemon.refused(
        "ns", "add", "other", f"{shared},offset=60M,size=8M"
    )
    assert "No such file" in daemon.refused("ns", "add", "other", str(tmp_path / "missing.img"))
    assert "unknown option" in daemon.refused("ns", "add", "other", f"{shared},rw")
    assert "no controller nope (have: other, vm)" in daemon.refused(
        "ns", "add", "nope", str(shared)
    )
    assert "controller vm has no nsid 3 (has: 1)" in daemon.refused("ns", "remove", "vm", "3")
    assert "nsid 1 is in use" in daemon.refused(
        "ns", "add", "vm", f"{shared},offset=32M", "--nsid", "1"
    )
    assert "max_io_queues" in daemon.refused(
        "controller", "create", "big", "--socket", str(tmp_path / "b.sock"), "--max-io-queues", "99"
    )
    assert "no controller gone" in daemon.refused("controller", "delete", "gone")
    # Nothing was left half made.
    assert [c["name"] for c in daemon.ok("list")["controllers"]] == ["other", "vm"]
    assert sorted(p.name for p in tmp_path.glob("*.sock")) == ["control.sock", "o.sock", "vm.sock"]
    # No daemon at all.
    result = subprocess.run(
        [*CLI, "list", "--control", str(tmp_path / "none.sock")], capture_output=True, text=True
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "No such file" in result.stderr


def test_iothread_and_stats_per_controller(daemon: DaemonProcess, tmp_path: Path) -> None:
    for name in ("a", "b"):
        daemon.ok(
            "controller", "create", name, "--socket", str(tmp_path / f"{name}.sock"),
            "--ns", str(image(tmp_path, f"{name}.img")), "--iothread-cpu", "0",
        )  # fmt: skip
    listing = {c["name"]: c for c in daemon.ok("list")["controllers"]}
    assert listing["a"]["iothread"]["cpus"] == [0]
    assert os.sched_getaffinity(listing["a"]["iothread"]["tid"]) == {0}
    result = daemon.cli(
        "iothread", "--controller", "b", "--cpu", "any", "--poll-timeout-ms", "7", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["poll_timeout_ms"] == 7
    assert "which controller? (have: a, b)" in daemon.refused("stats")
    with NvmeHost(str(tmp_path / "b.sock")) as host:
        host.enable()
        write_read(host, 1, 0, bytes(4096))
    result = daemon.cli("stats", "--controller", "b", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["queues"][0]["by_opcode"]["write"]["commands"] == 1
    text = daemon.cli("stats", "--prometheus").stdout
    assert 'nvme_mdev_commands_total{controller="b",qid="1",opcode="write"} 1' in text


CONFIG = """
[[controller]]
name = "vm1"
socket = "{tmp}/vm1.sock"
max_io_queues = 2
iothread_cpu = "0"

  [[controller.namespace]]
  spec = "{tmp}/shared.img"
  size = "16M"

  [[controller.namespace]]
  spec = "null:1G"
  nsid = 5

[[controller]]
name = "vm2"
socket = "{tmp}/vm2.sock"
serial = "VM2"
poll_timeout_ms = 0
namespaces = ["{tmp}/shared.img,offset=16M,bs=4096", {{ spec = "{tmp}/shared.img", ro = true }}]
"""


def test_config_file_at_start(tmp_path: Path) -> None:
    image(tmp_path, "shared.img")
    config = tmp_path / "nvme-mdev.toml"
    config.write_text(CONFIG.format(tmp=tmp_path))
    d = DaemonProcess(tmp_path, "--config", str(config))
    try:
        vm1, vm2 = d.ok("list")["controllers"]
        assert (vm1["name"], vm1["max_io_queues"], vm1["iothread"]["cpus"]) == ("vm1", 2, [0])
        assert [(n["nsid"], n["size"]) for n in vm1["namespaces"]] == [(1, 16 * MIB), (5, 1 << 30)]
        assert (vm2["serial"], vm2["iothread"]["poll_timeout_ms"]) == ("VM2", 0)
        assert [(n["nsid"], n["block_size"], n["readonly"]) for n in vm2["namespaces"]] == [
            (1, 4096, False),
            (2, 512, True),
        ]
        with NvmeHost(str(tmp_path / "vm2.sock")) as host:
            host.enable()
            assert write_read(host, 1, 0, b"\x77" * 4096, 4096) == b"\x77" * 4096
    finally:
        assert d.stop() == 0
    assert (tmp_path / "shared.img").read_bytes()[16 * MIB : 16 * MIB + 4096] == b"\x77" * 4096
    assert not list(tmp_path.glob("*.sock"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[controller]]\nname = 'a'\n", "controller a: socket is required"),
        ("[[controller]]\nname = 'a'\nsocket = 's'\nqueues = 3\n", "unknown key 'queues'"),
        ("[controler]\n", "unknown table 'controler'"),
        ("[[controller]\n", "nvme-mdev.toml"),
        (
            "[[controller]]\nname='a'\nsocket='{tmp}/a.sock'\nnamespaces=['{tmp}/i.img']\n"
            "[[controller]]\nname='b'\nsocket='{tmp}/b.sock'\nnamespaces=['{tmp}/i.img']\n",
            "overlap controller a nsid 1",
        ),
    ],
)
def test_bad_config_stops_the_daemon_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    image(tmp_path, "i.img")
    config = tmp_path / "nvme-mdev.toml"
    config.write_text(text.format(tmp=tmp_path))
    result = subprocess.run(
        [*CLI, "daemon", "--control", str(tmp_path / "c.sock"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    # (The daemon logs what it did before the error, then undoes it.)
    errors = [line for line in result.stderr.splitlines() if line.startswith("nvme-mdev: error")]
    assert len(errors) == 1 and message in errors[0] and str(config) in errors[0], result.stderr
    assert not list(tmp_path.glob("*.sock"))


def test_a_second_daemon_on_the_same_control_socket_is_refused(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    result = subprocess.run(
        [*CLI, "daemon", "--control", str(daemon.control)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "in use" in result.stderr
    assert daemon.ok("list")["controllers"] == []
    assert call(str(daemon.control), "list")["controllers"] == []


def test_sigterm_flushes_and_removes_every_socket(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path)
    disk = image(tmp_path, "d.img")
    d.ok("controller", "create", "a", "--socket", str(tmp_path / "a.sock"), "--ns", str(disk))
    d.ok("controller", "create", "b", "--socket", str(tmp_path / "b.sock"))
    with NvmeHost(str(tmp_path / "a.sock")) as host:
        host.enable()
        write_read(host, 1, 100, b"\xa5" * 4096)
        assert d.stop() == 0
    assert disk.read_bytes()[100 * 512 : 100 * 512 + 4096] == b"\xa5" * 4096
    assert not list(tmp_path.glob("*.sock"))


def open_fds_and_threads(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return fds, threads


@pytest.mark.parametrize("plane", ["native", "python"])
def test_deleted_controllers_leave_nothing_behind(
    daemon: DaemonProcess, tmp_path: Path, plane: str
) -> None:
    """Controllers created, used by a guest and deleted, over and over: the daemon's
    fds (sockets, eventfds, io_urings, images) and threads come back to where they
    were. (A native plane referenced from its own callbacks once outlived its controller
    with its thread, io_uring and eventfds: one control client could exhaust the fds of
    every VM.)"""
    disk = image(tmp_path, "d.img")

    def round_trip(i: int) -> None:
        sock = str(tmp_path / f"c{i}.sock")
        daemon.ok("controller", "create", "c", "--socket", sock, "--ns", str(disk),
                  "--data-plane", plane)  # fmt: skip
        with NvmeHost(sock) as host:
            host.enable()
            assert write_read(host, 1, i, bytes([i]) * 512) == bytes([i]) * 512
        daemon.ok("controller", "delete", "c")

    round_trip(0)  # the first one starts what lives as long as the daemon
    baseline = open_fds_and_threads(daemon.proc.pid)
    for i in range(1, 9):
        round_trip(i)
    deadline = time.monotonic() + 30  # a client's connection thread ends on its own time
    while open_fds_and_threads(daemon.proc.pid) != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds_and_threads(daemon.proc.pid) == baseline


def test_the_daemon_lifts_its_soft_open_files_limit(tmp_path: Path) -> None:
    """Started with the usual soft limit of 1024 open files, the daemon lifts it to the
    hard limit: each VM costs it tens of fds, and 1024 would cap it at a few dozen."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 1024:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}: nothing to lift to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # inherited by the daemon
    try:
        d = DaemonProcess(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == [str(hard), str(hard)], line
    finally:
        d.stop()
