"""NVMe Base 2.2, 4.3.1 Physical Region Page Entry and List and 4.3.2 Scatter Gather
List (SGL): data buffers described either way, over a real transfer, and the status
of each malformed one (4.2.3 Status Field)."""

from __future__ import annotations

import itertools

import pytest
from conformance_support import NS4K, NS512, Device, assert_ok, assert_status, pattern
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvme_mdev.nvme.sgl import SGLS_BIT_BUCKET
from nvme_mdev.nvme.spec import IoOpcode, Status
from nvme_mdev.nvme_host import (
    SGL_BIT_BUCKET,
    SGL_DATA_BLOCK,
    SGL_LAST_SEGMENT,
    SGL_SEGMENT,
    HostQueuePair,
    NvmeHost,
    nvm_command,
    sgl_descriptor,
    with_sgl,
)

PAGE = 4096
FEW = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _scattered_pages(host: NvmeHost, count: int, order: list[int]) -> list[int]:
    """`count` non-adjacent pages of guest RAM, in the order `order` gives."""
    base = host.alloc(2 * count * PAGE)
    pages = [base + 2 * PAGE * i for i in range(count)]
    return [pages[i] for i in order]


@st.composite
def _prp_layouts(draw: st.DrawFn) -> tuple[int, int, list[int], int]:
    """(blocks of 4 KiB, PRP1 offset, page order, PRP list offset)."""
    blocks = draw(st.integers(1, 24))
    offset = draw(st.sampled_from([0, 4, 512, 2048, 4092]))
    count = (offset + blocks * PAGE + PAGE - 1) // PAGE
    order = draw(st.permutations(list(range(count))))
    list_offset = draw(st.sampled_from([0, 8, PAGE - 16, PAGE - 8]))
    return blocks, offset, list(order), list_offset


@FEW
@given(layout=_prp_layouts(), seed=st.integers(0, 255))
def test_4_3_1_prp_entries_and_lists_describe_the_transfer(
    device: Device,
    host: NvmeHost,
    io: HostQueuePair,
    layout: tuple[int, int, list[int], int],
    seed: int,
) -> None:
    """PRP1 with a dword-aligned offset, then whole pages through PRP2 or a PRP list
    (qword-aligned, chained through its last entry at a page end): a Write stores the
    buffer's bytes in order and a Read of the same layout returns them."""
    blocks, offset, order, list_offset = layout
    length = blocks * PAGE
    data = pattern(length, seed)
    pages = _scattered_pages(host, len(order), order)
    pages[0] += offset
    pos = 0
    for i, page in enumerate(pages):
        n = min(length - pos, PAGE - (offset if i == 0 else 0))
        host.ram.write(page, data[pos : pos + n])
        pos += n
    prp1, prp2 = host.prps_for_pages(pages, list_offset)
    assert_ok(io.command(nvm_command(IoOpcode.WRITE, NS4K, 100, blocks, prp1, prp2)))
    assert device.stored(NS4K, 100, blocks) == data
    for page in pages:
        host.ram.write(page - (page % PAGE), bytes(PAGE))
    assert_ok(io.command(nvm_command(IoOpcode.READ, NS4K, 100, blocks, prp1, prp2)))
    back = b"".join(
        host.ram.read(page, min(PAGE - (offset if i == 0 else 0), length - i * PAGE + offset))
        for i, page in enumerate(pages)
    )
    assert back[:length] == data


