"""I/O commands (NVM Command Set 1.0: Read, Write, Write Zeroes, Dataset Management;
Base 2.0: Flush) and their data pointers (Base 2.0, PRP entries and PRP lists), run
against a real temp-file backend."""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable

import pytest
from harness import (
    BROADCAST,
    PAGE,
    UNMAPPED,
    Completion,
    Host,
    NamespaceFactory,
    SpyBackend,
    eio,
    enospc,
    prp,
    rw,
    u128,
    with_dnr,
)

from nvme_mdev.backends.file import FileBackend
from nvme_mdev.nvme.identity import ControllerConfig
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import AdminOpcode, FeatureId, IoOpcode, LogPage, Status

#: every test here runs with the synchronous and the io_uring engine
pytestmark = pytest.mark.usefixtures("io_engine")
READ, WRITE = IoOpcode.READ, IoOpcode.WRITE
FUA = 1 << 30
DEAC = 1 << 25


def pattern(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def file_bytes(ns: Namespace, offset: int, length: int) -> bytes:
    backend = ns.backend
    if isinstance(backend, SpyBackend):
        backend = backend.inner
    assert isinstance(backend, FileBackend)
    return os.pread(backend.fd, length, offset)


def setup(namespaces: list[Namespace], **config: int) -> Host:
    memory = int(config.pop("memory", 8 << 20))
    h = Host(namespaces, config=ControllerConfig(**config), memory_size=memory)  # type: ignore[arg-type]
    h.enable()
    h.create_io_queue_pair(1)
    return h


def spied(file_ns: NamespaceFactory, **kw: object) -> tuple[Namespace, SpyBackend]:
    fail = kw.pop("fail", None)
    ns = file_ns(**kw)
    assert isinstance(ns.backend, FileBackend)
    spy = SpyBackend(ns.backend, fail)  # type: ignore[arg-type]
    return Namespace(ns.nsid, spy, block_size=ns.block_size, readonly=ns.readonly), spy


@pytest.fixture
def h(file_ns: NamespaceFactory) -> Host:
    """One 1 MiB namespace of 512-byte blocks; I/O queue pair 1."""
    return setup([file_ns()])


# --- Read / Write round trips ------------------------------------------------------


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
@pytest.mark.parametrize("block_size", [512, 4096])
def test_read_write_round_trip(file_ns: NamespaceFactory, block_size: int, zero_copy: bool) -> None:
    ns = file_ns(block_size=block_size)
    h = setup([ns])
    h.memory.zero_copy = zero_copy
    data = pattern(2 * PAGE)
    src, dst = h.alloc(2 * PAGE), h.alloc(2 * PAGE)
    h.memory.write(src, data)
    nlb, slba = 2 * PAGE // block_size, 3
    assert h.io_cmd(1, rw(WRITE, 1, src, slba, nlb, prp2=src + PAGE)).status == 0
    assert file_bytes(ns, slba * block_size, 2 * PAGE) == data
    assert h.io_cmd(1, rw(READ, 1, dst, slba, nlb, prp2=dst + PAGE)).status == 0
    assert h.memory.read(dst, 2 * PAGE) == data


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_prp1_only_with_offset(h: Host, zero_copy: bool) -> None:
    h.memory.zero_copy = zero_copy
    buf = h.alloc(PAGE)
    h.memory.write(buf + 0x200, pattern(512))
    assert h.io_cmd(1, rw(WRITE, 1, buf + 0x200, 7, 1)).status == 0
    assert h.io_cmd(1, rw(READ, 1, buf + 0xC00, 7, 1)).status == 0
    assert h.memory.read(buf + 0xC00, 512) == pattern(512)


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_prp1_offset_continues_in_prp2(h: Host, zero_copy: bool) -> None:
    h.memory.zero_copy = zero_copy
    data = pattern(2048)
    a, b = h.alloc(PAGE), h.alloc(PAGE)  # first 0x200 bytes at the end of a, rest at b
    h.memory.write(a + 0xE00, data[:0x200])
    h.memory.write(b, data[0x200:])
    assert h.io_cmd(1, rw(WRITE, 1, a + 0xE00, 0, 4, prp2=b)).status == 0
    ns = h.ctrl.namespaces[1]
    assert file_bytes(ns, 0, 2048) == data


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_prp_list_scattered_pages(h: Host, zero_copy: bool) -> None:
    h.memory.zero_copy = zero_copy
    pages = [h.alloc(PAGE) for _ in range(5)]
    order = [pages[3], pages[0], pages[4], pages[1]]  # out of address order
    first = pages[2] + 0x100  # PRP1 with an offset: 0xF00 bytes, then 3 whole pages + 0x100
    data = pattern(0xF00 + 3 * PAGE + 0x100)
    h.memory.write(first, data[:0xF00])
    rest = data[0xF00:]
    for i, page in enumerate(order):
        h.memory.write(page, rest[i * PAGE : (i + 1) * PAGE])
    prp1, prp2 = h.prps_for_pages(first, order)
    nlb = len(data) // 512
    assert h.io_cmd(1, rw(WRITE, 1, prp1, 10, nlb, prp2=prp2)).status == 0
    assert file_bytes(h.ctrl.namespaces[1], 10 * 512, len(data)) == data
    dst = h.alloc(5 * PAGE)
    prp1, prp2 = h.prps(dst, len(data))
    assert h.io_cmd(1, rw(READ, 1, prp1, 10, nlb, prp2=prp2)).status == 0
    assert h.memory.read(dst, len(data)) == data


def test_guest_memory_above_4_gib(file_ns: NamespaceFactory) -> None:
    """Every address a command carries is 64 bits: the queues, the Identify buffer,
    PRP1, PRP2 and the PRP list entries all lie above 4 GiB, where a lost upper dword
    would move the data somewhere else."""
    ns = file_ns()
    h = Host([ns], memory_base=0x1_2340_0000)
    h.enable()
    c, data = h.identify(1)  # Identify Controller into a buffer above 4 GiB
    assert c.status == 0 and data[24:64].strip() != b""  # serial, model present
    # Set Features (Timestamp) takes its data from a buffer up there too.
    stamp = 0x1234_5678_9A
    buf = h.alloc(PAGE)
    h.memory.write(buf, stamp.to_bytes(8, "little"))
    set_ts = [AdminOpcode.SET_FEATURES, 0, 0, 0, 0, 0, *prp(buf), 0, 0, FeatureId.TIMESTAMP]
    assert h.admin_cmd(set_ts).status == 0
    h.memory.write(buf, bytes(8))
    get_ts = [AdminOpcode.GET_FEATURES, 0, 0, 0, 0, 0, *prp(buf), 0, 0, FeatureId.TIMESTAMP]
    assert h.admin_cmd(get_ts).status == 0
    got = int.from_bytes(h.memory.read(buf, 6), "little")
    assert stamp <= got < stamp + 3_600_000  # it ran on from the value set (ms)
    h.create_io_queue_pair(1)
    payload = pattern(3 * PAGE)
    src, dst = h.alloc(3 * PAGE), h.alloc(3 * PAGE)
    assert src >> 32 and dst >> 32
    h.memory.write(src, payload)
    prp1, prp2 = h.prps(src, len(payload))  # PRP2 points to a PRP list
    assert h.io_cmd(1, rw(WRITE, 1, prp1, 4, 24, prp2=prp2)).status == 0
    assert file_bytes(ns, 4 * 512, len(payload)) == payload
    prp1, prp2 = h.prps(dst, 2 * PAGE)  # PRP2 is the second page itself
    assert h.io_cmd(1, rw(READ, 1, prp1, 4, 16, prp2=prp2)).status == 0
    assert h.memory.read(dst, 2 * PAGE) == payload[: 2 * PAGE]


def test_prp_list_chained_from_the_last_slot(h: Host) -> None:
    """A PRP list starting in the last two slots of a page: one entry, then a pointer
    to the next list page (the last entry of a full list page chains)."""
    data = pattern(5 * PAGE)
    buf = h.alloc(5 * PAGE)
    h.memory.write(buf, data)
    list1, list2 = h.alloc(PAGE), h.alloc(PAGE)
    h.memory.write(list1 + PAGE - 16, struct.pack("<QQ", buf + PAGE, list2))
    h.memory.write(list2, struct.pack("<QQQ", buf + 2 * PAGE, buf + 3 * PAGE, buf + 4 * PAGE))
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 40, prp2=list1 + PAGE - 16)).status == 0
    assert file_bytes(h.ctrl.namespaces[1], 0, 5 * PAGE) == data


