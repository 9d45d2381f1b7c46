"""Guest memory (vfio_user/memory.py): fd-backed regions mmap'd for zero-copy
views, fd-less ones through messages, the lock-free table, unmap rules."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvme_mdev.guest_memory import DmaError, GuestMemory
from nvme_mdev.vfio_user.memory import DmaMemory
from nvme_mdev.vfio_user.protocol import Bytes, ProtocolError

PAGE = mmap.PAGESIZE


class Ram:
    """A memfd standing in for the client's guest RAM."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)

    def dup(self) -> int:
        return os.dup(self.fd)  # DmaMemory.map takes ownership of the fd it gets

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def ram() -> Iterator[Ram]:
    r = Ram(16 * PAGE)
    yield r
    r.close()


@pytest.fixture
def memory() -> Iterator[DmaMemory]:
    m = DmaMemory()
    yield m
    DmaMemory.release(m.unmap_all())


class FakeTransport:
    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.data = bytearray(size)
        self.calls: list[tuple[str, int, int]] = []

    def dma_read(self, addr: int, length: int) -> bytes:
        self.calls.append(("read", addr, length))
        off = addr - self.base
        return bytes(self.data[off : off + length])

    def dma_write(self, addr: int, data: Bytes) -> None:
        self.calls.append(("write", addr, len(data)))
        off = addr - self.base
        self.data[off : off + len(data)] = data


def test_is_a_guest_memory() -> None:
    memory: GuestMemory = DmaMemory()
    assert memory is not None


def test_view_is_zero_copy_at_an_unaligned_file_offset(memory: DmaMemory, ram: Ram) -> None:
    ram.map[3 * PAGE + 100 : 3 * PAGE + 105] = b"hello"
    # iova 0x10000 is file offset PAGE + 100: not page aligned.
    memory.map(0x10000, 4 * PAGE, True, True, ram.dup(), PAGE + 100)
    view = memory.view(0x10000 + 2 * PAGE, 5, writable=False)
    assert view is not None and bytes(view) == b"hello"
    writable = memory.view(0x10000, 4, writable=True)
    assert writable is not None
    writable[:] = b"dev!"
    assert ram.map[PAGE + 100 : PAGE + 104] == b"dev!"
    memory.write(0x10000 + 8, b"abc")
    assert ram.map[PAGE + 108 : PAGE + 111] == b"abc"
    assert memory.read(0x10000 + 2 * PAGE, 5) == b"hello"
    view.release()
    writable.release()


def test_fd_is_owned(memory: DmaMemory, ram: Ram) -> None:
    """The region keeps the fd (a successor process maps the same memory through it)
    and closes it when it goes; a refused mapping closes it at once."""
    fd = ram.dup()
    region = memory.map(0, PAGE, True, True, fd, 0)
    assert region.fd == fd and os.fstat(fd)
    DmaMemory.release(memory.unmap(0, PAGE))
    with pytest.raises(OSError):
        os.fstat(fd)
    memory.map(0, PAGE, True, True, ram.dup(), 0)
    bad = ram.dup()
    with pytest.raises(ProtocolError):
        memory.map(0, PAGE, True, True, bad, 0)  # overlap: refused, fd still closed
    with pytest.raises(OSError):
        os.fstat(bad)


def test_permissions(memory: DmaMemory, ram: Ram) -> None:
    memory.map(0, PAGE, True, False, ram.dup(), 0)  # read-only
    memory.map(PAGE, PAGE, False, True, ram.dup(), PAGE)  # write-only
    ro = memory.view(0, 16, writable=False)
    assert ro is not None and ro.readonly
    with pytest.raises(DmaError):
        memory.view(0, 16, writable=True)
    with pytest.raises(DmaError):
        memory.write(0, b"x")
    with pytest.raises(DmaError):
        memory.read(PAGE, 4)
    with pytest.raises(DmaError):
        memory.view(PAGE, 4, writable=False)
    memory.write(PAGE, b"w")
    with pytest.raises(DmaError):  # a write that reaches into the read-only one
        memory.write(PAGE - 1, b"xy")
    ro.release()


def test_unmapped_and_spanning(memory: DmaMemory, ram: Ram) -> None:
    memory.map(0x1000, PAGE, True, True, ram.dup(), 0)
    memory.map(0x1000 + PAGE, PAGE, True, True, ram.dup(), 5 * PAGE)
    for addr, length in ((0, 4), (0x1000 + 2 * PAGE, 1), (0x1000 + 2 * PAGE - 2, 4), (0xFFF, 2)):
        with pytest.raises(DmaError):
            memory.view(addr, length, False)
        with pytest.raises(DmaError):
            memory.read(addr, length)
        with pytest.raises(DmaError):
            memory.write(addr, bytes(length))
    # Two adjacent regions: no single view, but read/write go piece by piece.
    edge = 0x1000 + PAGE - 3
    assert memory.view(edge, 6, True) is None
    memory.write(edge, b"spans!")
    assert ram.map[PAGE - 3 : PAGE] == b"spa" and ram.map[5 * PAGE : 5 * PAGE + 3] == b"ns!"
    assert memory.read(edge, 6) == b"spans!"
    empty = memory.view(0xDEAD0000, 0, False)
    assert empty is not None and len(empty) == 0


