"""A small NVMe host driver over the vfio-user client: the guest's part, in Python.

It enables the controller, creates queues in a memfd of "guest RAM", submits
commands and waits for their completions on MSI-X eventfds. Tests and benchmarks
drive devices with it; users can script a device with it.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .guest_memory import words32
from .nvme.spec import CQE, DOORBELL_BASE, SQE, Reg
from .vfio_user.client import GuestRam, VfioUserClient

PAGE = 4096
BAR0 = 0
DOORBELL_BUFFER_CONFIG = 0x7C

_U32 = struct.Struct("<I")


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Linux's nvme_dbbuf_need_event: a shadowed doorbell must also be rung for real
    iff the device's EventIdx lies in [old, new) (16-bit wrapping arithmetic)."""
    return ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class NvmeHostError(Exception):
    pass


@dataclass(frozen=True)
class Completion:
    dw0: int
    sq_head: int
    sq_id: int
    cid: int
    status: int  # Status Field (SCT << 8 | SC, DNR bit 14), phase removed

    @property
    def ok(self) -> bool:
        return self.status == 0


class HostQueuePair:
    def __init__(self, host: NvmeHost, qid: int, entries: int, vector: int) -> None:
        self.host, self.qid, self.entries, self.vector = host, qid, entries, vector
        self.sq_addr = host.alloc(entries * 64)
        self.cq_addr = host.alloc(entries * 16)
        self.sq_tail = 0
        self.cq_head = 0
        self.phase = 1
        self._next_cid = 0
        #: offsets in guest RAM of (SQ shadow, SQ EventIdx, CQ shadow, CQ EventIdx),
        #: once the host has enabled shadow doorbells (I/O queues only, as in Linux)
        self._shadow: tuple[int, int, int, int] | None = None
        self._shadow_checked = False

    def submit(self, dwords: list[int], ring: bool = True) -> int:
        cid = self._next_cid
        self._next_cid = (cid + 1) & 0xFFFF
        dw = (list(dwords) + [0] * 16)[:16]
        dw[0] = (dw[0] & 0xFFFF) | (cid << 16)
        self.host.ram.write(self.sq_addr + self.sq_tail * 64, SQE.pack(*dw))
        self.sq_tail = (self.sq_tail + 1) % self.entries
        if ring:
            self.ring()
        return cid

    def submit_batch(self, commands: Iterable[list[int]]) -> list[int]:
        """Queue several commands and ring the doorbell once for all of them."""
        cids = [self.submit(dwords, ring=False) for dwords in commands]
        if cids:
            self.ring()
        return cids

    def ring(self) -> None:
        """Publish sq_tail: through the shadow doorbell when the host enabled them
        (a real doorbell only if the device's EventIdx asks for one), else MMIO."""
        shadow = self._shadow_slots()
        if shadow is None or self._shadow_update(shadow[0], shadow[1], self.sq_tail):
            self._mmio_doorbell(0, self.sq_tail)

    def ring_cq(self) -> None:
        """Publish cq_head (after the host consumed completions), like ring()."""
        shadow = self._shadow_slots()
        if shadow is None or self._shadow_update(shadow[2], shadow[3], self.cq_head):
            self._mmio_doorbell(4, self.cq_head)

    def _mmio_doorbell(self, offset: int, value: int) -> None:
        register = DOORBELL_BASE + 8 * self.qid + offset
        mapped = self.host.mapped_bar0
        if mapped is not None:
            mapped[register >> 2] = value  # a plain store: nothing traps
        else:
            self.host.client.write32(BAR0, register, value, posted=True)

    def _shadow_slots(self) -> tuple[int, int, int, int] | None:
        if not self._shadow_checked:
            pages = self.host.shadow_doorbells
            if pages is not None and self.qid:
                # Slots at 4-byte stride (CAP.DSTRD = 0): SQ y at 2y, CQ y at 2y + 1.
                shadow, eventidx = (page - self.host.ram.base for page in pages)
                sq, cq = 8 * self.qid, 8 * self.qid + 4
                self._shadow = (shadow + sq, eventidx + sq, shadow + cq, eventidx + cq)
                self._shadow_checked = True
            elif self.qid == 0:
                self._shadow_checked = True  # the admin queue is never shadowed
        return self._shadow

    def _shadow_update(self, slot: int, event_slot: int, value: int) -> bool:
        """Store `value` in a shadow doorbell; True if the real one must be rung too."""
        words = self.host.ram.words
        old = words[slot >> 2]
        words[slot >> 2] = value
        # A full fence (a locked instruction) between our store and the EventIdx load,
        # matching the device's between arming EventIdx and re-reading the shadow.
        with self.host.barrier:
            pass
        return need_event(words[event_slot >> 2], value, old)

    def reap(self) -> list[Completion]:
        done = []
        ram = self.host.ram
        while True:
            raw = ram.read(self.cq_addr + self.cq_head * 16, 16)
            dw0, _, sqhd, sqid, cid, sf = CQE.unpack(raw)
            if (sf & 1) != self.phase:
                break
            done.append(Completion(dw0, sqhd, sqid, cid, sf >> 1))
            self.cq_head += 1
            if self.cq_head == self.entries:
                self.cq_head, self.phase = 0, self.phase ^ 1
        if done:
            self.ring_cq()
        return done

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[Completion]:
        """Completions until `count` have arrived, waiting on the queue's interrupt."""
        done: list[Completion] = []
        deadline = time.monotonic() + timeout
        fd = self.host.irq_fds[self.vector]
        while len(done) < count:
            done += self.reap()
            if len(done) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise NvmeHostError(f"queue {self.qid}: {len(done)}/{count} completions")
            if select.select([fd], [], [], min(left, 0.05))[0]:
                os.eventfd_read(fd)
        return done

    def command(self, dwords: list[int], timeout: float = 10.0) -> Completion:
        cid = self.submit(dwords)
        (done,) = self.wait(1, timeout)
        if done.cid != cid:
            raise NvmeHostError(f"completion for cid {done.cid}, expected {cid}")
        return done