def test_prp_list_chained_over_two_pages_at_mdts(file_ns: NamespaceFactory) -> None:
    """4 MiB (MDTS 10): PRP1 + 1023 list entries = 511 + pointer, then 512."""
    ns = file_ns(size=8 << 20, block_size=4096)
    h = setup([ns], mdts=10, memory=16 << 20)
    length = 4 << 20
    data = pattern(length)
    src, dst = h.alloc(length), h.alloc(length)
    h.memory.write(src, data)
    prp1, prp2 = h.prps(src, length)
    assert h.memory.u32(prp2 + PAGE - 8) != 0  # the first list page chains
    assert h.io_cmd(1, rw(WRITE, 1, prp1, 0, 1024, prp2=prp2)).status == 0
    prp1, prp2 = h.prps(dst, length)
    assert h.io_cmd(1, rw(READ, 1, prp1, 0, 1024, prp2=prp2)).status == 0
    assert h.memory.read(dst, length) == data


def test_prp_more_pages_than_one_vectored_call(file_ns: NamespaceFactory) -> None:
    """4 MiB (MDTS 10) from an offset in PRP1 over scattered pages: 1 025 buffers, more
    than one preadv/pwritev takes (IOV_MAX); the backend goes on piece by piece."""
    ns = file_ns(size=8 << 20, block_size=512)
    h = setup([ns], mdts=10, memory=24 << 20)
    length = 4 << 20
    data = pattern(length)
    first = h.alloc(2 * PAGE) + PAGE - 512
    pages = [h.alloc(2 * PAGE) for _ in range(1024)]  # a gap after each: nothing merges
    h.memory.write(first, data[:512])
    for i, page in enumerate(pages):
        h.memory.write(page, data[512 + i * PAGE : 512 + (i + 1) * PAGE][:PAGE])
    prp1, prp2 = h.prps_for_pages(first, pages)
    nlb = length // 512
    assert h.io_cmd(1, rw(WRITE, 1, prp1, 0, nlb, prp2=prp2)).status == 0
    assert file_bytes(ns, 0, length) == data
    for page in pages:
        h.memory.write(page, bytes(PAGE))
    assert h.io_cmd(1, rw(READ, 1, prp1, 0, nlb, prp2=prp2)).status == 0
    got = h.memory.read(first, 512) + b"".join(h.memory.read(p, PAGE) for p in pages)
    assert got[:length] == data


