"""DMA_UNMAP while the controller is enabled (the client's memory transactions: a
region unmapped, and the same IOVA range mapped again onto other memory): from the
unmap on, the device never touches the old memory. Queues (admin and I/O), shadow
doorbells and data buffers moved to new memory are used there; a queue left unmapped
makes the controller fatal (no completion can be posted for what cannot be fetched)
instead of going on through the old mapping.

Guest RAM here is what the transport really maps: a memfd, mmap'd per DMA region by
`DmaMemory`, unmapped inside the device's quiesce exactly as the server does it."""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections.abc import Iterator

import harness
import pytest
from harness import Host, HostQueue, NamespaceFactory, rw

from nvme_mdev.nvme.controller import Controller
from nvme_mdev.nvme.spec import DOORBELL_BASE, SQE, AdminOpcode, IoOpcode, Reg
from nvme_mdev.vfio_user.memory import DmaMemory, DmaRegion

CHUNK = 64 << 10  # one DMA region
RAM = 2 << 20
BASE = 0x100000
SPARE_CHUNKS = 16
READ, WRITE = IoOpcode.READ, IoOpcode.WRITE
CSTS_CFS = 2
#: what the transport logs when it unmaps memory the device still holds a view of
STALE_VIEW = "unmapped while a view of it is held"


class GuestRam(DmaMemory):
    """Guest RAM at [BASE, BASE + size) as the client maps it: one memfd, one DMA region
    per 64 KiB chunk (so that one can be unmapped, or moved), and spare room in the
    memfd for memory a range is moved to. `raw()` reads the memfd itself: whatever a
    chunk of it was, mapped or not."""

    def __init__(self, size: int = RAM, base: int = BASE) -> None:
        super().__init__()
        self.base = base
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        total = size + SPARE_CHUNKS * CHUNK
        os.ftruncate(self.fd, total)
        self._whole = mmap.mmap(self.fd, total)
        #: (Host.alloc checks its length)
        self.ram = memoryview(self._whole)[:size]
        self._spare = size
        self._removed: list[DmaRegion] = []
        #: where each mapped chunk lives in the memfd
        self.offsets: dict[int, int] = {}
        for off in range(0, size, CHUNK):
            self._map_chunk(base + off, off)

    def _map_chunk(self, iova: int, offset: int) -> None:
        self.map(iova, CHUNK, True, True, os.dup(self.fd), offset)
        self.offsets[iova] = offset

    def u32(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 4), "little")

    def put_u32(self, addr: int, value: int) -> None:
        self.write(addr, value.to_bytes(4, "little"))

    def raw(self, offset: int, length: int = CHUNK) -> bytes:
        return bytes(self._whole[offset : offset + length])

    def raw_write(self, offset: int, data: bytes) -> None:
        self._whole[offset : offset + len(data)] = data

    def dma_unmap(self, ctrl: Controller, iova: int, munmap: bool = True) -> int:
        """DMA_UNMAP of the chunk at `iova`, as the server does it: inside the device's
        quiesce (VirtualController._quiesced), and munmapped before it ends (unless
        `munmap` is False: then by `munmap_removed()`). Returns where the chunk was in
        the memfd."""
        with ctrl.lock, ctrl.data.paused():
            ctrl.release_memory_views()
            self._removed = self.unmap(iova, CHUNK)
            if munmap:
                self.munmap_removed()
        return self.offsets.pop(iova)

    def munmap_removed(self) -> None:
        DmaMemory.release(self._removed)
        self._removed = []

    def move(self, ctrl: Controller, iova: int) -> int:
        """The client moves the chunk at `iova` to other memory (same contents, another
        mapping): DMA_UNMAP, then DMA_MAP of the same range onto a copy. The old mapping
        goes only once the new one exists, so that the new one cannot take its address
        (a device still using the old host address must not work by chance). Returns
        where the old memory is in the memfd."""
        old = self.dma_unmap(ctrl, iova, munmap=False)
        new = self._spare
        assert new + CHUNK <= len(self._whole), "no spare memory left"
        self._spare += CHUNK
        self.raw_write(new, self.raw(old))
        self._map_chunk(iova, new)
        self.munmap_removed()
        return old

    def close(self) -> None:
        DmaMemory.release(self.unmap_all())
        self.ram.release()
        with contextlib.suppress(BufferError):  # a view still held (a failed test)
            self._whole.close()
        os.close(self.fd)


