"""Scatter Gather Lists (NVMe Base 2.x, 4.3.2 "Scatter Gather List (SGL)"): the other
way, besides PRPs, for a command to describe its data buffer.

SGL Entry 1 in the command (DPTR) is the first SGL segment, of one descriptor. A
segment is an array of 16-byte descriptors; only its last may be a Segment or
Last Segment descriptor, which points to the next segment. A Data Block
descriptor names a byte range of host memory; a Bit Bucket descriptor, in a
read, names data the controller discards.

The walk turns the list into (guest address, length) segments, as prp.py does for
PRPs, with BIT_BUCKET as the address of data to discard. Every malformed list gets
the status Figure 113 and the descriptor figures assign; the walk stops as soon
as the transfer is described (descriptors past that are not examined, which the
specification allows), so an SGL longer than the transfer is accepted (SGLS
LLDTS).
"""

from __future__ import annotations

import struct
from typing import Final

from ..guest_memory import DmaError, GuestMemory
from .errors import CommandError
from .prp import Segment
from .spec import Status

# SGL Descriptor Type (SGL Identifier bits 7:4), Base Figure 116
DATA_BLOCK: Final = 0x0
BIT_BUCKET_DESCRIPTOR: Final = 0x1
SEGMENT: Final = 0x2
LAST_SEGMENT: Final = 0x3
# 4h Keyed Data Block and 5h Transport Data Block are for NVMe over Fabrics; 6h-Fh
# are reserved or vendor specific: all are SGL Descriptor Type Invalid here.

# SGL Support (Identify Controller SGLS), Base Figure 313
SGLS_BYTE_GRANULARITY: Final = 0b01  # bits 1:0: supported, no Data Block alignment
SGLS_DWORD_GRANULARITY: Final = 0b10  # bits 1:0: supported, Data Blocks dword aligned
SGLS_BIT_BUCKET: Final = 1 << 16  # SBBDS
SGLS_LONGER_THAN_TRANSFER: Final = 1 << 18  # LLDTS

#: the address of a segment whose data a read discards
BIT_BUCKET: Final = -1
DESCRIPTOR = struct.Struct("<QI3xB")  # Address, Length, reserved, SGL Identifier
DESCRIPTOR_SIZE: Final = 16
#: descriptors fetched from guest memory at a time (one 4 KiB page)
_CHUNK: Final = 256
#: Descriptors examined for one command at most. The specification sets no bound;
#: a real host needs a few hundred. (A loop of segments is caught on its own.)
MAX_DESCRIPTORS: Final = 1 << 16
_ADDRESS_LIMIT: Final = 1 << 64
# a read's discarded bytes land here; shared, never read back
_DISCARD = memoryview(bytearray(64 << 10))


def sgls_field(support: int) -> int:
    """Identify Controller SGLS for SGL Support `support` (0: none, 1: byte, 2: dword)."""
    if support == 0:
        return 0
    return support | SGLS_BIT_BUCKET | SGLS_LONGER_THAN_TRANSFER


def sgl_segments(
    memory: GuestMemory,
    dw: tuple[int, ...],
    length: int,
    to_guest: bool,
    dword_granularity: bool = False,
) -> list[Segment]:
    """The segments SGL Entry 1 of command `dw` describes for `length` bytes.

    `to_guest` is the direction: a Bit Bucket in a read discards data (its segment's
    address is BIT_BUCKET); in a write it has no effect. Raises CommandError with the
    specification's status for a malformed list, Data Transfer Error for a segment
    in unmapped memory.
    """
    addr, dlen, ident = dw[6] | (dw[7] << 32), dw[8], dw[9] >> 24
    # One Data Block that describes it all (Linux's choice for a contiguous buffer).
    if (
        ident == 0
        and dlen >= length
        and addr + dlen <= _ADDRESS_LIMIT
        and not (dword_granularity and (addr | dlen) & 0x3)
    ):
        return [(addr, length)] if length > 0 else []
    return _Walk(memory, length, to_guest, dword_granularity).run(addr, dlen, ident)