# --- PRP errors ---------------------------------------------------------------------


def test_prp1_not_dword_aligned(h: Host) -> None:
    buf = h.alloc(PAGE)
    for op in (READ, WRITE):
        assert h.io_cmd(1, rw(op, 1, buf + 2, 0, 1)).status == with_dnr(Status.PRP_OFFSET_INVALID)


def test_prp2_entry_with_offset(h: Host) -> None:
    buf = h.alloc(2 * PAGE)
    c = h.io_cmd(1, rw(READ, 1, buf, 0, 16, prp2=buf + PAGE + 0x200))
    assert c.status == with_dnr(Status.PRP_OFFSET_INVALID)


def test_prp_list_entry_with_offset(h: Host) -> None:
    buf = h.alloc(3 * PAGE)
    lst = h.alloc(PAGE)
    h.memory.write(lst, struct.pack("<QQ", buf + PAGE, buf + 2 * PAGE + 8))
    c = h.io_cmd(1, rw(WRITE, 1, buf, 0, 24, prp2=lst))
    assert c.status == with_dnr(Status.PRP_OFFSET_INVALID)


def test_prp_list_pointer_not_qword_aligned(h: Host) -> None:
    buf = h.alloc(3 * PAGE)
    lst = h.alloc(PAGE)
    c = h.io_cmd(1, rw(READ, 1, buf, 0, 24, prp2=lst + 4))
    assert c.status == with_dnr(Status.PRP_OFFSET_INVALID)