class NvmeHost:
    def __init__(self, socket_path: str, ram_size: int = 64 << 20, msix_vectors: int = 4) -> None:
        self.client = VfioUserClient(socket_path)
        self.client.negotiate()
        self.ram = GuestRam(ram_size, base=0x10000000)
        self.client.dma_map(self.ram)
        self.irq_fds = self.client.enable_msix(msix_vectors)
        self._next = self.ram.base
        self.admin: HostQueuePair | None = None
        self.io: dict[int, HostQueuePair] = {}
        #: (shadow doorbell page, EventIdx page) once enable_shadow_doorbells() ran
        self.shadow_doorbells: tuple[int, int] | None = None
        #: BAR0 mapped from the device's fd (map_doorbells()) as 32-bit words; doorbells
        #: are stores to it
        self.mapped_bar0: memoryview | None = None
        self._bar0_map: mmap.mmap | None = None
        #: acquired and released as a full memory fence (see _shadow_update)
        self.barrier = threading.Lock()

    def map_doorbells(self) -> None:
        """Map BAR0's mmap-able doorbell page (`serve --mmap-doorbells`), as QEMU does:
        from then on ringing a doorbell is a store to memory, with no message."""
        info = self.client.region_info(BAR0)
        if info.fd is None:
            raise NvmeHostError("BAR0 is not mmap-able: is the device serving --mmap-doorbells?")
        try:
            if not any(
                a <= DOORBELL_BASE and a + n >= DOORBELL_BASE + PAGE for a, n in info.sparse_areas
            ):
                raise NvmeHostError(f"no mmap-able area holds the doorbells: {info.sparse_areas}")
            self._bar0_map = mmap.mmap(info.fd, info.size, offset=info.offset)
        finally:
            os.close(info.fd)
        with memoryview(self._bar0_map) as bar0:
            self.mapped_bar0 = words32(bar0)

    def close(self) -> None:
        if self.mapped_bar0 is not None and self._bar0_map is not None:
            self.mapped_bar0.release()
            self._bar0_map.close()
        self.client.close()
        for fd in self.irq_fds:
            os.close(fd)
        self.ram.close()

    def __enter__(self) -> NvmeHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def alloc(self, size: int) -> int:
        addr = self._next
        self._next += (size + PAGE - 1) // PAGE * PAGE
        if self._next > self.ram.base + self.ram.size:
            raise NvmeHostError("out of guest RAM")
        return addr

    def reg32(self, offset: int) -> int:
        return self.client.read32(BAR0, offset)

    def enable(self, admin_entries: int = 32, timeout: float = 5.0) -> None:
        admin = HostQueuePair(self, 0, admin_entries, vector=0)
        self.client.write32(BAR0, Reg.AQA, ((admin_entries - 1) << 16) | (admin_entries - 1))
        self.client.write64(BAR0, Reg.ASQ, admin.sq_addr)
        self.client.write64(BAR0, Reg.ACQ, admin.cq_addr)
        self.client.write32(BAR0, Reg.CC, (4 << 20) | (6 << 16) | 1)
        deadline = time.monotonic() + timeout
        while not self.reg32(Reg.CSTS) & 1:
            if self.reg32(Reg.CSTS) & 2 or time.monotonic() > deadline:
                raise NvmeHostError(f"controller not ready: CSTS={self.reg32(Reg.CSTS):#x}")
            time.sleep(0.001)
        self.admin = admin

    def admin_command(self, dwords: list[int]) -> Completion:
        if self.admin is None:
            raise NvmeHostError("controller not enabled")
        return self.admin.command(dwords)

    def enable_shadow_doorbells(self) -> None:
        """Doorbell Buffer Config: from now on the I/O queues publish their tails and
        heads in guest memory and ring for real only when EventIdx asks (as Linux does)."""
        shadow, eventidx = self.alloc(PAGE), self.alloc(PAGE)
        prps = [shadow & 0xFFFFFFFF, shadow >> 32, eventidx & 0xFFFFFFFF, eventidx >> 32]
        c = self.admin_command([DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, *prps])
        if not c.ok:
            raise NvmeHostError(f"Doorbell Buffer Config: status {c.status:#x}")
        self.shadow_doorbells = (shadow, eventidx)

    def identify(self, cns: int, nsid: int = 0) -> bytes:
        buf = self.alloc(PAGE)
        c = self.admin_command([0x06, nsid, 0, 0, 0, 0, buf & 0xFFFFFFFF, buf >> 32, 0, 0, cns])
        if not c.ok:
            raise NvmeHostError(f"Identify CNS {cns}: status {c.status:#x}")
        return self.ram.read(buf, PAGE)

    def create_queue_pair(
        self, qid: int, entries: int = 64, vector: int | None = None
    ) -> HostQueuePair:
        q = HostQueuePair(self, qid, entries, qid if vector is None else vector)
        for dwords in (
            [
                0x05,
                0,
                0,
                0,
                0,
                0,
                q.cq_addr & 0xFFFFFFFF,
                q.cq_addr >> 32,
                0,
                0,
                ((entries - 1) << 16) | qid,
                (q.vector << 16) | 0x3,
            ],
            [
                0x01,
                0,
                0,
                0,
                0,
                0,
                q.sq_addr & 0xFFFFFFFF,
                q.sq_addr >> 32,
                0,
                0,
                ((entries - 1) << 16) | qid,
                (qid << 16) | 0x1,
            ],
        ):
            c = self.admin_command(dwords)
            if not c.ok:
                raise NvmeHostError(f"create queue {qid}: status {c.status:#x}")
        self.io[qid] = q
        return q


def read_write(opcode: int, nsid: int, buf: int, slba: int, nlb: int, prp2: int = 0) -> list[int]:
    """The dwords of a Read (0x02) or Write (0x01) of `nlb` blocks."""
    return [
        opcode,
        nsid,
        0,
        0,
        0,
        0,
        buf & 0xFFFFFFFF,
        buf >> 32,
        prp2 & 0xFFFFFFFF,
        prp2 >> 32,
        slba & 0xFFFFFFFF,
        slba >> 32,
        (nlb - 1) & 0xFFFF,
    ]


__all__ = [
    "Completion",
    "HostQueuePair",
    "NvmeHost",
    "NvmeHostError",
    "need_event",
    "read_write",
]
