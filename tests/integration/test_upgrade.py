"""Upgrade in place: `nvme-mdev upgrade` (and SIGHUP) hand every controller of a
running `serve` to a new process while the host keeps using it, over the real socket
with the project's own client: no reset, commands in flight complete, the data, the
queues, features, logs, counters and a waiting Asynchronous Event Request carry over."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nvme_mdev.control import ControlError, call
from nvme_mdev.nvme.spec import FeatureId, Reg
from nvme_mdev.nvme_host import (
    NvmeHost,
    async_event_request,
    get_log_page,
    read_write,
)
from nvme_mdev.vfio_user.device import RegionIndex

if TYPE_CHECKING:
    from ceph_cluster import CephCluster

CLI = [sys.executable, "-m", "nvme_mdev.cli"]
CONFIG = RegionIndex.CONFIG
BLOCK = 512


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Served:
    """A `serve` process, followed across upgrades by its pid."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.socket = tmp / "nvme.sock"
        self.control = f"{self.socket}.ctl"
        self.first = subprocess.Popen([*CLI, "serve", "--socket", str(self.socket), *args])
        self.pid = self.first.pid
        deadline = time.monotonic() + 30
        while not os.path.exists(self.control):
            assert self.first.poll() is None, "serve exited"
            assert time.monotonic() < deadline, "no control socket"
            time.sleep(0.02)

    def upgrade(self) -> dict[str, object]:
        old = self.pid
        result = call(self.control, "upgrade", timeout=120)
        assert isinstance(result, dict)
        self.pid = int(result["pid"])
        assert self.pid != old and alive(self.pid)
        if old == self.first.pid:
            assert self.first.wait(timeout=30) == 0  # it exits once the new one serves
        else:
            deadline = time.monotonic() + 30
            while alive(old):
                assert time.monotonic() < deadline, f"pid {old} did not exit"
                time.sleep(0.02)
        return result

    def stop(self) -> None:
        if alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.first.poll() is None:
            self.first.kill()
            self.first.wait()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    return path


