#!/usr/bin/env python3
"""Fuzz target `sgl`: the Python reference's SGL walk (nvme/sgl.py) over guest memory
the input writes, checked against a walk written from the specification (NVMe Base
4.3.2; Figures 113-117: the status of each malformed list).

Input: SGL Entry 1 (16 bytes: address, length, 3 reserved, SGL identifier), the
transfer length (u32, its low 20 bits; its top bit: a read, to the guest; bit 30: dword
granularity), an offset in guest memory (u16) and the bytes put there (SGL segments).
Guest memory is GUEST_SIZE bytes at guest-physical 0; its fourth page is a hole
when bit 29 of the length is set, and it is reached by copies only (no zero-copy
views) when bit 28 is.

Invariants: sgl_segments returns segments or raises CommandError with one of the SGL
statuses or Data Transfer Error, nothing else; it agrees with the reference walk
(same segments, or the same status); the segments add up to the length, none is
empty, bit buckets appear only in a read, data addresses stay below 2^64; a data
block is dword aligned when the controller asks for that; sgl_views and
sgl_copy_to_guest agree with the segments.
"""

from __future__ import annotations

import itertools
import sys

import fuzzing

with fuzzing.instrumented(__name__):
    from nvme_mdev.guest_memory import DmaError
    from nvme_mdev.nvme import sgl
    from nvme_mdev.nvme.errors import CommandError
    from nvme_mdev.nvme.prp import Segment
    from nvme_mdev.nvme.spec import PAGE_SIZE, Status
from harness import FakeGuestMemory

GUEST_SIZE = 16 * PAGE_SIZE
HOLE = (3 * PAGE_SIZE, PAGE_SIZE)
MAX_LENGTH = 1 << 20
_STATUSES = frozenset(
    {
        Status.SGL_DESCRIPTOR_TYPE_INVALID,
        Status.DATA_SGL_LENGTH_INVALID,
        Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS,
        Status.INVALID_SGL_SEGMENT_DESCRIPTOR,
        Status.SGL_DATA_BLOCK_GRANULARITY_INVALID,
        Status.DATA_TRANSFER_ERROR,
    }
)
_MEMORY = FakeGuestMemory(GUEST_SIZE, base=0)
_ZERO = bytes(GUEST_SIZE)
_PATTERN = bytes(i * 13 & 0xFF for i in range(MAX_LENGTH))
_LIMIT = 1 << 64


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(hex(status))
        self.status = status


class Reference:
    """The walk, descriptor by descriptor. Segments are fetched a page of descriptors
    at a time (as the controller does: a descriptor past the transfer's end may
    still be in a page it fetches) and a walk that meets the same segment with the
    same bytes left is a loop."""

    def __init__(self, memory: FakeGuestMemory, length: int, read: bool, dword: bool) -> None:
        self.memory, self.remaining, self.read, self.dword = memory, length, read, dword
        self.segments: list[Segment] = []
        self.budget = sgl.MAX_DESCRIPTORS

    def take(self, addr: int, n: int) -> None:
        n = min(n, self.remaining)
        self.remaining -= n
        last = self.segments[-1] if self.segments else None
        if (
            last is not None
            and addr != sgl.BIT_BUCKET
            and last[0] != sgl.BIT_BUCKET
            and last[0] + last[1] == addr
        ):
            self.segments[-1] = (last[0], last[1] + n)
        else:
            self.segments.append((addr, n))

    def descriptor(
        self, addr: int, n: int, ident: int, last_of_segment: bool, in_last: bool
    ) -> tuple[int, int, bool] | None:
        kind, subtype = ident >> 4, ident & 0xF
        if subtype:
            raise _Refused(Status.SGL_DESCRIPTOR_TYPE_INVALID)
        if kind == sgl.DATA_BLOCK:
            if self.dword and (addr % 4 or n % 4):
                raise _Refused(Status.SGL_DATA_BLOCK_GRANULARITY_INVALID)
            if addr + n > _LIMIT:
                raise _Refused(Status.DATA_SGL_LENGTH_INVALID)
            if n:
                self.take(addr, n)
            return None
        if kind == sgl.BIT_BUCKET_DESCRIPTOR:
            if n and self.read:
                self.take(sgl.BIT_BUCKET, n)
            return None
        if kind in (sgl.SEGMENT, sgl.LAST_SEGMENT):
            if in_last:
                raise _Refused(Status.INVALID_SGL_SEGMENT_DESCRIPTOR)
            if not last_of_segment:
                raise _Refused(Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS)
            if n == 0 or n % 16 or addr % 8:
                raise _Refused(Status.INVALID_SGL_SEGMENT_DESCRIPTOR)
            if addr + n > _LIMIT:
                raise _Refused(Status.DATA_SGL_LENGTH_INVALID)
            return addr, n, kind == sgl.LAST_SEGMENT
        raise _Refused(Status.SGL_DESCRIPTOR_TYPE_INVALID)

    def walk(self, addr: int, n: int, ident: int) -> list[Segment]:
        if self.remaining <= 0:
            return []
        following = self.descriptor(addr, n, ident, True, False)
        seen: set[tuple[tuple[int, int, bool], int]] = set()
        while following is not None and self.remaining > 0:
            if (following, self.remaining) in seen:
                raise _Refused(Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS)
            seen.add((following, self.remaining))
            seg_addr, seg_len, in_last = following
            count = seg_len // 16
            following = None
            for index in range(count):
                if index % 256 == 0:  # fetch the next page of descriptors
                    fetch = min(256, count - index)
                    self.budget -= fetch
                    if self.budget < 0:
                        raise _Refused(Status.INVALID_NUMBER_OF_SGL_DESCRIPTORS)
                    try:
                        page = self.memory.read(seg_addr + index * 16, fetch * 16)
                    except DmaError:
                        raise _Refused(Status.DATA_TRANSFER_ERROR) from None
                d = page[(index % 256) * 16 : (index % 256) * 16 + 16]
                d_addr, d_len, d_ident = (
                    int.from_bytes(d[:8], "little"),
                    int.from_bytes(d[8:12], "little"),
                    d[15],
                )
                following = self.descriptor(d_addr, d_len, d_ident, index == count - 1, in_last)
                if self.remaining == 0:
                    return self.segments
        if self.remaining > 0:
            raise _Refused(Status.DATA_SGL_LENGTH_INVALID)
        return self.segments


