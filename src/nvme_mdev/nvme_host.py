"""A small NVMe host driver over the vfio-user client: the guest's part, in Python.

It enables the controller, creates queues in a memfd of "guest RAM", submits
commands and waits for their completions on MSI-X eventfds. Tests and benchmarks
drive devices with it; users can script a device with it.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .dataplane.fence import full_fence
from .guest_memory import words32
from .nvme.spec import CQE, DOORBELL_BASE, SQE, AdminOpcode, IoOpcode, Reg
from .vfio_user.client import GuestRam, VfioUserClient
from .vfio_user.framing import wait_readable

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
    dw1: int = 0
    #: the Phase Tag the entry carried (Base 4.2.4)
    phase: int = 1

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def sct(self) -> int:
        """Status Code Type."""
        return (self.status >> 8) & 0x7

    @property
    def sc(self) -> int:
        """Status Code."""
        return self.status & 0xFF

    @property
    def code(self) -> int:
        """SCT << 8 | SC, without DNR and More: compare with nvme.spec.Status."""
        return self.status & 0x7FF

    @property
    def dnr(self) -> bool:
        """Do Not Retry."""
        return bool(self.status & (1 << 14))

    @property
    def more(self) -> bool:
        """More: further information in the Error Information log page."""
        return bool(self.status & (1 << 13))


class HostQueuePair:
    """A submission queue and the completion queue it posts to. With `shared_cq` the
    SQ posts to another pair's CQ (several SQs on one CQ): reaping and waiting then
    go through that pair."""

    def __init__(
        self,
        host: NvmeHost,
        qid: int,
        entries: int,
        vector: int,
        shared_cq: HostQueuePair | None = None,
        cq_entries: int | None = None,
    ) -> None:
        self.host, self.qid, self.entries, self.vector = host, qid, entries, vector
        self.cq_pair: HostQueuePair = self if shared_cq is None else shared_cq
        #: entries in the completion queue (the shared one's size, with shared_cq)
        self.cq_entries: int = shared_cq.cq_entries if shared_cq else cq_entries or entries
        self.sq_addr = host.alloc(entries * 64)
        self.cq_addr: int = (
            host.alloc(self.cq_entries * 16) if shared_cq is None else shared_cq.cq_addr
        )
        self.sq_tail = 0
        self.cq_head = 0
        self.phase = 1
        self._next_cid = 0
        #: offsets in guest RAM of (SQ shadow, SQ EventIdx, CQ shadow, CQ EventIdx),
        #: once the host has enabled shadow doorbells (I/O queues only, as in Linux)
        self._shadow: tuple[int, int, int, int] | None = None
        self._shadow_checked = False
        #: completions reaped while command() waited for another one
        self.held: list[Completion] = []

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

    def submit_fused(
        self, first: list[int], second: list[int], ring_between: bool = False
    ) -> tuple[int, int]:
        """A fused operation (Base 3.4.2): `first` with FUSE 01b and `second` with FUSE
        10b in adjacent entries, published by one doorbell as the spec asks; with
        `ring_between` the doorbell is rung for the first alone too, as a misbehaving
        host might. The CIDs (wait() for the two completions)."""
        first_cid = self.submit([first[0] | FUSE_FIRST, *first[1:]], ring=ring_between)
        second_cid = self.submit([second[0] | FUSE_SECOND, *second[1:]])
        return first_cid, second_cid

    def compare_and_write(
        self, compare: list[int], write: list[int], timeout: float = 10.0
    ) -> tuple[Completion, Completion]:
        """Submit Compare and Write fused and wait for both: the Compare's completion
        and the Write's."""
        cids = self.submit_fused(compare, write)
        held = self.cq_pair.held
        deadline = time.monotonic() + timeout
        found: dict[int, Completion] = {}
        while len(found) < 2:
            for c in list(held):
                if c.cid in cids and c.sq_id == self.qid:
                    held.remove(c)
                    found[c.cid] = c
            if len(found) < 2:
                held += self._poll(deadline, f"fused cids {cids}")
        return found[cids[0]], found[cids[1]]

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
        # A full fence between our store and the EventIdx load, matching the device's
        # between arming EventIdx and re-reading the shadow (Linux's mb() there).
        full_fence()
        return need_event(words[event_slot >> 2], value, old)

    def reap(self, ring: bool = True) -> list[Completion]:
        """The new completions in the CQ; the CQ head doorbell is rung after them
        unless `ring` is False (the entries then stay unconsumed for the controller)."""
        if self.cq_pair is not self:
            return self.cq_pair.reap(ring)
        done = []
        ram = self.host.ram
        while True:
            raw = ram.read(self.cq_addr + self.cq_head * 16, 16)
            dw0, dw1, sqhd, sqid, cid, sf = CQE.unpack(raw)
            if (sf & 1) != self.phase:
                break
            done.append(Completion(dw0, sqhd, sqid, cid, sf >> 1, dw1, sf & 1))
            self.cq_head += 1
            if self.cq_head == self.cq_entries:
                self.cq_head, self.phase = 0, self.phase ^ 1
        if done and ring:
            self.ring_cq()
        return done

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[Completion]:
        """Completions until `count` have arrived, waiting on the queue's interrupt
        (those command() set aside first, oldest first)."""
        held = self.cq_pair.held
        done: list[Completion] = held[:count]
        del held[:count]
        deadline = time.monotonic() + timeout
        while len(done) < count:
            done += self._poll(deadline, f"{len(done)}/{count} completions")
        return done

    def _poll(self, deadline: float, waiting_for: str) -> list[Completion]:
        """New completions, waiting (until `deadline`) for the interrupt if none."""
        done = self.reap()
        if done:
            return done
        left = deadline - time.monotonic()
        if left <= 0:
            raise NvmeHostError(f"queue {self.qid}: {waiting_for}")
        fd = self.host.irq_fds[self.cq_pair.vector]
        if wait_readable(fd, min(left, 0.05)):
            os.eventfd_read(fd)
        return []

    def command(self, dwords: list[int], timeout: float = 10.0) -> Completion:
        """Submit one command and wait for its completion. Completions of other
        commands that arrive meanwhile (an Asynchronous Event Request, a command
        submitted earlier) are held for wait()."""
        cid = self.submit(dwords)
        held = self.cq_pair.held
        deadline = time.monotonic() + timeout
        while True:
            for i, c in enumerate(held):
                if c.cid == cid and c.sq_id == self.qid:
                    return held.pop(i)
            held += self._poll(deadline, f"no completion for cid {cid}")


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
        c = self.admin_command(identify(cns, buf, nsid))
        if not c.ok:
            raise NvmeHostError(f"Identify CNS {cns}: status {c.status:#x}")
        return self.ram.read(buf, PAGE)

    def create_queue_pair(
        self,
        qid: int,
        entries: int = 64,
        vector: int | None = None,
        shared_cq: HostQueuePair | None = None,
        cq_entries: int | None = None,
    ) -> HostQueuePair:
        """Create I/O CQ `qid` (unless the SQ is to post to `shared_cq`) and I/O SQ `qid`;
        NvmeHostError if the controller refuses either."""
        q = HostQueuePair(
            self, qid, entries, qid if vector is None else vector, shared_cq, cq_entries
        )
        if shared_cq is None:
            c = self.admin_command(create_io_cq(qid, q.cq_addr, q.cq_entries, q.vector))
            if not c.ok:
                raise NvmeHostError(f"create I/O CQ {qid}: status {c.status:#x}")
        c = self.admin_command(create_io_sq(qid, q.sq_addr, entries, q.cq_pair.qid))
        if not c.ok:
            raise NvmeHostError(f"create I/O SQ {qid}: status {c.status:#x}")
        self.io[qid] = q
        return q

    def delete_queue_pair(self, q: HostQueuePair) -> None:
        """Delete I/O SQ `q.qid`, then its CQ unless another pair owns it."""
        c = self.admin_command([AdminOpcode.DELETE_IO_SQ, 0, 0, 0, 0, 0, 0, 0, 0, 0, q.qid])
        if not c.ok:
            raise NvmeHostError(f"delete I/O SQ {q.qid}: status {c.status:#x}")
        if q.cq_pair is q:
            c = self.admin_command([AdminOpcode.DELETE_IO_CQ, 0, 0, 0, 0, 0, 0, 0, 0, 0, q.qid])
            if not c.ok:
                raise NvmeHostError(f"delete I/O CQ {q.qid}: status {c.status:#x}")
        self.io.pop(q.qid, None)

    def write_doorbell(self, qid: int, value: int, completion: bool = False) -> None:
        """Write a doorbell register directly (SQ y Tail, or CQ y Head with
        `completion`), bypassing any queue state: for driving a device into errors."""
        register = DOORBELL_BASE + 8 * qid + (4 if completion else 0)
        self.client.write32(BAR0, register, value, posted=True)

    def sync(self) -> None:
        """Returns once the device has handled every write sent before (a register
        read travels behind the posted writes on the same socket)."""
        self.reg32(Reg.CSTS)

    def wait_csts(self, mask: int, value: int, timeout: float = 5.0) -> int:
        """Poll CSTS until (CSTS & mask) == value; returns CSTS."""
        deadline = time.monotonic() + timeout
        while True:
            csts = self.reg32(Reg.CSTS)
            if csts & mask == value:
                return csts
            if time.monotonic() > deadline:
                raise NvmeHostError(f"CSTS={csts:#x}, waited for {value:#x} under {mask:#x}")
            time.sleep(0.001)

    def disable(self, timeout: float = 5.0) -> None:
        """Controller Level Reset through CC.EN = 0; waits for CSTS.RDY = 0. Every
        queue the host had is gone afterwards (enable() again to go on)."""
        self.client.write32(BAR0, Reg.CC, self.reg32(Reg.CC) & ~1)
        self.wait_csts(1, 0, timeout)
        self.admin = None
        self.io.clear()
        self.shadow_doorbells = None

    def shutdown(self, abrupt: bool = False, timeout: float = 5.0) -> None:
        """Shutdown notification (CC.SHN 01b, or 10b if `abrupt`); waits for
        CSTS.SHST = 10b (shutdown processing complete)."""
        cc = self.reg32(Reg.CC) & ~(0x3 << 14)
        self.client.write32(BAR0, Reg.CC, cc | ((2 if abrupt else 1) << 14))
        self.wait_csts(0x3 << 2, 0x2 << 2, timeout)

    def get_log_page(
        self,
        lid: int,
        length: int,
        offset: int = 0,
        rae: bool = False,
        nsid: int = 0xFFFFFFFF,
    ) -> tuple[Completion, bytes]:
        """Get Log Page of `length` bytes (a multiple of 4) from byte `offset`; the
        data is what the controller wrote into a fresh buffer (empty on an error)."""
        buf = self.alloc(max(length, 1))
        prp1, prp2 = self.prps(buf, length)
        c = self.admin_command(get_log_page(lid, prp1, length, offset, rae, nsid, prp2))
        return c, self.ram.read(buf, length) if c.ok else b""

    def prps(self, buf: int, length: int) -> tuple[int, int]:
        """PRP Entry 1 and 2 for `length` bytes of guest RAM at `buf` (contiguous),
        with a PRP list where two entries do not suffice (Base 4.3.1)."""
        return self.prps_for_pages(
            [buf]
            + [
                (buf & ~(PAGE - 1)) + PAGE * i
                for i in range(1, (((buf & (PAGE - 1)) + length + PAGE - 1) // PAGE))
            ]
        )

    def prps_for_pages(self, pages: list[int], list_offset: int = 0) -> tuple[int, int]:
        """PRP Entry 1 and 2 describing `pages` in order: the first may have an offset,
        the others are page addresses. More than two go into PRP list pages allocated
        here, the first list starting `list_offset` bytes (a multiple of 8) into its
        page, chained through the last entry of a page when it does not hold them."""
        if not pages:
            return 0, 0
        if len(pages) <= 2:
            return pages[0], pages[1] if len(pages) == 2 else 0
        rest = pages[1:]
        first = list_addr = self.alloc(PAGE) + list_offset
        while True:
            slots = (PAGE - (list_addr & (PAGE - 1))) // 8
            if len(rest) <= slots:
                self.ram.write(list_addr, struct.pack(f"<{len(rest)}Q", *rest))
                break
            following = self.alloc(PAGE)
            chunk = [*rest[: slots - 1], following]
            self.ram.write(list_addr, struct.pack(f"<{slots}Q", *chunk))
            rest = rest[slots - 1 :]
            list_addr = following
        return pages[0], first

    def sgl(self, descriptors: list[bytes], per_segment: int = 0) -> bytes:
        """SGL Entry 1 for a list of data and bit bucket descriptors (Base 4.3.2): the
        one descriptor itself, or Segment descriptors chaining SGL segments of at most
        `per_segment` of them (all in one if 0) in guest RAM, the last reached through
        a Last Segment descriptor."""
        if len(descriptors) == 1 and not per_segment:
            return descriptors[0]
        n = per_segment or len(descriptors)
        groups = [descriptors[i : i + n] for i in range(0, len(descriptors), n)]
        following = b""
        for i in reversed(range(len(groups))):
            body = b"".join(groups[i]) + following
            addr = self.alloc(len(body))
            self.ram.write(addr, body)
            kind = SGL_LAST_SEGMENT if i == len(groups) - 1 else SGL_SEGMENT
            following = sgl_descriptor(kind, addr, len(body))
        return following

    def get_features(
        self, fid: int, sel: int = 0, cdw11: int = 0, nsid: int = 0, data_length: int = 0
    ) -> tuple[Completion, bytes]:
        """Get Features; returns the completion (the value is in dw0) and, for a
        feature with a data structure, `data_length` bytes of it."""
        buf = self.alloc(PAGE) if data_length else 0
        c = self.admin_command(get_features(fid, sel, cdw11, nsid, buf))
        return c, self.ram.read(buf, data_length) if data_length and c.ok else b""

    def set_features(
        self, fid: int, cdw11: int = 0, save: bool = False, nsid: int = 0, data: bytes = b""
    ) -> Completion:
        """Set Features; `data` is the feature's data structure, for those that have one."""
        buf = 0
        if data:
            buf = self.alloc(len(data))
            self.ram.write(buf, data)
        return self.admin_command(set_features(fid, cdw11, save, nsid, buf))


# --- Command builders: the dwords of one command, CID left for submit() -------------


def _lo_hi(value: int) -> tuple[int, int]:
    return value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF


def create_io_cq(
    qid: int,
    addr: int,
    entries: int,
    vector: int,
    interrupts: bool = True,
    contiguous: bool = True,
) -> list[int]:
    """Create I/O Completion Queue (Base 5.2.1)."""
    flags = (2 if interrupts else 0) | (1 if contiguous else 0)
    return [
        AdminOpcode.CREATE_IO_CQ,
        0,
        0,
        0,
        0,
        0,
        *_lo_hi(addr),
        0,
        0,
        ((entries - 1) << 16) | qid,
        (vector << 16) | flags,
    ]


def create_io_sq(
    qid: int, addr: int, entries: int, cqid: int, priority: int = 0, contiguous: bool = True
) -> list[int]:
    """Create I/O Submission Queue (Base 5.2.2)."""
    flags = (priority << 1) | (1 if contiguous else 0)
    return [
        AdminOpcode.CREATE_IO_SQ,
        0,
        0,
        0,
        0,
        0,
        *_lo_hi(addr),
        0,
        0,
        ((entries - 1) << 16) | qid,
        (cqid << 16) | flags,
    ]


def identify(cns: int, buf: int, nsid: int = 0, cntid: int = 0, csi: int = 0) -> list[int]:
    """Identify (Base 5.1.13) into the 4 KiB page at `buf`."""
    return [
        AdminOpcode.IDENTIFY,
        nsid,
        0,
        0,
        0,
        0,
        *_lo_hi(buf),
        0,
        0,
        (cntid << 16) | cns,
        csi << 24,
    ]


def get_log_page(
    lid: int,
    buf: int,
    length: int,
    offset: int = 0,
    rae: bool = False,
    nsid: int = 0xFFFFFFFF,
    prp2: int = 0,
    lsp: int = 0,
    csi: int = 0,
) -> list[int]:
    """Get Log Page (Base 5.1.12) of `length` bytes (NUMDL/NUMDU) from byte `offset`
    (LPOL/LPOU), Retain Asynchronous Event with `rae`."""
    numd = length // 4 - 1
    return [
        AdminOpcode.GET_LOG_PAGE,
        nsid,
        0,
        0,
        0,
        0,
        *_lo_hi(buf),
        *_lo_hi(prp2),
        ((numd & 0xFFFF) << 16) | (int(rae) << 15) | ((lsp & 0x7F) << 8) | lid,
        numd >> 16,
        *_lo_hi(offset),
        csi << 24,
    ]


def get_features(fid: int, sel: int = 0, cdw11: int = 0, nsid: int = 0, buf: int = 0) -> list[int]:
    """Get Features (Base 5.1.11): SEL 0 current, 1 default, 2 saved, 3 supported
    capabilities."""
    return [AdminOpcode.GET_FEATURES, nsid, 0, 0, 0, 0, *_lo_hi(buf), 0, 0, (sel << 8) | fid, cdw11]


def set_features(
    fid: int, cdw11: int = 0, save: bool = False, nsid: int = 0, buf: int = 0
) -> list[int]:
    """Set Features (Base 5.1.25); SV with `save`."""
    return [
        AdminOpcode.SET_FEATURES,
        nsid,
        0,
        0,
        0,
        0,
        *_lo_hi(buf),
        0,
        0,
        (int(save) << 31) | fid,
        cdw11,
    ]


def abort(sqid: int, cid: int) -> list[int]:
    """Abort (Base 5.1.1) command `cid` of submission queue `sqid`."""
    return [AdminOpcode.ABORT, 0, 0, 0, 0, 0, 0, 0, 0, 0, (cid << 16) | sqid]


def async_event_request() -> list[int]:
    """Asynchronous Event Request (Base 5.1.2): completes when an event is reported."""
    return [AdminOpcode.ASYNC_EVENT_REQUEST]


def keep_alive() -> list[int]:
    """Keep Alive (Base 5.1.14)."""
    return [AdminOpcode.KEEP_ALIVE]


def nvm_command(
    opcode: int,
    nsid: int,
    slba: int = 0,
    nlb: int = 1,
    prp1: int = 0,
    prp2: int = 0,
    fua: bool = False,
    cdw12_flags: int = 0,
    cdw13: int = 0,
) -> list[int]:
    """An NVM command with an LBA range (Read, Write, Compare, Verify, Write Zeroes,
    Write Uncorrectable): `nlb` blocks from `slba`, FUA, any other CDW12 bits."""
    cdw12 = ((nlb - 1) & 0xFFFF) | (int(fua) << 30) | cdw12_flags
    return [opcode, nsid, 0, 0, 0, 0, *_lo_hi(prp1), *_lo_hi(prp2), *_lo_hi(slba), cdw12, cdw13]


#: CDW0 FUSE (Base 3.4.2): the first and the second command of a fused operation
FUSE_FIRST = 0x1 << 8
FUSE_SECOND = 0x2 << 8


def flush(nsid: int) -> list[int]:
    """Flush (Base 7.2); NSID FFFFFFFFh flushes every namespace if VWC says so."""
    return [IoOpcode.FLUSH, nsid]


def write_zeroes(
    nsid: int, slba: int, nlb: int, deallocate: bool = False, fua: bool = False
) -> list[int]:
    """Write Zeroes (NVM 3.3.8), with Deallocate (DEAC) if asked."""
    return nvm_command(
        IoOpcode.WRITE_ZEROES, nsid, slba, nlb, fua=fua, cdw12_flags=int(deallocate) << 25
    )


def dataset_management(nsid: int, buf: int, ranges: int, deallocate: bool = False) -> list[int]:
    """Dataset Management (NVM 3.3.3) of `ranges` 16-byte range entries at `buf`
    (see dsm_range); Attribute Deallocate with `deallocate`."""
    return [
        IoOpcode.DATASET_MANAGEMENT,
        nsid,
        0,
        0,
        0,
        0,
        *_lo_hi(buf),
        0,
        0,
        ranges - 1,
        int(deallocate) << 2,
    ]


def dsm_range(slba: int, nlb: int, attributes: int = 0) -> bytes:
    """One Dataset Management range entry."""
    return struct.pack("<IIQ", attributes, nlb, slba)


def copy(
    nsid: int, sdlba: int, buf: int, ranges: int, desc_format: int = 0, fua: bool = False
) -> list[int]:
    """Copy (NVM 3.3.2) of `ranges` source range entries at `buf` (see copy_range) to
    destination LBA `sdlba`."""
    cdw12 = (ranges - 1) | (desc_format << 8) | (int(fua) << 30)
    return [IoOpcode.COPY, nsid, 0, 0, 0, 0, *_lo_hi(buf), 0, 0, *_lo_hi(sdlba), cdw12]


def copy_range(slba: int, nlb: int) -> bytes:
    """One Source Range Entry, Copy Descriptor Format 0h (32 bytes)."""
    return struct.pack("<8xQH14x", slba, nlb - 1)


# --- Scatter Gather Lists (Base 4.3.2) ---------------------------------------------------

SGL_DATA_BLOCK = 0x0
SGL_BIT_BUCKET = 0x1
SGL_SEGMENT = 0x2
SGL_LAST_SEGMENT = 0x3
#: CDW0.PSDT 01b: SGLs, metadata in one contiguous buffer
PSDT_SGL = 1 << 14


def sgl_descriptor(kind: int, addr: int = 0, length: int = 0, subtype: int = 0) -> bytes:
    """One 16-byte SGL descriptor: Address, Length, SGL Identifier (type << 4 | sub type)."""
    return struct.pack("<QI3xB", addr, length, (kind << 4) | subtype)


def with_sgl(dwords: list[int], descriptor: bytes) -> list[int]:
    """`dwords` with PSDT set to SGLs and SGL Entry 1 (DPTR, dwords 6-9) = `descriptor`."""
    out = (list(dwords) + [0] * 16)[:16]
    out[0] = (out[0] & ~(0x3 << 14)) | PSDT_SGL
    out[6:10] = struct.unpack("<4I", descriptor)
    return out


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
    "FUSE_FIRST",
    "FUSE_SECOND",
    "PSDT_SGL",
    "SGL_BIT_BUCKET",
    "SGL_DATA_BLOCK",
    "SGL_LAST_SEGMENT",
    "SGL_SEGMENT",
    "Completion",
    "HostQueuePair",
    "NvmeHost",
    "NvmeHostError",
    "abort",
    "async_event_request",
    "copy",
    "copy_range",
    "create_io_cq",
    "create_io_sq",
    "dataset_management",
    "dsm_range",
    "flush",
    "get_features",
    "get_log_page",
    "identify",
    "keep_alive",
    "need_event",
    "nvm_command",
    "read_write",
    "set_features",
    "sgl_descriptor",
    "with_sgl",
    "write_zeroes",
]
