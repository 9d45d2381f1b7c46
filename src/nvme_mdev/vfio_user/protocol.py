"""vfio-user messages: constants, the 16-byte header and every payload, encoded
and decoded. Pure: no I/O, no threads.

Sources: QEMU's docs/interop/vfio-user.rst and, where the two disagree, what
QEMU 11.1's client (hw/vfio-user/) actually sends and accepts, which is what we
serve. Each decoder validates strictly: a malformed payload (short, sizes that
disagree, bad argsz, unknown flags, fd count mismatch) raises ProtocolError with
the errno for the error reply, never another exception.

Facts checked against QEMU 11.1 (see also the tests):

- DMA_READ/DMA_WRITE carry {u64 address, u64 count, data}: QEMU 11.1 reads the
  count as 64 bits (a u32 count with data at offset 12, as older QEMU headers
  declared it, is refused with E2BIG). Its DMA_WRITE reply is a bare header; its
  DMA_READ reply is {address, count, data}.
- QEMU accepts a reply only as long as the buffer it allotted: a VERSION reply
  no longer than its request, a REGION_READ reply of at most `count` data,
  GET_REGION_INFO of at most `argsz` payload.
- GET_REGION_INFO with caps that do not fit the client's argsz: reply argsz =
  the size needed, CAPS flag clear and cap_offset 0 (QEMU refuses CAPS with a
  cap_offset outside its buffer, before it retries with the bigger argsz).
- SET_IRQS with DATA_EVENTFD: argsz is 20 and the fds travel only as
  SCM_RIGHTS, at most max_msg_fds per message; a chunk of "no eventfd" vectors
  comes with no fds at all (that detaches them).
"""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

#: any buffer a payload may arrive in
Bytes = bytes | bytearray | memoryview