def fuzz(data: bytes) -> None:
    source = fuzzing.Input(data)
    entry = source.take(16).ljust(16, b"\0")
    length = source.u32()
    at, image = source.u16() % GUEST_SIZE, source.rest()[:GUEST_SIZE]
    read, dword, hole = bool(length & 1 << 31), bool(length & 1 << 30), bool(length & 1 << 29)
    length &= MAX_LENGTH - 1
    memory = _MEMORY
    memory.ram[:] = _ZERO
    memory.holes.clear()
    if hole:
        memory.holes.append(HOLE)
    memory._zero_copy = not length & 1 << 28  # (the setter tells listeners; there are none)
    memory.ram[at : at + len(image)] = image[: GUEST_SIZE - at]
    words = [int.from_bytes(entry[i : i + 4], "little") for i in range(0, 16, 4)]
    dw = (0,) * 6 + tuple(words)
    addr, n, ident = words[0] | words[1] << 32, words[2], words[3] >> 24

    reference = Reference(memory, length, read, dword)
    try:
        expected: list[Segment] | int = reference.walk(addr, n, ident)
    except _Refused as refused:
        expected = refused.status
    try:
        segments = sgl.sgl_segments(memory, dw, length, read, dword)
    except CommandError as exc:
        assert exc.status in _STATUSES, hex(exc.status)
        assert expected == exc.status, f"status {exc.status:#x} ({exc}), reference: {expected}"
        return
    # The controller takes one Data Block that covers the transfer as it is (the
    # reference agrees), so its segments are the reference's.
    assert segments == expected, (segments, expected)
    assert sum(n for _, n in segments) == length
    for seg_addr, seg_len in segments:
        assert seg_len > 0
        if seg_addr == sgl.BIT_BUCKET:
            assert read, "a bit bucket in a write"
        else:
            assert seg_addr >= 0 and seg_addr + seg_len <= _LIMIT
    try:
        views = sgl.sgl_views(memory, segments, to_guest=read)
    except CommandError as exc:
        assert exc.status == Status.DATA_TRANSFER_ERROR
        return
    if views is None:
        assert not memory.zero_copy
    else:
        assert sum(len(v) for v in views) == length
    pattern = _PATTERN[:length]
    sgl.sgl_copy_to_guest(memory, segments, pattern)
    ends = sorted((a, a + n) for a, n in segments if a != sgl.BIT_BUCKET)
    if all(end <= start for (_, end), (start, _) in itertools.pairwise(ends)):
        pos = 0
        for seg_addr, seg_len in segments:
            if seg_addr != sgl.BIT_BUCKET:
                assert memory.read(seg_addr, seg_len) == pattern[pos : pos + seg_len]
            pos += seg_len


if __name__ == "__main__":
    fuzzing.main(fuzz)
    sys.exit(0)