@pytest.fixture
def ram_host(
    file_ns: NamespaceFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Host, GuestRam]]:
    """An enabled controller (one 1 MiB namespace) whose guest RAM is a GuestRam."""
    made: list[GuestRam] = []

    def guest_ram(size: int, base: int) -> GuestRam:
        made.append(GuestRam(size, base))
        return made[-1]

    with monkeypatch.context() as m:
        m.setattr(harness, "FakeGuestMemory", guest_ram)
        h = Host([file_ns()], memory_size=RAM)
    h.enable()
    yield h, made[0]
    h.ctrl.reset()  # the queues let go of their views
    made[0].close()


def chunk(h: Host) -> int:
    """A whole chunk of its own (a DMA region by itself)."""
    pad = -(h._next - BASE) % CHUNK
    if pad:
        h.alloc(pad)
    return h.alloc(CHUNK)


def queue_pair(h: Host, qid: int, sq_addr: int, cq_addr: int, entries: int = 16) -> HostQueue:
    q = HostQueue(h, qid, entries)
    q.sq_addr, q.cq_addr = sq_addr, cq_addr
    assert h.create_cq(qid, entries, cq_addr).status == 0
    assert h.create_sq(qid, entries, qid, sq_addr).status == 0
    h.io[qid] = q
    return q


def storage(h: Host, lba: int, blocks: int = 8) -> bytes:
    path = h.ctrl.namespaces[1].backend.description
    with open(path, "rb") as f:
        f.seek(lba * 512)
        return f.read(blocks * 512)


def planted_write(buf: int, slba: int) -> bytes:
    """A Write of 8 blocks to `slba` from `buf`, CID 0xBEEF: what a device that still
    read the old SQ memory would find there and run."""
    dw = rw(WRITE, 1, buf, slba, 8)
    dw[0] |= 0xBEEF << 16
    return SQE.pack(*dw, *([0] * (16 - len(dw))))


def test_io_queues_and_buffers_moved_are_used_in_their_new_memory(
    ram_host: tuple[Host, GuestRam], caplog: pytest.LogCaptureFixture
) -> None:
    h, ram = ram_host
    sq_at, cq_at, buf = chunk(h), chunk(h), chunk(h)
    q = queue_pair(h, 1, sq_at, cq_at)
    h.memory.write(buf, b"\x11" * 4096)
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 8)).status == 0

    caplog.set_level(logging.WARNING)
    old = {at: ram.move(h.ctrl, at) for at in (sq_at, cq_at, buf)}
    assert STALE_VIEW not in caplog.text  # no view of the old memory outlived the unmap
    # What a device still reading the old SQ would run: a Write over LBA 100.
    for slot in range(16):
        ram.raw_write(old[sq_at] + slot * 64, planted_write(buf, 100))
    ram.raw_write(old[buf], b"\xee" * 4096)
    before = {at: ram.raw(off) for at, off in old.items()}

    # The guest goes on as if nothing happened: round the queue more than once.
    for i in range(20):
        h.memory.write(buf, bytes(4096))
        c = h.io_cmd(1, rw(READ, 1, buf, 0, 8))
        assert c.status == 0 and c.sq_head == (i + 2) % 16
        assert h.memory.read(buf, 4096) == b"\x11" * 4096  # into the new buffer
    h.memory.write(buf, b"\x22" * 4096)
    assert h.io_cmd(1, rw(WRITE, 1, buf, 8, 8)).status == 0
    assert storage(h, 8) == b"\x22" * 4096  # taken from the new buffer
    assert storage(h, 100) == bytes(4096)  # nothing from the old SQ ran
    for at, off in old.items():
        assert ram.raw(off) == before[at], f"old memory of {at:#x} was touched"
    assert q.qid == 1 and not h.read_reg(Reg.CSTS) & CSTS_CFS