def test_chained_prp_list_pointer_with_offset(h: Host) -> None:
    buf = h.alloc(5 * PAGE)
    list1 = h.alloc(PAGE)
    h.memory.write(list1 + PAGE - 16, struct.pack("<QQ", buf + PAGE, buf + 8))
    c = h.io_cmd(1, rw(READ, 1, buf, 0, 40, prp2=list1 + PAGE - 16))
    assert c.status == with_dnr(Status.PRP_OFFSET_INVALID)


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_prp_list_in_unmapped_memory(h: Host, zero_copy: bool) -> None:
    h.memory.zero_copy = zero_copy
    buf = h.alloc(PAGE)
    for op in (READ, WRITE):
        c = h.io_cmd(1, rw(op, 1, buf, 0, 24, prp2=UNMAPPED))
        assert c.status == Status.DATA_TRANSFER_ERROR


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_data_buffer_unmapped(h: Host, zero_copy: bool) -> None:
    h.memory.zero_copy = zero_copy
    for op in (READ, WRITE):
        assert h.io_cmd(1, rw(op, 1, UNMAPPED, 0, 1)).status == Status.DATA_TRANSFER_ERROR
    # A hole in the middle of a PRP list's pages.
    buf = h.alloc(4 * PAGE)
    h.memory.unmap(buf + 2 * PAGE, PAGE)
    prp1, prp2 = h.prps(buf, 4 * PAGE)
    for op in (READ, WRITE):
        c = h.io_cmd(1, rw(op, 1, prp1, 0, 32, prp2=prp2))
        assert c.status == Status.DATA_TRANSFER_ERROR
    # Nothing was written to the namespace by the failed write.
    assert file_bytes(h.ctrl.namespaces[1], 0, 4 * PAGE) == bytes(4 * PAGE)


# --- Command checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slba", "nlb"),
    [(2048, 1), (2047, 2), (0, 2049 & 0xFFFF), ((1 << 64) - 1, 2), ((1 << 64) - 1, 1)],
)
def test_lba_out_of_range(h: Host, slba: int, nlb: int) -> None:
    buf = h.alloc(PAGE)
    for op in (READ, WRITE, IoOpcode.WRITE_ZEROES):
        c = h.io_cmd(1, rw(op, 1, buf, slba, nlb))
        assert c.status == with_dnr(Status.LBA_OUT_OF_RANGE), (op, slba, nlb)


def test_last_block_is_in_range(h: Host) -> None:
    buf = h.alloc(PAGE)
    assert h.io_cmd(1, rw(WRITE, 1, buf, 2047, 1)).status == 0
    assert h.io_cmd(1, rw(READ, 1, buf, 2047, 1)).status == 0


def test_transfer_larger_than_mdts(file_ns: NamespaceFactory) -> None:
    h = setup([file_ns(size=4 << 20)])
    buf = h.alloc(129 * PAGE)
    prp1, prp2 = h.prps(buf, 129 * PAGE)
    for op in (READ, WRITE):
        c = h.io_cmd(1, rw(op, 1, prp1, 0, 1025, prp2=prp2))  # 512 KiB + 512
        assert c.status == with_dnr(Status.INVALID_FIELD)
    assert h.io_cmd(1, rw(READ, 1, prp1, 0, 1024, prp2=prp2)).status == 0  # exactly MDTS


@pytest.mark.parametrize("nsid", [0, 257, 0xFFFFFFFE, BROADCAST])
def test_invalid_namespace(h: Host, nsid: int) -> None:
    """An invalid NSID (0, above NN = 256, broadcast for a non-Flush command)."""
    buf = h.alloc(PAGE)
    for op in (READ, WRITE, IoOpcode.WRITE_ZEROES, IoOpcode.DATASET_MANAGEMENT):
        assert h.io_cmd(1, rw(op, nsid, buf, 0, 1)).status == with_dnr(Status.INVALID_NAMESPACE)


@pytest.mark.parametrize("nsid", [2, 256])
def test_inactive_namespace(h: Host, nsid: int) -> None:
    """A valid NSID (1..NN) with no namespace behind it: Invalid Field in Command."""
    buf = h.alloc(PAGE)
    for op in (READ, WRITE, IoOpcode.FLUSH, IoOpcode.WRITE_ZEROES, IoOpcode.DATASET_MANAGEMENT):
        assert h.io_cmd(1, rw(op, nsid, buf, 0, 1)).status == with_dnr(Status.INVALID_FIELD)


@pytest.mark.parametrize("opcode", [0x03, 0x04, 0x0D, 0x11, 0x7F, 0x80, 0xFF])
def test_invalid_io_opcode(h: Host, opcode: int) -> None:
    """Reserved opcodes, reservations, and Write Uncorrectable (04h, refused)."""
    c = h.io_cmd(1, [opcode, 1])
    assert c.status == with_dnr(Status.INVALID_OPCODE)


