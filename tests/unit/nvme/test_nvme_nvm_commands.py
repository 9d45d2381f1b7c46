"""NVM Command Set 1.x I/O commands beyond Read and Write: Compare (3.3.1), Copy (3.3.2),
Dataset Management attributes (3.3.3), Verify (3.3.5), Write Uncorrectable (3.3.7,
refused), and the FUA and Limited Retry bits (fused Compare and Write:
test_fused_compare_and_write.py), on a temp-file namespace."""

from __future__ import annotations

import random
import struct

import pytest
from harness import (
    PAGE,
    UNMAPPED,
    Host,
    NamespaceFactory,
    SpyBackend,
    eio,
    enospc,
    rw,
    u32,
    u128,
    with_dnr,
)

from nvme_mdev.backends.file import FileBackend
from nvme_mdev.nvme.identity import ControllerConfig
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import Cns, IoOpcode, LogPage, Status

READ, WRITE, COMPARE, VERIFY, COPY = (
    IoOpcode.READ,
    IoOpcode.WRITE,
    IoOpcode.COMPARE,
    IoOpcode.VERIFY,
    IoOpcode.COPY,
)
LR, FUA, PRACT = 1 << 31, 1 << 30, 1 << 29
BLOCKS = 2048  # 1 MiB of 512-byte blocks


def pattern(n: int, seed: int = 11) -> bytes:
    return random.Random(seed).randbytes(n)


IMAGE = pattern(1 << 20)


def setup(file_ns: NamespaceFactory, **config: int) -> tuple[Host, SpyBackend]:
    """One 1 MiB namespace holding IMAGE, behind a SpyBackend; I/O queue pair 1."""
    ns = file_ns(fill=IMAGE)
    assert isinstance(ns.backend, FileBackend)
    backend = SpyBackend(ns.backend)
    h = Host([Namespace(1, backend, block_size=512)], config=ControllerConfig(**config))
    h.enable()
    h.create_io_queue_pair(1)
    return h, backend


@pytest.fixture
def hs(file_ns: NamespaceFactory) -> tuple[Host, SpyBackend]:
    return setup(file_ns)


@pytest.fixture
def h(hs: tuple[Host, SpyBackend]) -> Host:
    return hs[0]


def buffer_with(h: Host, data: bytes) -> tuple[int, int]:
    buf = h.alloc(len(data))
    h.memory.write(buf, data)
    return h.prps(buf, len(data))


def media(h: Host, slba: int, nlb: int) -> bytes:
    buf = h.alloc(nlb * 512)
    prp1, prp2 = h.prps(buf, nlb * 512)
    assert h.io_cmd(1, rw(READ, 1, prp1, slba, nlb, prp2=prp2)).status == 0
    return h.memory.read(buf, nlb * 512)


def smart(h: Host) -> bytes:
    c, data = h.get_log(LogPage.SMART_HEALTH, 512)
    assert c.status == 0
    return data


# --- Compare ------------------------------------------------------------------------------


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_compare_equal(h: Host, zero_copy: bool) -> None:
    h.memory.zero_copy = zero_copy
    prp1, prp2 = buffer_with(h, IMAGE[512 * 40 : 512 * 56])
    assert h.io_cmd(1, rw(COMPARE, 1, prp1, 40, 16, prp2=prp2)).status == 0


@pytest.mark.parametrize("where", [0, 511, 4096, 8191])
def test_compare_failure(h: Host, where: int) -> None:
    """Any differing byte: Compare Failure (SCT 2h, SC 85h), do not retry."""
    data = bytearray(IMAGE[: 16 * 512])
    data[where] ^= 1
    prp1, prp2 = buffer_with(h, bytes(data))
    c = h.io_cmd(1, rw(COMPARE, 1, prp1, 0, 16, prp2=prp2))
    assert c.status == with_dnr(Status.COMPARE_FAILURE)
    assert c.status & 0x7FF == 0x285


