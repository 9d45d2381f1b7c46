"""Scatter Gather Lists (NVMe Base 2.x, 4.3.2): SGL Entry 1, Data Block, Bit Bucket,
Segment and Last Segment descriptors, SGLS, and the status of every malformed list
(Figure 102, Figure 113), driven through Read and Write on a temp-file namespace and,
for random descriptor chains, through the parser itself."""

from __future__ import annotations

import random
import struct

import pytest
from harness import PAGE, UNMAPPED, FakeGuestMemory, Host, NamespaceFactory, u32, with_dnr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvme_mdev.nvme.errors import CommandError
from nvme_mdev.nvme.identity import ControllerConfig
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.sgl import BIT_BUCKET, sgl_segments
from nvme_mdev.nvme.spec import AdminOpcode, Cns, IoOpcode, Status

#: every test here runs with the synchronous and the io_uring engine
pytestmark = pytest.mark.usefixtures("io_engine")
READ, WRITE = IoOpcode.READ, IoOpcode.WRITE
# SGL Identifier byte: type in bits 7:4, sub type 3:0
DATA, BUCKET, SEGMENT, LAST = 0x00, 0x10, 0x20, 0x30
PSDT_SGL = 0b01 << 14  # MPTR holds a buffer address
PSDT_SGL_MPTR_SEGMENT = 0b10 << 14
DESCRIPTOR = struct.Struct("<QI3xB")


def desc(addr: int, length: int, ident: int = DATA) -> bytes:
    return DESCRIPTOR.pack(addr, length, ident)


def sgl_cmd(
    opcode: int,
    sgl1: bytes,
    slba: int,
    nlb: int,
    nsid: int = 1,
    psdt: int = PSDT_SGL,
    dw12_flags: int = 0,
) -> list[int]:
    addr, length, ident = DESCRIPTOR.unpack(sgl1)
    return [
        opcode | psdt,
        nsid,
        0,
        0,
        0,
        0,
        addr & 0xFFFFFFFF,
        addr >> 32,
        length,
        ident << 24,
        slba & 0xFFFFFFFF,
        slba >> 32,
        ((nlb - 1) & 0xFFFF) | dw12_flags,
    ]


def put_segment(h: Host, descriptors: list[bytes], addr: int | None = None) -> int:
    """Write an SGL segment into guest memory; returns its address."""
    raw = b"".join(descriptors)
    if addr is None:
        addr = h.alloc(max(len(raw), 1))
    h.memory.write(addr, raw)
    return addr


def last_segment(h: Host, descriptors: list[bytes]) -> bytes:
    """SGL Entry 1 pointing to a last segment holding `descriptors`."""
    return desc(put_segment(h, descriptors), 16 * len(descriptors), LAST)


