"""What the conformance tests share: the namespaces of the device under test, and
checks and I/O shortcuts written with nvme_mdev.nvme_host."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nvme_mdev.nvme.spec import IoOpcode, Status
from nvme_mdev.nvme_host import Completion, HostQueuePair, NvmeHost, nvm_command
from nvme_mdev.virtual_controller import VirtualController


@dataclass(frozen=True)
class NamespaceLayout:
    nsid: int
    size: int
    block_size: int
    readonly: bool = False

    @property
    def blocks(self) -> int:
        return self.size // self.block_size


NAMESPACES = (
    NamespaceLayout(1, 8 << 20, 512),
    NamespaceLayout(2, 8 << 20, 4096),
    NamespaceLayout(3, 4 << 20, 512, readonly=True),
)
NS512, NS4K, NS_RO = (ns.nsid for ns in NAMESPACES)
LAYOUT = {ns.nsid: ns for ns in NAMESPACES}
#: an NSID no namespace has, but valid for the controller (1..NN)
INACTIVE_NSID = 9
BROADCAST = 0xFFFFFFFF
PAGE = 4096


@dataclass
class Device:
    controller: VirtualController
    images: dict[int, Path]

    @property
    def socket_path(self) -> str:
        return self.controller.server.socket_path

    def stored(self, nsid: int, slba: int, nlb: int) -> bytes:
        """The bytes of blocks [slba, slba + nlb) in the namespace's image file."""
        bs = LAYOUT[nsid].block_size
        with open(self.images[nsid], "rb") as f:
            f.seek(slba * bs)
            return f.read(nlb * bs)

    def store(self, nsid: int, slba: int, data: bytes) -> None:
        """Put `data` straight into the image file (bypassing the controller)."""
        fd = os.open(self.images[nsid], os.O_WRONLY)
        try:
            os.pwrite(fd, data, slba * LAYOUT[nsid].block_size)
        finally:
            os.close(fd)


def assert_status(c: Completion, expected: int, dnr: bool | None = None) -> None:
    """The completion carries status `expected` (SCT << 8 | SC) and, if given, DNR."""
    assert c.code == expected, f"status {c.code:#05x}, expected {expected:#05x}"
    if dnr is not None:
        assert c.dnr == dnr, f"DNR {int(c.dnr)}, expected {int(dnr)} (status {c.status:#x})"


def assert_ok(c: Completion) -> None:
    assert c.status == 0, f"status {c.status:#x}"


def pattern(length: int, seed: int) -> bytes:
    """`length` recognisable bytes, different for each seed."""
    block = bytes((seed * 7 + i * 13) & 0xFF for i in range(256))
    return (block * (length // 256 + 1))[:length]


def write_blocks(
    host: NvmeHost, q: HostQueuePair, nsid: int, slba: int, data: bytes, fua: bool = False
) -> Completion:
    """A Write of `data` (whole blocks) through PRPs."""
    buf = host.alloc(len(data))
    host.ram.write(buf, data)
    prp1, prp2 = host.prps(buf, len(data))
    nlb = len(data) // LAYOUT[nsid].block_size
    return q.command(nvm_command(IoOpcode.WRITE, nsid, slba, nlb, prp1, prp2, fua=fua))


def read_blocks(
    host: NvmeHost, q: HostQueuePair, nsid: int, slba: int, nlb: int
) -> tuple[Completion, bytes]:
    """A Read of `nlb` blocks through PRPs; the data (empty on an error)."""
    length = nlb * LAYOUT[nsid].block_size
    buf = host.alloc(length)
    prp1, prp2 = host.prps(buf, length)
    c = q.command(nvm_command(IoOpcode.READ, nsid, slba, nlb, prp1, prp2))
    return c, host.ram.read(buf, length) if c.ok else b""


def settle(seconds: float = 0.05) -> None:
    """Give the device's threads time to act on what was sent (for checking that
    something did NOT happen; never for waiting until something has: see wait_until)."""
    time.sleep(seconds)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Until `condition` holds. The timeout is no speed requirement: it only catches
    what never happens, however loaded the machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not in {timeout} s")
        time.sleep(0.001)


def completion_waiting(q: HostQueuePair) -> bool:
    """Whether the entry at the head of q's CQ is a new completion (its Phase Tag is
    the current phase), looked at without consuming it."""
    cq = q.cq_pair
    entry = cq.host.ram.read(cq.cq_addr + cq.cq_head * 16, 16)
    return entry[14] & 1 == cq.phase  # bit 0 of the Status Field's word


def reap_unrung(q: HostQueuePair, count: int) -> list[Completion]:
    """The next `count` completions of q's CQ, once they have arrived, reaped without
    ringing its head doorbell: the controller still counts their entries as in use."""
    done: list[Completion] = []

    def arrived() -> bool:
        done.extend(q.reap(ring=False))
        return len(done) >= count

    wait_until(arrived, f"{count} completions on queue {q.qid}")
    return done


__all__ = [
    "BROADCAST",
    "INACTIVE_NSID",
    "LAYOUT",
    "NAMESPACES",
    "NS4K",
    "NS512",
    "NS_RO",
    "PAGE",
    "Device",
    "NamespaceLayout",
    "Status",
    "assert_ok",
    "assert_status",
    "completion_waiting",
    "pattern",
    "read_blocks",
    "reap_unrung",
    "settle",
    "wait_until",
    "write_blocks",
]