@pytest.mark.parametrize("flags", [0x01, 0x02, 0x03, 0xC0, 0x41])
def test_fused_or_reserved_psdt_io_command(h: Host, flags: int) -> None:
    """FUSE on a Read (no fused operation has one) and PSDT 11b (reserved)."""
    buf = h.alloc(PAGE)
    dw = rw(READ, 1, buf, 0, 1)
    dw[0] |= flags << 8
    assert h.io_cmd(1, dw).status == with_dnr(Status.INVALID_FIELD)


def test_write_to_read_only_namespace(file_ns: NamespaceFactory) -> None:
    h = setup([file_ns(readonly=True, fill=b"\x5a")])
    buf = h.alloc(PAGE)
    c = h.io_cmd(1, rw(WRITE, 1, buf, 0, 1))
    assert c.status == with_dnr(Status.NAMESPACE_WRITE_PROTECTED)
    c = h.io_cmd(1, rw(IoOpcode.WRITE_ZEROES, 1, 0, 0, 1))
    assert c.status == with_dnr(Status.NAMESPACE_WRITE_PROTECTED)
    c = dsm(h, [(0, 8)], attributes=1 << 2)
    assert c.status == with_dnr(Status.NAMESPACE_WRITE_PROTECTED)
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1)).status == 0
    assert h.memory.read(buf, 512) == b"\x5a" * 512


def test_fua_write(file_ns: NamespaceFactory) -> None:
    ns, spy = spied(file_ns)
    h = setup([ns])
    buf = h.alloc(PAGE)
    h.memory.write(buf, pattern(512))
    assert h.io_cmd(1, rw(WRITE, 1, buf, 4, 1, dw12_flags=FUA)).status == 0
    assert h.io_cmd(1, rw(WRITE, 1, buf, 5, 1)).status == 0
    assert [args for name, args in spy.calls if name == "writev"] == [(2048, True), (2560, False)]
    assert file_bytes(ns, 2048, 512) == pattern(512)


# --- Flush ---------------------------------------------------------------------------------


def test_flush_one_and_all_namespaces(file_ns: NamespaceFactory) -> None:
    (ns1, spy1), (ns2, spy2) = spied(file_ns, nsid=1), spied(file_ns, nsid=2)
    h = setup([ns1, ns2])
    assert h.io_cmd(1, [IoOpcode.FLUSH, 2]).status == 0
    assert (spy1.count("flush"), spy2.count("flush")) == (0, 1)
    assert h.io_cmd(1, [IoOpcode.FLUSH, BROADCAST]).status == 0  # VWC bits 2:1 = 11b
    assert (spy1.count("flush"), spy2.count("flush")) == (1, 2)


@pytest.mark.parametrize("nsid", [0, 257, 0xFFFFFFFE])
def test_flush_invalid_namespace(h: Host, nsid: int) -> None:
    assert h.io_cmd(1, [IoOpcode.FLUSH, nsid]).status == with_dnr(Status.INVALID_NAMESPACE)


def test_flush_failure_is_write_fault(file_ns: NamespaceFactory) -> None:
    ns, _ = spied(file_ns, fail={"flush": eio()})
    h = setup([ns])
    assert h.io_cmd(1, [IoOpcode.FLUSH, 1]).status == Status.WRITE_FAULT


# --- Write Zeroes --------------------------------------------------------------------------


def write_zeroes(h: Host, slba: int, nlb: int, flags: int = 0, nsid: int = 1) -> int:
    return h.io_cmd(1, rw(IoOpcode.WRITE_ZEROES, nsid, 0, slba, nlb, dw12_flags=flags)).status


def read_back(h: Host, slba: int, nlb: int, block: int = 512) -> bytes:
    buf = h.alloc(nlb * block)
    prp1, prp2 = h.prps(buf, nlb * block)
    assert h.io_cmd(1, rw(READ, 1, prp1, slba, nlb, prp2=prp2)).status == 0
    return h.memory.read(buf, nlb * block)


def test_write_zeroes_reads_back_zero(file_ns: NamespaceFactory) -> None:
    h = setup([file_ns(fill=b"\x77")])
    assert write_zeroes(h, 2, 4) == 0
    assert read_back(h, 0, 8) == b"\x77" * 1024 + bytes(2048) + b"\x77" * 1024


def allocated_blocks(ns: Namespace) -> int:
    backend = ns.backend.inner if isinstance(ns.backend, SpyBackend) else ns.backend
    assert isinstance(backend, FileBackend)
    os.fsync(backend.fd)
    return os.fstat(backend.fd).st_blocks


