"""Ceph RBD images as namespaces, against a real one-node cluster (tests/ceph_cluster.py):
`nvme-mdev daemon` and `serve` as a user runs them, the project's NVMe host driver as
the guest, and the `rbd` command as the cluster's own view of what was written.

The I/O commands round trip and reach the cluster (Write with FUA, Flush, Write
Zeroes, Dataset Management); a snapshot is read-only; create= and clone= make images;
the exclusive lock keeps a second writer off (and break-lock takes it from a holder
that hangs); an image resized on the cluster reaches the guest as a Namespace
Attribute Changed event; and a cluster that loses its only OSD fails commands with a
status the guest may retry, and serves them again when it is back."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from test_daemon import DaemonProcess, aer, changed_namespaces, event

from nvme_mdev.nvme_host import (
    NvmeHost,
    dataset_management,
    dsm_range,
    flush,
    nvm_command,
    read_write,
    write_zeroes,
)

if TYPE_CHECKING:
    from ceph_cluster import CephCluster

MIB = 1 << 20
READ, WRITE = 0x02, 0x01
NS_ATTRIBUTE_CHANGED = 0x2 | (0x04 << 16)
#: Namespace Not Ready, Do Not Retry clear: the guest may retry
NOT_READY = 0x0082
DNR = 0x4000
WRITE_PROTECTED_DNR = 0x4020
#: a cluster operation's timeout in the conf of the outage tests (seconds; the
#: default, backends/rbd.py OP_TIMEOUT_S, is 10)
FAST_TIMEOUT = 3
#: how long a test waits for a command the cluster holds up (never a measurement)
PATIENCE = 90.0

_names = itertools.count()


@pytest.fixture(params=["native", "python"])
def plane(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path)
    yield d
    d.stop()


@contextlib.contextmanager
def running(where: Path) -> Iterator[DaemonProcess]:
    """A daemon of its own (as on another host), stopped at the end."""
    where.mkdir(exist_ok=True)
    d = DaemonProcess(where)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGCONT)  # (one a test stopped)
        d.stop()


def image_name(what: str) -> str:
    """A fresh image name (the cluster lives for the whole session)."""
    return f"{what}-{os.getpid()}-{next(_names)}"


def spec(cluster: CephCluster, image: str, *options: str, conf: Path | None = None) -> str:
    return ",".join(
        [
            f"rbd:{cluster.pool}/{image}",
            f"conf={conf or cluster.conf_path}",
            f"id={cluster.client_id}",
            f"keyring={cluster.keyring_path}",
            *options,
        ]
    )


def fast_conf(cluster: CephCluster, tmp_path: Path) -> Path:
    """The cluster's ceph.conf with short operation timeouts for its clients (the
    backend keeps a conf's own timeouts)."""
    text = cluster.conf_path.read_text().replace(
        "[client]\n",
        f"[client]\nrados osd op timeout = {FAST_TIMEOUT}\nrados mon op timeout = {FAST_TIMEOUT}\n",
    )
    assert "rados osd op timeout" in text
    path = tmp_path / "fast.conf"
    path.write_text(text)
    return path


def export(cluster: CephCluster, tmp_path: Path, image: str) -> bytes:
    """The image (or IMAGE@SNAP) as the cluster has it, read by the rbd command."""
    out = tmp_path / f"export-{next(_names)}"
    cluster.run("rbd", "export", f"{cluster.pool}/{image}", str(out))
    return out.read_bytes()


def import_image(cluster: CephCluster, tmp_path: Path, image: str, data: bytes) -> None:
    src = tmp_path / f"import-{next(_names)}"
    src.write_bytes(data)
    cluster.run("rbd", "import", str(src), f"{cluster.pool}/{image}")


def lockers(cluster: CephCluster, image: str) -> list[str]:
    """Who holds the image's lock, as `rbd lock ls` says (client.N)."""
    listing = cluster.run_json("rbd", "lock", "ls", f"{cluster.pool}/{image}")
    return [entry["locker"] for entry in listing]


def librbd_counters(cluster: CephCluster, pid: int) -> dict[str, int]:
    """librbd's performance counters (rd, wr, flush, discard...) of the one image
    process `pid` has open, from its client's admin socket (one per connection)."""
    (sock,) = cluster.run_dir.glob(f"client.{cluster.client_id}.{pid}.*.asok")
    dump = subprocess.run(
        ["ceph", "--admin-daemon", str(sock), "perf", "dump"],
        capture_output=True,
        check=True,
        env=cluster.env(),
        timeout=30,
    )
    (counters,) = (v for k, v in json.loads(dump.stdout).items() if k.startswith("librbd-"))
    return {k: v for k, v in counters.items() if isinstance(v, int)}


