"""vfio-user message encoding and decoding (vfio_user/protocol.py)."""

from __future__ import annotations

import contextlib
import errno
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvme_mdev.vfio_user import protocol as p


def test_header_round_trip() -> None:
    raw = p.encode(7, p.Command.REGION_READ, b"abc", reply=True, error=5, no_reply=True)
    h = p.Header.decode(raw)
    assert (h.msg_id, h.command, h.size, h.error) == (7, 9, 19, 5)
    assert h.is_reply and not h.wants_reply and h.flags & p.FLAG_ERROR


@pytest.mark.parametrize("size", [0, 15, p.MAX_MESSAGE + 1])
def test_header_sizes_refused(size: int) -> None:
    raw = p.HEADER.pack(1, 1, size, 0, 0)
    with pytest.raises(p.ProtocolError):
        p.Header.decode(raw)


def test_version_negotiation_takes_the_smaller_limits() -> None:
    caps = {"capabilities": {"max_msg_fds": 64, "max_data_xfer_size": 1 << 26,
                             "pgsizes": 4096, "max_dma_maps": 10, "write_multiple": True,
                             "migration": {"pgsize": 4096}}}  # fmt: skip
    major, minor, client = p.decode_version(p.VERSION.pack(0, 0) + json.dumps(caps).encode())
    assert (major, minor, client.max_msg_fds, client.write_multiple) == (0, 0, 64, True)
    reply, agreed = p.encode_version_reply(client)
    assert reply.endswith(b"\0")
    assert p.VERSION.unpack_from(reply) == (0, 0)
    ours = json.loads(reply[4:-1])["capabilities"]
    assert ours["max_msg_fds"] == 16 and ours["max_data_xfer_size"] == 1 << 20
    assert ours["max_dma_maps"] == 10 and "migration" not in ours
    assert agreed.max_dma_maps == 10


@pytest.mark.parametrize(
    "text",
    [
        b"{",
        b"[1]",
        b'{"capabilities": 3}',
        b'{"capabilities": {"max_msg_fds": "x"}}',
        b'{"capabilities": {"pgsizes": -1}}',
    ],
)
def test_version_bad_capabilities(text: bytes) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_version(p.VERSION.pack(0, 0) + text + b"\0")
    assert info.value.errno == errno.EINVAL


def test_region_info_with_sparse_mmap_areas() -> None:
    full = p.encode_region_info(256, 0, p.REGION_INFO_FLAG_READ, 16384, [(4096, 4096)])
    argsz, flags, _index, cap_offset, size, _ = p.REGION_INFO.unpack_from(full)
    assert flags & p.REGION_INFO_FLAG_CAPS and cap_offset == 32 and size == 16384
    cap_id, version, nxt, count, _ = p.SPARSE_MMAP_HEADER.unpack_from(full, cap_offset)
    assert (cap_id, version, nxt, count) == (p.CAP_SPARSE_MMAP, 1, 0, 1)
    assert p.SPARSE_MMAP_AREA.unpack_from(full, cap_offset + 16) == (4096, 4096)
    assert argsz == len(full)
    # A client buffer too small for the capability: told the size, no CAPS flag.
    short = p.encode_region_info(32, 0, p.REGION_INFO_FLAG_READ, 16384, [(4096, 4096)])
    argsz, flags, _, cap_offset, _, _ = p.REGION_INFO.unpack_from(short)
    assert len(short) == 32 and argsz == len(full)
    assert not flags & p.REGION_INFO_FLAG_CAPS and cap_offset == 0


def test_region_write_and_multi() -> None:
    payload = p.REGION_RW.pack(0x1000, 0, 4) + b"\1\0\0\0"
    assert p.decode_region_rw(payload, with_data=True) == (0x1000, 0, 4, b"\1\0\0\0")
    with pytest.raises(p.ProtocolError):
        p.decode_region_rw(p.REGION_RW.pack(0, 0, 8) + b"1234", with_data=True)
    multi = (
        p.WRITE_MULTI_COUNT.pack(2)
        + p.WRITE_ONE.pack(8, 0, 4, b"abcdefgh")
        + p.WRITE_ONE.pack(16, 7, 8, b"ABCDEFGH")
    )
    assert p.decode_write_multi(multi) == [(0, 8, b"abcd"), (7, 16, b"ABCDEFGH")]
    with pytest.raises(p.ProtocolError):
        p.decode_write_multi(p.WRITE_MULTI_COUNT.pack(3) + multi[8:])
    with pytest.raises(p.ProtocolError):
        p.decode_write_multi(p.WRITE_MULTI_COUNT.pack(1) + p.WRITE_ONE.pack(0, 0, 9, b"x" * 8))


def test_dma_rw_layout_is_what_qemu_reads() -> None:
    """QEMU 11.1: u64 address, u64 count, then the data."""
    msg = p.encode_dma_write(0x1234, b"\xaa\xbb")
    assert msg == (0x1234).to_bytes(8, "little") + (2).to_bytes(8, "little") + b"\xaa\xbb"
    assert p.decode_dma_rw(msg) == (0x1234, 2, b"\xaa\xbb")
    assert p.encode_dma_read(0x10, 4096) == p.DMA_RW.pack(0x10, 4096)
    with pytest.raises(p.ProtocolError):
        p.decode_dma_rw(p.DMA_RW.pack(0, 10) + b"short")


@given(st.binary(max_size=200))
def test_decoders_fail_only_with_protocol_error(data: bytes) -> None:
    for decode in (
        p.Header.decode,
        p.decode_version,
        lambda d: p.decode_region_rw(d, True),
        p.decode_write_multi,
        p.decode_dma_rw,
    ):
        with contextlib.suppress(p.ProtocolError):
            decode(data)