def test_compare_counts_as_a_read(h: Host) -> None:
    """SMART: Host Read Commands and Data Units Read include Compare."""
    before = smart(h)
    prp1, prp2 = buffer_with(h, IMAGE[:PAGE])
    assert h.io_cmd(1, rw(COMPARE, 1, prp1, 0, 8, prp2=prp2)).status == 0
    after = smart(h)
    assert u128(after, 64) == u128(before, 64) + 1
    assert u128(after, 32) == u128(before, 32) + 1  # 8 blocks: one (rounded up) unit


def test_compare_errors(h: Host) -> None:
    buf = h.alloc(PAGE)
    assert h.io_cmd(1, rw(COMPARE, 1, buf, BLOCKS - 1, 2)).status == with_dnr(
        Status.LBA_OUT_OF_RANGE
    )
    assert h.io_cmd(1, rw(COMPARE, 2, buf, 0, 1)).status == with_dnr(Status.INVALID_FIELD)
    assert h.io_cmd(1, rw(COMPARE, 1, UNMAPPED, 0, 1)).status == Status.DATA_TRANSFER_ERROR
    assert h.io_cmd(1, rw(COMPARE, 1, buf + 1, 0, 1)).status == with_dnr(Status.PRP_OFFSET_INVALID)


def test_compare_larger_than_mdts(file_ns: NamespaceFactory) -> None:
    h, _ = setup(file_ns, mdts=1)  # 8 KiB
    prp1, prp2 = buffer_with(h, IMAGE[: 3 * PAGE])
    c = h.io_cmd(1, rw(COMPARE, 1, prp1, 0, 24, prp2=prp2))
    assert c.status == with_dnr(Status.INVALID_FIELD)


def test_compare_media_error(hs: tuple[Host, SpyBackend]) -> None:
    h, spy = hs
    spy.fail = {"readv": eio()}
    prp1, _ = buffer_with(h, IMAGE[:512])
    c = h.io_cmd(1, rw(COMPARE, 1, prp1, 0, 1))
    assert c.status == Status.UNRECOVERED_READ_ERROR
    spy.fail = {}
    assert u128(smart(h), 160) == 1  # media errors


def test_compare_with_sgl_works_on_a_read_only_namespace(file_ns: NamespaceFactory) -> None:
    """Compare writes nothing: a write-protected namespace allows it."""
    ns = file_ns(fill=b"\x3c", readonly=True)
    h = Host([ns])
    h.enable()
    h.create_io_queue_pair(1)
    buf = h.alloc(PAGE)
    h.memory.write(buf, b"\x3c" * 1024)
    sgl1 = [buf, 0, 1024, 0]  # one SGL Data Block in DPTR
    dw = [COMPARE | (1 << 14), 1, 0, 0, 0, 0, *sgl1, 0, 0, 1]
    assert h.io_cmd(1, dw).status == 0


# --- Verify -------------------------------------------------------------------------------


def test_verify_reads_and_transfers_nothing(hs: tuple[Host, SpyBackend]) -> None:
    h, spy = hs
    before = smart(h)
    canary = h.alloc(PAGE)
    h.memory.write(canary, b"\xee" * PAGE)
    # The data pointer is not used: even an unmapped one does no harm.
    c = h.io_cmd(1, [VERIFY, 1, 0, 0, 0, 0, UNMAPPED & 0xFFFFFFFF, UNMAPPED >> 32, 0, 0, 8, 0, 7])
    assert c.status == 0
    assert [args for name, args in spy.calls if name == "readv"] == [(8 * 512,)]
    assert h.memory.read(canary, PAGE) == b"\xee" * PAGE
    after = smart(h)
    assert u128(after, 32) == u128(before, 32) + 1  # Data Units Read includes Verify
    assert u128(after, 64) == u128(before, 64)  # Host Read Commands does not