def test_map_refusals(memory: DmaMemory, ram: Ram) -> None:
    memory.map(0x10000, 2 * PAGE, True, True, ram.dup(), 0)
    cases = [
        ((0x10000 + PAGE, PAGE, True, True, None, 0), errno.EEXIST),
        ((0x10000 - PAGE, 2 * PAGE, True, True, None, 0), errno.EEXIST),
        ((0, 0, True, True, None, 0), errno.EINVAL),
        ((0, PAGE, False, False, None, 0), errno.EINVAL),
        # beyond the end of the file: would SIGBUS on access
        ((0x100000, 32 * PAGE, True, True, ram.dup(), 0), errno.EINVAL),
        ((0x100000, PAGE, True, True, ram.dup(), 64 * PAGE), errno.EINVAL),
    ]
    for args, err in cases:
        with pytest.raises(ProtocolError) as info:
            memory.map(*args)
        assert info.value.errno == err, args
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ProtocolError):
        memory.map(0x100000, PAGE, True, True, r, 0)  # not mmap-able
    small = DmaMemory(max_regions=1)
    small.map(0, PAGE, True, True, None, 0)
    with pytest.raises(ProtocolError) as info:
        small.map(PAGE, PAGE, True, True, None, 0)
    assert info.value.errno == errno.ENOSPC


def test_unmap_is_exact(memory: DmaMemory, ram: Ram) -> None:
    memory.map(0, 2 * PAGE, True, True, ram.dup(), 0)
    memory.map(2 * PAGE, PAGE, True, True, None, 0)
    for iova, size, err in (
        (0, PAGE, errno.EINVAL),
        (0, 3 * PAGE, errno.EINVAL),
        (8 * PAGE, PAGE, errno.ENOENT),
    ):
        with pytest.raises(ProtocolError) as info:
            memory.unmap(iova, size)
        assert info.value.errno == err
    removed = memory.unmap(0, 2 * PAGE)
    assert [(r.iova, r.size, r.fd_backed) for r in removed] == [(0, 2 * PAGE, True)]
    DmaMemory.release(removed)
    with pytest.raises(DmaError):
        memory.read(0, 1)
    assert memory.has_message_regions
    assert len(memory.unmap_all()) == 1 and not memory.regions


def test_release_while_a_view_is_held(memory: DmaMemory, ram: Ram) -> None:
    memory.map(0, PAGE, True, True, ram.dup(), 0)
    view = memory.view(0, 8, True)
    assert view is not None
    DmaMemory.release(memory.unmap(0, PAGE))  # logged, not fatal
    view[0:1] = b"z"  # still backed: the mapping goes with the last view
    view.release()


def test_message_regions(memory: DmaMemory) -> None:
    memory.map(0x8000, 2 * PAGE, True, True, None, 0)
    with pytest.raises(DmaError, match="no client"):
        memory.read(0x8000, 4)
    transport = FakeTransport(0x8000, 2 * PAGE)
    memory.attach(transport)
    assert memory.view(0x8000, 16, True) is None
    memory.write(0x8000 + 10, b"hello")
    assert memory.read(0x8000 + 10, 5) == b"hello"
    assert transport.calls == [("write", 0x800A, 5), ("read", 0x800A, 5)]
    with pytest.raises(DmaError):
        memory.read(0x8000 + 2 * PAGE - 1, 2)
    memory.attach(None)
    with pytest.raises(DmaError):
        memory.write(0x8000, b"x")


def test_mixed_regions_piecewise(memory: DmaMemory, ram: Ram) -> None:
    memory.map(0, PAGE, True, True, ram.dup(), 0)
    memory.map(PAGE, PAGE, True, True, None, 0)
    transport = FakeTransport(PAGE, PAGE)
    memory.attach(transport)
    memory.write(PAGE - 2, b"abcd")
    assert ram.map[PAGE - 2 : PAGE] == b"ab" and transport.data[:2] == b"cd"
    assert memory.read(PAGE - 2, 4) == b"abcd"


