"""A small NVMe host driver over the vfio-user client: the guest's part, in Python.

It enables the controller, creates queues in a memfd of "guest RAM", submits
commands and waits for their completions on MSI-X eventfds. Tests and benchmarks
drive devices with it; users can script a device with it.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass

from .nvme.spec import CQE, DOORBELL_BASE, SQE, Reg
from .vfio_user.client import GuestRam, VfioUserClient

PAGE = 4096
BAR0 = 0


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

    def ring(self) -> None:
        self.host.client.write32(BAR0, DOORBELL_BASE + 8 * self.qid, self.sq_tail, posted=True)

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
            self.host.client.write32(
                BAR0, DOORBELL_BASE + 8 * self.qid + 4, self.cq_head, posted=True
            )
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

    def close(self) -> None:
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


__all__ = ["Completion", "HostQueuePair", "NvmeHost", "NvmeHostError", "read_write"]
