"""Mapped doorbells (`serve --mmap-doorbells`): the doorbell registers live in a page
the guest writes without trapping; the controller reads them by polling."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Host, rw

from nvme_mdev.backends.file import FileBackend
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import DOORBELL_BASE, AdminOpcode, IoOpcode, Status

OACS_DBBC = 1 << 8


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    image = tmp_path / "ns.img"
    image.write_bytes(bytes(1 << 20))
    h = Host([Namespace(1, FileBackend(str(image)))], mapped_doorbells=True)
    h.enable()
    yield h


def test_admin_and_io_commands_run_without_a_trapped_doorbell(host: Host) -> None:
    q = host.create_io_queue_pair(1)
    buf = host.buffer(4096)
    assert host.io_cmd(1, rw(IoOpcode.WRITE, 1, buf, 0, 8)).status == 0
    assert q.sq_tail == 1
    assert host.ctrl.statistics()["doorbell_traps"] == 0
    page = host.doorbell_words
    assert page is not None
    assert (page[2], page[3]) == (1, 1)  # SQ 1 tail, CQ 1 head, in memory


def test_shadow_doorbells_are_neither_offered_nor_accepted(host: Host) -> None:
    _, data = host.identify(1)
    assert struct.unpack_from("<H", data, 256)[0] & OACS_DBBC == 0
    page = host.alloc(4096)
    c = host.admin_cmd([AdminOpcode.DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, page, 0, page + 4096, 0])
    assert c.sc == Status.INVALID_OPCODE


def test_a_trapped_doorbell_write_still_reaches_the_poller(host: Host) -> None:
    # A client that does not map the page sends the doorbell as a message instead.
    q = host.create_io_queue_pair(1)
    buf = host.buffer(4096)
    host.memory.write(q.sq_addr, bytes(64))
    cid = q.submit(rw(IoOpcode.READ, 1, buf, 0, 8), ring=False)
    host.ctrl.mmio_write(DOORBELL_BASE + 8, 4, q.sq_tail)
    host.run_io()
    (done,) = q.reap()
    assert done.cid == cid and done.status == 0
    assert host.ctrl.statistics()["doorbell_traps"] == 1


def test_reset_clears_the_doorbells_and_recreated_queues_start_at_zero(host: Host) -> None:
    host.create_io_queue_pair(1)
    buf = host.buffer(4096)
    for _ in range(3):
        assert host.io_cmd(1, rw(IoOpcode.READ, 1, buf, 0, 1)).status == 0
    host.disable()
    page = host.doorbell_words
    assert page is not None and not any(page)
    host.enable()
    host.create_io_queue_pair(1)
    assert host.io_cmd(1, rw(IoOpcode.READ, 1, buf, 0, 1)).status == 0


def test_queue_recreated_without_reset_ignores_the_old_tail(host: Host) -> None:
    host.create_io_queue_pair(1)
    buf = host.buffer(4096)
    for _ in range(5):
        assert host.io_cmd(1, rw(IoOpcode.READ, 1, buf, 0, 1)).status == 0
    assert host.delete_sq(1).status == 0 and host.delete_cq(1).status == 0
    q = host.create_io_queue_pair(1)
    host.run_io()
    assert q.reap() == []  # the stale tail 5 did not become five phantom commands


def test_io_thread_polls_for_good_and_finds_admin_commands(host: Host) -> None:
    io = host.ctrl.data
    io.poll_timeout = 0.01
    io.start()
    try:
        cid = host.admin.submit([AdminOpcode.GET_FEATURES, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07])
        deadline = time.monotonic() + 5
        done = []
        while not done:
            # The admin worker is not running: process_admin runs when the I/O thread
            # reports the admin doorbell (here we stand in for the worker).
            if host.ctrl.admin_doorbell.wait(0.01):
                host.ctrl.admin_doorbell.clear()
                host.ctrl.process_admin()
            done = host.admin.reap()
            assert time.monotonic() < deadline, "admin command not noticed"
        assert done[0].cid == cid and done[0].status == 0
        q = host.create_io_queue_pair(1)
        time.sleep(0.05)  # well past the poll timeout: a thread that parked now would hang
        buf = host.buffer(4096)
        cid = q.submit(rw(IoOpcode.WRITE, 1, buf, 0, 8))
        deadline = time.monotonic() + 5
        while not (done := q.reap()):
            assert time.monotonic() < deadline, "I/O not polled"
            time.sleep(0.001)
        assert done[0].cid == cid and host.ctrl.statistics()["io_thread"]["parks"] == 0
    finally:
        io.stop()