def test_4_3_1_prp1_not_dword_aligned_is_prp_offset_invalid(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """PRP entry offsets are dword aligned (bits 1:0 clear): PRP Offset Invalid."""
    buf = host.alloc(PAGE)
    c = io.command(nvm_command(IoOpcode.READ, NS512, 0, 1, buf + 2))
    assert_status(c, Status.PRP_OFFSET_INVALID, dnr=True)


def test_4_3_1_prp2_entry_with_an_offset_is_prp_offset_invalid(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """Entries after the first have offset 0h: PRP Offset Invalid."""
    buf = host.alloc(2 * PAGE)
    c = io.command(nvm_command(IoOpcode.READ, NS512, 0, 16, buf, buf + PAGE + 512))
    assert_status(c, Status.PRP_OFFSET_INVALID, dnr=True)


def test_4_3_1_prp_list_entry_with_an_offset_is_prp_offset_invalid(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """A PRP list entry with a non-zero offset: PRP Offset Invalid."""
    buf = host.alloc(3 * PAGE)
    prp1, prp2 = host.prps_for_pages([buf, buf + PAGE + 64, buf + 2 * PAGE])
    c = io.command(nvm_command(IoOpcode.READ, NS4K, 0, 3, prp1, prp2))
    assert_status(c, Status.PRP_OFFSET_INVALID, dnr=True)


def test_4_3_1_prp_outside_host_memory_is_a_data_transfer_error(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """A buffer the controller cannot reach: Data Transfer Error (retryable)."""
    c = io.command(nvm_command(IoOpcode.READ, NS512, 0, 1, 0x7000_0000_0000))
    assert_status(c, Status.DATA_TRANSFER_ERROR, dnr=False)


@st.composite
def _sgl_layouts(draw: st.DrawFn) -> tuple[int, list[int], list[int], int]:
    """(512-byte blocks, data block lengths, gaps between them, descriptors per segment)."""
    blocks = draw(st.integers(1, 16))
    length = blocks * 512
    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=12))) if length > 1 else []
    edges = [0, *cuts, length]
    sizes = [b - a for a, b in itertools.pairwise(edges)]
    gaps = draw(st.lists(st.integers(0, 64), min_size=len(sizes), max_size=len(sizes)))
    per_segment = draw(st.integers(0, 4))
    return blocks, sizes, gaps, per_segment


@FEW
@given(layout=_sgl_layouts(), seed=st.integers(0, 255))
def test_4_3_2_sgl_data_blocks_and_segments_describe_the_transfer(
    device: Device,
    host: NvmeHost,
    io: HostQueuePair,
    layout: tuple[int, list[int], list[int], int],
    seed: int,
) -> None:
    """Data Block descriptors of any byte length and address (byte granularity), in
    segments chained by Segment and Last Segment descriptors: a Write stores the bytes
    in descriptor order; a Read scatters them back the same way."""
    blocks, sizes, gaps, per_segment = layout
    length = blocks * 512
    data = pattern(length, seed)
    region = host.alloc(length + sum(gaps) + 64)
    descriptors, places, pos, addr = [], [], 0, region
    for size, gap in zip(sizes, gaps, strict=True):
        addr += gap
        host.ram.write(addr, data[pos : pos + size])
        descriptors.append(sgl_descriptor(SGL_DATA_BLOCK, addr, size))
        places.append((addr, size))
        addr += size
        pos += size
    entry = host.sgl(descriptors, per_segment)
    write = with_sgl(nvm_command(IoOpcode.WRITE, NS512, 1000, blocks), entry)
    assert_ok(io.command(write))
    assert device.stored(NS512, 1000, blocks) == data
    host.ram.write(region, bytes(length + sum(gaps) + 64))
    assert_ok(io.command(with_sgl(nvm_command(IoOpcode.READ, NS512, 1000, blocks), entry)))
    assert b"".join(host.ram.read(a, n) for a, n in places) == data


def test_4_3_2_identify_reports_sgl_support_with_bit_buckets(host: NvmeHost) -> None:
    """SGLS bits 1:0 non-zero (SGLs supported) and SBBDS (bit buckets)."""
    sgls = int.from_bytes(host.identify(1)[536:540], "little")
    assert sgls & 0x3 and sgls & SGLS_BIT_BUCKET


def test_4_3_2_bit_bucket_discards_read_data(
    device: Device, host: NvmeHost, io: HostQueuePair
) -> None:
    """A Bit Bucket descriptor in a read: the data it covers is not transferred."""
    device.store(NS512, 1200, pattern(1024, 44))
    buf = host.alloc(PAGE)
    host.ram.write(buf, b"\x55" * PAGE)
    entry = host.sgl(
        [
            sgl_descriptor(SGL_BIT_BUCKET, 0, 512),
            sgl_descriptor(SGL_DATA_BLOCK, buf, 512),
        ]
    )
    assert_ok(io.command(with_sgl(nvm_command(IoOpcode.READ, NS512, 1200, 2), entry)))
    assert host.ram.read(buf, 512) == pattern(1024, 44)[512:]
    assert host.ram.read(buf + 512, 512) == b"\x55" * 512


@pytest.mark.parametrize("subtype", [0x1, 0xA])
def test_4_3_2_descriptor_with_a_reserved_sub_type_is_sgl_descriptor_type_invalid(
    host: NvmeHost, io: HostQueuePair, subtype: int
) -> None:
    """Sub types other than 0h are reserved on PCIe: SGL Descriptor Type Invalid."""
    entry = sgl_descriptor(SGL_DATA_BLOCK, host.alloc(512), 512, subtype=subtype)
    c = io.command(with_sgl(nvm_command(IoOpcode.READ, NS512, 0, 1), entry))
    assert_status(c, Status.SGL_DESCRIPTOR_TYPE_INVALID, dnr=True)


def test_4_3_2_reserved_descriptor_type_is_sgl_descriptor_type_invalid(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """Descriptor types 6h-Eh are reserved: SGL Descriptor Type Invalid."""
    c = io.command(with_sgl(nvm_command(IoOpcode.READ, NS512, 0, 1), sgl_descriptor(0x6)))
    assert_status(c, Status.SGL_DESCRIPTOR_TYPE_INVALID, dnr=True)


def test_4_3_2_sgl_shorter_than_the_transfer_is_data_sgl_length_invalid(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """Data Blocks that add up to less than the transfer: Data SGL Length Invalid."""
    entry = host.sgl([sgl_descriptor(SGL_DATA_BLOCK, host.alloc(512), 256)] * 2)
    c = io.command(with_sgl(nvm_command(IoOpcode.READ, NS512, 0, 2), entry))
    assert_status(c, Status.DATA_SGL_LENGTH_INVALID, dnr=True)


def test_4_3_2_segment_descriptor_inside_the_last_segment_is_invalid(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """The last segment holds no Segment or Last Segment descriptor: Invalid SGL Last
    Segment Descriptor (SGL Segment Descriptor Invalid)."""
    inner = host.alloc(64)
    host.ram.write(inner, sgl_descriptor(SGL_DATA_BLOCK, host.alloc(512), 512))
    last = host.alloc(32)
    host.ram.write(
        last,
        sgl_descriptor(SGL_DATA_BLOCK, host.alloc(256), 256)
        + sgl_descriptor(SGL_SEGMENT, inner, 16),
    )
    entry = sgl_descriptor(SGL_LAST_SEGMENT, last, 32)
    c = io.command(with_sgl(nvm_command(IoOpcode.READ, NS512, 0, 1), entry))
    assert_status(c, Status.INVALID_SGL_SEGMENT_DESCRIPTOR, dnr=True)


def test_4_3_2_segment_descriptor_before_the_end_of_a_segment_is_invalid(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """Only the last descriptor of a segment may point to another segment: Invalid
    Number of SGL Descriptors."""
    nxt = host.alloc(16)
    host.ram.write(nxt, sgl_descriptor(SGL_DATA_BLOCK, host.alloc(256), 256))
    seg = host.alloc(32)
    host.ram.write(
        seg,
        sgl_descriptor(SGL_LAST_SEGMENT, nxt, 16)
        + sgl_descriptor(SGL_DATA_BLOCK, host.alloc(512), 256),
    )
    entry = sgl_descriptor(SGL_SEGMENT, seg, 32)
    c = io.command(with_sgl(nvm_command(IoOpcode.READ, NS512, 0, 1), entry))
    assert_status(c, Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS, dnr=True)


def test_4_1_1_psdt_11b_is_reserved(host: NvmeHost, io: HostQueuePair) -> None:
    """PSDT 11b is reserved: Invalid Field in Command."""
    dw = nvm_command(IoOpcode.READ, NS512, 0, 1, host.alloc(512))
    dw[0] |= 0x3 << 14
    assert_status(io.command(dw), Status.INVALID_FIELD, dnr=True)
