"""vfio-user messages (QEMU docs/interop/vfio-user.rst, as QEMU 10.1+ speaks it).

Pure encoding and decoding; no I/O. Anything malformed raises ProtocolError with
the errno to put in the error reply.
"""

from __future__ import annotations

import errno
import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Command(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15


# Header flags
TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20

HEADER = struct.Struct("<HHIII")  # msg_id, command, size, flags, error
HEADER_SIZE = HEADER.size

# Payload layouts (little-endian, as the C structs QEMU sends).
VERSION = struct.Struct("<HH")  # major, minor, then JSON
DMA_MAP = struct.Struct("<IIQQQ")  # argsz, flags, offset, iova, size
DMA_UNMAP = struct.Struct("<IIQQ")  # argsz, flags, iova, size
DEVICE_INFO = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
REGION_INFO = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
IRQ_INFO = struct.Struct("<IIII")  # argsz, flags, index, count
IRQ_SET = struct.Struct("<IIIII")  # argsz, flags, index, start, count
REGION_RW = struct.Struct("<QII")  # offset, region, count, then data
# DMA_READ/DMA_WRITE: u64 address, u64 count, data. QEMU 11.1 reads the count as 64
# bits, as the spec says (older QEMU trees declared it u32 with 4 bytes of padding;
# a u32 count puts the data's first bytes into the count's upper half there).
DMA_RW = struct.Struct("<QQ")
WRITE_MULTI_COUNT = struct.Struct("<Q")
WRITE_ONE = struct.Struct("<QII8s")  # offset, region, count, data[8]
WRITE_MULTI_MAX = 200

SPARSE_MMAP_HEADER = struct.Struct("<HHIII")  # id, version, next, nr_areas, reserved
SPARSE_MMAP_AREA = struct.Struct("<QQ")
CAP_SPARSE_MMAP = 1

# vfio.h flags
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1
REGION_INFO_FLAG_READ = 1 << 0
REGION_INFO_FLAG_WRITE = 1 << 1
REGION_INFO_FLAG_MMAP = 1 << 2
REGION_INFO_FLAG_CAPS = 1 << 3
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5
IRQ_SET_DATA_MASK = 0x7
IRQ_SET_ACTION_MASK_BITS = 0x38
DMA_MAP_FLAG_READ = 1 << 0
DMA_MAP_FLAG_WRITE = 1 << 1
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0
DMA_UNMAP_FLAG_ALL = 1 << 1

# What we offer in VERSION (a subset of what QEMU offers).
MAX_MSG_FDS = 16
MAX_DATA_XFER = 1 << 20
MAX_DMA_MAPS = 65535
PAGE_SIZE = 4096
# Nothing legitimate is larger than a data transfer plus its headers.
MAX_MESSAGE = MAX_DATA_XFER + 4096


class ProtocolError(Exception):
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class Header:
    msg_id: int
    command: int
    size: int
    flags: int
    error: int

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Header:
        if len(data) < HEADER_SIZE:
            raise ProtocolError(errno.EINVAL, "short header")
        header = cls(*HEADER.unpack_from(data))
        if header.size < HEADER_SIZE:
            raise ProtocolError(errno.EINVAL, f"message size {header.size} < header")
        if header.size > MAX_MESSAGE:
            raise ProtocolError(errno.E2BIG, f"message size {header.size} too large")
        return header

    @property
    def is_reply(self) -> bool:
        return (self.flags & TYPE_MASK) == TYPE_REPLY

    @property
    def wants_reply(self) -> bool:
        return not self.flags & FLAG_NO_REPLY


def encode(
    msg_id: int,
    command: int,
    payload: bytes = b"",
    reply: bool = False,
    error: int = 0,
    no_reply: bool = False,
) -> bytes:
    flags = (TYPE_REPLY if reply else TYPE_COMMAND) | (FLAG_ERROR if error else 0)
    flags |= FLAG_NO_REPLY if no_reply else 0
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error) + payload


def unpack(layout: struct.Struct, payload: bytes | memoryview, what: str) -> tuple[Any, ...]:
    if len(payload) < layout.size:
        raise ProtocolError(errno.EINVAL, f"{what}: payload {len(payload)} < {layout.size} bytes")
    return layout.unpack_from(payload)


# --- VERSION ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCapabilities:
    max_msg_fds: int = 1
    max_data_xfer_size: int = MAX_DATA_XFER
    pgsizes: int = PAGE_SIZE
    max_dma_maps: int = MAX_DMA_MAPS
    write_multiple: bool = False