def test_readers_never_see_a_torn_table(memory: DmaMemory, ram: Ram) -> None:
    """Lookups take no lock while the table changes under them."""
    memory.map(0, PAGE, True, True, ram.dup(), 0)
    stop = threading.Event()
    failures: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                assert memory.read(0, 4) == bytes(4)
                for addr in (PAGE, 3 * PAGE):
                    with contextlib.suppress(DmaError):
                        memory.read(addr, 4)
            except BaseException as exc:
                failures.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(300):
        iova = (1 + i % 5) * PAGE
        memory.map(iova, PAGE, True, True, None, 0)
        memory.unmap(iova, PAGE)
    stop.set()
    for t in threads:
        t.join()
    assert not failures


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["map", "unmap", "access"]), st.integers(0, 15), st.integers(1, 4)
        ),
        max_size=40,
    )
)
def test_against_a_model(ops: list[tuple[str, int, int]]) -> None:
    """Random map/unmap/access sequences agree with a page-granular model."""
    ram = Ram(16 * PAGE)
    memory = DmaMemory()
    model: dict[int, int] = {}  # page -> start page of its mapping
    maps: dict[int, int] = {}  # start page -> pages
    try:
        for op, page, pages in ops:
            if op == "map":
                free = (
                    all(pg not in model for pg in range(page, page + pages)) and page + pages <= 16
                )
                try:
                    memory.map(page * PAGE, pages * PAGE, True, True, ram.dup(), page * PAGE)
                    assert free
                    maps[page] = pages
                    for pg in range(page, page + pages):
                        model[pg] = page
                except ProtocolError:
                    assert not free
            elif op == "unmap":
                exact = maps.get(page) == pages
                try:
                    DmaMemory.release(memory.unmap(page * PAGE, pages * PAGE))
                    assert exact
                    del maps[page]
                    for pg in range(page, page + pages):
                        del model[pg]
                except ProtocolError:
                    assert not exact
            else:
                mapped = all(pg in model for pg in range(page, page + pages))
                try:
                    data = memory.read(page * PAGE + 7, pages * PAGE - 14)
                    assert mapped and data == ram.map[page * PAGE + 7 : (page + pages) * PAGE - 7]
                except DmaError:
                    assert not mapped
    finally:
        DmaMemory.release(memory.unmap_all())
        ram.close()


def test_map_accepts_the_whole_address_space_and_no_more(memory: DmaMemory) -> None:
    """The edges of [0, 2^64): a one-byte region, one that ends exactly at 2^64; not one
    past it, nor a negative address."""
    memory.map(0, 1, True, True, None, 0)
    top = memory.map((1 << 64) - PAGE, PAGE, True, False, None, 0)
    assert (top.iova, top.size) == ((1 << 64) - PAGE, PAGE)
    for iova, size in (((1 << 64) - PAGE, PAGE + 1), ((1 << 64) - 1, 2), (-PAGE, 2 * PAGE)):
        with pytest.raises(ProtocolError) as info:
            memory.map(iova, size, True, True, None, 0)
        assert info.value.errno == errno.EINVAL, (iova, size)


def test_map_at_a_file_offset(memory: DmaMemory, ram: Ram) -> None:
    """A region mapped from the middle of the client's file sees that part of it."""
    ram.map[3 * PAGE : 3 * PAGE + 5] = b"third"
    memory.map(0x40000, PAGE, True, False, ram.dup(), 3 * PAGE)
    assert memory.read(0x40000, 5) == b"third"


def test_memory_truncated_under_a_mapping_reads_as_zeroes_and_is_reported(
    memory: DmaMemory,
) -> None:
    """A client truncates the file it mapped: touching it would raise SIGBUS and end the
    daemon; guarded, the mapping turns to zeroes, the fault is counted, and the memory's
    owner is told (on the watcher's thread) so that its controller can go fatal."""
    ram = Ram(4 * PAGE)
    try:
        ram.map[:4] = b"data"
        lost = threading.Event()
        memory.on_lost(lost.set)
        memory.map(0x20000, 4 * PAGE, True, True, ram.dup(), 0)
        assert memory.read(0x20000, 4) == b"data"
        os.ftruncate(ram.fd, 0)
        assert memory.read(0x20000 + PAGE, 8) == bytes(8)  # not SIGBUS
        assert memory.faults == 1
        assert lost.wait(10)
    finally:
        ram.close()


def test_an_access_across_three_regions_away_from_address_zero(memory: DmaMemory) -> None:
    """Reads and writes that span three adjacent regions (two mapped from files, one in
    the middle reached by messages) land at the right offset of each; data given as a
    memoryview of another format is taken as its bytes; a negative address is refused."""
    first, last = Ram(PAGE), Ram(PAGE)
    try:
        base = 0x7_0000_0000
        memory.map(base, PAGE, True, True, first.dup(), 0)
        memory.map(base + PAGE, PAGE, True, True, None, 0)
        memory.map(base + 2 * PAGE, PAGE, True, True, last.dup(), 0)
        middle = FakeTransport(base + PAGE, PAGE)
        memory.attach(middle)
        data = (bytes(range(251)) * (PAGE // 251 + 1))[: PAGE + 24]
        words = memoryview(bytearray(data)).cast("I")  # a format other than "B"
        memory.write(base + PAGE - 12, words)
        assert first.map[PAGE - 12 :] == data[:12]
        assert middle.data == bytearray(data[12 : 12 + PAGE])
        assert last.map[:12] == data[12 + PAGE :]
        assert memory.read(base + PAGE - 12, len(data)) == data
        with pytest.raises(DmaError):
            memory.read(-PAGE, 16)
    finally:
        first.close()
        last.close()
