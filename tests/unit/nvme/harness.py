"""A fake host for driving the controller model without a socket or threads:
guest RAM is a bytearray, interrupts are recorded, the host side is a tiny driver."""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nvme_mdev.backends.file import FileBackend
from nvme_mdev.backends.io_engine import IoEngine, make_io_engine
from nvme_mdev.dataplane import QueueState, make_vector_routes
from nvme_mdev.dataplane.fence import full_fence
from nvme_mdev.guest_memory import DmaError, MappedRegion, words32
from nvme_mdev.nvme.controller import Controller
from nvme_mdev.nvme.identity import ControllerConfig
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import CQE, DNR, DOORBELL_BASE, SQE, AdminOpcode, FeatureId, Reg

PAGE = 4096
#: conftest's `file_ns` fixture: file_ns(nsid=1, size=1 MiB, block_size=512, readonly, fill)
NamespaceFactory = Callable[..., Namespace]
BROADCAST = 0xFFFFFFFF
#: a guest-physical address nothing is mapped at
UNMAPPED = 0x7_0000_0000
#: the I/O engine a Host gets unless told (conftest's `io_engine` fixture sets it)
ENGINE = "sync"
#: the data plane a Host gets unless told (conftest's `data_plane` fixture sets it)
PLANE = "python"
#: engines made by Hosts, closed after each test (conftest)
ENGINES: list[IoEngine] = []
#: interrupt fakes made by Hosts, closed after each test (conftest)
INTERRUPTS: list[FakeInterrupts] = []


def with_dnr(status: int) -> int:
    """An expected Status Field with Do Not Retry set."""
    return status | DNR