def test_write_zeroes_deallocate_punches_a_hole(file_ns: NamespaceFactory) -> None:
    ns = file_ns(fill=pattern(PAGE))
    h = setup([ns])
    before = allocated_blocks(ns)
    assert before >= (1 << 20) // 512
    assert write_zeroes(h, 256, 512, DEAC) == 0  # 256 KiB at 128 KiB
    after = allocated_blocks(ns)
    assert after <= before - (256 << 10) // 512
    assert read_back(h, 256, 512) == bytes(256 << 10)
    assert read_back(h, 0, 8) == pattern(PAGE)


def test_write_zeroes_fua_flushes(file_ns: NamespaceFactory) -> None:
    ns, spy = spied(file_ns)
    h = setup([ns])
    assert write_zeroes(h, 0, 8, FUA) == 0
    assert spy.count("flush") == 1
    assert [args for name, args in spy.calls if name == "write_zeroes"] == [(0, 4096, False)]


def test_write_zeroes_has_no_mdts_limit(file_ns: NamespaceFactory) -> None:
    h = setup([file_ns(size=(32 << 20) + PAGE)])
    buf = h.alloc(PAGE)
    h.memory.write(buf, b"\x01" * PAGE)
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0x10000 - 8, 8)).status == 0
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0x10000, 8)).status == 0
    assert write_zeroes(h, 0, 0x10000) == 0  # 32 MiB in one command, NLB 0's based
    assert read_back(h, 0x10000 - 8, 8) == bytes(PAGE)
    assert read_back(h, 0x10000, 8) == b"\x01" * PAGE


# --- Dataset Management ---------------------------------------------------------------


def dsm(h: Host, ranges: list[tuple[int, int]], attributes: int, nsid: int = 1) -> Completion:
    buf = h.alloc(PAGE)
    h.memory.write(buf, b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in ranges))
    return h.io_cmd(
        1,
        [IoOpcode.DATASET_MANAGEMENT, nsid, 0, 0, 0, 0, buf, 0, 0, 0, len(ranges) - 1, attributes],
    )


def test_dsm_deallocate_punches_holes(file_ns: NamespaceFactory) -> None:
    ns = file_ns(fill=pattern(PAGE))
    h = setup([ns])
    before = allocated_blocks(ns)
    c = dsm(h, [(0, 256), (1024, 256), (2000, 0)], attributes=1 << 2)  # AD; NLB 0: no range
    assert c.status == 0
    assert allocated_blocks(ns) <= before - 2 * (128 << 10) // 512
    assert read_back(h, 0, 256) == bytes(128 << 10)
    assert read_back(h, 1024, 256) == bytes(128 << 10)
    assert read_back(h, 256, 8) == pattern(PAGE)


def test_dsm_other_attributes_are_hints(file_ns: NamespaceFactory) -> None:
    ns, spy = spied(file_ns, fill=b"\x33")
    h = setup([ns])
    c = dsm(h, [(0, 16)], attributes=0b011)  # IDR | IDW
    assert c.status == 0
    assert spy.count("deallocate") == 0
    assert read_back(h, 0, 16) == b"\x33" * 8192


def test_dsm_range_out_of_range(h: Host) -> None:
    c = dsm(h, [(0, 8), (2047, 2)], attributes=1 << 2)
    assert c.status == with_dnr(Status.LBA_OUT_OF_RANGE)


def test_dsm_256_ranges(file_ns: NamespaceFactory) -> None:
    ns, spy = spied(file_ns)
    h = setup([ns])
    c = dsm(h, [(i * 8, 1) for i in range(256)], attributes=1 << 2)
    assert c.status == 0
    assert spy.count("deallocate") == 256


def test_dsm_range_list_unmapped(h: Host) -> None:
    c = h.io_cmd(
        1,
        [
            IoOpcode.DATASET_MANAGEMENT,
            1,
            0,
            0,
            0,
            0,
            *divmod(UNMAPPED, 1 << 32)[::-1],
            0,
            0,
            0,
            1 << 2,
        ],
    )
    assert c.status == Status.DATA_TRANSFER_ERROR


# --- Backend failures ---------------------------------------------------------------


