"""A passthrough namespace in the controller: the guest's commands reach the host's
namespace as the kernel would get them (checked, NSID and data pointer replaced, the
rest as it was), and the host's answer reaches the guest's completion as it was.
The host namespace here is a fake that answers as a controller would; the io_uring
path is taken as far as a kernel without NVMe devices goes."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import harness
import pytest
from harness import PAGE, Host, rw

from nvme_mdev.backends import passthrough as pt
from nvme_mdev.backends import uring
from nvme_mdev.backends.io_engine import IoEngine
from nvme_mdev.nvme.identity import ControllerConfig
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import DNR, IoOpcode, Status

READ, WRITE = IoOpcode.READ, IoOpcode.WRITE
COMPARE_FAILURE = 0x285  # SCT 2h, SC 85h


class FakeHostNamespace:
    """A host NVMe namespace in memory behind the PassthroughBackend interface: what
    the kernel would hand its controller is kept in `commands`."""

    passthrough = True
    is_block_device = True

    def __init__(self, blocks: int = 2048, block_size: int = 512, readonly: bool = False) -> None:
        self.block_size = block_size
        self.size = blocks * block_size
        self.data = bytearray(self.size)
        self.readonly = readonly
        self.description = "fake-ng0n5"
        self.host_nsid = 5
        self.fd = -1
        self.max_transfer: int | None = None
        self.max_segments: int | None = None
        #: (struct nvme_uring_cmd fields, vectored, buffer lengths)
        self.commands: list[tuple[tuple[int, ...], bool, list[int]]] = []
        #: answer every command with this (status, Dword 0) when set
        self.answer: tuple[int, int] | None = None

    def execute(self, dw: Sequence[int], views: Sequence[memoryview]) -> tuple[int, int]:
        cmd, vectored, _ = pt.encode(dw, self.host_nsid, views, ())
        f = pt.NVME_COMMAND.unpack(cmd)
        self.commands.append((f, vectored, [v.nbytes for v in views]))
        if self.answer is not None:
            return self.answer
        opcode, slba, nlb = f[0], f[10] | (f[11] << 32), (f[12] & 0xFFFF) + 1
        offset, length = slba * self.block_size, nlb * self.block_size
        if opcode in (READ, WRITE, IoOpcode.COMPARE):
            pos = offset
            for view in views:
                n = view.nbytes
                if opcode == READ:
                    view[:] = self.data[pos : pos + n]
                elif opcode == WRITE:
                    self.data[pos : pos + n] = view
                elif self.data[pos : pos + n] != view:
                    return COMPARE_FAILURE, 0
                pos += n
            assert pos == offset + length
        return 0, 0

    def store_size(self) -> int:
        return self.size

    def current_size(self) -> int:
        return self.size

    def io_target(self) -> None:
        return None

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def passthrough_host(
    backend: FakeHostNamespace,
    config: ControllerConfig | None = None,
    engine: IoEngine | None = None,
) -> Host:
    ns = Namespace(1, backend, block_size=backend.block_size)  # type: ignore[arg-type]
    h = Host([ns], config=config, engine=engine)
    h.enable()
    h.create_io_queue_pair(1)
    return h


@pytest.fixture
def fake() -> FakeHostNamespace:
    return FakeHostNamespace()


def test_write_then_read_through_the_host(fake: FakeHostNamespace) -> None:
    h = passthrough_host(fake)
    buf = h.buffer(2 * PAGE)
    payload = os.urandom(2 * PAGE)
    h.memory.write(buf, payload)
    prp1, prp2 = h.prps(buf, 2 * PAGE)
    c = h.io_cmd(1, rw(WRITE, 1, prp1, 16, 16, prp2, dw12_flags=1 << 30))
    assert c.status == 0
    assert fake.data[16 * 512 : 16 * 512 + 2 * PAGE] == payload
    fields, _, lengths = fake.commands[-1]
    assert fields[0] == WRITE and fields[3] == 5  # the host's NSID
    assert fields[12] == (1 << 30) | 15  # FUA and NLB as the guest wrote them
    assert fields[6] == 0 and fields[8] == 0  # no metadata
    assert sum(lengths) == 2 * PAGE

    out = h.buffer(2 * PAGE)
    prp1, prp2 = h.prps(out, 2 * PAGE)
    assert h.io_cmd(1, rw(READ, 1, prp1, 16, 16, prp2)).status == 0
    assert h.memory.read(out, 2 * PAGE) == payload
    counters = h.ctrl.counters
    assert (counters.host_read_commands, counters.host_write_commands) == (1, 1)
    assert counters.bytes_read == counters.bytes_written == 2 * PAGE


def test_scattered_pages_go_as_iovecs(fake: FakeHostNamespace) -> None:
    h = passthrough_host(fake)
    pages = [h.buffer(PAGE) for _ in range(4)]
    pages.reverse()  # not contiguous in guest memory
    for i, p in enumerate(pages):
        h.memory.write(p, bytes([i + 1]) * PAGE)
    prp1, prp2 = h.prps_for_pages(pages[0], pages[1:])
    assert h.io_cmd(1, rw(WRITE, 1, prp1, 0, 32, prp2)).status == 0
    _, vectored, lengths = fake.commands[-1]
    assert vectored and lengths == [PAGE] * 4
    assert fake.data[: 4 * PAGE] == b"".join(bytes([i + 1]) * PAGE for i in range(4))


def test_sgl_data_block(fake: FakeHostNamespace) -> None:
    h = passthrough_host(fake)
    buf = h.buffer(PAGE)
    h.memory.write(buf, b"S" * 1024)
    descriptor = struct.pack("<QI3xB", buf, 1024, 0x00)  # SGL Data Block
    dw = rw(WRITE, 1, 0, 4, 2)
    dw[0] |= 1 << 14  # PSDT 01b: SGLs
    dw[6:10] = struct.unpack("<4I", descriptor)
    assert h.io_cmd(1, dw).status == 0
    assert fake.data[4 * 512 : 6 * 512] == b"S" * 1024
    assert fake.commands[-1][0][1] == 0  # the host sees no PSDT: the kernel sets its own


def test_host_status_and_dword0_reach_the_guest(fake: FakeHostNamespace) -> None:
    h = passthrough_host(fake)
    buf = h.buffer(PAGE)
    fake.answer = (DNR | 0x281, 0x1234)  # Unrecovered Read Error, Do Not Retry
    c = h.io_cmd(1, rw(READ, 1, buf, 0, 1))
    assert (c.status, c.dw0) == (DNR | 0x281, 0x1234)
    assert h.ctrl.counters.media_errors == 1
    fake.answer = (0x002, 0)  # retryable Invalid Field: DNR stays clear, as the host said
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1)).status == 0x002
    fake.answer = None
    h.memory.write(buf, b"x" * 512)
    assert h.io_cmd(1, rw(IoOpcode.COMPARE, 1, buf, 0, 1)).status == COMPARE_FAILURE


def test_kernel_errors(fake: FakeHostNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    h = passthrough_host(fake)
    buf = h.buffer(PAGE)

    def fail(err: int) -> None:
        def execute(dw: Sequence[int], views: Sequence[memoryview]) -> tuple[int, int]:
            raise OSError(err, os.strerror(err))

        monkeypatch.setattr(fake, "execute", execute)

    fail(errno.EINVAL)  # the kernel would not send it
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1)).status == DNR | Status.INVALID_FIELD
    fail(errno.EIO)
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 1)).sc == Status.WRITE_FAULT
    fail(errno.EINTR)
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1)).sc == Status.COMMAND_INTERRUPTED


def test_refused_commands_never_reach_the_host(fake: FakeHostNamespace) -> None:
    h = passthrough_host(fake)
    buf = h.buffer(PAGE)
    for dw, status in [
        (rw(IoOpcode.WRITE_UNCORRECTABLE, 1, buf, 0, 1), Status.INVALID_OPCODE),
        (rw(0x81, 1, buf, 0, 1), Status.INVALID_OPCODE),  # vendor specific
        (rw(READ, 1, buf, 2047, 2), Status.LBA_OUT_OF_RANGE),
        (rw(READ, 1, buf, 0, 1025), Status.INVALID_FIELD),  # > MDTS (512 KiB)
        (rw(READ, 1, harness.UNMAPPED, 0, 1), Status.DATA_TRANSFER_ERROR),
    ]:
        c = h.io_cmd(1, dw)
        assert c.sc == status, (dw[0], hex(c.status))
    # a fused Compare and Write: never passed through (the host's kernel has no such
    # pair), refused whole
    compare, write = rw(IoOpcode.COMPARE, 1, buf, 0, 1), rw(WRITE, 1, buf, 0, 1)
    compare[0] |= 1 << 8
    write[0] |= 2 << 8
    q = h.io[1]
    cids = [q.submit(dw, ring=False) for dw in (compare, write)]
    q.ring_sq()
    h.run_io()
    done = {c.cid: c.sc for c in q.reap()}
    assert done == {cid: Status.INVALID_FIELD for cid in cids}
    assert fake.commands == []


def test_read_only_namespace(fake: FakeHostNamespace) -> None:
    fake.readonly = True
    h = passthrough_host(fake)
    buf = h.buffer(PAGE)
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 1)).sc == Status.NAMESPACE_WRITE_PROTECTED
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1)).status == 0
    assert h.io_cmd(1, [IoOpcode.FLUSH, 1]).status == 0
    assert [f[0] for f, _, _ in fake.commands] == [READ, IoOpcode.FLUSH]


def test_host_queue_limits_bound_mdts(fake: FakeHostNamespace) -> None:
    fake.max_transfer = 128 << 10
    with pytest.raises(ValueError, match="mdts 5 or less"):
        passthrough_host(fake)
    fake.max_transfer, fake.max_segments = None, 33  # 32 pages and the first's offset
    with pytest.raises(ValueError, match="mdts 5 or less"):
        passthrough_host(fake)
    passthrough_host(fake, ControllerConfig(mdts=5))


def test_block_size_is_the_hosts() -> None:
    with pytest.raises(ValueError, match="host's 512-byte blocks, not 4096"):
        Namespace(1, FakeHostNamespace(block_size=512), block_size=4096)  # type: ignore[arg-type]


# --- the io_uring path: URING_CMD in a big-SQE ring ---------------------------------------


@pytest.fixture
def regular_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "not-nvme", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


@pytest.mark.skipif(uring.unavailable() is not None, reason="no io_uring here")
def test_uring_cmd_reaches_the_kernel_and_its_error_the_guest(
    fake: FakeHostNamespace, regular_fd: int, data_plane: str
) -> None:
    """A URING_CMD on a descriptor with no such command (a regular file) comes back as
    -EOPNOTSUPP through the ring, the reap and finish(), to the guest as Invalid Field.
    (The Python data plane's: the native one passes commands through synchronously.)"""
    if data_plane != "python":
        pytest.skip("passthrough on io_uring is the Python data plane's")
    engine = uring.UringEngine(16)
    harness.ENGINES.append(engine)
    if not engine.passthrough_ring:
        pytest.skip("kernel without IORING_SETUP_SQE128/CQE32")
    h = passthrough_host(fake, engine=engine)
    fake.fd = regular_fd
    buf = h.buffer(PAGE)
    q = h.io[1]
    q.submit(rw(READ, 1, buf, 0, 1))
    h.run_io()
    (c,) = q.reap()
    assert c.status == DNR | Status.INVALID_FIELD
    assert fake.commands == []  # it went to the ring, not the synchronous ioctl
    assert engine.in_flight == 0


@pytest.mark.skipif(uring.unavailable() is not None, reason="no io_uring here")
def test_big_ring_sqe_layout_and_nop() -> None:
    ring = uring.Ring(4, uring.IORING_SETUP_BIG)
    try:
        cmd = bytes(range(72))
        ring.prep_uring_cmd(7, pt.NVME_URING_CMD_IO, cmd, 99)
        sqe = bytes(ring._sqes[:128])
        assert sqe[0] == uring.IORING_OP_URING_CMD
        assert struct.unpack_from("<iI", sqe, 4) == (7, pt.NVME_URING_CMD_IO)  # fd, cmd_op
        assert struct.unpack_from("<Q", sqe, 32)[0] == 99  # user_data
        assert sqe[48:120] == cmd and sqe[120:] == bytes(8)
        with pytest.raises(ValueError):
            ring.prep_uring_cmd(7, 0, bytes(81), 1)
        ring.prep(uring.IORING_OP_NOP, -1, 0, 0, 0, 0, 5)  # (replaces the cmd SQE's slot)
        ring.submit(wait=2)
        got = {}
        while len(got) < 2:
            got.update({u: (r, x) for u, r, x in ring.completions32()})
        assert got[5] == (0, 0)
        assert got[99][0] in (-errno.EBADF, -errno.EOPNOTSUPP)  # fd 7: none, or no commands
    finally:
        ring.close()