def pattern(lba: int, blocks: int, tag: int) -> bytes:
    return b"".join(
        (lba + i).to_bytes(8, "little") * (BLOCK // 16) + bytes([tag]) * (BLOCK // 2)
        for i in range(blocks)
    )


def doorbell_args(doorbells: str) -> list[str]:
    """serve's options for a host that rings `doorbells`: trapped, shadow or mapped."""
    return ["--mmap-doorbells"] if doorbells == "mapped" else []


def enable(host: NvmeHost, doorbells: str) -> None:
    """Enable the controller, with its doorbells as `doorbells` says (doorbell_args)."""
    if doorbells == "mapped":
        host.map_doorbells()
    host.enable()
    if doorbells == "shadow":
        host.enable_shadow_doorbells()


@pytest.mark.parametrize("doorbells", ["trapped", "shadow", "mapped"])
@pytest.mark.parametrize("plane", ["native", "python"])
def test_upgrade_is_invisible_to_the_host(
    tmp_path: Path, image: Path, plane: str, doorbells: str
) -> None:
    served = Served(tmp_path, *doorbell_args(doorbells), "--data-plane", plane,
                    "--poll-timeout-ms", "20", str(image))  # fmt: skip
    try:
        with NvmeHost(str(served.socket)) as host:
            enable(host, doorbells)
            queues = [host.create_queue_pair(qid, entries=32) for qid in (1, 2)]
            # State the host set that a fresh controller would not have.
            assert host.set_features(FeatureId.INTERRUPT_COALESCING, 0x0203).ok
            assert host.set_features(FeatureId.ASYNC_EVENT_CONFIG, 0x100).ok
            error_count = _error_log_count(host)
            bad = queues[0].command(read_write(0x02, 1, host.alloc(4096), 1 << 40, 1))
            assert bad.status & 0x7FF == 0x080  # LBA Out of Range: an error log entry
            assert _error_log_count(host) == error_count + 1
            aer = host.admin.submit(async_event_request()) if host.admin else -1

            buffers = {}
            for round_ in range(4):
                # Commands in flight on both queues while the new process takes over.
                submitted = []
                for i, q in enumerate(queues):
                    for j in range(8):
                        lba = (round_ * 16 + i * 8 + j) * 8
                        buf = buffers.setdefault(lba, host.alloc(4096))
                        host.ram.write(buf, pattern(lba, 8, round_))
                        submitted.append((q, q.submit(read_write(0x01, 1, buf, lba, 8))))
                if round_ < 3:
                    result = served.upgrade()
                    assert float(str(result["paused_ms"])) < 10_000
                for q in queues:
                    done = q.wait(8)
                    assert all(c.ok for c in done), [hex(c.status) for c in done]
                assert host.reg32(Reg.CSTS) & 0b11 == 0b01  # ready, never fatal, no reset

            # The statistics count every command, whichever process completed it.
            stats = call(served.control, "stats", {"controller": "nvme-mdev"})
            io = [q for q in stats["queues"] if q["qid"] != 0]
            assert sum(q["commands"] for q in io) == 1 + 4 * 16
            assert sum(q["errors"] for q in io) == 1
            assert sum(q["by_opcode"]["write"]["commands"] for q in io) == 4 * 16

            # Everything written reads back through the third process.
            for lba in buffers:
                back = host.alloc(4096)
                assert queues[lba % 2].command(read_write(0x02, 1, back, lba, 8)).ok
                round_ = lba // 128
                assert host.ram.read(back, 4096) == pattern(lba, 8, round_), lba
            assert image.read_bytes()[: 8 * BLOCK] == pattern(0, 8, 0)

            c, _ = host.get_features(FeatureId.INTERRUPT_COALESCING)
            assert c.ok and c.dw0 == 0x0203
            assert _error_log_count(host) == error_count + 1
            # The AER the first process held completes in the third: a namespace attach.
            extra = tmp_path / "extra.img"
            extra.write_bytes(bytes(1 << 20))
            call(served.control, "namespace_add", {"spec": str(extra)})
            assert host.admin is not None
            (event,) = host.admin.wait(1)
            assert event.cid == aer and event.ok
            assert event.dw0 & 0x7 == 0x2  # Notice: Namespace Attribute Changed
    finally:
        served.stop()


def _error_log_count(host: NvmeHost) -> int:
    buf = host.alloc(4096)
    assert host.admin_command(get_log_page(0x01, buf, 64)).ok
    return int.from_bytes(host.ram.read(buf, 8), "little")


# --- a successor that cannot take over: the old process keeps serving ---------------------

_FAKE = """#!{python}
import sys, time, socket
from nvme_mdev.handover.document import Channel
channel = Channel(socket.socket(fileno=int(sys.argv[-1])))
time.sleep({delay})
channel.send({{"reads": {reads}, "version": "fake"}})
if {crash}:
    channel.receive(30)  # the state document, then a crash during take-over
    sys.exit(3)
channel.receive(30)
"""


def fake_successor(tmp: Path, name: str, reads: list[int], crash: bool, delay: float = 0) -> str:
    path = tmp / name
    path.write_text(_FAKE.format(python=sys.executable, reads=reads, crash=crash, delay=delay))
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    ("reads", "crash", "message"),
    [
        ([99], False, "reads state versions [99], this one writes version 1"),
        ([1], True, "the new process exited (3) during take-over"),
    ],
)
def test_a_failed_takeover_leaves_the_old_process_serving(
    tmp_path: Path, image: Path, reads: list[int], crash: bool, message: str
) -> None:
    from nvme_mdev.control import ControlError

    served = Served(tmp_path, "--poll-timeout-ms", "20", str(image))
    successor = fake_successor(tmp_path, "successor", reads, crash)
    try:
        with NvmeHost(str(served.socket)) as host:
            host.enable()
            q = host.create_queue_pair(1, entries=32)
            buf = host.alloc(4096)
            host.ram.write(buf, pattern(0, 8, 7))
            cids = [q.submit(read_write(0x01, 1, buf, 8 * i, 8)) for i in range(8)]
            with pytest.raises(ControlError, match=re.escape(message)):
                call(served.control, "upgrade", {"executable": successor}, timeout=60)
            done = q.wait(8)
            assert sorted(c.cid for c in done) == sorted(cids) and all(c.ok for c in done)
            assert served.first.poll() is None and served.pid == served.first.pid
            back = host.alloc(4096)
            assert q.command(read_write(0x02, 1, back, 56, 8)).ok
            assert host.ram.read(back, 4096) == pattern(0, 8, 7)
            assert host.reg32(Reg.CSTS) & 0b11 == 0b01
            # ... and a real upgrade still works afterwards.
            served.upgrade()
            assert q.command(read_write(0x02, 1, back, 0, 8)).ok
    finally:
        served.stop()


