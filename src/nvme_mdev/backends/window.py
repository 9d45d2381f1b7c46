"""A window of a backend: bytes [offset, offset + size) of a file, disk or partition,
seen as a whole backend. Several namespaces can share one disk through windows
that do not overlap (storage.HostStorage checks that)."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Backend, IoTarget
from .file import BackendError


class WindowBackend:
    def __init__(self, inner: Backend, offset: int, size: int, to_end: bool = False) -> None:
        """`to_end`: the window was given no size: it runs to the end of its store, and
        follows the store when it grows or shrinks (a rescan)."""
        if offset < 0 or size <= 0:
            raise BackendError(f"{inner.description}: window offset {offset} size {size}")
        if offset + size > inner.size:
            raise BackendError(
                f"{inner.description}: window {offset}+{size} reaches past the end "
                f"({inner.size} bytes)"
            )
        if offset % inner.block_size:
            # BLKZEROOUT and BLKDISCARD want sector-aligned ranges.
            raise BackendError(
                f"{inner.description}: window offset {offset} is not a multiple of the "
                f"storage's {inner.block_size}-byte blocks"
            )
        self.inner = inner
        self.offset = offset
        self.size = size
        self.to_end = to_end
        self.block_size = inner.block_size
        self.readonly = inner.readonly
        # Also what the namespace's UUID is derived from: two windows differ.
        self.description = f"{inner.description},offset={offset},size={size}"
        #: Identify Namespace's DLFEAT depends on it (see admin/identify.py)
        self.is_block_device: bool = getattr(inner, "is_block_device", False)

    def store_size(self) -> int:
        return self.inner.store_size()

    def current_size(self) -> int:
        store = self.inner.store_size()
        size = store - self.offset if self.to_end else self.size
        if size <= 0 or self.offset + size > store:
            raise BackendError(
                f"{self.inner.description}: window {self.offset}+{self.size} now reaches "
                f"past the end ({store} bytes)"
            )
        return size

    # The namespace has checked every range against self.size: only shift it.

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        self.inner.readv(self.offset + offset, buffers)

    def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool) -> None:
        self.inner.writev(self.offset + offset, buffers, fua)

    def io_target(self) -> IoTarget | None:
        target = self.inner.io_target()
        return None if target is None else target._replace(base=target.base + self.offset)

    def flush(self) -> None:
        self.inner.flush()

    def write_zeroes(self, offset: int, length: int, deallocate: bool) -> None:
        self.inner.write_zeroes(self.offset + offset, length, deallocate)

    def deallocate(self, offset: int, length: int) -> None:
        self.inner.deallocate(self.offset + offset, length)

    def close(self) -> None:
        self.inner.close()