def pattern(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def h(file_ns: NamespaceFactory) -> Host:
    """One 1 MiB namespace of 512-byte blocks filled with a pattern; I/O queue pair 1."""
    return make_host(file_ns)


def make_host(file_ns: NamespaceFactory, sgl_support: int = 0b01) -> Host:
    host = Host([file_ns(fill=pattern(PAGE))], ControllerConfig(sgl_support=sgl_support))
    host.enable()
    host.create_io_queue_pair(1)
    return host


def media(h: Host, slba: int, nlb: int) -> bytes:
    """What the namespace holds, read back with PRPs."""
    buf = h.alloc(nlb * 512)
    prp1, prp2 = h.prps(buf, nlb * 512)
    c = h.io_cmd(1, [READ, 1, 0, 0, 0, 0, prp1, prp1 >> 32, prp2, prp2 >> 32, slba, 0, nlb - 1])
    assert c.status == 0
    return h.memory.read(buf, nlb * 512)


# --- SGLS -------------------------------------------------------------------------------


def test_sgls_reported(h: Host) -> None:
    _, d = h.identify(Cns.CONTROLLER)
    sgls = u32(d, 536)
    assert sgls & 0b11 == 0b01  # supported, no Data Block alignment or granularity
    assert sgls & (1 << 16)  # SBBDS: Bit Bucket
    assert sgls & (1 << 18)  # LLDTS: SGLs longer than the transfer
    assert not sgls & (1 << 2)  # no Keyed Data Blocks (fabrics)
    assert not sgls & ((1 << 17) | (1 << 19) | (1 << 20) | (1 << 21))  # no metadata, offsets


def test_sgls_off_refuses_psdt(file_ns: NamespaceFactory) -> None:
    h = make_host(file_ns, sgl_support=0)
    _, d = h.identify(Cns.CONTROLLER)
    assert u32(d, 536) == 0
    buf = h.alloc(PAGE)
    c = h.io_cmd(1, sgl_cmd(READ, desc(buf, 512), 0, 1))
    assert c.status == with_dnr(Status.INVALID_FIELD)


def test_sgl_on_admin_command_is_refused(h: Host) -> None:
    """SGLs shall not be used for Admin commands on PCIe (Base 4.1)."""
    buf = h.alloc(PAGE)
    c = h.admin_cmd(
        [AdminOpcode.IDENTIFY | PSDT_SGL, 0, 0, 0, 0, 0, buf, 0, PAGE, 0, Cns.CONTROLLER]
    )
    assert c.status == with_dnr(Status.INVALID_FIELD)


# --- transfers -----------------------------------------------------------------------------


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
@pytest.mark.parametrize("psdt", [PSDT_SGL, PSDT_SGL_MPTR_SEGMENT], ids=["psdt01", "psdt10"])
def test_one_data_block(h: Host, zero_copy: bool, psdt: int) -> None:
    h.memory.zero_copy = zero_copy
    data = pattern(3 * 512, seed=1)
    src, dst = h.alloc(2 * PAGE), h.alloc(2 * PAGE)
    h.memory.write(src + 3, data)  # byte granularity: any address
    assert h.io_cmd(1, sgl_cmd(WRITE, desc(src + 3, len(data)), 10, 3, psdt=psdt)).status == 0
    assert h.io_cmd(1, sgl_cmd(READ, desc(dst + 1, len(data)), 10, 3, psdt=psdt)).status == 0
    assert h.memory.read(dst + 1, len(data)) == data
    assert media(h, 10, 3) == data


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_last_segment_of_data_blocks(h: Host, zero_copy: bool) -> None:
    """Linux's layout: SGL Entry 1 is a Last Segment of Data Blocks; here with odd
    lengths and addresses, out of address order."""
    h.memory.zero_copy = zero_copy
    data = pattern(4 * 512, seed=2)
    pieces = [(h.alloc(PAGE) + 5, 100), (h.alloc(PAGE) + 17, 1436), (h.alloc(PAGE), 512)]
    pos = 0
    for addr, n in pieces:
        h.memory.write(addr, data[pos : pos + n])
        pos += n
    sgl1 = last_segment(h, [desc(a, n) for a, n in pieces])
    assert h.io_cmd(1, sgl_cmd(WRITE, sgl1, 20, 4)).status == 0
    assert media(h, 20, 4) == data
    for addr, n in pieces:
        h.memory.write(addr, bytes(n))
    assert h.io_cmd(1, sgl_cmd(READ, sgl1, 20, 4)).status == 0
    assert b"".join(h.memory.read(a, n) for a, n in pieces) == data


def test_segment_chain(h: Host) -> None:
    """Segment → segment ending in a Last Segment → last segment: every descriptor
    but the last in a segment is data."""
    data = pattern(8 * 512, seed=3)
    bufs = [h.alloc(PAGE) for _ in range(5)]
    lengths = [512, 1024, 512, 1024, 1024]
    pos = 0
    for addr, n in zip(bufs, lengths, strict=True):
        h.memory.write(addr, data[pos : pos + n])
        pos += n
    seg3 = put_segment(h, [desc(bufs[3], 1024), desc(bufs[4], 1024)])
    seg2 = put_segment(h, [desc(bufs[1], 1024), desc(bufs[2], 512), desc(seg3, 32, LAST)])
    seg1 = put_segment(h, [desc(bufs[0], 512), desc(seg2, 48, SEGMENT)])
    assert h.io_cmd(1, sgl_cmd(WRITE, desc(seg1, 32, SEGMENT), 0, 8)).status == 0
    assert media(h, 0, 8) == data


def test_adjacent_data_blocks_merge(h: Host) -> None:
    buf = h.alloc(PAGE)
    data = pattern(1024, seed=4)
    h.memory.write(buf, data)
    sgl1 = last_segment(h, [desc(buf, 300), desc(buf + 300, 0), desc(buf + 300, 724)])
    dw = sgl_cmd(WRITE, sgl1, 0, 2)
    assert sgl_segments(h.memory, tuple(dw), 1024, False) == [(buf, 1024)]
    assert h.io_cmd(1, dw).status == 0
    assert media(h, 0, 2) == data


def test_data_block_never_merges_into_a_bit_bucket() -> None:
    """A data block that starts where a bit bucket's length would end, counted from its
    placeholder address, stays a separate (transferred) segment."""
    memory = FakeGuestMemory(size=1 << 20, base=0x100000)
    seg = 0x100000 + 0x1000
    memory.write(seg, desc(0, 0x100001, BUCKET) + desc(0x100000, 511))
    dw = (0, 1, 0, 0, 0, 0, seg, 0, 32, LAST << 24)
    assert sgl_segments(memory, dw, 0x100200, True) == [(BIT_BUCKET, 0x100001), (0x100000, 511)]


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_bit_bucket_read(h: Host, zero_copy: bool) -> None:
    """Base Figure 124: 13 KiB read, 3 KiB to A, 2 KiB discarded, 4 KiB to B, 4 KiB to C."""
    h.memory.zero_copy = zero_copy
    expected = media(h, 100, 26)
    a, b, c = h.alloc(PAGE), h.alloc(PAGE), h.alloc(PAGE)
    seg2 = put_segment(h, [desc(c, 4096)])
    seg1 = put_segment(h, [desc(0, 2048, BUCKET), desc(b, 4096), desc(seg2, 16, LAST)])
    sgl = [desc(a, 3072), desc(seg1, 48, SEGMENT)]
    sgl1 = desc(put_segment(h, sgl), 32, SEGMENT)
    assert h.io_cmd(1, sgl_cmd(READ, sgl1, 100, 26)).status == 0
    assert h.memory.read(a, 3072) == expected[:3072]
    assert h.memory.read(b, 4096) == expected[5120:9216]
    assert h.memory.read(c, 4096) == expected[9216:]


def test_bit_bucket_reads_nothing_into_guest(h: Host) -> None:
    """A read wholly into a bit bucket transfers nothing (a large one: more than the
    discard buffer, in several views). Its address (0, unmapped here) is reserved."""
    canary = h.alloc(PAGE)
    h.memory.write(canary, b"\xa5" * PAGE)
    assert h.io_cmd(1, sgl_cmd(READ, desc(0, 256 << 10, BUCKET), 0, 512)).status == 0
    assert h.memory.read(canary, PAGE) == b"\xa5" * PAGE


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_data_after_a_bit_bucket_larger_than_the_discard_buffer(h: Host, zero_copy: bool) -> None:
    """A bit bucket of 64 KiB + 512 bytes (the discard buffer, then a piece of it) and a
    data block after it: exactly the bucket's bytes are dropped, the block gets the rest."""
    h.memory.zero_copy = zero_copy
    expected = media(h, 0, 130)
    block = h.alloc(PAGE)
    sgl1 = last_segment(h, [desc(0, (64 << 10) + 512, BUCKET), desc(block, 512)])
    assert h.io_cmd(1, sgl_cmd(READ, sgl1, 0, 130)).status == 0
    assert h.memory.read(block, 512) == expected[-512:]


def test_bit_bucket_in_write_counts_as_length_zero(h: Host) -> None:
    buf = h.alloc(PAGE)
    data = pattern(1024, seed=5)
    h.memory.write(buf, data)
    sgl1 = last_segment(h, [desc(0, 512, BUCKET), desc(buf, 1024), desc(0, 4096, BUCKET)])
    assert h.io_cmd(1, sgl_cmd(WRITE, sgl1, 8, 2)).status == 0
    assert media(h, 8, 2) == data
    # ... so a write described only by bit buckets is short
    c = h.io_cmd(1, sgl_cmd(WRITE, desc(0, 1024, BUCKET), 8, 2))
    assert c.status == with_dnr(Status.DATA_SGL_LENGTH_INVALID)


def test_sgl_longer_than_transfer_is_accepted(h: Host) -> None:
    """SGLS LLDTS: data past the transfer is not used; descriptors after the transfer
    is described are not examined (an invalid type there does no harm)."""
    buf = h.alloc(2 * PAGE)
    assert h.io_cmd(1, sgl_cmd(READ, desc(buf, 2 * PAGE), 0, 1)).status == 0
    sgl1 = last_segment(h, [desc(buf, 512), desc(buf, 512, 0x40), desc(0, 0, 0xF0)])
    assert h.io_cmd(1, sgl_cmd(READ, sgl1, 0, 1)).status == 0


def test_null_descriptors_are_skipped(h: Host) -> None:
    """An all-zero descriptor is a zero-length Data Block: a NULL descriptor."""
    buf = h.alloc(PAGE)
    sgl1 = last_segment(h, [bytes(16), desc(buf, 512), bytes(16)])
    assert h.io_cmd(1, sgl_cmd(READ, sgl1, 0, 1)).status == 0
    assert h.memory.read(buf, 512) == media(h, 0, 1)


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_more_data_blocks_than_one_vectored_call(h: Host, zero_copy: bool) -> None:
    """1 100 non-adjacent 16-byte blocks: more than IOV_MAX buffers, so the data is
    staged, and still lands where the list says."""
    h.memory.zero_copy = zero_copy
    expected = media(h, 0, 35)[: 1100 * 16]
    base = h.alloc(1100 * 32)
    blocks = [desc(base + 32 * i, 16) for i in range(1100)]
    sgl1 = last_segment(h, [*blocks, desc(0, 35 * 512 - 1100 * 16, BUCKET)])
    assert h.io_cmd(1, sgl_cmd(READ, sgl1, 0, 35)).status == 0
    got = b"".join(h.memory.read(base + 32 * i, 16) for i in range(1100))
    assert got == expected


def test_dword_granularity(file_ns: NamespaceFactory) -> None:
    """SGLS 10b: Data Block addresses and lengths dword aligned, else SGL Data Block
    Granularity Invalid."""
    h = make_host(file_ns, sgl_support=0b10)
    _, d = h.identify(Cns.CONTROLLER)
    assert u32(d, 536) & 0b11 == 0b10
    buf = h.alloc(PAGE)
    assert h.io_cmd(1, sgl_cmd(READ, desc(buf + 4, 512), 0, 1)).status == 0
    for sgl1 in (
        desc(buf + 2, 512),
        last_segment(h, [desc(buf, 510), desc(buf + 512, 2)]),
        last_segment(h, [desc(buf + 1, 512)]),
    ):
        c = h.io_cmd(1, sgl_cmd(READ, sgl1, 0, 1))
        assert c.status == with_dnr(Status.SGL_DATA_BLOCK_GRANULARITY_INVALID)


# --- malformed lists ----------------------------------------------------------------------


def test_data_sgl_too_short(h: Host) -> None:
    buf = h.alloc(PAGE)
    for sgl1 in (
        desc(buf, 1023),
        last_segment(h, [desc(buf, 512), desc(buf + 512, 511)]),
        desc(put_segment(h, [desc(buf, 512)]), 16, SEGMENT),  # a Segment that ends
        desc(0, 0),
    ):
        for op in (READ, WRITE):
            c = h.io_cmd(1, sgl_cmd(op, sgl1, 0, 2))
            assert c.status == with_dnr(Status.DATA_SGL_LENGTH_INVALID), (op, sgl1.hex())


def test_segment_descriptor_not_last_in_its_segment(h: Host) -> None:
    """Figure 113: Invalid Number of SGL Descriptors."""
    buf = h.alloc(PAGE)
    tail = put_segment(h, [desc(buf, 512)])
    for pointer in (desc(tail, 16, LAST), desc(tail, 16, SEGMENT)):
        sgl1 = desc(put_segment(h, [pointer, desc(buf, 512)]), 32, SEGMENT)
        c = h.io_cmd(1, sgl_cmd(READ, sgl1, 0, 2))
        assert c.status == with_dnr(Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS)


def test_segment_descriptor_in_last_segment(h: Host) -> None:
    """Figure 113: a last segment holding a (Last) Segment descriptor is Invalid SGL
    Segment Descriptor."""
    buf = h.alloc(PAGE)
    tail = put_segment(h, [desc(buf + 512, 512)])
    for pointer in (desc(tail, 16, LAST), desc(tail, 16, SEGMENT)):
        sgl1 = last_segment(h, [desc(buf, 512), pointer])
        c = h.io_cmd(1, sgl_cmd(READ, sgl1, 0, 2))
        assert c.status == with_dnr(Status.INVALID_SGL_SEGMENT_DESCRIPTOR)


@pytest.mark.parametrize("kind", [SEGMENT, LAST])
@pytest.mark.parametrize(("offset", "length"), [(0, 0), (0, 8), (0, 24), (4, 16), (8, 17)])
def test_bad_segment_descriptor(h: Host, kind: int, offset: int, length: int) -> None:
    """Length zero or not a multiple of 16, address not qword aligned: Invalid SGL
    Segment Descriptor (Figure 102, 0Dh)."""
    buf = h.alloc(PAGE)
    seg = put_segment(h, [desc(buf, 512), desc(buf + 512, 512)]) + offset
    c = h.io_cmd(1, sgl_cmd(READ, desc(seg, length, kind), 0, 2))
    assert c.status == with_dnr(Status.INVALID_SGL_SEGMENT_DESCRIPTOR)


@pytest.mark.parametrize("ident", [0x40, 0x50, 0x60, 0xE0, 0xF0, 0x01, 0x11, 0x21, 0x31, 0x0A])
def test_descriptor_type_invalid(h: Host, ident: int) -> None:
    """Keyed and Transport Data Blocks (fabrics), reserved and vendor types, and any
    non-zero sub type (Offset is fabrics only, Ah-Fh transport specific): SGL
    Descriptor Type Invalid, in SGL Entry 1 and in a segment."""
    buf = h.alloc(PAGE)
    seg = put_segment(h, [desc(buf, 512)])
    for sgl1 in (desc(seg, 16, ident), last_segment(h, [desc(seg, 16, ident)])):
        c = h.io_cmd(1, sgl_cmd(READ, sgl1, 0, 1))
        assert c.status == with_dnr(Status.SGL_DESCRIPTOR_TYPE_INVALID), hex(ident)


def test_descriptor_past_the_end_of_memory(h: Host) -> None:
    """Address + Length > 2^64: Data SGL Length Invalid (Figures 118, 120, 121)."""
    top = (1 << 64) - 256
    for sgl1 in (desc(top, 512), desc(top, 512, LAST), last_segment(h, [desc(top, 4096)])):
        c = h.io_cmd(1, sgl_cmd(READ, sgl1, 0, 1))
        assert c.status == with_dnr(Status.DATA_SGL_LENGTH_INVALID)


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "bounce"])
def test_unmapped_memory(h: Host, zero_copy: bool) -> None:
    """A segment or a data block in unmapped memory: Data Transfer Error (retryable)."""
    h.memory.zero_copy = zero_copy
    buf = h.alloc(PAGE)
    for sgl1 in (
        desc(UNMAPPED, 16, LAST),
        desc(UNMAPPED, 512),
        last_segment(h, [desc(buf, 256), desc(UNMAPPED, 256)]),
    ):
        for op in (READ, WRITE):
            c = h.io_cmd(1, sgl_cmd(op, sgl1, 0, 1))
            assert c.status == Status.DATA_TRANSFER_ERROR


