#!/usr/bin/env python3
"""The device's own cost per I/O, without a socket or a client: the controller
model over memfd "guest RAM" (as DMA_MAP gives it), a null or file namespace,
commands pre-written into a 1024-entry SQ, shadow doorbells as Linux uses them.
Each round publishes a batch of `--depth` commands and runs process_io until all
complete, so it measures doorbell → command → backend → completion → interrupt.
File rows run once per I/O engine (sync; uring where the kernel has io_uring).

    tools/profile_hot_path.py                 # µs per command, by workload
    tools/profile_hot_path.py --profile read  # and where the time goes (cProfile)
    tools/profile_hot_path.py --profile read --backend file --engine uring
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nvme_mdev.backends import uring
from nvme_mdev.backends.file import FileBackend, NullBackend
from nvme_mdev.backends.io_engine import make_io_engine
from nvme_mdev.nvme.controller import Controller
from nvme_mdev.nvme.identity import ControllerConfig
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import CQE, DOORBELL_BASE, SQE, AdminOpcode, IoOpcode, Reg
from nvme_mdev.vfio_user.memory import DmaMemory

RAM_BASE, RAM_SIZE, PAGE, ENTRIES = 0x100000, 192 << 20, 4096, 1024


class Interrupts:
    def __init__(self) -> None:
        self.sent = 0

    def msix_enabled(self) -> bool:
        return True

    def signal(self, vector: int) -> None:
        self.sent += 1

    def set_intx(self, asserted: bool) -> None:
        pass


class Rig:
    def __init__(self, namespace: Namespace, engine: str = "sync") -> None:
        fd = os.memfd_create("profile-ram")
        os.ftruncate(fd, RAM_SIZE)
        self.memory = DmaMemory()
        region = self.memory.map(RAM_BASE, RAM_SIZE, True, True, fd=fd)
        assert region.buffer is not None
        self.ram = region.buffer
        self.interrupts = Interrupts()
        self.engine = make_io_engine(engine)
        self.ctrl = Controller(
            ControllerConfig(), self.memory, self.interrupts, [namespace], io_engine=self.engine
        )
        self._next = RAM_BASE
        asq, acq = self.alloc(PAGE), self.alloc(PAGE)
        self.ctrl.mmio_write(Reg.AQA, 4, (31 << 16) | 31)
        self.ctrl.mmio_write(Reg.ASQ, 8, asq)
        self.ctrl.mmio_write(Reg.ACQ, 8, acq)
        self.ctrl.mmio_write(Reg.CC, 4, (4 << 20) | (6 << 16) | 1)
        self.admin = (asq, acq, 0)
        shadow, eventidx = self.alloc(PAGE), self.alloc(PAGE)
        self.admin_cmd([AdminOpcode.DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, shadow, 0, eventidx])
        self.admin_cmd([AdminOpcode.SET_FEATURES, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0])
        self.sq, self.cq = self.alloc(ENTRIES * 64), self.alloc(ENTRIES * 16)
        cq_dw = [AdminOpcode.CREATE_IO_CQ, 0, 0, 0, 0, 0, self.cq, 0, 0, 0]
        self.admin_cmd([*cq_dw, 1 | ((ENTRIES - 1) << 16), 0b11 | (1 << 16)])
        sq_dw = [AdminOpcode.CREATE_IO_SQ, 0, 0, 0, 0, 0, self.sq, 0, 0, 0]
        self.admin_cmd([*sq_dw, 1 | ((ENTRIES - 1) << 16), 1 | (1 << 16)])
        self.sq_shadow = shadow - RAM_BASE + 8
        self.cq_shadow = shadow - RAM_BASE + 12
        self.tail = self.head = 0
        self.phase = 1

    def alloc(self, size: int) -> int:
        addr, self._next = self._next, self._next + (size + PAGE - 1) // PAGE * PAGE
        return addr

    def admin_cmd(self, dw: list[int]) -> None:
        asq, acq, n = self.admin
        self.ram[asq - RAM_BASE + n * 64 : asq - RAM_BASE + n * 64 + 64] = SQE.pack(
            *(dw + [0] * 16)[:16]
        )
        self.ctrl.mmio_write(DOORBELL_BASE, 4, n + 1)
        self.ctrl.process_admin()
        status = CQE.unpack_from(self.ram, acq - RAM_BASE + n * 16)[5] >> 1
        assert status == 0, f"admin {dw[0]:#x}: status {status:#x}"
        self.ctrl.mmio_write(DOORBELL_BASE + 4, 4, n + 1)
        self.admin = (asq, acq, n + 1)

    def prepare(self, opcode: int, block_bytes: int, nlb: int) -> None:
        """Fill every SQ slot with a command on its own buffer (PRP list if needed)."""
        size = block_bytes * nlb
        for slot in range(ENTRIES):
            buf = self.alloc(size)
            pages = [buf + i * PAGE for i in range(1, size // PAGE)]
            prp2 = 0
            if len(pages) == 1:
                prp2 = pages[0]
            elif pages:
                prp2 = self.alloc(PAGE)
                struct.pack_into(f"<{len(pages)}Q", self.ram, prp2 - RAM_BASE, *pages)
            slba = (slot * nlb) % (1 << 20)
            dw = [opcode | (slot << 16), 1, 0, 0, 0, 0, buf, 0, prp2, 0, slba, 0, nlb - 1]
            self.ram[self.sq - RAM_BASE + slot * 64 : self.sq - RAM_BASE + slot * 64 + 64] = (
                SQE.pack(*(dw + [0] * 16)[:16])
            )

    def round(self, depth: int) -> None:
        self.tail = (self.tail + depth) % ENTRIES
        struct.pack_into("<I", self.ram, self.sq_shadow, self.tail)
        ctrl = self.ctrl
        sq = ctrl.io_sqs[1]
        while True:  # until every command is fetched and none is in flight
            if not ctrl.process_io() and ctrl.io_in_flight():
                ctrl.wait_io(200_000)  # as the I/O thread does: no spinning on the kernel
            if sq.head == self.tail and not ctrl.io_in_flight():
                break
        # consume: the guest moves its CQ head (phase checks are the guest's cost, not ours)
        self.head = (self.head + depth) % ENTRIES
        struct.pack_into("<I", self.ram, self.cq_shadow, self.head)


WORKLOADS = {
    "read": (IoOpcode.READ, 8),  # 4 KiB in 512-byte blocks
    "write": (IoOpcode.WRITE, 8),
    "read-128k": (IoOpcode.READ, 256),
    "flush": (IoOpcode.FLUSH, 1),
}


def measure(
    backend: str, workload: str, depth: int, seconds: float, engine: str = "sync"
) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        if backend == "null":
            ns = Namespace(1, NullBackend(1 << 40))
        else:
            path = Path(tmp) / "ns.img"
            with open(path, "wb") as f:
                f.truncate(1 << 30)
            ns = Namespace(1, FileBackend(str(path)))
        rig = Rig(ns, engine)
        opcode, nlb = WORKLOADS[workload]
        rig.prepare(opcode, 512, nlb)
        for _ in range(50):  # warm up
            rig.round(depth)
        count, start = 0, time.perf_counter()
        cpu0 = time.thread_time()
        while time.perf_counter() - start < seconds:
            for _ in range(20):
                rig.round(depth)
            count += 20 * depth
        cpu = time.thread_time() - cpu0
        ns.backend.close()
        rig.engine.close()
        return cpu / count * 1e6, rig.interrupts.sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--profile", choices=sorted(WORKLOADS), help="cProfile this workload")
    parser.add_argument("--backend", choices=("null", "file"), default="null")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--engine", choices=("sync", "uring"), default="sync")
    args = parser.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        measure(args.backend, args.profile, args.depth, args.seconds, args.engine)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
        return 0
    engines = ["sync"] if uring.unavailable() else ["sync", "uring"]
    head = f"{'backend':<8} {'engine':<6} {'workload':<10} {'depth':>5}"
    print(f"{head} {'µs/command':>11} {'commands/s':>11}")
    for backend in ("null", "file"):
        # null has no storage for an engine to queue to: it always runs synchronously
        for engine in engines if backend == "file" else ["sync"]:
            for workload in WORKLOADS:
                for depth in (1, 32):
                    us, _ = measure(backend, workload, depth, args.seconds, engine)
                    row = f"{backend:<8} {engine:<6} {workload:<10} {depth:>5}"
                    print(f"{row} {us:>11.2f} {1e6 / us:>11,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
