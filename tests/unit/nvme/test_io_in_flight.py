"""Commands in flight in the io_uring engine: many at once, completed out of order,
CQ slots reserved for them, and what reset, SQ deletion, hot remove and Abort do
to them, in the Python data plane. Real io_uring on real files; the engine below only
holds completions back (or shuffles them) to make the interesting orders happen."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PAGE, Host, NamespaceFactory, rw, with_dnr

from nvme_mdev.backends import uring
from nvme_mdev.backends.file import FileBackend
from nvme_mdev.backends.io_engine import Transfer
from nvme_mdev.dataplane.python import PythonDataPlane
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import AdminOpcode, IoOpcode, Status

pytestmark = pytest.mark.skipif(uring.unavailable() is not None, reason="no io_uring here")

READ, WRITE = IoOpcode.READ, IoOpcode.WRITE


class HeldEngine(uring.UringEngine):
    """Completions are held back while `hold` is set, then handed over all at once in
    a shuffled order (a drain, reap(wait=True), always gets them)."""

    def __init__(self) -> None:
        super().__init__(64)
        self.hold = True
        self.held: list[Transfer] = []
        self.rng = random.Random(7)

    def reap(self, wait: bool = False) -> list[Transfer]:
        self.held += super().reap(wait)
        if self.hold and not wait:
            return []
        while self._outstanding:  # everything the kernel still owes
            self.held += super().reap(True)
        out, self.held = self.held, []
        self.rng.shuffle(out)
        return out


@pytest.fixture
def engine() -> Iterator[HeldEngine]:
    e = HeldEngine()
    yield e
    e.close()


def make_host(ns: Namespace, engine: HeldEngine, cq_entries: int | None = None) -> Host:
    h = Host([ns], engine=engine, plane="python")
    h.enable()
    h.create_io_queue_pair(1, entries=64, cq_entries=cq_entries)
    return h


def plane(h: Host) -> PythonDataPlane:
    assert isinstance(h.ctrl.data, PythonDataPlane)
    return h.ctrl.data


def one_pass(h: Host) -> int:
    """One pass over the queues, leaving what is in flight in flight."""
    return plane(h).process_pass()


def fd_of(ns: Namespace) -> int:
    assert isinstance(ns.backend, FileBackend)
    return ns.backend.fd


def submit_writes(h: Host, count: int, block: int = 512) -> dict[int, bytes]:
    """`count` one-block FUA writes of distinct data; {cid: data}. (FUA: a buffered
    write without it is done in place, see UringEngine._queue.)"""
    q = h.io[1]
    sent = {}
    for i in range(count):
        buf = h.buffer(PAGE)
        data = bytes([i + 1]) * block
        h.memory.write(buf, data)
        sent[q.submit(rw(WRITE, 1, buf, i, 1, dw12_flags=1 << 30), ring=False)] = data
    q.ring_sq()
    return sent


def test_many_in_flight_complete_out_of_order(
    file_ns: NamespaceFactory, engine: HeldEngine
) -> None:
    ns = file_ns()
    h = make_host(ns, engine)
    sent = submit_writes(h, 40)
    assert one_pass(h) + one_pass(h) == 40  # (two arbitration bursts)
    assert plane(h).in_flight == 40
    assert h.io[1].peek() == []  # nothing posted before the data is written
    assert plane(h).cqs[1].reserved == 40
    engine.hold = False
    one_pass(h)
    done = h.io[1].reap()
    assert sorted(c.cid for c in done) == sorted(sent)
    assert [c.cid for c in done] != sorted(sent)  # shuffled: posted as they came
    assert all(c.status == 0 and c.sq_id == 1 for c in done)
    assert plane(h).in_flight == 0 and plane(h).cqs[1].reserved == 0
    for i, data in enumerate(sent.values()):
        assert os.pread(fd_of(ns), 512, i * 512) == data
    counters = h.ctrl.counters
    assert counters.host_write_commands == 40 and counters.bytes_written == 40 * 512


def test_reads_in_flight_land_in_guest_memory(
    file_ns: NamespaceFactory, engine: HeldEngine
) -> None:
    ns = file_ns(fill=bytes(range(256)) * 2)
    h = make_host(ns, engine)
    q = h.io[1]
    bufs = {}
    for i in range(32):
        buf = h.buffer(PAGE)
        bufs[q.submit(rw(READ, 1, buf, i, 8), ring=False)] = buf
    q.ring_sq()
    one_pass(h)
    engine.hold = False
    one_pass(h)
    done = q.reap()
    assert len(done) == 32 and all(c.status == 0 for c in done)
    expected = bytes(range(256)) * 16
    for cid, buf in bufs.items():
        assert h.memory.read(buf, 4096) == expected, cid
    assert h.ctrl.counters.host_read_commands == 32


def test_cq_slots_are_reserved_for_commands_in_flight(
    file_ns: NamespaceFactory, engine: HeldEngine
) -> None:
    h = make_host(file_ns(), engine, cq_entries=4)  # 3 usable slots
    submit_writes(h, 8)
    assert one_pass(h) == 3  # one slot per command in flight, then full
    assert plane(h).cqs[1].is_full()
    assert one_pass(h) == 0
    engine.hold = False
    one_pass(h)  # posts the 3 (no room was given away), fetches nothing
    q = h.io[1]
    first = q.reap()
    assert len(first) == 3
    total = len(first)
    while total < 8:
        one_pass(h)
        plane(h).drain()
        got = q.reap()
        assert got, "no progress"
        total += len(got)
    assert total == 8


def test_reset_waits_for_transfers_and_posts_nothing(
    file_ns: NamespaceFactory, engine: HeldEngine
) -> None:
    ns = file_ns()
    h = make_host(ns, engine)
    sent = submit_writes(h, 16)
    one_pass(h)
    assert plane(h).in_flight == 16
    cq = h.io[1]
    h.disable()  # CC.EN = 0
    assert plane(h).in_flight == 0
    assert cq.peek() == []
    for i, data in enumerate(sent.values()):  # the kernel finished before the reset did
        assert os.pread(fd_of(ns), 512, i * 512) == data


def test_sq_deletion_completes_commands_in_flight_first(
    file_ns: NamespaceFactory, engine: HeldEngine
) -> None:
    h = make_host(file_ns(), engine)
    sent = submit_writes(h, 10)
    one_pass(h)
    c = h.delete_sq(1)
    assert c.status == 0
    done = h.io[1].reap()
    assert sorted(x.cid for x in done) == sorted(sent) and all(x.status == 0 for x in done)
    assert plane(h).in_flight == 0
    assert h.delete_cq(1).status == 0


def test_hot_remove_completes_commands_in_flight_first(
    file_ns: NamespaceFactory, engine: HeldEngine
) -> None:
    h = make_host(file_ns(), engine)
    sent = submit_writes(h, 5)
    one_pass(h)
    ns = h.ctrl.detach_namespace(1)
    assert plane(h).in_flight == 0
    done = h.io[1].reap()
    assert sorted(x.cid for x in done) == sorted(sent) and all(x.status == 0 for x in done)
    ns.backend.close()


def test_abort_of_a_command_in_flight_is_not_aborted(
    file_ns: NamespaceFactory, engine: HeldEngine
) -> None:
    h = make_host(file_ns(), engine)
    (cid,) = submit_writes(h, 1)
    one_pass(h)
    assert plane(h).in_flight == 1
    c = h.admin_cmd([AdminOpcode.ABORT, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 | (cid << 16)])
    assert c.status == 0 and c.dw0 & 1  # not aborted
    plane(h).drain()
    (done,) = h.io[1].reap()
    assert done.cid == cid and done.status == 0


def test_kernel_errors_map_as_the_synchronous_path(tmp_path: Path, engine: HeldEngine) -> None:
    """An error the kernel reports for a transfer in flight completes the command as the
    synchronous path would (nvme/media_errors.py): EBADF means the storage is gone."""
    path = tmp_path / "img"
    path.write_bytes(bytes(1 << 20))
    backend = FileBackend(str(path))
    h = make_host(Namespace(1, backend), engine)
    engine.hold = False
    buf = h.buffer(PAGE)
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 1)).status == 0
    os.close(backend.fd)
    backend.fd = os.open(path, os.O_RDONLY)  # writes now fail in the kernel: EBADF
    c = h.io_cmd(1, rw(WRITE, 1, buf, 0, 1))
    assert c.status == with_dnr(Status.NAMESPACE_NOT_READY)
    assert h.ctrl.counters.host_errors == 1 and h.ctrl.counters.media_errors == 0
    # The namespace failed: later commands fail at once, without reaching the kernel.
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1)).status == with_dnr(Status.NAMESPACE_NOT_READY)
    assert h.ctrl.counters.host_write_commands == 1 and h.ctrl.counters.host_read_commands == 0
    backend.close()


def test_short_read_is_finished_synchronously(tmp_path: Path, engine: HeldEngine) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"z" * (1 << 20))
    backend = FileBackend(str(path))
    h = make_host(Namespace(1, backend), engine)
    engine.hold = False
    os.truncate(path, 1024)  # the file shrank under the namespace: reads end early
    buf = h.buffer(PAGE)
    c = h.io_cmd(1, rw(READ, 1, buf, 0, 2))
    assert c.status == 0
    c = h.io_cmd(1, rw(READ, 1, buf, 0, 4))  # past the end of what the file now holds
    assert c.status == with_dnr(Status.LBA_OUT_OF_RANGE)
    backend.close()


def test_fua_write_is_a_dsync_write(file_ns: NamespaceFactory, engine: HeldEngine) -> None:
    h = make_host(file_ns(), engine)
    engine.hold = False
    taken: list[bool] = []
    writev = engine.writev

    def spy(
        backend: object, offset: int, views: list[memoryview], length: int, fua: bool, ctx: object
    ) -> Transfer:
        taken.append(fua)
        return writev(backend, offset, views, length, fua, ctx)

    engine.writev = spy  # type: ignore[method-assign]
    buf = h.buffer(PAGE)
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 1, dw12_flags=1 << 30)).status == 0
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 1)).status == 0
    assert taken == [True, False]


def test_io_thread_does_not_park_with_commands_in_flight(tmp_path: Path) -> None:
    image = tmp_path / "ns.img"
    image.write_bytes(bytes(1 << 20))
    h = Host([Namespace(1, FileBackend(str(image)))], engine="uring", plane="python")
    h.enable()
    q = h.create_io_queue_pair(1, entries=64)
    io = plane(h)
    io.poll_timeout = 0.01
    io.start()
    try:
        for round_ in range(20):
            cids = set()
            for i in range(32):
                cids.add(q.submit(rw(WRITE, 1, h.scratch, i, 1), ring=False))
            q.ring_sq()
            got: list[int] = []
            for _ in range(5000):
                got += [c.cid for c in q.reap()]
                if len(got) == 32:
                    break
                time.sleep(0.001)
            assert sorted(got) == sorted(cids), round_
    finally:
        io.stop()
    assert plane(h).in_flight == 0