class _Walk:
    def __init__(
        self, memory: GuestMemory, length: int, to_guest: bool, dword_granularity: bool
    ) -> None:
        self.memory = memory
        self.remaining = length
        self.to_guest = to_guest
        self.dword_granularity = dword_granularity
        self.budget = MAX_DESCRIPTORS
        self.segments: list[Segment] = []

    def run(self, addr: int, dlen: int, ident: int) -> list[Segment]:
        if self.remaining <= 0:
            return []
        # SGL Entry 1 is a first segment of one descriptor, which may point onwards.
        following = self._descriptor(addr, dlen, ident, is_last_in_segment=True, in_last=False)
        # The walk is a function of (segment, bytes left): meeting one again is a loop.
        visited: set[tuple[tuple[int, int, bool], int]] = set()
        while following is not None and self.remaining > 0:
            state = (following, self.remaining)
            if state in visited:
                raise CommandError(
                    Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS, "SGL segments form a loop"
                )
            visited.add(state)
            seg_addr, seg_len, last = following
            following = self._segment(seg_addr, seg_len // DESCRIPTOR_SIZE, last)
        if self.remaining > 0:
            raise CommandError(
                Status.DATA_SGL_LENGTH_INVALID, f"SGL is {self.remaining} bytes short"
            )
        return self.segments

    def _segment(self, addr: int, count: int, last: bool) -> tuple[int, int, bool] | None:
        """Walk one SGL segment of `count` descriptors; returns the next segment's
        (address, length, is last segment) if this one points onwards."""
        following = None
        for start in range(0, count, _CHUNK):
            n = min(_CHUNK, count - start)
            self.budget -= n
            if self.budget < 0:
                raise CommandError(
                    Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS,
                    f"more than {MAX_DESCRIPTORS} SGL descriptors",
                )
            try:
                raw = self.memory.read(addr + start * DESCRIPTOR_SIZE, n * DESCRIPTOR_SIZE)
            except DmaError as exc:
                raise CommandError(Status.DATA_TRANSFER_ERROR, f"SGL segment: {exc}") from exc
            for i, (d_addr, d_len, d_ident) in enumerate(DESCRIPTOR.iter_unpack(raw)):
                if (
                    d_ident == 0
                    and d_addr + d_len <= _ADDRESS_LIMIT
                    and not (self.dword_granularity and (d_addr | d_len) & 0x3)
                ):
                    # A valid Data Block, by far the most common descriptor: no checks.
                    following = None
                    if d_len:
                        self._take(d_addr, d_len)
                else:
                    is_last = start + i == count - 1
                    following = self._descriptor(d_addr, d_len, d_ident, is_last, in_last=last)
                if self.remaining == 0:
                    return None  # described in full: the rest is not used for the transfer
        return following

    def _descriptor(
        self, addr: int, dlen: int, ident: int, is_last_in_segment: bool, in_last: bool
    ) -> tuple[int, int, bool] | None:
        """Take one descriptor: data go to the segment list; a (Last) Segment
        descriptor is returned as the next segment to walk."""
        dtype, subtype = ident >> 4, ident & 0xF
        if subtype != 0:
            # 1h (Offset) is for NVMe over Fabrics, Ah-Fh transport specific: on PCIe
            # every non-zero Sub Type is reserved (Figure 117).
            raise CommandError(Status.SGL_DESCRIPTOR_TYPE_INVALID, f"SGL sub type {subtype:#x}")
        if dtype == DATA_BLOCK:
            if self.dword_granularity and (addr | dlen) & 0x3:
                raise CommandError(
                    Status.SGL_DATA_BLOCK_GRANULARITY_INVALID, f"data block {addr:#x}+{dlen:#x}"
                )
            if addr + dlen > _ADDRESS_LIMIT:
                raise CommandError(Status.DATA_SGL_LENGTH_INVALID, "data block past 2^64")
            if dlen:
                self._take(addr, dlen)
            return None
        if dtype == BIT_BUCKET_DESCRIPTOR:
            if dlen and self.to_guest:  # in a source buffer it counts as length 0
                self._take(BIT_BUCKET, dlen)
            return None
        if dtype in (SEGMENT, LAST_SEGMENT):
            if in_last:
                raise CommandError(
                    Status.INVALID_SGL_SEGMENT_DESCRIPTOR, "segment descriptor in the last segment"
                )
            if not is_last_in_segment:
                raise CommandError(
                    Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS,
                    "segment descriptor before the end of its segment",
                )
            if dlen == 0 or dlen % DESCRIPTOR_SIZE or addr & 0x7:
                raise CommandError(
                    Status.INVALID_SGL_SEGMENT_DESCRIPTOR, f"SGL segment {addr:#x}+{dlen:#x}"
                )
            if addr + dlen > _ADDRESS_LIMIT:
                raise CommandError(Status.DATA_SGL_LENGTH_INVALID, "SGL segment past 2^64")
            return addr, dlen, dtype == LAST_SEGMENT
        raise CommandError(Status.SGL_DESCRIPTOR_TYPE_INVALID, f"SGL descriptor type {dtype:#x}")

    def _take(self, addr: int, dlen: int) -> None:
        n = min(dlen, self.remaining)
        self.remaining -= n
        segments = self.segments
        if segments and addr != BIT_BUCKET:
            last_addr, last_len = segments[-1]
            if last_addr != BIT_BUCKET and last_addr + last_len == addr:
                segments[-1] = (last_addr, last_len + n)
                return
        segments.append((addr, n))


def sgl_views(
    memory: GuestMemory, segments: list[Segment], to_guest: bool
) -> list[memoryview] | None:
    """Zero-copy views of the segments (bit buckets become scratch space that is
    thrown away), or None if any must go through copies."""
    views: list[memoryview] = []
    try:
        for addr, length in segments:
            if addr == BIT_BUCKET:
                for pos in range(0, length, len(_DISCARD)):
                    views.append(_DISCARD[: min(len(_DISCARD), length - pos)])
                continue
            view = memory.view(addr, length, to_guest)
            if view is None:
                return None
            views.append(view)
    except DmaError as exc:
        raise CommandError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc
    return views


def sgl_copy_to_guest(
    memory: GuestMemory, segments: list[Segment], data: bytes | bytearray | memoryview
) -> None:
    """Scatter `data` over the segments, skipping what bit buckets discard."""
    pos = 0
    try:
        for addr, length in segments:
            if addr != BIT_BUCKET:
                memory.write(addr, data[pos : pos + length])
            pos += length
    except DmaError as exc:
        raise CommandError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc
