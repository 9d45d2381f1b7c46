"""Shadow doorbells in guest memory the client gave no fd for: reachable only through
DMA_READ / DMA_WRITE messages (vfio-user), so no view of it exists. Doorbell Buffer
Config takes such pages; the controller reads the guest's shadow tails and heads with
DMA_READ and writes its EventIdx with DMA_WRITE, on both data planes (the native one
through the Python memory it falls back to), its I/O thread's park included."""

from __future__ import annotations

from collections.abc import Iterator

import harness
import pytest
from harness import (
    PAGE,
    Completion,
    Host,
    HostQueue,
    NamespaceFactory,
    completions,
    parks,
    rw,
    wait_for,
)

from nvme_mdev.nvme.spec import AdminOpcode, IoOpcode
from nvme_mdev.vfio_user.memory import DmaMemory
from nvme_mdev.vfio_user.protocol import Bytes

BASE = 0x100000
SIZE = 4 << 20


class MessageRam(DmaMemory):
    """Guest RAM mapped without an fd: the device reaches it only by messages, answered
    here (the client's side) from a bytearray and logged. The guest's own loads and
    stores of single words (shadow doorbells, EventIdx) go to the bytearray directly."""

    def __init__(self, size: int = SIZE, base: int = BASE) -> None:
        super().__init__()
        self.base = base
        self.ram = bytearray(size)
        #: ("read" | "write", address, length) of every DMA message
        self.messages: list[tuple[str, int, int]] = []
        self.attach(self)
        self.map(base, size, True, True)

    # --- the client's side of DMA_READ / DMA_WRITE -----------------------------------------

    def dma_read(self, addr: int, length: int) -> bytes:
        self.messages.append(("read", addr, length))
        off = addr - self.base
        return bytes(self.ram[off : off + length])

    def dma_write(self, addr: int, data: Bytes) -> None:
        self.messages.append(("write", addr, len(data)))
        off = addr - self.base
        self.ram[off : off + len(data)] = data

    # --- the guest's own accesses -------------------------------------------------------------

    def u32(self, addr: int) -> int:
        off = addr - self.base
        return int.from_bytes(self.ram[off : off + 4], "little")

    def put_u32(self, addr: int, value: int) -> None:
        off = addr - self.base
        self.ram[off : off + 4] = value.to_bytes(4, "little")

    def count(self, kind: str, addr: int) -> int:
        return sum(1 for k, a, n in self.messages if k == kind and a <= addr < a + n)


@pytest.fixture
def msg_host(
    file_ns: NamespaceFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Host, MessageRam]]:
    made: list[MessageRam] = []

    def message_ram(size: int, base: int) -> MessageRam:
        made.append(MessageRam(size, base))
        return made[-1]

    with monkeypatch.context() as m:
        m.setattr(harness, "FakeGuestMemory", message_ram)
        h = Host([file_ns()], memory_size=SIZE)
    h.enable()
    yield h, made[0]
    h.ctrl.reset()


def dbbc(h: Host) -> tuple[int, int]:
    shadow, eventidx = h.alloc(PAGE), h.alloc(PAGE)
    c = h.admin_cmd([AdminOpcode.DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, shadow, 0, eventidx, 0])
    assert c.status == 0
    return shadow, eventidx


def shadow_queue(h: Host, shadow: int, qid: int = 1, cq_entries: int | None = None) -> HostQueue:
    """An I/O queue pair whose tail and head the guest only stores in the shadow page,
    never ringing the real doorbell: for tests that drive the data plane themselves
    (host.run_io()), with no I/O thread that a value nobody rings for could strand."""
    assert h.ctrl.data.native_id is None, "an I/O thread runs: use use_shadow_doorbells"
    q = h.create_io_queue_pair(qid, entries=16, cq_entries=cq_entries)
    q.shadow_sq, q.shadow_cq = shadow + 8 * qid, shadow + 8 * qid + 4
    return q


def wait_done(q: HostQueue, count: int) -> list[Completion]:
    done = completions(q, count)
    assert len(done) == count
    return done


def wait_until_parked(h: Host, ram: MessageRam, q: HostQueue, parks_before: int) -> None:
    """Until the I/O thread has parked (its `parks` counter passed `parks_before`)
    with q's EventIdx armed at the tail it consumed, so that the guest's next
    submission rings. (Polling, the thread keeps EventIdx one behind the tail.)"""
    slot = q.eventidx_sq
    assert slot is not None
    wait_for(lambda: parks(h) > parks_before and ram.u32(slot) == q.sq_tail)


def test_doorbell_buffer_config_on_message_memory_seeds_by_messages(
    msg_host: tuple[Host, MessageRam],
) -> None:
    h, ram = msg_host
    assert h.memory.view(h.scratch, PAGE, True) is None  # no view: messages only
    before = h.create_io_queue_pair(1, entries=16)
    assert h.io_cmd(1, [IoOpcode.FLUSH, 1]).status == 0  # SQ 1 tail and CQ 1 head: 1
    shadow, eventidx = h.alloc(PAGE), h.alloc(PAGE)
    ram.ram[shadow - BASE : shadow - BASE + PAGE] = b"\xff" * PAGE
    ram.messages.clear()
    c = h.admin_cmd([AdminOpcode.DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, shadow, 0, eventidx, 0])
    assert c.status == 0
    # The existing queue's slots are seeded with where it stands, by DMA_WRITE.
    assert (ram.u32(shadow + 8), ram.u32(shadow + 12)) == (1, 1)
    assert ram.u32(eventidx + 8) == 1
    assert ram.count("write", shadow + 8) and ram.count("write", eventidx + 8)
    # A queue created afterwards too.
    after = shadow_queue(h, shadow, qid=2)
    assert ram.u32(shadow + 16) == 0 and ram.count("write", shadow + 16)
    assert before.qid == 1 and after.qid == 2


def test_shadow_tails_and_heads_are_read_by_messages(
    msg_host: tuple[Host, MessageRam],
) -> None:
    h, ram = msg_host
    shadow, eventidx = dbbc(h)
    q = shadow_queue(h, shadow, cq_entries=4)
    buf = h.buffer(PAGE)
    h.memory.write(buf, b"\x5a" * PAGE)
    assert h.io_cmd(1, rw(IoOpcode.WRITE, 1, buf, 0, 8)).status == 0
    ram.messages.clear()
    for _ in range(5):
        q.submit(rw(IoOpcode.READ, 1, buf, 0, 8))  # tails into the shadow only
    assert h.run_io() == 3  # a 4-entry CQ holds 3
    assert ram.count("read", shadow + 8)  # the tail, by DMA_READ
    done = q.reap()  # the head, into the shadow only
    assert [c.status for c in done] == [0, 0, 0]
    assert h.run_io() == 2  # the new head was read (by DMA_READ) and made room
    assert ram.count("read", shadow + 12)
    assert [c.status for c in q.reap()] == [0, 0]
    # EventIdx: armed before parking, one behind the tail while polling, by DMA_WRITE.
    ram.messages.clear()
    assert not h.ctrl.data.enable_notifications()
    assert ram.u32(eventidx + 8) == q.sq_tail and ram.count("write", eventidx + 8)
    h.ctrl.data.suppress_notifications()
    assert ram.u32(eventidx + 8) == q.sq_tail - 1
    q.submit(rw(IoOpcode.READ, 1, buf, 0, 8))
    assert h.ctrl.data.enable_notifications()  # a submission it has not seen


def test_io_thread_parks_and_wakes_with_shadow_doorbells_over_messages(
    msg_host: tuple[Host, MessageRam],
) -> None:
    """A guest that rings the real doorbell only when EventIdx asks (Linux's rule):
    every command completes, the thread parks between bursts, arming EventIdx by
    DMA_WRITE."""
    h, ram = msg_host
    shadow, eventidx = dbbc(h)
    q = h.create_io_queue_pair(1, entries=16)
    q.use_shadow_doorbells(shadow, eventidx)
    h.ctrl.data.poll_timeout = 0.001
    ram.messages.clear()  # (the seeding's DMA_WRITEs)
    h.ctrl.data.start()
    try:
        buf = h.buffer(PAGE)
        for i in range(60):
            before = parks(h)
            cid = q.submit(rw(IoOpcode.READ, 1, buf, 0, 1))  # the real doorbell if asked
            (c,) = wait_done(q, 1)
            assert c.cid == cid and c.status == 0
            if i % 4 == 0:  # the guest stays away until the thread has parked
                wait_until_parked(h, ram, q, before)
        assert parks(h) >= 15
        assert ram.count("write", eventidx + 8)  # EventIdx armed by DMA_WRITE
        assert not h.ctrl.registers.fatal
    finally:
        h.ctrl.data.stop()