def test_verify_beyond_mdts_in_pieces(file_ns: NamespaceFactory) -> None:
    """MDTS does not limit Verify, and VSL (here 8 KiB) only recommends."""
    h, spy = setup(file_ns, mdts=1)
    _, d = h.identify(Cns.CS_CONTROLLER)
    assert d[0] == 1  # VSL
    assert h.io_cmd(1, [VERIFY, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, BLOCKS - 1]).status == 0
    reads = [args for name, args in spy.calls if name == "readv"]
    assert reads == [(i * 2 * PAGE,) for i in range(BLOCKS * 512 // (2 * PAGE))]


def test_verify_media_error(hs: tuple[Host, SpyBackend]) -> None:
    h, spy = hs
    spy.fail = {"readv": eio()}
    c = h.io_cmd(1, [VERIFY, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    assert c.status == Status.UNRECOVERED_READ_ERROR  # the error a Read would get
    spy.fail = {}
    assert u128(smart(h), 160) == 1


def test_verify_errors(h: Host) -> None:
    assert h.io_cmd(1, [VERIFY, 1, 0, 0, 0, 0, 0, 0, 0, 0, BLOCKS, 0, 0]).status == with_dnr(
        Status.LBA_OUT_OF_RANGE
    )
    assert h.io_cmd(1, [VERIFY, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).status == with_dnr(
        Status.INVALID_FIELD  # an inactive NSID
    )
    # PRINFO.PRACT shall be cleared in a Verify (NVM Figure 61)
    c = h.io_cmd(1, [VERIFY, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, PRACT])
    assert c.status == with_dnr(Status.INVALID_FIELD)


# --- FUA and Limited Retry on commands that read ------------------------------------------


@pytest.mark.parametrize("opcode", [READ, COMPARE, VERIFY])
def test_fua_commits_before_reading(hs: tuple[Host, SpyBackend], opcode: int) -> None:
    """FUA on a command that reads: the volatile cache is flushed first, so what is
    read is what is on the medium; without FUA, or with the cache off, no flush."""
    h, spy = hs
    prp1, _ = buffer_with(h, IMAGE[:512])
    assert h.io_cmd(1, rw(opcode, 1, prp1, 0, 1, dw12_flags=FUA | LR)).status == 0
    assert [name for name, _ in spy.calls] == ["flush", "readv"]
    spy.calls.clear()
    assert h.io_cmd(1, rw(opcode, 1, prp1, 0, 1, dw12_flags=LR)).status == 0
    assert [name for name, _ in spy.calls] == ["readv"]
    assert h.set_feature(0x06, 0).status == 0  # write cache off: writes are durable already
    spy.calls.clear()
    assert h.io_cmd(1, rw(opcode, 1, prp1, 0, 1, dw12_flags=FUA)).status == 0
    assert [name for name, _ in spy.calls] == ["readv"]


def test_fua_commit_failure(hs: tuple[Host, SpyBackend]) -> None:
    h, spy = hs
    spy.fail = {"flush": eio()}
    buf = h.alloc(PAGE)
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1, dw12_flags=FUA)).status == Status.WRITE_FAULT


def test_limited_retry_accepted_on_writes(hs: tuple[Host, SpyBackend]) -> None:
    h, spy = hs
    prp1, _ = buffer_with(h, pattern(512, seed=3))
    assert h.io_cmd(1, rw(WRITE, 1, prp1, 4, 1, dw12_flags=LR | FUA)).status == 0
    assert h.io_cmd(1, rw(IoOpcode.WRITE_ZEROES, 1, 0, 5, 1, dw12_flags=LR)).status == 0
    assert ("writev", (4 * 512, True)) in spy.calls
    assert media(h, 4, 1) == pattern(512, seed=3)
    assert media(h, 5, 1) == bytes(512)


# --- Copy ---------------------------------------------------------------------------------


def copy_ranges(h: Host, ranges: list[tuple[int, int]], fmt0_extra: bytes = bytes(16)) -> int:
    """Source Range Entries, format 0h: (SLBA, NLB 1-based) each; returns the list."""
    raw = b"".join(struct.pack("<8xQI", slba, nlb - 1) + fmt0_extra[:12] for slba, nlb in ranges)
    buf = h.alloc(max(len(raw), 1))
    h.memory.write(buf, raw)
    return buf


def copy_cmd(
    h: Host,
    sdlba: int,
    ranges: list[tuple[int, int]],
    flags: int = 0,
    desfmt: int = 0,
    nr: int | None = None,
    nsid: int = 1,
) -> int:
    buf = copy_ranges(h, ranges)
    prp1, prp2 = h.prps(buf, 32 * len(ranges))
    nr = len(ranges) - 1 if nr is None else nr
    dw12 = nr | (desfmt << 8) | flags
    c = h.io_cmd(1, [COPY, nsid, 0, 0, 0, 0, prp1, 0, prp2, 0, sdlba, 0, dw12])
    return c.status


def test_copy(hs: tuple[Host, SpyBackend]) -> None:
    """NVM Figure 41's shape: ranges land in order, one after the other, from SDLBA."""
    h, spy = hs
    ranges = [(101, 50), (1300, 100), (331, 10), (215, 10)]
    before = smart(h)
    assert copy_cmd(h, 1500, ranges) == 0
    expected = b"".join(IMAGE[s * 512 : (s + n) * 512] for s, n in ranges)
    assert media(h, 1500, 170) == expected
    assert media(h, 1499, 1) == IMAGE[1499 * 512 : 1500 * 512]
    assert media(h, 1670, 1) == IMAGE[1670 * 512 : 1671 * 512]
    writes = [args for name, args in spy.calls if name == "writev"]
    assert writes == [(1500 * 512, False)]  # one write: NVMCSA
    after = smart(h)
    assert u128(after, 80) == u128(before, 80)  # Host Write Commands: Writes only
    assert u128(after, 48) == u128(before, 48) + 1  # Data Units Written: 170 blocks


def test_copy_overlapping_ranges_read_before_writing(h: Host) -> None:
    """Overlap is the host's risk (NVM 3.3.2); here the result is as if every source
    were read first."""
    assert copy_cmd(h, 10, [(0, 20), (5, 4)]) == 0
    assert media(h, 10, 24) == IMAGE[: 20 * 512] + IMAGE[5 * 512 : 9 * 512]


def test_copy_fua_and_write_through(hs: tuple[Host, SpyBackend]) -> None:
    h, spy = hs
    assert copy_cmd(h, 100, [(0, 1)], flags=FUA) == 0
    assert spy.calls[-1] == ("writev", (100 * 512, True))
    assert h.set_feature(0x06, 0).status == 0
    assert copy_cmd(h, 100, [(0, 1)]) == 0
    assert spy.calls[-1] == ("writev", (100 * 512, True))


def test_copy_limits(h: Host) -> None:
    """MSRC, MSSRL and MCL as Identify Namespace reports them: Command Size Limit
    Exceeded (SCT 1h, SC 83h) one past each, success at each."""
    _, d = h.identify(Cns.NAMESPACE, nsid=1)
    mssrl, mcl, msrc = struct.unpack_from("<HIB", d, 74)
    assert (mssrl, mcl, msrc) == (1024, 1024, 127)
    over = with_dnr(Status.COMMAND_SIZE_LIMIT_EXCEEDED)
    assert copy_cmd(h, 0, [(1024, mssrl)]) == 0
    assert copy_cmd(h, 0, [(1024, mssrl + 1)]) == over
    assert copy_cmd(h, 1024, [(0, 512), (0, 512)]) == 0
    assert copy_cmd(h, 1024, [(0, 512), (0, 513)]) == over
    assert copy_cmd(h, 1024, [(0, 1)] * (msrc + 1)) == 0
    assert copy_cmd(h, 1024, [(0, 1)] * (msrc + 2)) == over


def test_copy_errors(file_ns: NamespaceFactory) -> None:
    h, spy = setup(file_ns)
    assert copy_cmd(h, 0, [(0, 1)], desfmt=1) == with_dnr(Status.INVALID_FIELD)  # 16b PI
    assert copy_cmd(h, 0, [(0, 1)], desfmt=2) == with_dnr(Status.INVALID_FIELD)  # SNSID
    assert copy_cmd(h, 0, [(BLOCKS - 1, 2)]) == with_dnr(Status.LBA_OUT_OF_RANGE)
    assert copy_cmd(h, BLOCKS - 1, [(0, 2)]) == with_dnr(Status.LBA_OUT_OF_RANGE)
    assert copy_cmd(h, 0, [(0, 1)], nsid=9) == with_dnr(Status.INVALID_FIELD)  # inactive
    c = h.io_cmd(1, [COPY, 1, 0, 0, 0, 0, UNMAPPED & 0xFFFFFFFF, UNMAPPED >> 32, 0, 0, 0, 0, 0])
    assert c.status == Status.DATA_TRANSFER_ERROR
    assert c.dw0 == 0  # no data written: Dword 0 is 0
    assert spy.count("writev") == 0  # nothing was copied by any of these
    spy.fail = {"readv": eio()}
    assert copy_cmd(h, 0, [(8, 1)]) == Status.UNRECOVERED_READ_ERROR
    spy.fail = {"writev": eio()}
    assert copy_cmd(h, 0, [(8, 1)]) == Status.WRITE_FAULT
    spy.fail = {"writev": enospc()}
    assert copy_cmd(h, 0, [(8, 1)]) == with_dnr(Status.CAPACITY_EXCEEDED)


def test_copy_read_only_namespace(file_ns: NamespaceFactory) -> None:
    h = Host([file_ns(readonly=True)])
    h.enable()
    h.create_io_queue_pair(1)
    assert copy_cmd(h, 8, [(0, 1)]) == with_dnr(Status.NAMESPACE_WRITE_PROTECTED)


def test_copy_identify(h: Host) -> None:
    _, d = h.identify(Cns.CONTROLLER)
    assert u32(d, 520) >> 8 & 0b11 == 0b11  # ONCS: Copy, Copy Single Atomicity
    assert struct.unpack_from("<H", d, 534)[0] == 1  # CDFS: format 0h only


# --- Dataset Management ----------------------------------------------------------------------


@pytest.mark.parametrize("attributes", range(8))
def test_dsm_every_attribute_combination(hs: tuple[Host, SpyBackend], attributes: int) -> None:
    """All combinations of IDR, IDW and AD are accepted (NVM 3.3.3), and so are context
    attributes in the ranges; only AD changes anything."""
    h, spy = hs
    buf = h.alloc(PAGE)
    cattr = 0x0F << 24 | 1 << 10 | 1 << 9 | 1 << 8 | 0b11 << 4 | 0x5  # CASZE WP SWR SRR AL AF
    h.memory.write(buf, struct.pack("<IIQ", cattr, 8, 64) + struct.pack("<IIQ", 0, 8, 128))
    c = h.io_cmd(1, [IoOpcode.DATASET_MANAGEMENT, 1, 0, 0, 0, 0, buf, 0, 0, 0, 1, attributes])
    assert c.status == 0
    deallocated = bool(attributes & 0b100)
    assert spy.count("deallocate") == (2 if deallocated else 0)
    assert media(h, 64, 8) == (bytes(PAGE) if deallocated else IMAGE[64 * 512 : 72 * 512])


# --- refused ------------------------------------------------------------------------------------


def test_write_uncorrectable_refused(h: Host) -> None:
    """Not supported: Invalid Command Opcode, ONCS bit 1 clear, no Effects entry; the
    blocks are untouched."""
    c = h.io_cmd(1, rw(IoOpcode.WRITE_UNCORRECTABLE, 1, 0, 0, 8))
    assert c.status == with_dnr(Status.INVALID_OPCODE)
    _, d = h.identify(Cns.CONTROLLER)
    assert not u32(d, 520) & 0b10
    _, d = h.identify(Cns.CS_CONTROLLER)
    assert d[2] == 0  # WUSL
    assert media(h, 0, 8) == IMAGE[:PAGE]
