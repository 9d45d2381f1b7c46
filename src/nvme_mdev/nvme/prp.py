"""Physical Region Page entries and lists (NVMe Base 4.1.1): the guest's scatter list.

A data pointer becomes a list of (guest address, length) segments, validated
as the specification requires; the I/O path then turns each segment into a
zero-copy view of guest memory.
"""

from __future__ import annotations

import struct

from ..guest_memory import DmaError, GuestMemory
from .errors import CommandError
from .spec import PAGE_SIZE, Status

Segment = tuple[int, int]  # (guest address, length)

_PAGE_MASK = PAGE_SIZE - 1
_PRP_ENTRIES_PER_PAGE = PAGE_SIZE // 8


def prp_segments(memory: GuestMemory, prp1: int, prp2: int, length: int) -> list[Segment]:
    """The segments that PRP1/PRP2 describe for a transfer of `length` bytes.

    Physically adjacent pages are merged into one segment. Raises CommandError with
    PRP Offset Invalid for misaligned entries and Data Transfer Error for a PRP list
    in unmapped memory.
    """
    if length <= 0:
        return []
    if prp1 & 0x3:
        raise CommandError(Status.PRP_OFFSET_INVALID, "PRP1 not dword aligned")
    first = min(length, PAGE_SIZE - (prp1 & _PAGE_MASK))
    segments: list[Segment] = [(prp1, first)]
    remaining = length - first
    if remaining == 0:
        return segments
    if remaining <= PAGE_SIZE:
        if prp2 & _PAGE_MASK:
            raise CommandError(Status.PRP_OFFSET_INVALID, "PRP2 entry has an offset")
        _append(segments, prp2, remaining)
        return segments
    if prp2 & 0x7:
        raise CommandError(Status.PRP_OFFSET_INVALID, "PRP list pointer not qword aligned")
    list_addr = prp2
    while remaining > 0:
        pages_left = (remaining + _PAGE_MASK) // PAGE_SIZE
        slots = (PAGE_SIZE - (list_addr & _PAGE_MASK)) // 8  # entries to the end of this page
        chained = pages_left > slots  # the last slot then points to the next list page
        count = slots - 1 if chained else pages_left
        entries = _read_entries(memory, list_addr, slots if chained else count)
        for entry in entries[:count]:
            if entry & _PAGE_MASK:
                raise CommandError(Status.PRP_OFFSET_INVALID, "PRP list entry has an offset")
            chunk = min(PAGE_SIZE, remaining)
            _append(segments, entry, chunk)
            remaining -= chunk
        if chained:
            list_addr = entries[-1]
            if list_addr & _PAGE_MASK:
                raise CommandError(Status.PRP_OFFSET_INVALID, "chained PRP list has an offset")
    return segments


def _append(segments: list[Segment], addr: int, length: int) -> None:
    last_addr, last_len = segments[-1]
    if last_addr + last_len == addr:
        segments[-1] = (last_addr, last_len + length)
    else:
        segments.append((addr, length))


def _read_entries(memory: GuestMemory, addr: int, count: int) -> tuple[int, ...]:
    try:
        raw = memory.read(addr, count * 8)
    except DmaError as exc:
        raise CommandError(Status.DATA_TRANSFER_ERROR, f"PRP list: {exc}") from exc
    return struct.unpack(f"<{count}Q", raw)


def segment_views(
    memory: GuestMemory, segments: list[Segment], to_guest: bool
) -> list[memoryview] | None:
    """Zero-copy views of the segments, or None if any must go through copies."""
    views: list[memoryview] = []
    try:
        for addr, length in segments:
            view = memory.view(addr, length, to_guest)
            if view is None:
                return None
            views.append(view)
    except DmaError as exc:
        raise CommandError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc
    return views


def prp_views(
    memory: GuestMemory, prp1: int, prp2: int, length: int, to_guest: bool
) -> tuple[list[Segment], list[memoryview] | None]:
    """prp_segments() and segment_views() in one call, with a shortcut for the most
    common transfer of all, one that PRP1 alone describes (a 4 KiB I/O)."""
    if length <= PAGE_SIZE - (prp1 & _PAGE_MASK) and not prp1 & 0x3 and length > 0:
        try:
            view = memory.view(prp1, length, to_guest)
        except DmaError as exc:
            raise CommandError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc
        return [(prp1, length)], None if view is None else [view]
    segments = prp_segments(memory, prp1, prp2, length)
    return segments, segment_views(memory, segments, to_guest)


def copy_to_guest(
    memory: GuestMemory, segments: list[Segment], data: bytes | bytearray | memoryview
) -> None:
    """Scatter `data` over the segments (the data may be shorter than they are)."""
    pos = 0
    try:
        for addr, length in segments:
            if pos >= len(data):
                break
            chunk = data[pos : pos + length]
            memory.write(addr, chunk)
            pos += len(chunk)
    except DmaError as exc:
        raise CommandError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc


def copy_from_guest(memory: GuestMemory, segments: list[Segment]) -> bytes:
    """Gather the segments' contents."""
    try:
        return b"".join(memory.read(addr, length) for addr, length in segments)
    except DmaError as exc:
        raise CommandError(Status.DATA_TRANSFER_ERROR, str(exc)) from exc


def send_to_host(memory: GuestMemory, dw: tuple[int, ...], data: bytes | memoryview) -> None:
    """Return a command's data (Identify, log pages ...) through its PRP1/PRP2."""
    segments = prp_segments(memory, dw[6] | (dw[7] << 32), dw[8] | (dw[9] << 32), len(data))
    copy_to_guest(memory, segments, data)


def receive_from_host(memory: GuestMemory, dw: tuple[int, ...], length: int) -> bytes:
    """Fetch a command's data from its PRP1/PRP2."""
    segments = prp_segments(memory, dw[6] | (dw[7] << 32), dw[8] | (dw[9] << 32), length)
    return copy_from_guest(memory, segments)
