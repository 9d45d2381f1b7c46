#!/usr/bin/env python3
"""Fuzz target `prp`: the Python reference's PRP walk (nvme/prp.py) over guest
memory the input writes, checked against a walk written straight from the
specification (NVMe Base 4.1.1: PRP1, PRP2, PRP lists chained by their last entry).

Input: PRP1, PRP2 (u64 each), the transfer length (u32, its low 21 bits), an offset
in guest memory (u16) and the bytes put there (PRP lists). Guest memory is
GUEST_SIZE bytes at guest-physical 0, the unit tests' FakeGuestMemory; the fourth
page is left unmapped when the length's top bit is set, and it is reached by copies
only (no zero-copy views, as memory a client gave no fd for) when bit 30 is.

Invariants: prp_segments returns segments or raises CommandError with PRP Offset
Invalid or Data Transfer Error, nothing else; its segments are the specification's
pages (merged where adjacent) and add up to the length; it fails exactly when the
specification's walk fails; prp_views agrees with it; copying through the segments
moves the bytes the segments name.
"""

from __future__ import annotations

import itertools
import struct
import sys

import fuzzing

with fuzzing.instrumented(__name__):
    from nvme_mdev.guest_memory import DmaError
    from nvme_mdev.nvme import prp
    from nvme_mdev.nvme.errors import CommandError
    from nvme_mdev.nvme.spec import PAGE_SIZE, Status
from harness import FakeGuestMemory

GUEST_SIZE = 16 * PAGE_SIZE
HOLE = (3 * PAGE_SIZE, PAGE_SIZE)
MAX_LENGTH = 2 << 20
_STATUSES = frozenset({Status.PRP_OFFSET_INVALID, Status.DATA_TRANSFER_ERROR})
_MEMORY = FakeGuestMemory(GUEST_SIZE, base=0)
_ZERO = bytes(GUEST_SIZE)
_PATTERN = bytes(i * 7 & 0xFF for i in range(MAX_LENGTH))


class _Refused(Exception):
    pass


def reference(memory: FakeGuestMemory, prp1: int, prp2: int, length: int) -> list[prp.Segment]:
    """The pages PRP1/PRP2 describe, entry by entry as the specification reads them
    (adjacent ones merged), or _Refused."""
    if length <= 0:
        return []
    if prp1 % 4:
        raise _Refused("PRP1 not dword aligned")
    pages = [(prp1, min(length, PAGE_SIZE - prp1 % PAGE_SIZE))]
    remaining = length - pages[0][1]
    if 0 < remaining <= PAGE_SIZE:
        if prp2 % PAGE_SIZE:
            raise _Refused("PRP2 offset")
        pages.append((prp2, remaining))
        remaining = 0
    elif remaining > PAGE_SIZE and prp2 % 8:
        raise _Refused("PRP list pointer not qword aligned")
    entry_addr = prp2
    while remaining > 0:
        try:
            (entry,) = struct.unpack("<Q", memory.read(entry_addr, 8))
        except DmaError:
            raise _Refused("list in unmapped memory") from None
        if entry % PAGE_SIZE:
            raise _Refused("entry with an offset")
        if entry_addr % PAGE_SIZE == PAGE_SIZE - 8 and remaining > PAGE_SIZE:
            entry_addr = entry  # the last entry of a list page points to the next one
            continue
        pages.append((entry, min(PAGE_SIZE, remaining)))
        remaining -= pages[-1][1]
        entry_addr += 8
    merged: list[prp.Segment] = []
    for addr, n in pages:
        if merged and merged[-1][0] + merged[-1][1] == addr:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((addr, n))
    return merged


def fuzz(data: bytes) -> None:
    source = fuzzing.Input(data)
    prp1, prp2, length = source.u64(), source.u64(), source.u32()
    at, image = source.u16() % GUEST_SIZE, source.rest()[:GUEST_SIZE]
    memory = _MEMORY
    memory.ram[:] = _ZERO
    memory.holes.clear()
    if length & 1 << 31:
        memory.holes.append(HOLE)
    memory._zero_copy = not length & 1 << 30  # (the setter tells listeners; there are none)
    length &= MAX_LENGTH - 1
    memory.ram[at : at + len(image)] = image[: GUEST_SIZE - at]

    try:
        expected: list[prp.Segment] | None = reference(memory, prp1, prp2, length)
    except _Refused:
        expected = None
    try:
        segments = prp.prp_segments(memory, prp1, prp2, length)
    except CommandError as exc:
        assert exc.status in _STATUSES, hex(exc.status)
        assert expected is None, f"refused ({exc}) what the specification allows: {expected}"
        return
    assert segments == expected, (segments, expected)
    assert sum(n for _, n in segments) == length
    assert all(n > 0 and 0 <= a < 1 << 64 for a, n in segments)

    try:
        same, views = prp.prp_views(memory, prp1, prp2, length, to_guest=False)
    except CommandError as exc:
        assert exc.status == Status.DATA_TRANSFER_ERROR, hex(exc.status)
        mapped = False
    else:
        assert same == segments, (same, segments)
        mapped = True
        if views is not None:
            assert [len(v) for v in views] == [n for _, n in segments]
        else:
            assert not memory.zero_copy
    try:
        content = prp.copy_from_guest(memory, segments)
    except CommandError as exc:
        assert exc.status == Status.DATA_TRANSFER_ERROR and not mapped
        return
    assert mapped and len(content) == length
    assert content == b"".join(memory.read(a, n) for a, n in segments)
    ends = sorted((a, a + n) for a, n in segments)
    if all(end <= start for (_, end), (start, _) in itertools.pairwise(ends)):
        pattern = _PATTERN[:length]
        prp.copy_to_guest(memory, segments, pattern)
        assert prp.copy_from_guest(memory, segments) == pattern


if __name__ == "__main__":
    fuzzing.main(fuzz)
    sys.exit(0)