def test_segment_loop(h: Host) -> None:
    """Segments that point back at each other never describe the data: the walk gives
    up after MAX_DESCRIPTORS descriptors."""
    buf = h.alloc(PAGE)
    a, b = h.alloc(PAGE), h.alloc(PAGE)
    put_segment(h, [desc(buf, 0), desc(b, 32, SEGMENT)], a)
    put_segment(h, [bytes(16), desc(a, 32, SEGMENT)], b)
    c = h.io_cmd(1, sgl_cmd(READ, desc(a, 32, SEGMENT), 0, 1))
    assert c.status == with_dnr(Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS)


def test_huge_segment_is_read_in_pieces(h: Host) -> None:
    """A segment length of almost 4 GiB: descriptors are fetched a page at a time and
    the walk stops when the transfer is described."""
    buf = h.alloc(PAGE)
    sgl1 = desc(put_segment(h, [desc(buf, 512)]), 0xFFFFFFF0, LAST)
    assert h.io_cmd(1, sgl_cmd(READ, sgl1, 0, 1)).status == 0


# --- commands other than Read and Write --------------------------------------------------


def test_dataset_management_range_list_by_sgl(file_ns: NamespaceFactory) -> None:
    h = Host([file_ns(fill=b"\x66")])
    h.enable()
    h.create_io_queue_pair(1)
    ranges = h.alloc(PAGE)
    h.memory.write(ranges + 1, struct.pack("<IIQ", 0, 8, 16))
    dw = sgl_cmd(IoOpcode.DATASET_MANAGEMENT, desc(ranges + 1, 16), 0, 1)
    dw[10:13] = [0, 1 << 2, 0]  # one range, Deallocate
    assert h.io_cmd(1, dw).status == 0
    assert media(h, 16, 8) == bytes(PAGE)
    assert media(h, 24, 1) == b"\x66" * 512