def nsze(host: NvmeHost, nsid: int) -> int:
    return int(struct.unpack_from("<Q", host.identify(0, nsid))[0])


def write(
    host: NvmeHost, nsid: int, lba: int, data: bytes, fua: bool = False, block_size: int = 512
) -> int:
    """Write `data` at `lba` from scattered guest pages (several buffers for the
    backend); the completion's status."""
    q = host.io.get(1) or host.create_queue_pair(1)
    # every other page: no two buffers are contiguous
    pages = [host.alloc(8192) for _ in range((len(data) + 4095) // 4096)]
    for i, page in enumerate(pages):
        host.ram.write(page, data[i * 4096 : (i + 1) * 4096])
    prp1, prp2 = host.prps_for_pages(pages)
    cmd = nvm_command(WRITE, nsid, lba, len(data) // block_size, prp1, prp2, fua=fua)
    return q.command(cmd, timeout=PATIENCE).status


def read(host: NvmeHost, nsid: int, lba: int, length: int) -> tuple[int, bytes]:
    q = host.io.get(1) or host.create_queue_pair(1)
    buf = host.alloc(length)
    host.ram.write(buf, b"\xee" * length)
    prp1, prp2 = host.prps(buf, length)
    done = q.command(read_write(READ, nsid, prp1, lba, length // 512, prp2), timeout=PATIENCE)
    return done.status, host.ram.read(buf, length)


# --- I/O ------------------------------------------------------------------------------


def test_io_reaches_the_cluster(
    ceph_cluster: CephCluster, daemon: DaemonProcess, tmp_path: Path, plane: str
) -> None:
    """Write (also across a 4 MiB object, and with FUA), Flush, Write Zeroes and
    Dataset Management deallocate, checked through the device and with `rbd export`;
    create=SIZE made the image."""
    name = image_name("io")
    size = 16 * MIB
    created = daemon.ok(
        "controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
        "--data-plane", plane, "--ns", spec(ceph_cluster, name, "create=16M"),
    )  # fmt: skip
    ns = created["namespaces"][0]
    assert (ns["size"], ns["blocks"], ns["path"]) == (size, size // 512, f"rbd:rbd/{name}")
    assert ns["spec"].endswith(",create=16M") and ns["failure"] is None
    info = ceph_cluster.run_json("rbd", "info", f"{ceph_cluster.pool}/{name}")
    assert info["size"] == size and "exclusive-lock" in info["features"]
    assert len(lockers(ceph_cluster, name)) == 1  # the daemon holds the lock
    rng = random.Random(7)
    first, across, durable = rng.randbytes(64 * 1024), rng.randbytes(16384), rng.randbytes(4096)
    across_lba = (4 * MIB - 8192) // 512  # half in object 0, half in object 1
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        assert nsze(host, 1) == size // 512
        assert write(host, 1, 8, first) == 0
        assert write(host, 1, across_lba, across) == 0
        # FUA and Flush flush librbd (its counters say: nothing else would show it, with
        # its cache off the data is on the OSDs either way)
        before = librbd_counters(ceph_cluster, daemon.proc.pid)
        assert write(host, 1, 20000, durable, fua=True) == 0
        after_fua = librbd_counters(ceph_cluster, daemon.proc.pid)
        assert (after_fua["wr"], after_fua["flush"]) == (before["wr"] + 1, before["flush"] + 1)
        q = host.io[1]
        assert q.command(flush(1)).ok
        assert librbd_counters(ceph_cluster, daemon.proc.pid)["flush"] == before["flush"] + 2
        expected = bytearray(size)
        for lba, data in ((8, first), (across_lba, across), (20000, durable)):
            expected[lba * 512 : lba * 512 + len(data)] = data
        assert export(ceph_cluster, tmp_path, name) == expected
        assert read(host, 1, 8, len(first)) == (0, first)
        assert read(host, 1, across_lba, len(across)) == (0, across)
        # Write Zeroes (blocks 8..23), and a deallocate (24..39) that must read zeroes
        assert q.command(write_zeroes(1, 8, 16)).ok
        ranges = host.alloc(4096)
        host.ram.write(ranges, dsm_range(24, 16) + dsm_range(across_lba + 4, 8))
        assert q.command(dataset_management(1, ranges, 2, deallocate=True)).ok
        expected[8 * 512 : 40 * 512] = bytes(32 * 512)
        lba = across_lba + 4
        expected[lba * 512 : (lba + 8) * 512] = bytes(8 * 512)
        assert read(host, 1, 0, 64 * 1024) == (0, bytes(expected[: 64 * 1024]))
        assert read(host, 1, across_lba, len(across)) == (
            0,
            bytes(expected[across_lba * 512 : across_lba * 512 + len(across)]),
        )
        assert export(ceph_cluster, tmp_path, name) == expected
        # Past the end: refused by the namespace, not sent to the cluster
        status, _ = read(host, 1, size // 512 - 1, 1024)
        assert status == 0x4080  # LBA Out of Range, DNR
    # The native plane ran them itself (librbd's asynchronous calls), all but Dataset
    # Management, which it leaves to the Python command set.
    stats = json.loads(daemon.cli("stats", "--controller", "vm", "--json").stdout)
    assert stats["slow_commands"] == (1 if plane == "native" else 0)
    (queue,) = stats["queues"]
    by_opcode = queue["by_opcode"]
    assert by_opcode["write"]["commands"] == 3 and by_opcode["flush"]["commands"] == 1


def test_many_commands_in_flight(
    ceph_cluster: CephCluster, daemon: DaemonProcess, tmp_path: Path, plane: str
) -> None:
    """64 writes in flight at once, then 64 reads of them, some with FUA, across object
    boundaries: every command completes once, with its own data, and the cluster holds
    what the guest wrote. (The native plane has them in librbd together; the Python
    plane runs them one after another.)"""
    name = image_name("qd")
    daemon.ok(
        "controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
        "--data-plane", plane, "--ns", spec(ceph_cluster, name, "create=16M"),
    )  # fmt: skip
    rng = random.Random(64)
    chunk = 16384
    slots = rng.sample(range(16 * MIB // chunk), 64)  # distinct 16 KiB places
    data = {slot: rng.randbytes(chunk) for slot in slots}
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        q = host.create_queue_pair(1, entries=128)
        bufs = {}
        commands = []
        for i, slot in enumerate(slots):
            buf = bufs[slot] = host.alloc(chunk)
            host.ram.write(buf, data[slot])
            prp1, prp2 = host.prps(buf, chunk)
            lba = slot * chunk // 512
            commands.append(nvm_command(WRITE, 1, lba, chunk // 512, prp1, prp2, fua=i % 4 == 0))
        before = librbd_counters(ceph_cluster, daemon.proc.pid)
        cids = q.submit_batch(commands)
        done = q.wait(len(cids), timeout=PATIENCE)
        assert sorted(c.cid for c in done) == sorted(cids)
        assert all(c.status == 0 for c in done)
        # one librbd write each, and a flush for each of the 16 with FUA only
        after = librbd_counters(ceph_cluster, daemon.proc.pid)
        assert (after["wr"] - before["wr"], after["flush"] - before["flush"]) == (64, 16)
        for buf in bufs.values():
            host.ram.write(buf, bytes(chunk))
        commands = []
        for slot in slots:
            prp1, prp2 = host.prps(bufs[slot], chunk)
            commands.append(read_write(READ, 1, prp1, slot * chunk // 512, chunk // 512, prp2))
        cids = q.submit_batch(commands)
        done = q.wait(len(cids), timeout=PATIENCE)
        assert sorted(c.cid for c in done) == sorted(cids)
        assert all(c.status == 0 for c in done)
        for slot in slots:
            assert host.ram.read(bufs[slot], chunk) == data[slot], slot
    image = export(ceph_cluster, tmp_path, name)
    for slot in slots:
        assert image[slot * chunk : (slot + 1) * chunk] == data[slot], slot


def test_a_snapshot_is_read_only_and_reads_the_snapshot(
    ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    """`nvme-mdev serve` with a snapshot (read-only whatever the spec says) and the
    image's head, read-only, beside it."""
    name = image_name("snap")
    old, new = b"\x5a" * (4 * MIB), b"\xa5" * (4 * MIB)
    import_image(ceph_cluster, tmp_path, name, old)
    ceph_cluster.run("rbd", "snap", "create", f"{ceph_cluster.pool}/{name}@before")
    with running(tmp_path / "writer") as d:  # the head changes after the snapshot
        d.ok("controller", "create", "w", "--socket", str(tmp_path / "w.sock"),
             "--ns", spec(ceph_cluster, name))  # fmt: skip
        with NvmeHost(str(tmp_path / "w.sock")) as host:
            host.enable()
            assert write(host, 1, 0, new[:65536]) == 0
    from test_cli import start

    # and a client whose caps only let it read (it cannot even watch the image)
    keyring = tmp_path / "reader.keyring"
    ceph_cluster.run(
        "ceph", "auth", "get-or-create", "client.reader", "mon", "profile rbd",
        "osd", f"profile rbd-read-only pool={ceph_cluster.pool}", "-o", str(keyring),
    )  # fmt: skip
    reader = f"rbd:{ceph_cluster.pool}/{name},conf={ceph_cluster.conf_path},id=reader,"
    reader += f"keyring={keyring},ro"
    sock = tmp_path / "snap.sock"
    serve = start(
        sock, spec(ceph_cluster, f"{name}@before"), spec(ceph_cluster, name, "ro"), reader
    )
    try:
        with NvmeHost(str(sock)) as host:
            host.enable()
            for nsid in (1, 2, 3):
                assert host.identify(0, nsid)[99] & 1  # NSATTR: write protected
            assert read(host, 1, 0, 65536) == (0, old[:65536])
            assert read(host, 2, 0, 65536) == (0, new[:65536])
            assert read(host, 3, 0, 65536) == (0, new[:65536])
            for nsid in (1, 2, 3):
                assert write(host, nsid, 0, new[:4096]) == WRITE_PROTECTED_DNR
            q = host.io[1]
            assert q.command(write_zeroes(1, 0, 8)).status == WRITE_PROTECTED_DNR
    finally:
        serve.send_signal(signal.SIGTERM)
        _, stderr = serve.communicate(timeout=30)
    assert serve.returncode == 0, stderr
    assert "the client may only read: opened without a watch" in stderr
    assert export(ceph_cluster, tmp_path, f"{name}@before") == old
    # A read-only namespace took no lock
    assert lockers(ceph_cluster, name) == []


def test_create_refuses_an_image_that_exists(
    ceph_cluster: CephCluster, daemon: DaemonProcess, tmp_path: Path
) -> None:
    name = image_name("exists")
    ceph_cluster.run("rbd", "create", "--size", "8M", f"{ceph_cluster.pool}/{name}")
    daemon.ok("controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"))
    error = daemon.refused("ns", "add", "vm", spec(ceph_cluster, name, "create=16M"))
    assert error.endswith(
        f"rbd:rbd/{name}: create=: the image exists (leave out create= to use it)"
    )
    assert ceph_cluster.run_json("rbd", "info", f"{ceph_cluster.pool}/{name}")["size"] == 8 * MIB
    missing = image_name("missing")
    error = daemon.refused("ns", "add", "vm", spec(ceph_cluster, missing))
    assert error.endswith(f"rbd:rbd/{missing}: no such image (create=SIZE makes one)")
    error = daemon.refused("ns", "add", "vm", f"rbd:nopool/{name},conf={ceph_cluster.conf_path}")
    assert error.endswith(f"rbd:nopool/{name}: the cluster has no pool nopool")
    assert daemon.ok("list")["controllers"][0]["namespaces"] == []


def test_a_clone_reads_its_parent_and_writes_only_itself(
    ceph_cluster: CephCluster, daemon: DaemonProcess, tmp_path: Path
) -> None:
    """clone=POOL/IMAGE@SNAP makes a copy-on-write clone for a new VM disk (the parent
    snapshot protected first where the cluster takes only clone v1)."""
    base, vm = image_name("base"), image_name("vm")
    golden = random.Random(3).randbytes(8 * MIB)
    import_image(ceph_cluster, tmp_path, base, golden)
    ceph_cluster.run("rbd", "snap", "create", f"{ceph_cluster.pool}/{base}@gold")
    daemon.ok(
        "controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
        "--ns", spec(ceph_cluster, vm, f"clone={ceph_cluster.pool}/{base}@gold"),
    )  # fmt: skip
    info = ceph_cluster.run_json("rbd", "info", f"{ceph_cluster.pool}/{vm}")
    assert (info["parent"]["image"], info["parent"]["snapshot"]) == (base, "gold")
    mine = b"\x42" * 8192
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        assert nsze(host, 1) == len(golden) // 512
        assert read(host, 1, 100, 65536) == (0, golden[100 * 512 : 100 * 512 + 65536])
        assert write(host, 1, 100, mine) == 0
        assert read(host, 1, 100, 8192) == (0, mine)
    child = bytearray(golden)
    child[100 * 512 : 100 * 512 + 8192] = mine
    assert export(ceph_cluster, tmp_path, vm) == child
    assert export(ceph_cluster, tmp_path, f"{base}@gold") == golden
    assert export(ceph_cluster, tmp_path, base) == golden
    # A second clone of the same snapshot for another VM, and one onto an image that exists
    daemon.ok("ns", "add", "vm", spec(ceph_cluster, image_name("vm"), f"clone=rbd/{base}@gold"))
    error = daemon.refused("ns", "add", "vm", spec(ceph_cluster, vm, f"clone=rbd/{base}@gold"))
    assert "the image exists (leave out clone= to use it)" in error


# --- the exclusive lock ------------------------------------------------------------------


def test_a_second_writer_is_refused_until_the_first_lets_go(
    ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    """Two daemons (as on two hosts): the second writable opener gets one line naming
    the holder; `ns remove` and a daemon's stop give the lock back."""
    name = image_name("lock")
    ceph_cluster.run("rbd", "create", "--size", "8M", f"{ceph_cluster.pool}/{name}")
    ns = spec(ceph_cluster, name)
    with running(tmp_path / "a") as a, running(tmp_path / "b") as b:
        a.ok("controller", "create", "vm", "--socket", str(tmp_path / "a.sock"), "--ns", ns)
        b.ok("controller", "create", "vm", "--socket", str(tmp_path / "b.sock"))
        (holder,) = lockers(ceph_cluster, name)
        error = b.refused("ns", "add", "vm", ns)
        assert f"rbd:rbd/{name}: locked by {holder} at 127.0.0.1:" in error
        assert "add break-lock if it is dead" in error
        # the same in `controller create` (nothing is left behind)
        error = b.refused("controller", "create", "vm2", "--socket", str(tmp_path / "x.sock"),
                          "--ns", ns)  # fmt: skip
        assert f"locked by {holder} at" in error and not (tmp_path / "x.sock").exists()
        # A reader needs no lock; a second writer in the same daemon is refused there
        b.ok("ns", "add", "vm", spec(ceph_cluster, name, "ro"))
        a.ok("controller", "create", "other", "--socket", str(tmp_path / "o.sock"))
        error = a.refused("ns", "add", "other", ns)
        assert "overlap controller vm nsid 1" in error
        # Removed: the lock is given back at once, and the other daemon takes it
        a.ok("ns", "remove", "vm", "1")
        assert lockers(ceph_cluster, name) == []
        b.ok("ns", "add", "vm", ns)
        assert lockers(ceph_cluster, name) != [holder]
        with NvmeHost(str(tmp_path / "b.sock")) as host:
            host.enable()
            assert write(host, 2, 0, b"\x17" * 4096) == 0
        assert b.stop() == 0  # a daemon that stops gives the lock back too
        assert lockers(ceph_cluster, name) == []
        a.ok("ns", "add", "vm", ns)
    assert export(ceph_cluster, tmp_path, name)[:4096] == b"\x17" * 4096


def test_break_lock_takes_the_image_from_a_hung_or_dead_holder(
    ceph_cluster: CephCluster, tmp_path: Path
) -> None:
    """A holder that hangs (stopped), or was killed a moment ago: the cluster still sees
    it watch the image, so it keeps its lock until break-lock, which blocklists it. The
    hung one, woken, can no longer write: its namespace is gone (Namespace Not Ready
    with Do Not Retry, every later command too), its controller stays."""
    name = image_name("break")
    ceph_cluster.run("rbd", "create", "--size", "8M", f"{ceph_cluster.pool}/{name}")
    conf = fast_conf(ceph_cluster, tmp_path)
    ns = spec(ceph_cluster, name, conf=conf)
    with running(tmp_path / "a") as a, running(tmp_path / "b") as b:
        a.ok("controller", "create", "vm", "--socket", str(tmp_path / "a.sock"), "--ns", ns)
        b.ok("controller", "create", "vm", "--socket", str(tmp_path / "b.sock"))
        (holder,) = lockers(ceph_cluster, name)
        a.proc.send_signal(signal.SIGSTOP)
        try:
            assert f"locked by {holder} at 127.0.0.1:" in b.refused("ns", "add", "vm", ns)
            b.ok("ns", "add", "vm", f"{ns},break-lock")
            assert lockers(ceph_cluster, name) not in ([], [holder])
            assert f"broke the lock of {holder} at" in b.log()
        finally:
            a.proc.send_signal(signal.SIGCONT)
        with NvmeHost(str(tmp_path / "b.sock")) as host:
            host.enable()
            assert write(host, 1, 0, b"\x3c" * 4096) == 0
        with NvmeHost(str(tmp_path / "a.sock")) as host:
            host.enable()
            status = write(host, 1, 0, b"\xc3" * 4096)
            assert status == NOT_READY | DNR, hex(status)  # blocklisted: gone, not fatal
            assert not host.reg32(0x1C) & 2  # CSTS.CFS
            assert read(host, 1, 0, 4096)[0] == NOT_READY | DNR
        (gone,) = a.ok("list")["controllers"][0]["namespaces"]
        assert os.strerror(errno.ESHUTDOWN) in gone["failure"], gone  # (EBLOCKLISTED)
        assert a.stop() == 0
    assert export(ceph_cluster, tmp_path, name)[:4096] == b"\x3c" * 4096
    # Killed outright, and reopened at once (before its watch expires)
    with running(tmp_path / "c") as c:
        c.ok("controller", "create", "vm", "--socket", str(tmp_path / "c.sock"), "--ns", ns)
        (killed,) = lockers(ceph_cluster, name)
        c.proc.kill()
        c.proc.wait()
    with running(tmp_path / "d") as d:
        d.ok("controller", "create", "vm", "--socket", str(tmp_path / "d.sock"))
        assert f"locked by {killed} at" in d.refused("ns", "add", "vm", ns)
        d.ok("ns", "add", "vm", f"{ns},break-lock")
        assert lockers(ceph_cluster, name) not in ([], [killed])


# --- the cluster changes under the namespace ------------------------------------------


def test_an_image_resized_on_the_cluster_reaches_the_guest(
    ceph_cluster: CephCluster, daemon: DaemonProcess, tmp_path: Path
) -> None:
    """`rbd resize` of an image in use: Namespace Attribute Changed and the new size in
    Identify Namespace, no reset, no `ns rescan`."""
    name = image_name("resize")
    daemon.ok(
        "controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
        "--ns", spec(ceph_cluster, name, "create=16M", "bs=4096"),
    )  # fmt: skip
    image = f"{ceph_cluster.pool}/{name}"
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        assert nsze(host, 1) == 4096
        daemon.ok("ns", "add", "vm", spec(ceph_cluster, name, "ro"))  # a reader watches too
        aer(host)
        ceph_cluster.run("rbd", "resize", "--size", "48M", image)
        done = event(host)
        assert (done.dw0, done.status) == (NS_ATTRIBUTE_CHANGED, 0)
        assert 1 in changed_namespaces(host)
        assert nsze(host, 1) == 12288
        deadline = time.monotonic() + PATIENCE
        while nsze(host, 2) != 98304:  # (its own watch: perhaps a moment later)
            assert time.monotonic() < deadline, "the read-only namespace kept its size"
            time.sleep(0.1)
        assert host.reg32(0x1C) & 1  # still ready: no reset
        assert write(host, 1, 12287, b"\x99" * 4096, block_size=4096) == 0  # the new last
        assert daemon.ok("list")["controllers"][0]["namespaces"][0]["size"] == 48 * MIB
        # and smaller again
        changed_namespaces(host)  # (read: the next change is told)
        assert host.admin is not None
        host.admin.submit([0x0C])
        ceph_cluster.run("rbd", "resize", "--allow-shrink", "--size", "24M", image)
        done = event(host)
        assert (done.dw0, done.status) == (NS_ATTRIBUTE_CHANGED, 0)
        assert nsze(host, 1) == 6144
    assert "nsid 1 resized, 4096 -> 12288 blocks (guest told)" in daemon.log()


def test_a_config_file_declares_rbd_namespaces(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    """`nvme-mdev daemon --config FILE.toml` with an image and a snapshot of it."""
    name = image_name("toml")
    import_image(ceph_cluster, tmp_path, name, b"\x11" * MIB)
    ceph_cluster.run("rbd", "snap", "create", f"{ceph_cluster.pool}/{name}@one")
    config = tmp_path / "nvme-mdev.toml"
    config.write_text(
        f'[[controller]]\nname = "vm"\nsocket = "{tmp_path / "vm.sock"}"\n'
        f'[[controller.namespace]]\nspec = "{spec(ceph_cluster, name)}"\n'
        f'[[controller.namespace]]\nspec = "{spec(ceph_cluster, name + "@one")}"\n'
    )
    (tmp_path / "d").mkdir()
    d = DaemonProcess(tmp_path / "d", "--config", str(config))
    try:
        one, two = d.ok("list")["controllers"][0]["namespaces"]
        assert (one["size"], one["readonly"], two["readonly"]) == (MIB, False, True)
        assert two["spec"].startswith(f"rbd:rbd/{name}@one,ro,")
        with NvmeHost(str(tmp_path / "vm.sock")) as host:
            host.enable()
            assert write(host, 1, 0, b"\x22" * 4096) == 0
            assert read(host, 2, 0, 4096) == (0, b"\x11" * 4096)
    finally:
        assert d.stop() == 0
    assert export(ceph_cluster, tmp_path, name)[:8192] == b"\x22" * 4096 + b"\x11" * 4096


def test_the_backend_itself(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    """RbdBackend without a device: the settings its connection is made with, buffers
    the guest maps read-only, more buffers than one librbd call takes, a read past the
    end of an image that shrank, and the ids that identify an image."""
    from nvme_mdev.backends.file import IOV_MAX, EndOfStorage
    from nvme_mdev.backends.rbd import OP_TIMEOUT_S, Connection, RbdBackend, RbdImage, _Cluster

    connection = Connection(str(ceph_cluster.conf_path), "admin", str(ceph_cluster.keyring_path))
    for conf, expected in (
        (ceph_cluster.conf_path, (str(OP_TIMEOUT_S), str(OP_TIMEOUT_S), "5")),
        (fast_conf(ceph_cluster, tmp_path), (str(FAST_TIMEOUT), str(FAST_TIMEOUT), "5")),
    ):
        cluster = _Cluster("test", Connection(str(conf), "admin", str(ceph_cluster.keyring_path)))
        try:
            names = ("rados_osd_op_timeout", "rados_mon_op_timeout", "client_mount_timeout")
            assert tuple(cluster._get(n) for n in names) == expected
            assert cluster._get("rbd_cache") == "false"
            assert cluster.fsid() == ceph_cluster.fsid
        finally:
            cluster.shutdown()
    name = image_name("backend")
    backend = RbdBackend(RbdImage(ceph_cluster.pool, name), connection, create=4 * MIB)
    reader = RbdBackend(RbdImage(ceph_cluster.pool, name), connection, readonly=True)
    try:
        backend.lock()
        assert backend.store_key() == reader.store_key()
        assert backend.store_key()[:3] == ("rbd", ceph_cluster.fsid, reader.store_key()[2])
        pieces = [bytes([i % 251]) * 512 for i in range(IOV_MAX + 50)]
        backend.writev(0, [memoryview(p) for p in pieces], False)  # read-only buffers
        back = [bytearray(512) for _ in pieces]
        backend.readv(0, [memoryview(b) for b in back])
        assert back == [bytearray(p) for p in pieces]
        with pytest.raises(OSError) as caught:
            backend.readv(0, [memoryview(b"read-only guest memory")])
        assert caught.value.errno == errno.EFAULT
        ceph_cluster.run(
            "rbd", "resize", "--allow-shrink", "--size", "1M", f"{ceph_cluster.pool}/{name}"
        )
        with pytest.raises(EndOfStorage):
            backend.readv(2 * MIB, [memoryview(bytearray(4096))])
        with pytest.raises(EndOfStorage):
            backend.readv(MIB - 512, [memoryview(bytearray(4096))])
        assert backend.store_size() == MIB
    finally:
        backend.close()
        reader.close()
    written = b"".join(pieces)
    assert export(ceph_cluster, tmp_path, name) == written + bytes(MIB - len(written))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("id=nobody", "cannot connect as client.nobody: Permission denied (check id= and"),
        ("conf=/nonexistent/ceph.conf", "reading /nonexistent/ceph.conf: No such file"),
        ("keyring=/nonexistent/keyring", "keyring /nonexistent/keyring: cannot read it"),
        ("conf=DEAD", "no monitor answered in 5 s (check 'mon host' in"),
    ],
)
def test_connection_errors_say_what_to_fix(
    ceph_cluster: CephCluster, tmp_path: Path, options: str, message: str
) -> None:
    from nvme_mdev.config import ConfigError, NamespaceSpec

    dead = tmp_path / "dead.conf"  # a monitor nobody answers at
    dead.write_text(f"[global]\nmon host = 127.0.0.1:1\nkeyring = {ceph_cluster.keyring_path}\n")
    text = f"rbd:{ceph_cluster.pool}/any,conf={ceph_cluster.conf_path},{options}"
    with pytest.raises(ConfigError) as caught:
        NamespaceSpec.parse(text.replace("DEAD", str(dead))).open(1)
    assert str(caught.value).startswith(f"rbd:{ceph_cluster.pool}/any: {message}")
    assert "\n" not in str(caught.value)


def test_a_lost_cluster_fails_commands_retryably_and_serves_again(
    ceph_cluster: CephCluster, daemon: DaemonProcess, tmp_path: Path, plane: str
) -> None:
    """The only OSD stops while the guest reads and writes: each command completes
    once the operation times out, with Namespace Not Ready and no Do Not Retry; the
    controller and the namespace stay; once the OSD is back the same namespace serves
    I/O again."""
    name = image_name("outage")
    conf = fast_conf(ceph_cluster, tmp_path)
    daemon.ok(
        "controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
        "--data-plane", plane, "--ns", spec(ceph_cluster, name, "create=8M", conf=conf),
    )  # fmt: skip
    before = b"\x61" * 8192
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        assert write(host, 1, 0, before) == 0
        q = host.io[1]
        buf = host.alloc(8192)
        ceph_cluster.stop_osd()
        try:
            prp1, prp2 = host.prps(buf, 8192)
            q.submit(read_write(READ, 1, prp1, 0, 16, prp2))
            q.submit(read_write(WRITE, 1, prp1, 64, 16, prp2))
            q.submit(flush(1))
            read_done, write_done, flush_done = sorted(
                q.wait(3, timeout=PATIENCE), key=lambda c: c.cid
            )
            assert (read_done.status, write_done.status) == (NOT_READY, NOT_READY)
            assert flush_done.status in (0, NOT_READY)  # (nothing was left to flush)
            assert not (read_done.dnr or write_done.dnr)
            csts = host.reg32(0x1C)
            assert csts & 1 and not csts & 2  # ready, no Controller Fatal Status
            assert host.identify(0, 1)  # the admin queue answers all along
            (ns,) = daemon.ok("list")["controllers"][0]["namespaces"]
            assert ns["failure"] is None and not ns["host_read_only"]
        finally:
            if not ceph_cluster.osd_running:
                ceph_cluster.start_osd()
        # The same namespace, no reset: the guest's retries succeed
        deadline = time.monotonic() + PATIENCE
        while (status := write(host, 1, 64, b"\x62" * 8192)) == NOT_READY:
            assert time.monotonic() < deadline, "the namespace never served again"
        assert status == 0
        assert read(host, 1, 0, 8192) == (0, before)
        assert read(host, 1, 64, 8192) == (0, b"\x62" * 8192)


# --- fused Compare and Write ------------------------------------------------------------

COMPARE = 0x05
COMPARE_FAILED = 0x4285  # Compare Failure, DNR
FUSED_FAILED = 0x4009  # Command Aborted due to Failed Fused Command, DNR


def compare_and_write(
    host: NvmeHost, nsid: int, lba: int, expected: bytes, new: bytes
) -> tuple[int, int]:
    """A fused Compare and Write of `new` where `expected` should be: both statuses."""
    q = host.io.get(1) or host.create_queue_pair(1)
    buffers = []
    for data in (expected, new):
        buf = host.alloc(len(data))
        host.ram.write(buf, data)
        buffers.append(host.prps(buf, len(data)))
    nlb = len(new) // 512
    first = nvm_command(COMPARE, nsid, lba, nlb, *buffers[0])
    second = nvm_command(WRITE, nsid, lba, nlb, *buffers[1])
    compared, written = q.compare_and_write(first, second, timeout=PATIENCE)
    return compared.status, written.status


def test_compare_and_write_is_librbds_compare_and_write(
    ceph_cluster: CephCluster, daemon: DaemonProcess, tmp_path: Path, plane: str
) -> None:
    """A pair librbd takes (one 512-byte block) runs as its compare-and-write (its
    `cmp` counter moves, `wr` does not): a match writes, a mismatch writes nothing."""
    name = image_name("caw")
    daemon.ok(
        "controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
        "--data-plane", plane, "--ns", spec(ceph_cluster, name, "create=4M"),
    )  # fmt: skip
    new, other = b"\x5a" * 512, b"\xa5" * 512
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        before = librbd_counters(ceph_cluster, daemon.proc.pid)
        assert compare_and_write(host, 1, 9, bytes(512), new) == (0, 0)
        after = librbd_counters(ceph_cluster, daemon.proc.pid)
        assert (after["cmp"], after["wr"]) == (before["cmp"] + 1, before["wr"])
        assert compare_and_write(host, 1, 9, bytes(512), other) == (COMPARE_FAILED, FUSED_FAILED)
        last = librbd_counters(ceph_cluster, daemon.proc.pid)
        assert (last["cmp"], last["wr"]) == (after["cmp"] + 1, after["wr"])
        assert read(host, 1, 9, 512) == (0, new)
    assert export(ceph_cluster, tmp_path, name)[9 * 512 : 10 * 512] == new


def test_compare_and_write_across_an_object_goes_the_generic_way(
    ceph_cluster: CephCluster, daemon: DaemonProcess, tmp_path: Path, plane: str
) -> None:
    """4 KiB objects: a pair across two of them (librbd refuses that one) is compared
    and written by the device itself, with nothing else in flight."""
    name = image_name("caw-objects")
    ceph_cluster.run(
        "rbd", "create", "--size", "1M", "--object-size", "4K", f"{ceph_cluster.pool}/{name}"
    )
    daemon.ok(
        "controller", "create", "vm", "--socket", str(tmp_path / "vm.sock"),
        "--data-plane", plane, "--ns", spec(ceph_cluster, name),
    )  # fmt: skip
    new = random.Random(3).randbytes(1024)
    with NvmeHost(str(tmp_path / "vm.sock")) as host:
        host.enable()
        before = librbd_counters(ceph_cluster, daemon.proc.pid)
        assert compare_and_write(host, 1, 7, bytes(1024), new) == (0, 0)  # bytes 3584..4607
        assert compare_and_write(host, 1, 7, bytes(1024), bytes(1024)) == (
            COMPARE_FAILED,
            FUSED_FAILED,
        )
        after = librbd_counters(ceph_cluster, daemon.proc.pid)
        assert after["cmp"] == before["cmp"]  # (refused before reaching the OSDs)
        assert after["wr"] == before["wr"] + 1
        assert read(host, 1, 7, 1024) == (0, new)
    assert export(ceph_cluster, tmp_path, name)[7 * 512 : 9 * 512] == new