def media_errors(h: Host) -> int:
    c, data = h.get_log(LogPage.SMART_HEALTH, 512)
    assert c.status == 0
    return u128(data, 160)


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_backend_read_error_is_unrecovered_read_error(
    file_ns: NamespaceFactory, zero_copy: bool
) -> None:
    ns, _ = spied(file_ns, fail={"readv": eio()})
    h = setup([ns])
    h.memory.zero_copy = zero_copy
    buf = h.alloc(PAGE)
    c = h.io_cmd(1, rw(READ, 1, buf, 0, 1))
    assert c.status == Status.UNRECOVERED_READ_ERROR  # media error: retry allowed
    assert media_errors(h) == 1


def write_one(h: Host, buf: int) -> list[int]:
    return rw(WRITE, 1, buf, 0, 1)


def zero_one(h: Host, buf: int) -> list[int]:
    return rw(IoOpcode.WRITE_ZEROES, 1, 0, 0, 1)


@pytest.mark.parametrize(
    ("operation", "command"), [("writev", write_one), ("write_zeroes", zero_one)]
)
def test_backend_write_errors(
    file_ns: NamespaceFactory, operation: str, command: Callable[[Host, int], list[int]]
) -> None:
    ns, spy = spied(file_ns, fail={operation: eio()})
    h = setup([ns])
    buf = h.alloc(PAGE)
    assert h.io_cmd(1, command(h, buf)).status == Status.WRITE_FAULT
    assert media_errors(h) == 1
    spy.fail = {operation: enospc()}
    assert h.io_cmd(1, command(h, buf)).status == with_dnr(Status.CAPACITY_EXCEEDED)
    assert media_errors(h) == 1  # not a media error


def test_backend_deallocate_errors(file_ns: NamespaceFactory) -> None:
    ns, spy = spied(file_ns, fail={"deallocate": eio()})
    h = setup([ns])
    assert dsm(h, [(0, 8)], attributes=1 << 2).status == Status.WRITE_FAULT
    spy.fail = {"deallocate": enospc()}
    c = dsm(h, [(0, 8)], attributes=1 << 2)
    assert c.status == with_dnr(Status.CAPACITY_EXCEEDED)


def test_failed_write_not_counted(file_ns: NamespaceFactory) -> None:
    ns, _ = spied(file_ns, fail={"writev": eio()})
    h = setup([ns])
    buf = h.alloc(PAGE)
    h.io_cmd(1, rw(WRITE, 1, buf, 0, 1))
    _, data = h.get_log(LogPage.SMART_HEALTH, 512)
    assert u128(data, 48) == 0 and u128(data, 80) == 0


@pytest.mark.parametrize("deac", [False, True])
def test_zeroing_without_fallocate_support(
    file_ns: NamespaceFactory, monkeypatch: pytest.MonkeyPatch, deac: bool
) -> None:
    """A filesystem without FALLOC_FL_PUNCH_HOLE / ZERO_RANGE: Write Zeroes and DSM
    deallocate must still read back zeroes, as DLFEAT (001b) promises."""
    monkeypatch.setattr(FileBackend, "_fallocate", lambda self, mode, offset, length: False)
    h = setup([file_ns(fill=b"\x42")])
    assert write_zeroes(h, 0, 8, DEAC if deac else 0) == 0
    assert read_back(h, 0, 8) == bytes(PAGE)
    assert dsm(h, [(16, 8)], attributes=1 << 2).status == 0
    assert read_back(h, 16, 8) == bytes(PAGE)
    assert read_back(h, 8, 8) == b"\x42" * PAGE


def test_volatile_write_cache_disabled_writes_through(file_ns: NamespaceFactory) -> None:
    """With the volatile write cache off (Set Features 06h WCE = 0) a completed write is
    durable: every write goes out as FUA."""
    ns, spy = spied(file_ns)
    h = setup([ns])
    buf = h.alloc(PAGE)
    assert h.set_feature(0x06, 0).status == 0
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 1)).status == 0
    assert write_zeroes(h, 8, 8) == 0
    assert spy.calls[-3:] == [
        ("writev", (0, True)),
        ("write_zeroes", (4096, 4096, False)),
        ("flush", ()),
    ]
    assert h.set_feature(0x06, 1).status == 0
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 1)).status == 0
    assert spy.calls[-1] == ("writev", (0, False))
    # A reset brings the default (cache on) back.
    assert h.set_feature(0x06, 0).status == 0
    h.disable()
    h.enable()
    h.create_io_queue_pair(1)
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 1)).status == 0
    assert spy.calls[-1] == ("writev", (0, False))