# --- random descriptor chains ----------------------------------------------------------------

_MEMORY = FakeGuestMemory(size=64 << 10, base=0x10000)
_SLOTS = [_MEMORY.base + i * 0x800 for i in range(6)]  # 2 KiB apart: room for 128 each
_STATUSES = {
    Status.DATA_TRANSFER_ERROR,
    Status.INVALID_SGL_SEGMENT_DESCRIPTOR,
    Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS,
    Status.DATA_SGL_LENGTH_INVALID,
    Status.SGL_DESCRIPTOR_TYPE_INVALID,
    Status.SGL_DATA_BLOCK_GRANULARITY_INVALID,
}

# Tables, not free integers: drawing is what costs here, and these hold every case
# (segments, misaligned and odd addresses, the top of memory, unmapped memory).
_addresses = st.sampled_from(
    [*_SLOTS, _SLOTS[0] + 8, _SLOTS[1] + 3, _SLOTS[2] + 2, (1 << 64) - 16, UNMAPPED, 0]
)
_lengths = st.sampled_from(
    [0, 1, 3, 16, 32, 48, 64, 100, 511, 512, 0x800, 4096, 0xFFFFFFF0, 0xFFFFFFFF]
)
_idents = st.sampled_from(
    [*[DATA] * 6, *[BUCKET] * 2, *[SEGMENT] * 3, *[LAST] * 3, 0x40, 0xF0, 0x01, 0x21]
)
_descriptor = st.tuples(_addresses, _lengths, _idents)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sgl1=_descriptor,
    segments=st.lists(st.lists(_descriptor, min_size=1, max_size=6), min_size=6, max_size=6),
    length=st.integers(1, 4096),
    to_guest=st.booleans(),
    dword=st.booleans(),
)
def test_random_descriptor_chains(
    sgl1: tuple[int, int, int],
    segments: list[list[tuple[int, int, int]]],
    length: int,
    to_guest: bool,
    dword: bool,
) -> None:
    """Any chain of descriptors either describes exactly the transfer or fails with
    one of the SGL statuses; nothing else escapes."""
    for slot, descriptors in zip(_SLOTS, segments, strict=True):
        _MEMORY.write(slot, b"".join(desc(a, n & 0xFFFFFFFF, i) for a, n, i in descriptors))
    addr, dlen, ident = sgl1
    dw = (0, 1, 0, 0, 0, 0, addr & 0xFFFFFFFF, addr >> 32 & 0xFFFFFFFF, dlen, ident << 24)
    try:
        result = sgl_segments(_MEMORY, dw, length, to_guest, dword)
    except CommandError as err:
        assert err.status in _STATUSES, hex(err.status)
        return
    assert sum(n for _, n in result) == length
    for seg_addr, n in result:
        assert n > 0
        if seg_addr == BIT_BUCKET:
            assert to_guest  # a bit bucket only discards read data
        else:
            assert seg_addr >= 0 and seg_addr + n <= 1 << 64
            assert not dword or seg_addr & 3 == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    segments=st.lists(st.lists(_descriptor, min_size=1, max_size=6), min_size=4, max_size=4),
    sgl1=_descriptor,
    nlb=st.integers(1, 8),
    write=st.booleans(),
)
def test_random_chains_through_commands(
    sgl_host: Host,
    segments: list[list[tuple[int, int, int]]],
    sgl1: tuple[int, int, int],
    nlb: int,
    write: bool,
) -> None:
    """Through the controller, a random list completes with success or an SGL status
    (never an internal error, never a fatal controller)."""
    h = sgl_host
    slots: list[int] = h.sgl_slots  # type: ignore[attr-defined]

    def here(addr: int) -> int:  # the parser test's segment addresses, in this host
        for i, slot in enumerate(_SLOTS[: len(slots)]):
            if slot <= addr < slot + 16:
                return slots[i] + addr - slot
        return addr

    for slot, descriptors in zip(slots, segments, strict=True):
        raw = b"".join(desc(here(a), n & 0xFFFFFFFF, i) for a, n, i in descriptors)
        h.memory.write(slot, raw)
    addr, dlen, ident = sgl1
    c = h.io_cmd(1, sgl_cmd(WRITE if write else READ, desc(here(addr), dlen, ident), 0, nlb))
    assert c.status == 0 or c.status & 0x7FF in _STATUSES, hex(c.status)
    assert not h.ctrl.registers.fatal


@pytest.fixture(scope="module")
def sgl_host(tmp_path_factory: pytest.TempPathFactory) -> Host:
    from harness import make_file

    from nvme_mdev.backends.file import FileBackend

    path = make_file(tmp_path_factory.mktemp("sgl") / "ns.img", 64 << 10)
    h = Host([Namespace(1, FileBackend(str(path)))], config=ControllerConfig())
    h.enable()
    h.create_io_queue_pair(1, entries=256)
    h.sgl_slots = [h.alloc(PAGE) for _ in range(4)]  # type: ignore[attr-defined]
    return h