class FakeGuestMemory:
    """Guest RAM at guest-physical addresses [base, base + size); `holes` are unmapped."""

    def __init__(self, size: int = 32 << 20, base: int = 0x100000) -> None:
        self.base = base
        self.ram = bytearray(size)
        self.mv = memoryview(self.ram)
        self._zero_copy = True
        self.holes: list[tuple[int, int]] = []  # (address, length)
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, changed: Callable[[], None]) -> None:
        """Told when the map changes (a hole, copies only), as DmaMemory tells."""
        self._listeners.append(changed)

    def _changed(self) -> None:
        for changed in self._listeners:
            changed()

    @property
    def zero_copy(self) -> bool:
        """False: reachable by copies only, as memory a client gave no fd for."""
        return self._zero_copy

    @zero_copy.setter
    def zero_copy(self, on: bool) -> None:
        self._zero_copy = on
        self._changed()

    def unmap(self, addr: int, length: int) -> None:
        self.holes.append((addr, length))
        self._changed()

    def _offset(self, addr: int, length: int) -> int:
        off = addr - self.base
        if off < 0 or off + length > len(self.ram) or length < 0:
            raise DmaError(f"{addr:#x}+{length:#x} not mapped")
        for hole, size in self.holes:
            if addr < hole + size and hole < addr + length:
                raise DmaError(f"{addr:#x}+{length:#x} overlaps a hole at {hole:#x}")
        return off

    def view(self, addr: int, length: int, writable: bool) -> memoryview | None:
        off = self._offset(addr, length)
        return self.mv[off : off + length] if self._zero_copy else None

    def read(self, addr: int, length: int) -> bytes:
        off = self._offset(addr, length)
        return bytes(self.ram[off : off + length])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        off = self._offset(addr, len(data))
        self.ram[off : off + len(data)] = data

    def mapped_regions(self) -> list[MappedRegion]:
        """RAM minus the holes, in pieces."""
        edges = sorted((h - self.base, h - self.base + n) for h, n in self.holes)
        pieces, start = [], 0
        for lo, hi in [*edges, (len(self.ram), len(self.ram))]:
            lo, hi = max(lo, 0), min(hi, len(self.ram))
            if lo > start:
                pieces.append((start, lo))
            start = max(start, hi)
        return [
            (self.base + lo, hi - lo, self.mv[lo:hi] if self._zero_copy else None, True, True)
            for lo, hi in pieces
        ]

    def u32(self, addr: int) -> int:
        return int(struct.unpack("<I", self.read(addr, 4))[0])

    def put_u32(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<I", value))


class FakeInterrupts:
    """MSI-X (on unless `msix` is set False) and INTx, recorded. For the native data
    plane, whose thread signals through MSI-X routes by itself, every vector is routed
    to an eventfd of ours, read back into `signalled`."""

    def __init__(self, vectors: int = 65, plane: str = "python") -> None:
        self.routes = make_vector_routes(plane, vectors)
        self._signalled: list[int] = []
        self.intx = False
        self._eventfds: list[int] = []
        if plane == "native":
            for vector in range(vectors):
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._eventfds.append(fd)
                self.routes.route(vector, fd)
        self.msix = True

    @property
    def msix(self) -> bool:
        return self.routes.enabled

    @msix.setter
    def msix(self, on: bool) -> None:
        self.routes.set_enabled(on)

    @property
    def signalled(self) -> list[int]:
        """Vectors signalled (for the native plane: in vector order within a read)."""
        for vector, fd in enumerate(self._eventfds):
            with contextlib.suppress(BlockingIOError):
                self._signalled += [vector] * os.eventfd_read(fd)
        return self._signalled

    def msix_enabled(self) -> bool:
        return self.msix

    def signal(self, vector: int) -> None:
        self._signalled.append(vector)

    def set_intx(self, asserted: bool) -> None:
        self.intx = asserted

    def close(self) -> None:
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds = []


@dataclass
class Completion:
    dw0: int
    dw1: int
    sq_head: int
    sq_id: int
    cid: int
    status: int  # Status Field without the phase bit (includes DNR/More)

    @property
    def sc(self) -> int:
        return self.status & 0x7FF  # SCT and SC

    @property
    def dnr(self) -> bool:
        return bool(self.status & (1 << 14))


class HostQueue:
    """A host-side SQ/CQ pair with the same id (the CQ may be shared: see `cq_of`)."""

    def __init__(self, host: Host, qid: int, entries: int, cq_entries: int | None = None) -> None:
        self.host, self.qid, self.entries = host, qid, entries
        self.cq_entries = cq_entries or entries
        self.sq_addr = host.alloc(entries * 64)
        self.cq_addr = host.alloc(self.cq_entries * 16)
        self.sq_tail = 0
        self.cq_head = 0
        self.phase = 1
        self.next_cid = 0
        #: set when shadow doorbells are used (use_shadow_doorbells): tails and heads
        #: go to guest memory, and the real doorbell is rung only when asked
        self.shadow_sq: int | None = None
        self.shadow_cq: int | None = None
        #: the controller's EventIdx slots for the shadowed SQ and CQ. The guest rings
        #: the real doorbell when the value it stores passes them (need_event), as
        #: Linux's nvme_dbbuf_update_and_check_event does; without that a parked I/O
        #: thread would never see the new value. None: a guest that ignores EventIdx
        #: (only for showing that such a guest is not seen while the thread is parked)
        self.eventidx_sq: int | None = None
        self.eventidx_cq: int | None = None

    def submit(self, dwords: Sequence[int], ring: bool = True) -> int:
        cid = self.next_cid
        self.next_cid = (self.next_cid + 1) & 0xFFFF
        dw = list(dwords) + [0] * (16 - len(dwords))
        dw[0] = (dw[0] & 0xFFFF) | (cid << 16)
        self.host.memory.write(self.sq_addr + self.sq_tail * 64, SQE.pack(*dw))
        self.sq_tail = (self.sq_tail + 1) % self.entries
        if ring:
            self.ring_sq()
        return cid

    def ring_sq(self) -> None:
        page = self.host.doorbell_words
        if page is not None:
            page[2 * self.qid] = self.sq_tail
        elif self.shadow_sq is not None:
            if self._shadow_update(self.shadow_sq, self.eventidx_sq, self.sq_tail):
                self.host.ctrl.mmio_write(DOORBELL_BASE + 8 * self.qid, 4, self.sq_tail)
        else:
            self.host.ctrl.mmio_write(DOORBELL_BASE + 8 * self.qid, 4, self.sq_tail)

    def use_shadow_doorbells(self, shadow_page: int, eventidx_page: int) -> None:
        """Publish this pair's SQ tail and CQ head through the pages given to Doorbell
        Buffer Config (slots at 4-byte stride: SQ y at 2y, CQ y at 2y + 1), ringing the
        real doorbell only when EventIdx asks, as Linux does."""
        sq, cq = 8 * self.qid, 8 * self.qid + 4
        self.shadow_sq, self.shadow_cq = shadow_page + sq, shadow_page + cq
        self.eventidx_sq, self.eventidx_cq = eventidx_page + sq, eventidx_page + cq

    def _shadow_update(self, slot: int, event_slot: int | None, value: int) -> bool:
        """Linux's nvme_dbbuf_update_and_check_event: store `value` in the shadow
        doorbell, a full fence, then load EventIdx; True if the real doorbell must be
        rung too. The fence pairs with the controller's (store EventIdx, fence, load
        the shadow again) before its thread parks, so that at least one side sees the
        other's store: the thread finds the new value, or the guest rings."""
        memory = self.host.memory
        old = memory.u32(slot)
        memory.put_u32(slot, value)
        if event_slot is None:
            return False  # a guest that ignores EventIdx
        full_fence()
        return need_event(memory.u32(event_slot), value, old)

    def peek(self) -> list[Completion]:
        """The completions the controller has posted, without consuming them."""
        out = []
        head, phase = self.cq_head, self.phase
        while True:
            raw = self.host.memory.read(self.cq_addr + head * 16, 16)
            dw0, dw1, sqhd, sqid, cid, sf = CQE.unpack(raw)
            if sf & 1 != phase:
                break
            out.append(Completion(dw0, dw1, sqhd, sqid, cid, sf >> 1))
            head += 1
            if head == self.cq_entries:
                head = 0
                phase ^= 1
            if len(out) > self.cq_entries - 1:
                raise AssertionError("more valid entries than the CQ holds: one was overwritten")
        return out

    def reap(self, ring: bool = True) -> list[Completion]:
        """Consume the posted completions and (by default) ring the CQ head doorbell."""
        out = self.peek()
        for _ in out:
            self.cq_head += 1
            if self.cq_head == self.cq_entries:
                self.cq_head = 0
                self.phase ^= 1
        if out and ring:
            self.ring_cq()
        return out

    def ring_cq(self) -> None:
        page = self.host.doorbell_words
        if page is not None:
            page[2 * self.qid + 1] = self.cq_head
        elif self.shadow_cq is not None:
            if self._shadow_update(self.shadow_cq, self.eventidx_cq, self.cq_head):
                self.host.ctrl.mmio_write(DOORBELL_BASE + 8 * self.qid + 4, 4, self.cq_head)
        else:
            self.host.ctrl.mmio_write(DOORBELL_BASE + 8 * self.qid + 4, 4, self.cq_head)


class Host:
    """Enables the controller and runs commands synchronously."""

    def __init__(
        self,
        namespaces: list[Namespace] | None = None,
        config: ControllerConfig | None = None,
        admin_entries: int = 32,
        memory_size: int = 8 << 20,
        mapped_doorbells: bool = False,
        engine: str | IoEngine | None = None,
        plane: str | None = None,
        memory_base: int = 0x100000,
    ) -> None:
        plane = plane or PLANE
        self.memory = FakeGuestMemory(memory_size, memory_base)
        self.interrupts = FakeInterrupts(plane=plane)
        INTERRUPTS.append(self.interrupts)
        config = config or ControllerConfig()
        #: BAR0's doorbell page as the guest would map it (serve --mmap-doorbells)
        self.doorbell_words = words32(memoryview(bytearray(PAGE))) if mapped_doorbells else None
        self.engine = (
            engine
            if engine is not None and not isinstance(engine, str)
            else make_io_engine(engine or ENGINE)
        )
        ENGINES.append(self.engine)
        self.ctrl = Controller(
            config,
            self.memory,
            self.interrupts,
            namespaces,
            doorbell_words=self.doorbell_words,
            io_engine=self.engine,
            data_plane=plane,
        )
        self.memory.add_listener(self.ctrl.data.memory_changed)
        self._next = self.memory.base
        self.admin = HostQueue(self, 0, admin_entries)
        self.io: dict[int, HostQueue] = {}
        self.scratch = self.alloc(4 * PAGE)

    def alloc(self, size: int) -> int:
        addr = self._next
        self._next += (size + PAGE - 1) // PAGE * PAGE
        assert self._next <= self.memory.base + len(self.memory.ram), "guest memory exhausted"
        return addr

    def write_reg(self, reg: int, value: int, size: int = 4) -> None:
        self.ctrl.mmio_write(reg, size, value)

    def read_reg(self, reg: int, size: int = 4) -> int:
        return self.ctrl.mmio_read(reg, size)

    def cc_value(self, en: bool = True, mps: int = 0, css: int = 0, shn: int = 0) -> int:
        return (4 << 20) | (6 << 16) | (shn << 14) | (mps << 7) | (css << 4) | int(en)

    def enable(self) -> None:
        a = self.admin
        self.write_reg(Reg.AQA, ((a.entries - 1) << 16) | (a.entries - 1))
        self.write_reg(Reg.ASQ, a.sq_addr, 8)
        self.write_reg(Reg.ACQ, a.cq_addr, 8)
        self.write_reg(Reg.CC, self.cc_value())
        assert self.read_reg(Reg.CSTS) & 1, "controller did not become ready"

    def disable(self) -> None:
        self.write_reg(Reg.CC, self.cc_value(en=False))
        self.admin = HostQueue(self, 0, self.admin.entries)
        self.io.clear()

    # --- admin ------------------------------------------------------------------

    def admin_cmd(self, dwords: Sequence[int]) -> Completion:
        cid = self.admin.submit(dwords)
        self.ctrl.process_admin()
        done = self.admin.reap()
        assert len(done) == 1, done
        assert done[0].cid == cid
        return done[0]

    def identify(
        self, cns: int, nsid: int = 0, cntid: int = 0, csi: int = 0
    ) -> tuple[Completion, bytes]:
        buf = self.scratch
        self.memory.write(buf, b"\xa5" * PAGE)  # junk: the command must overwrite it all
        dw10, dw11 = cns | (cntid << 16), csi << 24
        c = self.admin_cmd([AdminOpcode.IDENTIFY, nsid, 0, 0, 0, 0, *prp(buf), 0, 0, dw10, dw11])
        return c, self.memory.read(buf, PAGE)

    def get_log(
        self,
        lid: int,
        length: int,
        offset: int = 0,
        rae: bool = False,
        nsid: int = BROADCAST,
        csi: int = 0,
        lsp: int = 0,
    ) -> tuple[Completion, bytes]:
        """Get Log Page for `length` bytes (a multiple of 4) into a PRP-described buffer."""
        buf = self.buffer(length)
        self.memory.write(buf, b"\xa5" * length)
        prp1, prp2 = self.prps(buf, length)
        numd = length // 4 - 1
        dw10 = lid | (lsp << 8) | (int(rae) << 15) | ((numd & 0xFFFF) << 16)
        c = self.admin_cmd(
            [
                AdminOpcode.GET_LOG_PAGE,
                nsid,
                0,
                0,
                0,
                0,
                *split(prp1),
                *split(prp2),
                dw10,
                numd >> 16,
                offset & 0xFFFFFFFF,
                offset >> 32,
                csi << 24,
            ]
        )
        return c, self.memory.read(buf, length)

    def get_feature(self, fid: int, sel: int = 0, dw11: int = 0, nsid: int = 0) -> Completion:
        return self.admin_cmd(
            [
                AdminOpcode.GET_FEATURES,
                nsid,
                0,
                0,
                0,
                0,
                *prp(self.scratch),
                0,
                0,
                fid | (sel << 8),
                dw11,
            ]
        )

    def set_feature(
        self, fid: int, value: int = 0, save: bool = False, nsid: int = 0, data: int = 0
    ) -> Completion:
        return self.admin_cmd(
            [
                AdminOpcode.SET_FEATURES,
                nsid,
                0,
                0,
                0,
                0,
                *prp(data),
                0,
                0,
                fid | (int(save) << 31),
                value,
            ]
        )

    def create_cq(
        self,
        qid: int,
        entries: int,
        addr: int | None = None,
        vector: int | None = None,
        ien: bool = True,
        pc: bool = True,
    ) -> Completion:
        addr = self.alloc(entries * 16) if addr is None else addr
        iv = qid if vector is None else vector
        flags = (int(ien) << 1) | int(pc)
        return self.admin_cmd(
            [
                AdminOpcode.CREATE_IO_CQ,
                0,
                0,
                0,
                0,
                0,
                *prp(addr),
                0,
                0,
                ((entries - 1) << 16) | qid,
                (iv << 16) | flags,
            ]
        )

    def create_sq(
        self, qid: int, entries: int, cqid: int, addr: int | None = None, pc: bool = True
    ) -> Completion:
        addr = self.alloc(entries * 64) if addr is None else addr
        return self.admin_cmd(
            [
                AdminOpcode.CREATE_IO_SQ,
                0,
                0,
                0,
                0,
                0,
                *prp(addr),
                0,
                0,
                ((entries - 1) << 16) | qid,
                (cqid << 16) | int(pc),
            ]
        )

    def delete_sq(self, qid: int) -> Completion:
        return self.admin_cmd([AdminOpcode.DELETE_IO_SQ, 0, 0, 0, 0, 0, 0, 0, 0, 0, qid])

    def delete_cq(self, qid: int) -> Completion:
        return self.admin_cmd([AdminOpcode.DELETE_IO_CQ, 0, 0, 0, 0, 0, 0, 0, 0, 0, qid])

    def create_io_queue_pair(
        self,
        qid: int,
        entries: int = 64,
        vector: int | None = None,
        cq_entries: int | None = None,
        ien: bool = True,
    ) -> HostQueue:
        q = HostQueue(self, qid, entries, cq_entries)
        c = self.create_cq(qid, q.cq_entries, q.cq_addr, vector, ien)
        assert c.status == 0, hex(c.status)
        c = self.create_sq(qid, entries, qid, q.sq_addr)
        assert c.status == 0, hex(c.status)
        self.io[qid] = q
        return q

    # --- I/O --------------------------------------------------------------------

    def run_io(self) -> int:
        """One pass over the I/O queues, then every transfer in flight completed, and
        what the data plane reported applied (as the admin worker would)."""
        n = self.ctrl.data.process()
        self.ctrl.data_plane_notified()
        return n

    def sq(self, qid: int) -> QueueState:
        """Where I/O SQ `qid` stands in the data plane."""
        (state,) = (q for q in self.ctrl.data.queues() if q.qid == qid and not q.is_cq)
        return state

    def io_cmd(self, qid: int, dwords: Sequence[int]) -> Completion:
        q = self.io[qid]
        cid = q.submit(dwords)
        self.run_io()
        done = q.reap()
        assert len(done) == 1, done
        assert done[0].cid == cid
        return done[0]

    def buffer(self, size: int) -> int:
        return self.alloc(size)

    def prps(self, addr: int, length: int) -> tuple[int, int]:
        """PRP1/PRP2 for a contiguous buffer, building a PRP list when needed."""
        return self.prps_for_pages(addr, pages_from(addr, length))

    def prps_for_pages(self, first: int, pages: list[int]) -> tuple[int, int]:
        """PRP1 = `first` (may have an offset); `pages` are the page addresses after it."""
        if not pages:
            return first, 0
        if len(pages) == 1:
            return first, pages[0]
        return first, self.prp_list(pages)

    def prp_list(self, pages: list[int]) -> int:
        """Page-aligned PRP list pages holding `pages`, chained as needed; returns the first."""
        per_page = PAGE // 8
        chunks: list[list[int]] = []
        rest = list(pages)
        while rest:
            if len(rest) <= per_page:
                chunks.append(rest)
                rest = []
            else:
                chunks.append(rest[: per_page - 1])
                rest = rest[per_page - 1 :]
        addrs = [self.alloc(PAGE) for _ in chunks]
        for i, (addr, chunk) in enumerate(zip(addrs, chunks, strict=True)):
            entries = chunk + ([addrs[i + 1]] if i + 1 < len(addrs) else [])
            self.memory.write(addr, struct.pack(f"<{len(entries)}Q", *entries))
        return addrs[0]


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Linux's nvme_dbbuf_need_event: ring iff (u16)(new - ei - 1) < (u16)(new - old)."""
    return ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def listen(h: Host, aec: int = 1 << 8) -> int:
    """Enable these asynchronous events (default: Namespace Attribute Notices, as
    Linux does) and leave an AER waiting for them."""
    assert h.set_feature(FeatureId.ASYNC_EVENT_CONFIG, aec).status == 0
    cid = h.admin.submit([AdminOpcode.ASYNC_EVENT_REQUEST])
    h.ctrl.process_admin()
    assert h.admin.peek() == []
    return cid


def events(h: Host) -> list[tuple[int, int]]:
    """(CID, DW0) of the asynchronous events completed so far."""
    h.ctrl.process_admin()
    return [(c.cid, c.dw0) for c in h.admin.reap()]


def pages_from(addr: int, length: int) -> list[int]:
    """The page addresses after the first one that a buffer at `addr` spans."""
    first_end = (addr // PAGE + 1) * PAGE
    return list(range(first_end, addr + length, PAGE))


def split(addr: int) -> tuple[int, int]:
    return addr & 0xFFFFFFFF, addr >> 32


def prp(addr: int) -> tuple[int, int]:
    return split(addr)


def rw(
    opcode: int, nsid: int, addr: int, slba: int, nlb: int, prp2: int = 0, dw12_flags: int = 0
) -> list[int]:
    lo, hi = prp(addr)
    return [
        opcode,
        nsid,
        0,
        0,
        0,
        0,
        lo,
        hi,
        prp2 & 0xFFFFFFFF,
        prp2 >> 32,
        slba & 0xFFFFFFFF,
        (slba >> 32) & 0xFFFFFFFF,
        ((nlb - 1) & 0xFFFF) | dw12_flags,
    ]


def u32(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", data, off)[0])


def u16(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", data, off)[0])


def u64(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", data, off)[0])


def u128(data: bytes, off: int) -> int:
    return int.from_bytes(data[off : off + 16], "little")


# --- backends -------------------------------------------------------------------


def make_file(path: Path, size: int, fill: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill * (size // len(fill)))
    return path


class SpyBackend:
    """Wraps a backend: records calls, and raises `fail[operation]` when set."""

    def __init__(self, inner: FileBackend, fail: dict[str, OSError] | None = None) -> None:
        self.inner = inner
        self.size = inner.size
        self.block_size = inner.block_size
        self.readonly = inner.readonly
        self.description = inner.description
        self.fail = fail or {}
        #: what store_size() says, if not the inner backend's
        self.store: int | None = None
        #: as a block device (what media_errors asks before choosing a status)
        self.is_block_device = False
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    def _call(self, name: str, *args: object) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self._call("readv", offset)
        self.inner.readv(offset, buffers)

    def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool) -> None:
        self._call("writev", offset, fua)
        self.inner.writev(offset, buffers, fua)

    def flush(self) -> None:
        self._call("flush")
        self.inner.flush()

    def write_zeroes(self, offset: int, length: int, deallocate: bool) -> None:
        self._call("write_zeroes", offset, length, deallocate)
        self.inner.write_zeroes(offset, length, deallocate)

    def deallocate(self, offset: int, length: int) -> None:
        self._call("deallocate", offset, length)
        self.inner.deallocate(offset, length)

    def store_size(self) -> int:
        """The inner store's, unless a test set `store` (a disk that shrank, or went:
        0) or made `fail['store_size']` raise."""
        self._call("store_size")
        return self.inner.store_size() if self.store is None else self.store

    def current_size(self) -> int:
        return self.store_size()

    def close(self) -> None:
        self.inner.close()


def eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --- waiting for a running I/O thread ------------------------------------------------


def wait_for(predicate: Callable[[], object], timeout: float = 60.0) -> None:
    """Until `predicate` holds; the timeout only catches what never happens."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


def completions(q: HostQueue, count: int) -> list[Completion]:
    """The completions on q's CQ once at least `count` have arrived."""
    done: list[Completion] = []

    def arrived() -> bool:
        done.extend(q.reap())
        return len(done) >= count

    wait_for(arrived)
    return done


def parks(host: Host) -> int:
    """How often the host's I/O thread has parked."""
    return int(host.ctrl.statistics()["io_thread"]["parks"])  # type: ignore[index]