class ProtocolError(Exception):
    """A malformed or unacceptable message; `errno` goes into the error reply."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


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
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# --- header -----------------------------------------------------------------------

TYPE_MASK: Final = 0xF
TYPE_COMMAND: Final = 0x0
TYPE_REPLY: Final = 0x1
FLAG_NO_REPLY: Final = 0x10
FLAG_ERROR: Final = 0x20
_KNOWN_FLAGS: Final = TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR

HEADER: Final = struct.Struct("<HHIII")  # msg_id, command, size, flags, error
HEADER_SIZE: Final = HEADER.size

# --- what we offer (VERSION) and protocol limits ------------------------------------

#: fds we accept in one message (QEMU caps its own value at 16)
MAX_MSG_FDS: Final = 16
#: data bytes in one REGION_READ/WRITE or DMA_READ/WRITE (QEMU's default)
MAX_DATA_XFER_SIZE: Final = 1 << 20
#: QEMU refuses a max_data_xfer_size above this
MAX_MAX_DATA_XFER_SIZE: Final = 64 << 20
#: the protocol's default max_dma_maps, for a peer that does not say
MAX_DMA_MAPS: Final = 65535
#: the most DMA regions we accept at once (QEMU maps a handful per VM; libvfio-user
#: servers take 16 by default). Each DMA_MAP costs a copy of the region table, so the
#: bound is also what one map can cost.
SERVER_MAX_DMA_MAPS: Final = 4096
PAGE_SIZE: Final = 4096
#: the largest message either side may send: a data transfer plus its headers
MAX_MESSAGE_SIZE: Final = MAX_DATA_XFER_SIZE + 4096
#: SCM_MAX_FD: the kernel's limit on fds in one message
SCM_MAX_FD: Final = 253

# --- vfio.h flags -----------------------------------------------------------------

DEVICE_FLAGS_RESET: Final = 1 << 0
DEVICE_FLAGS_PCI: Final = 1 << 1

REGION_INFO_FLAG_READ: Final = 1 << 0
REGION_INFO_FLAG_WRITE: Final = 1 << 1
REGION_INFO_FLAG_MMAP: Final = 1 << 2
REGION_INFO_FLAG_CAPS: Final = 1 << 3

REGION_INFO_CAP_SPARSE_MMAP: Final = 1
REGION_INFO_CAP_TYPE: Final = 2

IRQ_INFO_EVENTFD: Final = 1 << 0
IRQ_INFO_MASKABLE: Final = 1 << 1
IRQ_INFO_AUTOMASKED: Final = 1 << 2
IRQ_INFO_NORESIZE: Final = 1 << 3

IRQ_SET_DATA_NONE: Final = 1 << 0
IRQ_SET_DATA_BOOL: Final = 1 << 1
IRQ_SET_DATA_EVENTFD: Final = 1 << 2
IRQ_SET_ACTION_MASK: Final = 1 << 3
IRQ_SET_ACTION_UNMASK: Final = 1 << 4
IRQ_SET_ACTION_TRIGGER: Final = 1 << 5
IRQ_SET_DATA_TYPE_MASK: Final = 0x7
IRQ_SET_ACTION_TYPE_MASK: Final = 0x38

DMA_MAP_FLAG_READ: Final = 1 << 0
DMA_MAP_FLAG_WRITE: Final = 1 << 1
#: access mode bits (spec): mmap the fd / pread-pwrite the fd
DMA_MAP_FLAG_MMAP: Final = 1 << 2
DMA_MAP_FLAG_FILE_IO: Final = 1 << 3

DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: Final = 1 << 0
DMA_UNMAP_FLAG_ALL: Final = 1 << 1
DMA_UNMAP_FLAG_VADDR: Final = 1 << 2

_U32: Final = (1 << 32) - 1
_U64_LIMIT: Final = 1 << 64


def _struct_field(data: Bytes, layout: struct.Struct, what: str) -> tuple[Any, ...]:
    if len(data) < layout.size:
        raise ProtocolError(errno.EINVAL, f"{what}: {len(data)} bytes, need {layout.size}")
    return layout.unpack_from(data)


def _hex(data: bytes, limit: int = 16) -> str:
    return data[:limit].hex() + ("..." if len(data) > limit else "")


def _exact(data: Bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise ProtocolError(errno.EINVAL, f"{what}: payload of {len(data)} bytes, expected {size}")


# --- header -----------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: built per message, and frozen costs ~0.5 us
class Header:
    msg_id: int
    command: int
    size: int
    flags: int
    error: int = 0

    @classmethod
    def decode(cls, data: Bytes, max_size: int = MAX_MESSAGE_SIZE) -> Header:
        """Framing only: a header whose size cannot be trusted breaks the stream."""
        if len(data) < HEADER_SIZE:
            raise ProtocolError(errno.EINVAL, f"header of {len(data)} bytes")
        return cls.unpack_from(data, 0, max_size)

    @classmethod
    def unpack_from(cls, buffer: Bytes, offset: int, max_size: int = MAX_MESSAGE_SIZE) -> Header:
        """decode() at `offset` of a buffer known to hold 16 bytes there."""
        msg_id, command, size, flags, error = HEADER.unpack_from(buffer, offset)
        if not HEADER_SIZE <= size <= max_size:
            if size < HEADER_SIZE:
                raise ProtocolError(errno.EINVAL, f"message size {size} < header size")
            raise ProtocolError(errno.E2BIG, f"message size {size} > {max_size}")
        return cls(msg_id, command, size, flags, error)

    def encode(self) -> bytes:
        return HEADER.pack(self.msg_id, self.command, self.size, self.flags, self.error)

    @property
    def msg_type(self) -> int:
        return self.flags & TYPE_MASK

    @property
    def wants_reply(self) -> bool:
        return not self.flags & FLAG_NO_REPLY

    @property
    def is_reply(self) -> bool:
        return self.flags & TYPE_MASK == TYPE_REPLY

    @property
    def is_command(self) -> bool:
        return self.flags & TYPE_MASK == TYPE_COMMAND

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    def check_command_flags(self) -> None:
        """Semantic checks for an incoming command (framing is already sound)."""
        if self.flags & ~_KNOWN_FLAGS:
            raise ProtocolError(errno.EINVAL, f"unknown header flags {self.flags:#x}")
        if self.msg_type != TYPE_COMMAND:
            raise ProtocolError(errno.EINVAL, f"message type {self.msg_type}")
        if self.flags & FLAG_ERROR:
            raise ProtocolError(errno.EINVAL, "ERROR flag on a command")


def encode_message(
    msg_id: int,
    command: int,
    payload: Bytes = b"",
    *,
    reply: bool = False,
    error: int = 0,
    no_reply: bool = False,
) -> bytes:
    """A whole message. An error reply carries only the header (spec)."""
    if error:
        payload = b""
    flags = (TYPE_REPLY if reply else TYPE_COMMAND) | (FLAG_ERROR if error else 0)
    if no_reply:
        flags |= FLAG_NO_REPLY
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error) + bytes(payload)


# --- VERSION ------------------------------------------------------------------------

VERSION: Final = struct.Struct("<HH")
MAJOR: Final = 0
MINOR: Final = 0
_INT_CAPS: Final = ("max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps")


@dataclass(frozen=True)
class Capabilities:
    """The "capabilities" object of a VERSION message. None: not offered (the
    effective_* properties give the spec's defaults)."""

    max_msg_fds: int | None = None
    max_data_xfer_size: int | None = None
    pgsizes: int | None = None
    max_dma_maps: int | None = None
    write_multiple: bool | None = None

    @property
    def effective_max_msg_fds(self) -> int:
        return 1 if self.max_msg_fds is None else self.max_msg_fds

    @property
    def effective_max_data_xfer_size(self) -> int:
        return MAX_DATA_XFER_SIZE if self.max_data_xfer_size is None else self.max_data_xfer_size

    @property
    def effective_pgsizes(self) -> int:
        return PAGE_SIZE if self.pgsizes is None else self.pgsizes

    @property
    def effective_max_dma_maps(self) -> int:
        return MAX_DMA_MAPS if self.max_dma_maps is None else self.max_dma_maps

    @property
    def effective_write_multiple(self) -> bool:
        return bool(self.write_multiple)

    def to_json(self) -> dict[str, Any]:
        caps: dict[str, Any] = {}
        for key in (*_INT_CAPS, "write_multiple"):
            value = getattr(self, key)
            if value is not None:
                caps[key] = value
        return {"capabilities": caps}

    @classmethod
    def from_json(cls, doc: object) -> Capabilities:
        if not isinstance(doc, dict):
            raise ProtocolError(errno.EINVAL, "VERSION: JSON is not an object")
        caps = doc.get("capabilities", {})
        if not isinstance(caps, dict):
            raise ProtocolError(errno.EINVAL, "VERSION: capabilities is not an object")
        values: dict[str, Any] = {}
        for key in _INT_CAPS:
            if key in caps:
                value = caps[key]
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ProtocolError(errno.EINVAL, f"VERSION: {key} is not an integer")
                if not 0 <= value < _U64_LIMIT:
                    raise ProtocolError(errno.EINVAL, f"VERSION: {key} {value} out of range")
                values[key] = value
        # Zero would mean "no transfers / no pages / no maps": nothing can work.
        for key in ("max_data_xfer_size", "pgsizes", "max_dma_maps"):
            if values.get(key) == 0:
                raise ProtocolError(errno.EINVAL, f"VERSION: {key} is 0")
        if "write_multiple" in caps:
            if not isinstance(caps["write_multiple"], bool):
                raise ProtocolError(errno.EINVAL, "VERSION: write_multiple is not a boolean")
            values["write_multiple"] = caps["write_multiple"]
        # Others (migration, twin_socket) we do not support; leaving them out of
        # our reply declines them.
        return cls(**values)


@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    capabilities: Capabilities | None = None

    def encode(self) -> bytes:
        out = VERSION.pack(self.major, self.minor)
        if self.capabilities is not None:
            text = json.dumps(self.capabilities.to_json(), separators=(",", ":"))
            out += text.encode() + b"\0"  # QEMU checks the terminating NUL
        return out

    @classmethod
    def decode(cls, payload: Bytes) -> Version:
        major, minor = _struct_field(payload, VERSION, "VERSION")
        data = bytes(payload[VERSION.size :])
        if not data:
            return cls(major, minor, None)
        # The spec and QEMU terminate the JSON with a NUL; tolerate its absence.
        text = data[:-1] if data[-1] == 0 else data
        if 0 in text:
            raise ProtocolError(errno.EINVAL, "VERSION: data is not one string")
        try:
            doc = json.loads(text.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(errno.EINVAL, f"VERSION: bad JSON: {exc}") from None
        return cls(major, minor, Capabilities.from_json(doc))


def negotiate(client: Capabilities) -> Capabilities:
    """Our VERSION reply capabilities: only keys the client offered (the spec's
    subset rule), each what we accept ourselves or the client's, whichever is
    smaller (QEMU adopts our max_data_xfer_size for the DMA requests it accepts
    from us, so both directions stay within both limits)."""
    return Capabilities(
        max_msg_fds=None if client.max_msg_fds is None else MAX_MSG_FDS,
        max_data_xfer_size=(
            None
            if client.max_data_xfer_size is None
            else min(client.max_data_xfer_size, MAX_DATA_XFER_SIZE)
        ),
        pgsizes=None if client.pgsizes is None else PAGE_SIZE,
        max_dma_maps=None
        if client.max_dma_maps is None
        else min(client.max_dma_maps, SERVER_MAX_DMA_MAPS),
        write_multiple=True if client.write_multiple else None,
    )


# --- DMA_MAP / DMA_UNMAP --------------------------------------------------------------

DMA_MAP: Final = struct.Struct("<IIQQQ")  # argsz, flags, offset, iova, size
DMA_UNMAP: Final = struct.Struct("<IIQQ")  # argsz, flags, iova, size
_DMA_MAP_KNOWN: Final = (
    DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE | DMA_MAP_FLAG_MMAP | DMA_MAP_FLAG_FILE_IO
)


def _check_range(iova: int, size: int, what: str) -> None:
    if size == 0:
        raise ProtocolError(errno.EINVAL, f"{what}: size 0")
    if iova + size > _U64_LIMIT:
        raise ProtocolError(errno.EINVAL, f"{what}: {iova:#x}+{size:#x} wraps")


@dataclass(frozen=True)
class DmaMap:
    flags: int
    offset: int
    iova: int
    size: int
    argsz: int = DMA_MAP.size

    @property
    def readable(self) -> bool:
        return bool(self.flags & DMA_MAP_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & DMA_MAP_FLAG_WRITE)

    def encode(self) -> bytes:
        return DMA_MAP.pack(self.argsz, self.flags, self.offset, self.iova, self.size)

    @classmethod
    def decode(cls, payload: Bytes) -> DmaMap:
        _exact(payload, DMA_MAP.size, "DMA_MAP")
        argsz, flags, offset, iova, size = DMA_MAP.unpack(payload)
        if argsz != DMA_MAP.size:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP: argsz {argsz}")
        if flags & ~_DMA_MAP_KNOWN:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP: flags {flags:#x}")
        if not flags & (DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE):
            raise ProtocolError(errno.EINVAL, "DMA_MAP: neither readable nor writable")
        if flags & DMA_MAP_FLAG_MMAP and flags & DMA_MAP_FLAG_FILE_IO:
            raise ProtocolError(errno.EINVAL, "DMA_MAP: two access modes")
        _check_range(iova, size, "DMA_MAP")
        return cls(flags, offset, iova, size, argsz)


@dataclass(frozen=True)
class DmaUnmap:
    flags: int
    iova: int
    size: int
    argsz: int = DMA_UNMAP.size

    @property
    def unmap_all(self) -> bool:
        return bool(self.flags & DMA_UNMAP_FLAG_ALL)

    def encode(self) -> bytes:
        return DMA_UNMAP.pack(self.argsz, self.flags, self.iova, self.size)

    @classmethod
    def decode(cls, payload: Bytes) -> DmaUnmap:
        _exact(payload, DMA_UNMAP.size, "DMA_UNMAP")
        argsz, flags, iova, size = DMA_UNMAP.unpack(payload)
        if argsz < DMA_UNMAP.size:
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP: argsz {argsz}")
        if flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            # no dirty page tracking (QEMU never asks a vfio-user device for it)
            raise ProtocolError(errno.ENOTSUP, "DMA_UNMAP: dirty page tracking is not supported")
        if flags & ~DMA_UNMAP_FLAG_ALL:
            raise ProtocolError(errno.EINVAL, f"DMA_UNMAP: flags {flags:#x}")
        if flags & DMA_UNMAP_FLAG_ALL:
            if iova or size:  # as the kernel: ALL goes with an empty range
                raise ProtocolError(errno.EINVAL, "DMA_UNMAP: ALL with a range")
        else:
            _check_range(iova, size, "DMA_UNMAP")
        return cls(flags, iova, size, argsz)


# --- DEVICE_GET_INFO ------------------------------------------------------------------

DEVICE_INFO: Final = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs


@dataclass(frozen=True)
class DeviceInfo:
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0
    argsz: int = DEVICE_INFO.size

    def encode(self) -> bytes:
        return DEVICE_INFO.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def decode(cls, payload: Bytes) -> DeviceInfo:
        _exact(payload, DEVICE_INFO.size, "DEVICE_GET_INFO")
        argsz, flags, num_regions, num_irqs = DEVICE_INFO.unpack(payload)
        return cls(flags, num_regions, num_irqs, argsz)

    @classmethod
    def decode_request(cls, payload: Bytes) -> DeviceInfo:
        info = cls.decode(payload)
        if info.argsz < DEVICE_INFO.size:
            raise ProtocolError(errno.EINVAL, f"DEVICE_GET_INFO: argsz {info.argsz}")
        return info


# --- DEVICE_GET_REGION_INFO -------------------------------------------------------------

REGION_INFO: Final = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
CAP_HEADER: Final = struct.Struct("<HHI")  # id, version, next
SPARSE_MMAP: Final = struct.Struct("<II")  # nr_areas, reserved
SPARSE_MMAP_AREA: Final = struct.Struct("<QQ")  # offset, size
SPARSE_MMAP_VERSION: Final = 1
#: no sane region has more (and QEMU allots its buffer from our argsz)
MAX_SPARSE_AREAS: Final = 1024


@dataclass(frozen=True)
class RegionInfoRequest:
    index: int
    argsz: int = REGION_INFO.size

    def encode(self) -> bytes:
        return REGION_INFO.pack(self.argsz, 0, self.index, 0, 0, 0)

    @classmethod
    def decode(cls, payload: Bytes) -> RegionInfoRequest:
        """QEMU sends the 32-byte struct; SPDK's initiator sends its whole reply buffer
        (argsz bytes, the rest zero), which the protocol allows (libvfio-user reads
        the struct at the front): anything from 32 bytes up to argsz is accepted."""
        if len(payload) < REGION_INFO.size:
            raise ProtocolError(
                errno.EINVAL,
                f"GET_REGION_INFO: payload of {len(payload)} bytes, expected at least "
                f"{REGION_INFO.size}",
            )
        argsz, _flags, index, _cap, _size, _offset = REGION_INFO.unpack_from(payload)
        if argsz < REGION_INFO.size:
            raise ProtocolError(errno.EINVAL, f"GET_REGION_INFO: argsz {argsz}")
        if len(payload) > max(argsz, REGION_INFO.size):
            raise ProtocolError(
                errno.EINVAL, f"GET_REGION_INFO: payload of {len(payload)} bytes > argsz {argsz}"
            )
        return cls(index, argsz)


@dataclass(frozen=True)
class RegionInfo:
    """A GET_REGION_INFO reply. `argsz` is the size the full reply needs; when it
    exceeds what the client offered, `sparse_areas` were left out (and the CAPS
    flag with them) so that the client asks again."""

    index: int
    flags: int
    size: int
    offset: int = 0
    sparse_areas: tuple[tuple[int, int], ...] = ()
    argsz: int = REGION_INFO.size
    cap_offset: int = 0

    @staticmethod
    def sparse_cap(areas: Sequence[tuple[int, int]]) -> bytes:
        return (
            CAP_HEADER.pack(REGION_INFO_CAP_SPARSE_MMAP, SPARSE_MMAP_VERSION, 0)
            + SPARSE_MMAP.pack(len(areas), 0)
            + b"".join(SPARSE_MMAP_AREA.pack(off, size) for off, size in areas)
        )

    @classmethod
    def build(
        cls,
        client_argsz: int,
        index: int,
        flags: int,
        size: int,
        offset: int = 0,
        sparse_areas: Sequence[tuple[int, int]] = (),
    ) -> tuple[RegionInfo, bytes]:
        """The reply for a client that offered `client_argsz`: (info, payload)."""
        caps = cls.sparse_cap(sparse_areas) if sparse_areas else b""
        needed = REGION_INFO.size + len(caps)
        flags &= ~REGION_INFO_FLAG_CAPS
        if caps and client_argsz >= needed:
            info = cls(
                index,
                flags | REGION_INFO_FLAG_CAPS,
                size,
                offset,
                sparse_areas=tuple(sparse_areas),
                argsz=needed,
                cap_offset=REGION_INFO.size,
            )
            return info, REGION_INFO.pack(
                needed, info.flags, index, REGION_INFO.size, size, offset
            ) + caps
        info = cls(index, flags, size, offset, (), needed, 0)
        return info, REGION_INFO.pack(needed, flags, index, 0, size, offset)

    @classmethod
    def decode(cls, payload: Bytes) -> RegionInfo:
        """Client side: the reply, with the sparse-mmap capability parsed."""
        argsz, flags, index, cap_offset, size, offset = _struct_field(
            payload, REGION_INFO, "GET_REGION_INFO reply"
        )
        if argsz < REGION_INFO.size:
            raise ProtocolError(errno.EINVAL, f"GET_REGION_INFO reply: argsz {argsz}")
        if len(payload) not in (REGION_INFO.size, argsz):
            raise ProtocolError(errno.EINVAL, "GET_REGION_INFO reply: size disagrees with argsz")
        areas: list[tuple[int, int]] = []
        if flags & REGION_INFO_FLAG_CAPS and cap_offset:
            if len(payload) != argsz:
                raise ProtocolError(errno.EINVAL, "GET_REGION_INFO reply: caps beyond payload")
            seen: set[int] = set()
            pos = cap_offset
            while pos:
                if pos < REGION_INFO.size or pos in seen or pos + CAP_HEADER.size > len(payload):
                    raise ProtocolError(errno.EINVAL, f"GET_REGION_INFO reply: cap at {pos}")
                seen.add(pos)
                cap_id, _version, nxt = CAP_HEADER.unpack_from(payload, pos)
                if cap_id == REGION_INFO_CAP_SPARSE_MMAP:
                    body = pos + CAP_HEADER.size
                    if body + SPARSE_MMAP.size > len(payload):
                        raise ProtocolError(errno.EINVAL, "sparse mmap cap truncated")
                    (count, _) = SPARSE_MMAP.unpack_from(payload, body)
                    first = body + SPARSE_MMAP.size
                    if count > MAX_SPARSE_AREAS or first + count * SPARSE_MMAP_AREA.size > len(
                        payload
                    ):
                        raise ProtocolError(errno.EINVAL, f"sparse mmap cap: {count} areas")
                    areas.extend(
                        SPARSE_MMAP_AREA.unpack_from(payload, first + i * SPARSE_MMAP_AREA.size)
                        for i in range(count)
                    )
                pos = nxt
        return cls(index, flags, size, offset, tuple(areas), argsz, cap_offset)


# --- DEVICE_GET_IRQ_INFO -------------------------------------------------------------

IRQ_INFO: Final = struct.Struct("<IIII")  # argsz, flags, index, count


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: int = 0
    count: int = 0
    argsz: int = IRQ_INFO.size

    def encode(self) -> bytes:
        return IRQ_INFO.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def decode(cls, payload: Bytes) -> IrqInfo:
        _exact(payload, IRQ_INFO.size, "GET_IRQ_INFO")
        argsz, flags, index, count = IRQ_INFO.unpack(payload)
        if argsz < IRQ_INFO.size:
            raise ProtocolError(errno.EINVAL, f"GET_IRQ_INFO: argsz {argsz}")
        return cls(index, flags, count, argsz)


# --- DEVICE_SET_IRQS -----------------------------------------------------------------

IRQ_SET: Final = struct.Struct("<IIIII")  # argsz, flags, index, start, count
_DATA_TYPES: Final = (IRQ_SET_DATA_NONE, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD)
_ACTIONS: Final = (IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_UNMASK, IRQ_SET_ACTION_TRIGGER)
#: vfio-pci has at most 2048 MSI-X vectors; anything bigger is garbage
MAX_IRQ_COUNT: Final = 2048


@dataclass(frozen=True)
class IrqSet:
    flags: int
    index: int
    start: int
    count: int
    #: DATA_BOOL: one byte per vector
    data: bytes = b""
    argsz: int = 0  # 0: computed by encode()

    @property
    def data_type(self) -> int:
        return self.flags & IRQ_SET_DATA_TYPE_MASK

    @property
    def action(self) -> int:
        return self.flags & IRQ_SET_ACTION_TYPE_MASK

    @property
    def disables_all(self) -> bool:
        """The spec's special case: DATA_NONE|TRIGGER with count 0 disables the index."""
        return self.count == 0

    @property
    def bools(self) -> tuple[bool, ...] | None:
        if self.data_type != IRQ_SET_DATA_BOOL:
            return None
        return tuple(bool(b) for b in self.data)

    def encode(self) -> bytes:
        argsz = self.argsz or IRQ_SET.size + len(self.data)
        return IRQ_SET.pack(argsz, self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def decode(cls, payload: Bytes, num_fds: int = 0) -> IrqSet:
        argsz, flags, index, start, count = _struct_field(payload, IRQ_SET, "SET_IRQS")
        data = bytes(payload[IRQ_SET.size :])
        if flags & ~(IRQ_SET_DATA_TYPE_MASK | IRQ_SET_ACTION_TYPE_MASK):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: flags {flags:#x}")
        data_type = flags & IRQ_SET_DATA_TYPE_MASK
        action = flags & IRQ_SET_ACTION_TYPE_MASK
        if data_type not in _DATA_TYPES or action not in _ACTIONS:
            raise ProtocolError(
                errno.EINVAL, f"SET_IRQS: flags {flags:#x}: one data type, one action"
            )
        if count > MAX_IRQ_COUNT or start > MAX_IRQ_COUNT:
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: vectors {start}+{count}")
        if count == 0 and (
            data_type != IRQ_SET_DATA_NONE or action != IRQ_SET_ACTION_TRIGGER or start
        ):
            raise ProtocolError(
                errno.EINVAL, "SET_IRQS: count 0 only with DATA_NONE|TRIGGER, start 0"
            )
        if data_type == IRQ_SET_DATA_BOOL:
            if len(data) != count or argsz != IRQ_SET.size + count:
                raise ProtocolError(
                    errno.EINVAL, f"SET_IRQS: {len(data)} bools for {count} (argsz {argsz})"
                )
        elif data_type == IRQ_SET_DATA_EVENTFD:
            # QEMU: argsz 20, no data, fds as SCM_RIGHTS. The kernel's layout (an int
            # per vector in data) is tolerated; the ints mean nothing across a socket.
            if len(data) not in (0, 4 * count) or argsz != IRQ_SET.size + len(data):
                raise ProtocolError(errno.EINVAL, f"SET_IRQS: eventfd data of {len(data)} bytes")
            if num_fds not in (0, count):
                raise ProtocolError(errno.EINVAL, f"SET_IRQS: {num_fds} fds for {count} vectors")
            # Decoded as QEMU's layout, argsz included: encode() gives what decodes again.
            data, argsz = b"", IRQ_SET.size
        elif data or argsz != IRQ_SET.size:
            raise ProtocolError(
                errno.EINVAL, f"SET_IRQS: DATA_NONE with {len(data)} bytes, argsz {argsz}"
            )
        if data_type != IRQ_SET_DATA_EVENTFD and num_fds:
            raise ProtocolError(errno.EINVAL, f"SET_IRQS: {num_fds} fds without DATA_EVENTFD")
        return cls(flags, index, start, count, data, argsz)


# --- REGION_READ / REGION_WRITE / REGION_WRITE_MULTI ---------------------------------------

REGION_RW: Final = struct.Struct("<QII")  # offset, region, count, then data


@dataclass(slots=True)  # not frozen: built per message, and frozen costs ~0.5 us
class RegionAccess:
    """A REGION_READ/REGION_WRITE request or reply: data is empty for a read request
    and a write reply."""

    region: int
    offset: int
    count: int
    data: bytes = b""

    def __repr__(self) -> str:  # short enough for a per-message debug log
        data = f" data={_hex(self.data)}" if self.data else ""
        return (
            f"RegionAccess(region={self.region} offset={self.offset:#x} count={self.count}{data})"
        )

    def encode(self) -> bytes:
        return REGION_RW.pack(self.offset, self.region, self.count) + self.data

    @classmethod
    def decode_read(cls, payload: Bytes, max_count: int = MAX_DATA_XFER_SIZE) -> RegionAccess:
        _exact(payload, REGION_RW.size, "REGION_READ")
        offset, region, count = REGION_RW.unpack(payload)
        if count > max_count:
            raise ProtocolError(errno.E2BIG, f"REGION_READ of {count} bytes")
        return cls(region, offset, count)

    @classmethod
    def decode_write(cls, payload: Bytes, max_count: int = MAX_DATA_XFER_SIZE) -> RegionAccess:
        offset, region, count = _struct_field(payload, REGION_RW, "REGION_WRITE")
        if count > max_count:
            raise ProtocolError(errno.E2BIG, f"REGION_WRITE of {count} bytes")
        if len(payload) != REGION_RW.size + count:
            _exact(payload, REGION_RW.size + count, "REGION_WRITE")
        return cls(region, offset, count, bytes(payload[REGION_RW.size :]))

    @classmethod
    def decode_read_reply(cls, payload: Bytes, asked: int) -> RegionAccess:
        offset, region, count = _struct_field(payload, REGION_RW, "REGION_READ reply")
        if count > asked:
            raise ProtocolError(errno.E2BIG, f"REGION_READ reply of {count} bytes, asked {asked}")
        _exact(payload, REGION_RW.size + count, "REGION_READ reply")
        return cls(region, offset, count, bytes(payload[REGION_RW.size :]))

    @classmethod
    def decode_write_reply(cls, payload: Bytes) -> RegionAccess:
        _exact(payload, REGION_RW.size, "REGION_WRITE reply")
        offset, region, count = REGION_RW.unpack(payload)
        return cls(region, offset, count)


WRITE_MULTI_COUNT: Final = struct.Struct("<Q")
WRITE_ONE: Final = struct.Struct("<QII8s")  # offset, region, count, data[8]
WRITE_MULTI_DATA: Final = 8
WRITE_MULTI_MAX: Final = 200


@dataclass(frozen=True)
class WriteMulti:
    writes: tuple[RegionAccess, ...]

    def encode(self) -> bytes:
        out = [WRITE_MULTI_COUNT.pack(len(self.writes))]
        for w in self.writes:
            if w.count > WRITE_MULTI_DATA or len(w.data) != w.count:
                raise ValueError(f"REGION_WRITE_MULTI: a write of {len(w.data)} bytes")
            out.append(WRITE_ONE.pack(w.offset, w.region, w.count, w.data))
        return b"".join(out)

    @classmethod
    def decode(cls, payload: Bytes) -> WriteMulti:
        (count,) = _struct_field(payload, WRITE_MULTI_COUNT, "REGION_WRITE_MULTI")
        if count > WRITE_MULTI_MAX:
            raise ProtocolError(errno.EINVAL, f"REGION_WRITE_MULTI: {count} writes")
        _exact(payload, WRITE_MULTI_COUNT.size + count * WRITE_ONE.size, "REGION_WRITE_MULTI")
        writes = []
        for i in range(count):
            offset, region, length, data = WRITE_ONE.unpack_from(
                payload, WRITE_MULTI_COUNT.size + i * WRITE_ONE.size
            )
            if length > WRITE_MULTI_DATA:
                raise ProtocolError(errno.EINVAL, f"REGION_WRITE_MULTI: a write of {length} bytes")
            writes.append(RegionAccess(region, offset, length, data[:length]))
        return cls(tuple(writes))


# --- DMA_READ / DMA_WRITE (server -> client) ------------------------------------------

DMA_RW: Final = struct.Struct("<QQ")  # address, count (u64, as QEMU 11.1 reads it), then data


@dataclass(slots=True)  # not frozen: built per message, and frozen costs ~0.5 us
class DmaAccess:
    """A DMA_READ/DMA_WRITE request or reply: data is present in a DMA_WRITE request
    and a DMA_READ reply."""

    address: int
    count: int
    data: bytes = b""

    def __repr__(self) -> str:
        data = f" data={_hex(self.data)}" if self.data else ""
        return f"DmaAccess(address={self.address:#x} count={self.count}{data})"

    def encode(self) -> bytes:
        return DMA_RW.pack(self.address, self.count) + self.data

    @classmethod
    def decode(
        cls, payload: Bytes, with_data: bool, max_count: int = MAX_DATA_XFER_SIZE
    ) -> DmaAccess:
        address, count = _struct_field(payload, DMA_RW, "DMA_READ/WRITE")
        if count > max_count:
            raise ProtocolError(errno.E2BIG, f"DMA access of {count} bytes")
        if address + count > _U64_LIMIT:
            raise ProtocolError(errno.EINVAL, f"DMA access {address:#x}+{count:#x} wraps")
        _exact(payload, DMA_RW.size + (count if with_data else 0), "DMA_READ/WRITE")
        return cls(address, count, bytes(payload[DMA_RW.size :]))

    @classmethod
    def decode_write_reply(cls, payload: Bytes, sent: DmaAccess) -> int:
        """Bytes written: QEMU replies with a bare header (all of them), the spec
        with {address, count}."""
        if not payload:
            return sent.count
        reply = cls.decode(payload, with_data=False, max_count=_U64_LIMIT - 1)
        if reply.address != sent.address or reply.count > sent.count:
            raise ProtocolError(
                errno.EIO, f"DMA_WRITE reply {reply} to {sent.address:#x}+{sent.count:#x}"
            )
        return reply.count

    @classmethod
    def decode_read_reply(cls, payload: Bytes, sent: DmaAccess) -> bytes:
        reply = cls.decode(payload, with_data=True, max_count=sent.count)
        if reply.address != sent.address:
            raise ProtocolError(
                errno.EIO, f"DMA_READ reply for {reply.address:#x}, asked {sent.address:#x}"
            )
        return reply.data


# --- requests as a whole (server side) --------------------------------------------------

#: commands that carry no payload and no fds
_EMPTY_COMMANDS: Final = frozenset({Command.DEVICE_RESET})


@dataclass(frozen=True)
class Limits:
    """What the server accepts once VERSION is negotiated."""

    max_data_xfer_size: int = MAX_DATA_XFER_SIZE
    max_msg_fds: int = MAX_MSG_FDS


_DEFAULT_LIMITS: Final = Limits()
_COMMANDS: Final = {int(c): c for c in Command}

Request = (
    Version | DmaMap | DmaUnmap | DeviceInfo | RegionInfoRequest | IrqInfo | IrqSet
    | RegionAccess | WriteMulti | None
)  # fmt: skip


@dataclass(slots=True)  # not frozen: built per message, and frozen costs ~0.5 us
class Decoded:
    command: Command
    request: Request
    #: REGION_READ vs REGION_WRITE share a type
    is_write: bool = False


def decode_request(
    command: int, payload: Bytes, num_fds: int = 0, limits: Limits | None = None
) -> Decoded:
    """Decode a client-to-server command's payload; check its fd count."""
    limits = limits or _DEFAULT_LIMITS
    if command == Command.REGION_WRITE and not num_fds:  # the hot path: doorbells
        return Decoded(
            Command.REGION_WRITE,
            RegionAccess.decode_write(payload, limits.max_data_xfer_size),
            True,
        )
    cmd = _COMMANDS.get(command)
    if cmd is None:
        raise ProtocolError(errno.ENOTSUP, f"unknown command {command}")
    if num_fds > limits.max_msg_fds:
        raise ProtocolError(errno.EINVAL, f"{num_fds} fds > {limits.max_msg_fds}")
    if cmd not in (Command.DMA_MAP, Command.DEVICE_SET_IRQS) and num_fds:
        raise ProtocolError(errno.EINVAL, f"{cmd.name} with {num_fds} fds")
    request: Request
    if cmd == Command.VERSION:
        request = Version.decode(payload)
    elif cmd == Command.DMA_MAP:
        request = DmaMap.decode(payload)
        if num_fds > 1:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP with {num_fds} fds")
        if not num_fds and request.flags & (DMA_MAP_FLAG_MMAP | DMA_MAP_FLAG_FILE_IO):
            raise ProtocolError(errno.EINVAL, "DMA_MAP: fd access mode without an fd")
        if request.flags & DMA_MAP_FLAG_FILE_IO:
            raise ProtocolError(errno.ENOTSUP, "DMA_MAP: file I/O access mode is not supported")
    elif cmd == Command.DMA_UNMAP:
        request = DmaUnmap.decode(payload)
    elif cmd == Command.DEVICE_GET_INFO:
        request = DeviceInfo.decode_request(payload)
    elif cmd == Command.DEVICE_GET_REGION_INFO:
        request = RegionInfoRequest.decode(payload)
    elif cmd == Command.DEVICE_GET_IRQ_INFO:
        request = IrqInfo.decode(payload)
    elif cmd == Command.DEVICE_SET_IRQS:
        request = IrqSet.decode(payload, num_fds)
    elif cmd == Command.REGION_READ:
        request = RegionAccess.decode_read(payload, limits.max_data_xfer_size)
    elif cmd == Command.REGION_WRITE:
        return Decoded(cmd, RegionAccess.decode_write(payload, limits.max_data_xfer_size), True)
    elif cmd == Command.REGION_WRITE_MULTI:
        request = WriteMulti.decode(payload)
    elif cmd in _EMPTY_COMMANDS:
        _exact(payload, 0, cmd.name)
        request = None
    else:
        # DMA_READ/WRITE go the other way; the rest we do not implement.
        raise ProtocolError(errno.ENOTSUP, f"{cmd.name} is not supported")
    return Decoded(cmd, request)


# --- tuple-style helpers (kept for existing callers) -------------------------------------

MAX_MESSAGE: Final = MAX_MESSAGE_SIZE
MAX_DATA_XFER: Final = MAX_DATA_XFER_SIZE
CAP_SPARSE_MMAP: Final = REGION_INFO_CAP_SPARSE_MMAP
#: the sparse-mmap capability's header and area count in one: id, version, next, nr_areas, reserved
SPARSE_MMAP_HEADER: Final = struct.Struct("<HHIII")
ClientCapabilities = Capabilities


def encode(
    msg_id: int,
    command: int,
    payload: Bytes = b"",
    reply: bool = False,
    error: int = 0,
    no_reply: bool = False,
) -> bytes:
    """A whole message, payload kept even with an error (encode_message drops it)."""
    flags = (TYPE_REPLY if reply else TYPE_COMMAND) | (FLAG_ERROR if error else 0)
    flags |= FLAG_NO_REPLY if no_reply else 0
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error) + bytes(payload)


def decode_version(payload: Bytes) -> tuple[int, int, Capabilities]:
    version = Version.decode(payload)
    return version.major, version.minor, version.capabilities or Capabilities()


def encode_version_reply(client: Capabilities) -> tuple[bytes, Capabilities]:
    """Our VERSION reply payload and the capabilities it states."""
    ours = negotiate(client)
    return Version(MAJOR, MINOR, ours).encode(), ours


def encode_region_info(
    client_argsz: int, index: int, flags: int, size: int, areas: Sequence[tuple[int, int]]
) -> bytes:
    return RegionInfo.build(client_argsz, index, flags, size, 0, areas)[1]


def decode_region_rw(payload: Bytes, with_data: bool) -> tuple[int, int, int, bytes]:
    """(offset, region, count, data) of a REGION_WRITE (with_data) or REGION_READ."""
    access = RegionAccess.decode_write(payload) if with_data else RegionAccess.decode_read(payload)
    return access.offset, access.region, access.count, access.data


def decode_write_multi(payload: Bytes) -> list[tuple[int, int, bytes]]:
    """(region, offset, data) of each write."""
    return [(w.region, w.offset, w.data) for w in WriteMulti.decode(payload).writes]


def encode_dma_read(addr: int, count: int) -> bytes:
    return DmaAccess(addr, count).encode()


def encode_dma_write(addr: int, data: Bytes) -> bytes:
    return DmaAccess(addr, len(data), bytes(data)).encode()


def decode_dma_rw(payload: Bytes) -> tuple[int, int, bytes]:
    """(address, count, data) of a DMA_WRITE request or DMA_READ reply."""
    access = DmaAccess.decode(payload, with_data=True, max_count=MAX_MAX_DATA_XFER_SIZE)
    return access.address, access.count, access.data