def test_admin_queues_moved_are_used_in_their_new_memory(
    ram_host: tuple[Host, GuestRam], caplog: pytest.LogCaptureFixture
) -> None:
    h, ram = ram_host
    assert h.admin.sq_addr < BASE + CHUNK and h.admin.cq_addr < BASE + CHUNK  # chunk 0
    assert h.admin_cmd([AdminOpcode.KEEP_ALIVE]).status == 0
    caplog.set_level(logging.WARNING)
    old = ram.move(h.ctrl, BASE)
    assert STALE_VIEW not in caplog.text
    before = ram.raw(old)
    for _ in range(40):  # round the 32-entry admin queues
        c, data = h.identify(1)
        assert c.status == 0 and data[24:33] == b"nvme-mdev"  # into the new scratch buffer
    assert ram.raw(old) == before


def test_shadow_doorbells_moved_are_used_in_their_new_memory(
    ram_host: tuple[Host, GuestRam],
) -> None:
    h, ram = ram_host
    pages = chunk(h)
    shadow, eventidx = pages, pages + 4096
    c = h.admin_cmd([AdminOpcode.DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, shadow, 0, eventidx, 0])
    assert c.status == 0
    # The guest only stores its tails and heads in the shadow page (the real doorbell
    # is never rung), so that the tails run_io() finds can only come from that page,
    # old or new; with no I/O thread, nothing waits for a doorbell.
    assert h.ctrl.data.native_id is None
    q = h.create_io_queue_pair(1, entries=16)
    q.shadow_sq, q.shadow_cq = shadow + 8, shadow + 12
    q.submit([IoOpcode.FLUSH, 1])
    assert h.run_io() == 1 and len(q.reap()) == 1
    old = ram.move(h.ctrl, pages)
    before = ram.raw(old)
    for _ in range(3):
        q.submit([IoOpcode.FLUSH, 1])  # tails only in the new shadow page
    assert h.run_io() == 3
    assert [c.status for c in q.reap()] == [0, 0, 0]
    assert not h.ctrl.data.enable_notifications()
    assert h.memory.u32(eventidx + 8) == 4  # armed in the new EventIdx page
    assert ram.raw(old) == before


def test_an_unmapped_submission_queue_is_fatal_not_read_through_the_old_mapping(
    ram_host: tuple[Host, GuestRam],
) -> None:
    h, ram = ram_host
    sq_at, cq_at, buf = chunk(h), chunk(h), chunk(h)
    q = queue_pair(h, 1, sq_at, cq_at)
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 8)).status == 0
    old = ram.dma_unmap(h.ctrl, sq_at)
    for slot in range(16):
        ram.raw_write(old + slot * 64, planted_write(buf, 100))
    h.memory.write(buf, b"\xee" * 4096)
    before = ram.raw(old)
    # The guest rings for a command it could not even write.
    h.ctrl.mmio_write(DOORBELL_BASE + 8, 4, 2)
    h.run_io()
    assert h.read_reg(Reg.CSTS) & CSTS_CFS
    assert q.peek() == []
    assert storage(h, 100) == bytes(4096)
    assert ram.raw(old) == before
    h.disable()
    h.enable()
    q = queue_pair(h, 1, chunk(h), chunk(h))  # fresh memory for the new queues
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 8)).status == 0


def test_an_unmapped_completion_queue_is_fatal_not_written_through_the_old_mapping(
    ram_host: tuple[Host, GuestRam],
) -> None:
    h, ram = ram_host
    sq_at, cq_at, buf = chunk(h), chunk(h), chunk(h)
    q = queue_pair(h, 1, sq_at, cq_at)
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 8)).status == 0
    old = ram.dma_unmap(h.ctrl, cq_at)
    before = ram.raw(old)
    q.submit(rw(READ, 1, buf, 0, 8))
    h.run_io()
    assert h.read_reg(Reg.CSTS) & CSTS_CFS
    assert ram.raw(old) == before  # the completion was not posted into freed memory
    h.disable()
    h.enable()
    q = queue_pair(h, 1, chunk(h), chunk(h))  # fresh memory for the new queues
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 8)).status == 0