def test_one_upgrade_at_a_time(tmp_path: Path, image: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from nvme_mdev.control import ControlError

    served = Served(tmp_path, str(image))
    slow = fake_successor(tmp_path, "slow", [99], False, delay=2)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call, served.control, "upgrade", {"executable": slow}, 60)
            time.sleep(0.5)
            with pytest.raises(ControlError, match="an upgrade is already running"):
                call(served.control, "upgrade", {"executable": slow}, timeout=60)
            with pytest.raises(ControlError, match="reads state versions"):
                first.result()
        assert served.first.poll() is None
    finally:
        served.stop()


def test_cli_upgrade_and_sighup(tmp_path: Path, image: Path) -> None:
    """`nvme-mdev upgrade` prints one line; SIGHUP to the daemon does the same. The
    Prometheus endpoint stays on its port, served by each process in turn."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    served = Served(tmp_path, str(image), "--metrics", f"127.0.0.1:{port}")

    def scrape() -> str:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as reply:
            return str(reply.read().decode())

    try:
        assert "nvme_mdev_io_thread_parks_total" in scrape()
        out = subprocess.run(
            [*CLI, "upgrade", "--control", served.control],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("upgraded: pid ") and "guests paused" in out.stdout
        new = int(out.stdout.split()[2])
        assert served.first.wait(timeout=30) == 0 and alive(new)
        assert "nvme_mdev_io_thread_parks_total" in scrape()  # the new process answers
        os.kill(new, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while alive(new):
            assert time.monotonic() < deadline, "SIGHUP did not hand over"
            time.sleep(0.05)
        listed = call(served.control, "list")
        assert listed["controllers"][0]["socket"] == str(served.socket)
        served.pid = _pid_of_socket_owner(served.control)
        assert "nvme_mdev_io_thread_parks_total" in scrape()
    finally:
        served.stop()


def _pid_of_socket_owner(path: str) -> int:
    """The pid of the process that serves the control socket now."""
    return int(call(path, "list")["pid"])


@pytest.mark.parametrize("plane", ["native", "python"])
def test_a_request_the_worker_died_handling_is_answered_by_its_successor(
    tmp_path: Path, image: Path, plane: str
) -> None:
    """The worker dies while it handles a request: a write to config space, which waits
    for its checkpoint to reach the supervisor (stopped, its socket full). The request
    was read and not answered: the successor handles it again and answers it, and the
    client, which waited, goes on with no error."""
    served = Served(tmp_path, "--supervised", "--data-plane", plane, str(image))
    supervisor = served.first.pid
    try:
        with NvmeHost(str(served.socket)) as host:
            host.enable()
            q = host.create_queue_pair(1, entries=16)
            command = host.client.region_read(CONFIG, 4, 2)
            worker = _pid_of_socket_owner(served.control)
            os.kill(supervisor, signal.SIGSTOP)
            try:
                # Each write is checkpointed; once the supervisor's socket is full, the
                # next one waits (up to CHECKPOINT_WAIT, 2 s) in the worker.
                started = [time.monotonic()]
                writes: list[BaseException | None] = []
                killed = threading.Event()

                def write() -> None:
                    try:
                        while not killed.is_set():
                            started[0] = time.monotonic()
                            host.client.region_write(CONFIG, 4, command)
                        writes.append(None)
                    except BaseException as exc:
                        writes.append(exc)

                writer = threading.Thread(target=write, daemon=True)
                writer.start()
                while time.monotonic() - started[0] < 0.3:  # one write is stuck
                    assert writer.is_alive(), writes
                    time.sleep(0.01)
                os.kill(worker, signal.SIGKILL)
                killed.set()
            finally:
                os.kill(supervisor, signal.SIGCONT)
            writer.join(120)
            assert writes == [None]  # every write answered: the stuck one by the successor
            assert _pid_of_socket_owner(served.control) != worker
            assert host.client.region_read(CONFIG, 4, 2) == command
            buf = host.alloc(4096)
            host.ram.write(buf, pattern(0, 8, 9))
            assert q.command(read_write(0x01, 1, buf, 0, 8), timeout=60).ok
            assert host.reg32(Reg.CSTS) & 0b11 == 0b01
        served.first.send_signal(signal.SIGTERM)
        assert served.first.wait(timeout=60) == 0
    finally:
        served.stop()


def test_an_upgrade_under_a_supervisor_renews_its_standby(tmp_path: Path, image: Path) -> None:
    """The standby successor has the code installed when it started: after an upgrade
    (which may bring new code) another one takes its place, and a crash goes to that."""
    served = Served(tmp_path, "--supervised", str(image))
    try:
        worker = _pid_of_socket_owner(served.control)
        before = _standby_of(served.first.pid, worker)
        upgraded = int(call(served.control, "upgrade", timeout=120)["pid"])
        after = _standby_of(served.first.pid, upgraded, before)
        # The new worker checkpoints over the channel the old one shared: a change
        # made now is what the successor after a crash starts from.
        extra = tmp_path / "extra.img"
        extra.write_bytes(bytes(1 << 20))
        call(served.control, "namespace_add", {"spec": str(extra)})
        deadline = time.monotonic() + 30
        while alive(before):
            assert time.monotonic() < deadline, "the old standby stays"
            time.sleep(0.05)
        time.sleep(1)  # (it has started Python by then, most likely: not needed)
        os.kill(upgraded, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (serving := _pid_of_socket_owner_or_none(served.control)) in (None, upgraded):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert serving == after
        (listed,) = call(served.control, "list")["controllers"]
        assert [n["nsid"] for n in listed["namespaces"]] == [1, 2]
        served.first.send_signal(signal.SIGTERM)
        assert served.first.wait(timeout=60) == 0
    finally:
        served.stop()


def _pid_of_socket_owner_or_none(path: str) -> int | None:
    try:
        return _pid_of_socket_owner(path)
    except ControlError:
        return None


def _standby_of(supervisor: int, worker: int, *not_these: int) -> int:
    """The successor a supervisor keeps waiting for its worker's crash (it starts one
    STANDBY_DELAY after the worker)."""
    deadline = time.monotonic() + 30
    while True:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in (worker, *not_these):
                continue
            try:
                status = (entry / "status").read_text()
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"\nPPid:\t{supervisor}\n" in status and b"takeover" in command:
                return int(entry.name)
        assert time.monotonic() < deadline, "no standby successor"
        time.sleep(0.05)


# --- the new process refuses a document it cannot take -----------------------------------


@pytest.mark.parametrize("damage", ["version", "truncated", "fds"])
def test_takeover_refuses_a_bad_document(damage: str) -> None:
    import socket as socket_module

    from nvme_mdev.handover.document import Channel, new_document

    ours, theirs = socket_module.socketpair()
    proc = subprocess.Popen(
        [*CLI, "takeover", "--fd", str(theirs.fileno())], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    channel = Channel(ours)
    try:
        hello, _ = channel.receive(60)
        assert hello["reads"] == [1]
        doc = new_document(0, control={}, metrics=None, storage=[], controllers=[])
        if damage == "version":
            doc["version"] = 99
            channel.send(doc)
            answer, _ = channel.receive(30)
            assert "state version 99" in answer["refused"]
        elif damage == "fds":
            doc["fds"] = 3
            channel.send(doc)
            answer, _ = channel.receive(30)
            assert "names 3 fds, 0 came" in answer["refused"]
        else:
            ours.sendall(struct_header(1000, 0) + b'{"format": "nvme-mdev-st')
            ours.shutdown(socket_module.SHUT_WR)
        assert proc.wait(timeout=30) == 1
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def struct_header(length: int, fds: int) -> bytes:
    import struct

    return struct.pack("<II", length, fds)


def test_the_old_process_stays_held_after_the_handover(tmp_path: Path, image: Path) -> None:
    """Between the commit and its exit the old process must do nothing: its controllers
    stay held even once the handover's objects are garbage (a collected held() would
    resume its threads next to the successor's, and both would run the same queues)."""
    import gc
    import threading

    from nvme_mdev.config import NamespaceSpec
    from nvme_mdev.control import ControlServer
    from nvme_mdev.daemon import ControllerSettings, Daemon, NamespaceRequest
    from nvme_mdev.handover import upgrade as handover
    from nvme_mdev.nvme.identity import ControllerConfig

    daemon = Daemon()
    daemon.create_controller(
        ControllerSettings(
            "vm",
            str(tmp_path / "vm.sock"),
            ControllerConfig(),
            namespaces=(NamespaceRequest(NamespaceSpec.parse(str(image))),),
        )
    )
    control = ControlServer(str(tmp_path / "control.sock"), daemon.methods())
    control.start()
    device = daemon.controllers["vm"].device
    handed = handover.upgrade(handover.Served(daemon, control, None))
    try:
        gc.collect()
        taken: list[bool] = []
        probe = threading.Thread(
            target=lambda: taken.append(device.controller.lock.acquire(blocking=False))
        )
        probe.start()
        probe.join()
        assert taken == [False]  # still held by the handover
        assert call(str(tmp_path / "control.sock"), "list")["controllers"][0]["name"] == "vm"
    finally:
        os.kill(handed.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while alive(handed.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        handover._kept_until_exit.pop().close()
        control.stop()
        daemon.stop()


def test_a_daemon_hands_over_every_controller_and_its_locks(tmp_path: Path, image: Path) -> None:
    """Two controllers on windows of one file, one with a namespace added at run time:
    all of them come back in the new process with the same namespaces, and the writer
    locks moved with their descriptions (another process still may not write those
    bytes, even for a moment in between)."""
    control = tmp_path / "control.sock"
    daemon = subprocess.Popen([*CLI, "daemon", "--control", str(control)])
    pid = daemon.pid
    try:
        deadline = time.monotonic() + 30
        while not control.exists():
            assert time.monotonic() < deadline and daemon.poll() is None
            time.sleep(0.02)
        for name, window in (("a", "size=8M"), ("b", "offset=8M")):
            call(
                str(control),
                "controller_create",
                {
                    "name": name,
                    "socket": str(tmp_path / f"{name}.sock"),
                    "namespaces": [f"{image},{window}"],
                },
            )
        extra = tmp_path / "extra.img"
        extra.write_bytes(bytes(1 << 20))
        call(str(control), "namespace_add", {"controller": "b", "spec": str(extra)})
        before = call(str(control), "list")

        with NvmeHost(str(tmp_path / "a.sock")) as host:
            host.enable()
            q = host.create_queue_pair(1)
            buf = host.alloc(4096)
            host.ram.write(buf, pattern(0, 8, 1))
            assert q.command(read_write(0x01, 1, buf, 0, 8)).ok
            result = call(str(control), "upgrade", timeout=120)
            pid = int(result["pid"])
            assert daemon.wait(timeout=30) == 0
            back = host.alloc(4096)
            assert q.command(read_write(0x02, 1, back, 0, 8)).ok
            assert host.ram.read(back, 4096) == pattern(0, 8, 1)

        # The host's disconnect resets controller "a": wait until the new process saw it.
        deadline = time.monotonic() + 30
        while (after := call(str(control), "list"))["controllers"][0]["enabled"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert after.pop("pid") == pid != before.pop("pid")
        for listing in (before, after):
            for c in listing["controllers"]:
                c["iothread"].pop("tid")  # (a thread of the new process)
        assert after == before
        assert [len(c["namespaces"]) for c in after["controllers"]] == [1, 2]
        # The lock on the first 8 MiB is the new process's now: a second process that
        # writes them is refused; one that writes other bytes is not.
        refused = subprocess.run(
            [*CLI, "serve", "--socket", str(tmp_path / "c.sock"), f"{image},size=4M"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode != 0
        assert "written by a namespace of another nvme-mdev process" in refused.stderr
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_an_rbd_namespace_moves_with_its_lock(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    """An RBD image's exclusive lock cannot travel as an fd: the old process flushes and
    gives it back while held, the new one takes it before it says ready. Data written
    before reads back after, the lock has one holder (the new client), and a second
    writer is still refused."""
    name = f"upgrade-{os.getpid()}"
    pool = ceph_cluster.pool
    ceph_cluster.run("rbd", "create", "--size", "8M", f"{pool}/{name}")
    spec = ",".join(
        [
            f"rbd:{pool}/{name}",
            f"conf={ceph_cluster.conf_path}",
            f"id={ceph_cluster.client_id}",
            f"keyring={ceph_cluster.keyring_path}",
        ]
    )

    def lockers() -> list[str]:
        listing = ceph_cluster.run_json("rbd", "lock", "ls", f"{pool}/{name}")
        return [entry["locker"] for entry in listing]

    served = Served(tmp_path, "--poll-timeout-ms", "20", spec)
    try:
        with NvmeHost(str(served.socket)) as host:
            host.enable()
            q = host.create_queue_pair(1)
            buf = host.alloc(4096)
            host.ram.write(buf, pattern(0, 8, 5))
            assert q.command(read_write(0x01, 1, buf, 0, 8), timeout=90).ok
            (before,) = lockers()
            served.upgrade()
            (after,) = lockers()
            assert after != before
            back = host.alloc(4096)
            assert q.command(read_write(0x02, 1, back, 0, 8), timeout=90).ok
            assert host.ram.read(back, 4096) == pattern(0, 8, 5)
            assert q.command(read_write(0x01, 1, buf, 8, 8), timeout=90).ok
        other = subprocess.run(
            [*CLI, "serve", "--socket", str(tmp_path / "other.sock"), spec],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert other.returncode != 0 and f"locked by {after}" in other.stderr
    finally:
        served.stop()


# --- crash recovery: a supervisor replaces a worker that dies -----------------------------

INTERRUPTED = 0x21  # Command Interrupted (Generic Command Status), Do Not Retry clear


@pytest.mark.parametrize("doorbells", ["shadow", "mapped"])
@pytest.mark.parametrize("plane", ["native", "python"])
def test_a_killed_worker_is_replaced_and_the_host_goes_on(
    tmp_path: Path, image: Path, plane: str, doorbells: str
) -> None:
    """SIGKILL the worker with commands in flight, three times: every command completes,
    successfully or with Command Interrupted (and then succeeds when retried, as a host
    retries it); no reset; every write acknowledged reads back; features and a waiting
    Asynchronous Event Request survive."""
    served = Served(tmp_path, *doorbell_args(doorbells), "--supervised", "--data-plane", plane,
                    "--poll-timeout-ms", "20", str(image))  # fmt: skip
    try:
        with NvmeHost(str(served.socket)) as host:
            enable(host, doorbells)
            queues = [host.create_queue_pair(qid, entries=64) for qid in (1, 2)]
            assert host.set_features(FeatureId.INTERRUPT_COALESCING, 0x0105).ok
            assert host.set_features(FeatureId.ASYNC_EVENT_CONFIG, 0x100).ok
            assert host.admin is not None
            aer = host.admin.submit(async_event_request())
            acknowledged: dict[int, int] = {}  # lba: round
            interrupted = 0
            for round_ in range(3):
                worker = _pid_of_socket_owner(served.control)
                assert worker != served.first.pid
                standby = _standby_of(served.first.pid, worker)
                time.sleep(1)  # (it has started Python by then, most likely: not needed)
                submitted = {}
                for i, q in enumerate(queues):
                    for j in range(16):
                        lba = (i * 16 + j) * 8
                        buf = host.alloc(4096)
                        host.ram.write(buf, pattern(lba, 8, round_))
                        cid = q.submit(read_write(0x01, 1, buf, lba, 8))
                        submitted[(q.qid, cid)] = (q, lba, buf)
                os.kill(worker, signal.SIGKILL)
                for q in queues:
                    for c in q.wait(16, timeout=60):
                        _, lba, buf = submitted.pop((q.qid, c.cid))
                        if c.status & 0x7FF == INTERRUPTED:
                            interrupted += 1
                            assert not c.status & 0x4000  # Do Not Retry clear
                            assert q.command(read_write(0x01, 1, buf, lba, 8), timeout=60).ok
                        else:
                            assert c.ok, hex(c.status)
                        acknowledged[lba] = round_
                assert not submitted
                assert host.reg32(Reg.CSTS) & 0b11 == 0b01
                # The standby successor took over (it had started Python already).
                assert _pid_of_socket_owner(served.control) == standby
            for lba, round_ in acknowledged.items():
                back = host.alloc(4096)
                assert queues[0].command(read_write(0x02, 1, back, lba, 8), timeout=60).ok
                assert host.ram.read(back, 4096) == pattern(lba, 8, round_), lba
            c, _ = host.get_features(FeatureId.INTERRUPT_COALESCING)
            assert c.ok and c.dw0 == 0x0105
            extra = tmp_path / "extra.img"
            extra.write_bytes(bytes(1 << 20))
            call(served.control, "namespace_add", {"spec": str(extra)})
            (event,) = host.admin.wait(1, timeout=30)
            assert event.cid == aer and event.ok
            print("commands completed Command Interrupted:", interrupted)
        assert served.first.poll() is None  # the supervisor
        served.first.send_signal(signal.SIGTERM)
        assert served.first.wait(timeout=60) == 0
    finally:
        served.stop()
