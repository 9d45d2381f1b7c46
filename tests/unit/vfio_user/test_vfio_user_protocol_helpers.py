"""The tuple-style helpers of vfio_user/protocol.py (decode_version,
encode_version_reply, encode_region_info, decode_region_rw, decode_write_multi)."""

from __future__ import annotations

import errno
import json
import struct

import pytest

from nvme_mdev.vfio_user import protocol as p


def version(doc: object, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(doc).encode()
    return struct.pack("<HH", 0, 0) + text + b"\0"


def refused(fn: object, *args: object, err: int = errno.EINVAL) -> None:
    with pytest.raises(p.ProtocolError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.errno == err, info.value


def test_decode_version_good() -> None:
    major, minor, caps = p.decode_version(
        version({"capabilities": {"max_msg_fds": 8, "pgsizes": 4096, "write_multiple": False}})
    )
    assert (major, minor) == (0, 0)
    assert (caps.max_msg_fds, caps.pgsizes, caps.write_multiple) == (8, 4096, False)
    assert caps.max_data_xfer_size is None and caps.effective_max_data_xfer_size == 1 << 20
    # no JSON at all, or no capabilities: the spec's defaults
    assert p.decode_version(struct.pack("<HH", 0, 3))[2] == p.Capabilities()
    assert p.decode_version(version({}))[2].effective_max_msg_fds == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"\0\0",  # short
        version(None, b"{not json"),
        version(None, b"\xff\xfe"),  # not UTF-8
        version([1, 2]),  # not an object
        version("caps"),
        version({"capabilities": [16]}),  # capabilities not an object
        version({"capabilities": "x"}),
        version({"capabilities": {"max_msg_fds": "16"}}),  # bad types
        version({"capabilities": {"max_msg_fds": True}}),
        version({"capabilities": {"max_msg_fds": 1.5}}),
        version({"capabilities": {"max_msg_fds": -1}}),
        version({"capabilities": {"pgsizes": 1 << 64}}),
        version({"capabilities": {"max_data_xfer_size": 0}}),
        version({"capabilities": {"write_multiple": 1}}),
        version(None, b'{"a":1}\0{"b":2}'),  # two strings
        version(None, b"[" * 100000 + b"]" * 100000),  # deep nesting
    ],
)
def test_decode_version_bad(payload: bytes) -> None:
    refused(p.decode_version, payload)


def test_encode_version_reply_takes_the_minimums() -> None:
    client = p.Capabilities(
        max_msg_fds=253, max_data_xfer_size=4 << 20, pgsizes=4096 | 1 << 21, max_dma_maps=10
    )
    payload, ours = p.encode_version_reply(client)
    assert payload[:4] == b"\0\0\0\0" and payload.endswith(b"\0") and payload.count(0) == 5
    doc = json.loads(payload[4:-1])
    assert doc == {
        "capabilities": {
            "max_msg_fds": 16,
            "max_data_xfer_size": 1 << 20,
            "pgsizes": 4096,
            "max_dma_maps": 10,
        }
    }
    assert ours == p.Capabilities(16, 1 << 20, 4096, 10, None)
    small, _ = p.encode_version_reply(p.Capabilities(max_data_xfer_size=4096))
    assert json.loads(small[4:-1]) == {"capabilities": {"max_data_xfer_size": 4096}}
    # nothing offered, nothing stated (the subset rule)
    assert json.loads(p.encode_version_reply(p.Capabilities())[0][4:-1]) == {"capabilities": {}}
    # and it decodes as what it says
    assert p.decode_version(payload)[2] == ours


def test_encode_region_info_sparse_areas() -> None:
    areas = [(0x1000, 0x1000), (0x3000, 0x2000)]
    rw = p.REGION_INFO_FLAG_READ | p.REGION_INFO_FLAG_WRITE | p.REGION_INFO_FLAG_MMAP
    needed = 32 + 8 + 8 + 16 * len(areas)
    full = p.encode_region_info(needed, 0, rw, 0x8000, areas)
    assert len(full) == needed
    argsz, flags, index, cap_offset, size, offset = p.REGION_INFO.unpack_from(full)
    assert (argsz, flags, index, cap_offset, size, offset) == (
        needed,
        rw | p.REGION_INFO_FLAG_CAPS,
        0,
        32,
        0x8000,
        0,
    )
    assert p.CAP_HEADER.unpack_from(full, 32) == (p.REGION_INFO_CAP_SPARSE_MMAP, 1, 0)
    assert p.SPARSE_MMAP.unpack_from(full, 40) == (2, 0)
    assert [p.SPARSE_MMAP_AREA.unpack_from(full, 48 + 16 * i) for i in range(2)] == areas
    assert p.RegionInfo.decode(full).sparse_areas == tuple(areas)
    # too small: the size needed, no CAPS flag, no cap_offset, no caps
    for client_argsz in (32, needed - 1):
        short = p.encode_region_info(client_argsz, 0, rw | p.REGION_INFO_FLAG_CAPS, 0x8000, areas)
        assert p.REGION_INFO.unpack(short) == (needed, rw, 0, 0, 0x8000, 0)
    # no areas: the bare structure whatever the argsz
    plain = p.encode_region_info(4096, 7, 3, 4096, [])
    assert p.REGION_INFO.unpack(plain) == (32, 3, 7, 0, 4096, 0)


def test_decode_region_rw_limits() -> None:
    read = p.REGION_RW.pack(0x10, 7, 4)
    assert p.decode_region_rw(read, False) == (0x10, 7, 4, b"")
    write = p.REGION_RW.pack(0x10, 0, 4) + b"abcd"
    assert p.decode_region_rw(write, True) == (0x10, 0, 4, b"abcd")
    limit = p.MAX_DATA_XFER_SIZE
    assert p.decode_region_rw(p.REGION_RW.pack(0, 0, limit), False)[2] == limit
    refused(p.decode_region_rw, p.REGION_RW.pack(0, 0, limit + 1), False, err=errno.E2BIG)
    refused(p.decode_region_rw, p.REGION_RW.pack(0, 0, limit + 1), True, err=errno.E2BIG)
    refused(p.decode_region_rw, read + b"x", False)  # a read carries no data
    refused(p.decode_region_rw, read[:15], False)
    refused(p.decode_region_rw, write[:-1], True)
    refused(p.decode_region_rw, write + b"e", True)
    refused(p.decode_region_rw, write[:8], True)


def test_decode_write_multi_limits() -> None:
    one = p.WRITE_ONE.pack(8, 0, 4, b"abcd\0\0\0\0")
    assert p.decode_write_multi(p.WRITE_MULTI_COUNT.pack(1) + one) == [(0, 8, b"abcd")]
    most = p.WRITE_MULTI_COUNT.pack(200) + one * 200
    assert len(p.decode_write_multi(most)) == 200
    assert p.decode_write_multi(p.WRITE_MULTI_COUNT.pack(0)) == []
    refused(p.decode_write_multi, p.WRITE_MULTI_COUNT.pack(201) + one * 201)
    refused(p.decode_write_multi, p.WRITE_MULTI_COUNT.pack(2) + one)  # count disagrees
    refused(p.decode_write_multi, p.WRITE_MULTI_COUNT.pack(1) + one + b"x")
    refused(p.decode_write_multi, p.WRITE_MULTI_COUNT.pack(1) + p.WRITE_ONE.pack(0, 0, 9, bytes(8)))
    refused(p.decode_write_multi, b"\1\0\0")
    refused(p.decode_write_multi, p.WRITE_MULTI_COUNT.pack(1 << 63))