def decode_version(payload: bytes | memoryview) -> tuple[int, int, ClientCapabilities]:
    major, minor = unpack(VERSION, payload, "VERSION")
    text = bytes(payload[VERSION.size :]).split(b"\0", 1)[0]
    caps: dict[str, Any] = {}
    if text:
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(errno.EINVAL, f"VERSION: bad JSON: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("capabilities", {}), dict):
            raise ProtocolError(errno.EINVAL, "VERSION: capabilities must be an object")
        caps = doc.get("capabilities", {})
    values: dict[str, Any] = {}
    for key in ("max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps"):
        if key in caps:
            value = caps[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ProtocolError(errno.EINVAL, f"VERSION: {key} must be a positive integer")
            values[key] = value
    if "write_multiple" in caps:
        values["write_multiple"] = caps["write_multiple"] is True
    return major, minor, ClientCapabilities(**values)


def encode_version_reply(client: ClientCapabilities) -> tuple[bytes, ClientCapabilities]:
    """Our VERSION reply payload and the capabilities both sides then live by."""
    agreed = ClientCapabilities(
        max_msg_fds=min(client.max_msg_fds, MAX_MSG_FDS),
        max_data_xfer_size=min(client.max_data_xfer_size, MAX_DATA_XFER),
        pgsizes=PAGE_SIZE,
        max_dma_maps=min(client.max_dma_maps, MAX_DMA_MAPS),
        write_multiple=client.write_multiple,
    )
    caps = {
        "capabilities": {
            "max_msg_fds": agreed.max_msg_fds,
            "max_data_xfer_size": agreed.max_data_xfer_size,
            "pgsizes": agreed.pgsizes,
            "max_dma_maps": agreed.max_dma_maps,
            "write_multiple": agreed.write_multiple,
        }
    }
    return VERSION.pack(0, 0) + json.dumps(caps).encode() + b"\0", agreed


# --- regions ------------------------------------------------------------------------


def encode_region_info(
    client_argsz: int,
    index: int,
    flags: int,
    size: int,
    areas: list[tuple[int, int]],
) -> bytes:
    """GET_REGION_INFO reply payload. With sparse-mmap areas that do not fit in the
    client's argsz, report the size needed (and no capability) so it asks again."""
    caps = b""
    if areas:
        caps = SPARSE_MMAP_HEADER.pack(CAP_SPARSE_MMAP, 1, 0, len(areas), 0) + b"".join(
            SPARSE_MMAP_AREA.pack(offset, length) for offset, length in areas
        )
    needed = REGION_INFO.size + len(caps)
    if caps and client_argsz >= needed:
        flags |= REGION_INFO_FLAG_CAPS
        return REGION_INFO.pack(needed, flags, index, REGION_INFO.size, size, 0) + caps
    return REGION_INFO.pack(needed, flags, index, 0, size, 0)


def decode_region_rw(payload: bytes | memoryview, with_data: bool) -> tuple[int, int, int, bytes]:
    offset, region, count = unpack(REGION_RW, payload, "REGION_READ/WRITE")
    if count > MAX_DATA_XFER:
        raise ProtocolError(errno.E2BIG, f"region access of {count} bytes")
    data = b""
    if with_data:
        data = bytes(payload[REGION_RW.size : REGION_RW.size + count])
        if len(data) != count:
            raise ProtocolError(errno.EINVAL, "REGION_WRITE: data shorter than count")
    return offset, region, count, data


def decode_write_multi(payload: bytes | memoryview) -> list[tuple[int, int, bytes]]:
    (count,) = unpack(WRITE_MULTI_COUNT, payload, "REGION_WRITE_MULTI")
    if count > WRITE_MULTI_MAX or len(payload) < WRITE_MULTI_COUNT.size + count * WRITE_ONE.size:
        raise ProtocolError(errno.EINVAL, f"REGION_WRITE_MULTI: {count} writes do not fit")
    writes = []
    for i in range(count):
        offset, region, length, data = WRITE_ONE.unpack_from(
            payload, WRITE_MULTI_COUNT.size + i * WRITE_ONE.size
        )
        if length > len(data):
            raise ProtocolError(errno.EINVAL, f"REGION_WRITE_MULTI: write of {length} bytes")
        writes.append((region, offset, data[:length]))
    return writes


# --- DMA ---------------------------------------------------------------------------


def encode_dma_read(addr: int, count: int) -> bytes:
    return DMA_RW.pack(addr, count)


def encode_dma_write(addr: int, data: bytes | bytearray | memoryview) -> bytes:
    return DMA_RW.pack(addr, len(data)) + bytes(data)


def decode_dma_rw(payload: bytes | memoryview) -> tuple[int, int, bytes]:
    """A DMA_READ reply / DMA_WRITE request: (address, count, data)."""
    addr, count = unpack(DMA_RW, payload, "DMA_READ/WRITE")
    data = bytes(payload[DMA_RW.size : DMA_RW.size + count])
    if len(data) != count:
        raise ProtocolError(errno.EINVAL, "DMA data shorter than count")
    return addr, count, data
