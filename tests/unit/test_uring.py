"""The io_uring ring and engine (backends/uring.py) against real files and the real
kernel interface: no mocks."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvme_mdev.backends import uring
from nvme_mdev.backends.file import BackendError, FileBackend, NullBackend
from nvme_mdev.backends.io_engine import SyncEngine, Transfer, make_io_engine
from nvme_mdev.backends.window import WindowBackend

pytestmark = pytest.mark.skipif(
    uring.unavailable() is not None, reason=f"no io_uring here: {uring.unavailable()}"
)


@pytest.fixture
def ring() -> Iterator[uring.Ring]:
    r = uring.Ring(64)
    yield r
    r.close()


@pytest.fixture
def fd(tmp_path: Path) -> Iterator[int]:
    f = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    yield f
    os.close(f)


def iovecs(*buffers: bytearray) -> ctypes.Array[ctypes.c_uint64]:
    arr = (ctypes.c_uint64 * (2 * len(buffers)))()
    for i, b in enumerate(buffers):
        arr[2 * i] = uring.buffer_address(memoryview(b))
        arr[2 * i + 1] = len(b)
    return arr


def run(ring: uring.Ring, count: int) -> dict[int, int]:
    ring.submit(wait=count)
    out: dict[int, int] = {}
    while len(out) < count:
        out.update(ring.completions())
        if len(out) < count:
            ring.wait(1)
    return out


def test_write_fsync_read_round_trip(ring: uring.Ring, fd: int) -> None:
    a, b = bytearray(b"A" * 4096), bytearray(b"B" * 512)
    wiov = iovecs(a, b)
    ring.prep(uring.IORING_OP_WRITEV, fd, ctypes.addressof(wiov), 2, 8192, 0, 1)
    assert run(ring, 1) == {1: 4608}
    ring.prep(uring.IORING_OP_FSYNC, fd, 0, 0, 0, uring.IORING_FSYNC_DATASYNC, 2)
    assert run(ring, 1) == {2: 0}
    c, d = bytearray(512), bytearray(4096)
    riov = iovecs(c, d)
    ring.prep(uring.IORING_OP_READV, fd, ctypes.addressof(riov), 2, 8192, 0, 3)
    assert run(ring, 1) == {3: 4608}
    assert bytes(c + d) == b"A" * 4096 + b"B" * 512
    assert os.pread(fd, 4608, 8192) == bytes(a + b)


def test_errors_are_negative_errno(ring: uring.Ring, fd: int, tmp_path: Path) -> None:
    buf = bytearray(512)
    iov = iovecs(buf)
    ring.prep(uring.IORING_OP_READV, 9999, ctypes.addressof(iov), 1, 0, 0, 1)  # no such fd
    ro = os.open(tmp_path / "data", os.O_RDONLY)
    try:
        ring.prep(uring.IORING_OP_WRITEV, ro, ctypes.addressof(iov), 1, 0, 0, 2)
        done = run(ring, 2)
    finally:
        os.close(ro)
    assert done == {1: -errno.EBADF, 2: -errno.EBADF}


def test_short_read_at_end_of_file(ring: uring.Ring, fd: int) -> None:
    os.pwrite(fd, b"x" * 100, 0)
    buf = bytearray(4096)
    iov = iovecs(buf)
    ring.prep(uring.IORING_OP_READV, fd, ctypes.addressof(iov), 1, 0, 0, 5)
    assert run(ring, 1) == {5: 100}


def test_batch_of_64_in_one_submit(ring: uring.Ring, fd: int) -> None:
    buffers = [bytearray(bytes([i]) * 512) for i in range(64)]
    arrays = [iovecs(b) for b in buffers]
    assert ring.sq_space() == 64
    for i, arr in enumerate(arrays):
        ring.prep(uring.IORING_OP_WRITEV, fd, ctypes.addressof(arr), 1, i * 512, 0, 100 + i)
    assert ring.sq_space() == 0
    assert ring.submit() == 64
    done: dict[int, int] = {}
    while len(done) < 64:
        ring.wait(1)
        done.update(ring.completions())
    assert done == {100 + i: 512 for i in range(64)}
    assert ring.sq_space() == 64
    data = os.pread(fd, 64 * 512, 0)
    assert data == b"".join(bytes(b) for b in buffers)


def test_timed_wait_returns_without_completions(ring: uring.Ring) -> None:
    """A 2 ms wait for a completion that never comes returns. (It runs in a thread so
    that a wait that never returns fails the test instead of hanging it; how soon it
    returns is up to the machine's load.)"""
    waiter = threading.Thread(target=ring.wait, args=(1,), kwargs={"timeout_ns": 2_000_000})
    waiter.daemon = True
    waiter.start()
    waiter.join(60)
    assert not waiter.is_alive(), "the timed wait never returned"
    assert ring.completions() == []


def test_buffer_address_leaves_no_export(tmp_path: Path) -> None:
    m = mmap.mmap(-1, 8192)
    view = memoryview(m)
    base = uring.buffer_address(view)
    assert uring.buffer_address(view[4096:]) == base + 4096
    view.release()
    m.close()  # BufferError if the address lookup had left an export behind


# --- the engine ----------------------------------------------------------------------


def test_engine_queues_submits_and_reaps(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(1 << 16))
    backend = FileBackend(str(path))
    window = WindowBackend(backend, 4096, 8192)
    engine = uring.UringEngine(8)
    try:
        data = memoryview(bytearray(b"w" * 1024))
        req = engine.writev(window, 512, [data[:512], data[512:]], 1024, True, "ctx")
        assert req.submitted and engine.in_flight == 1
        engine.submit()
        (done,) = engine.reap(wait=True)
        assert done is req and req.result == 1024 and req.write and req.fua
        assert req.context == "ctx"
        engine.release(req)
        assert engine.in_flight == 0
        assert os.pread(backend.fd, 1024, 4096 + 512) == b"w" * 1024
    finally:
        engine.close()
        backend.close()


def test_engine_does_at_once_what_it_cannot_submit(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(1 << 20))
    backend = FileBackend(str(path))
    engine = uring.UringEngine(4)

    def done_at_once(t: Transfer, result: int) -> None:
        assert not t.submitted and t.result == result
        engine.release(t)

    try:
        buf = memoryview(bytearray(512))
        done_at_once(engine.readv(NullBackend(1 << 20), 0, [buf], 512, None), 512)  # no fd
        done_at_once(engine.writev(backend, 0, [buf.toreadonly()], 512, True, None), 512)
        done_at_once(engine.readv(backend, 0, [buf] * 1025, 1025 * 512, None), 1025 * 512)
        assert engine.in_flight == 0
        # (FUA writes: a buffered write without it is done in place)
        taken = [engine.writev(backend, 512 * i, [buf], 512, True, None) for i in range(4)]
        assert all(t.submitted for t in taken)
        done_at_once(engine.writev(backend, 0, [buf], 512, True, None), 512)  # the ring is full
        engine.submit()
        got: list[Transfer] = []
        while len(got) < 4:
            got += engine.reap(wait=True)
        for t in got:
            engine.release(t)
        again = engine.writev(backend, 0, [buf], 512, True, None)
        assert again.submitted  # room again
        engine.submit()
        for t in engine.reap(wait=True):
            engine.release(t)
    finally:
        engine.close()
        backend.close()


def test_engine_wait_times_out_and_reaps_nothing_without_work() -> None:
    engine = uring.UringEngine(4)
    try:
        engine.wait(1_000_000)
        assert engine.reap(wait=True) == []  # nothing outstanding: never blocks
    finally:
        engine.close()


def test_selection() -> None:
    assert isinstance(make_io_engine("sync"), SyncEngine)
    auto = make_io_engine("auto")
    assert auto.name == "uring"
    auto.close()
    with pytest.raises(ValueError):
        make_io_engine("aio")


def test_auto_falls_back_to_sync_where_io_uring_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(uring, "unavailable", lambda: "io_uring is disabled")
    assert isinstance(make_io_engine("auto"), SyncEngine)
    with pytest.raises(OSError, match="disabled"):
        make_io_engine("uring")


def _direct_capable(tmp_path: Path) -> Path:
    """A directory whose filesystem takes O_DIRECT (/tmp may be a tmpfs, which does not)."""
    for place in (tmp_path, Path("/var/tmp")):
        probe = place / f"direct-probe-{os.getpid()}"
        probe.write_bytes(bytes(4096))
        try:
            os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
            return place
        except OSError:
            continue
        finally:
            probe.unlink()
    pytest.skip("no filesystem here takes O_DIRECT")


def test_direct_transfers_take_the_o_direct_descriptor_when_aligned(tmp_path: Path) -> None:
    """direct=on: a transfer whose buffers, lengths and offset are aligned goes through
    the O_DIRECT descriptor; any other through the page cache; both read what is there."""
    path = _direct_capable(tmp_path) / f"direct-{os.getpid()}.img"
    path.write_bytes(b"".join(bytes([i]) * 4096 for i in range(16)))
    backend = FileBackend(str(path), direct=True)
    engine = uring.UringEngine(8)
    pages = mmap.mmap(-1, 4 * 4096)  # page-aligned, like mmap'd guest memory
    view = memoryview(pages)
    try:
        target = backend.io_target()
        assert target is not None and target.direct_fd >= 0 and target.direct_align == 4096
        assert fcntl.fcntl(target.direct_fd, fcntl.F_GETFL) & os.O_DIRECT

        def transfer(req: Transfer) -> int:
            assert req.submitted
            engine.submit()
            (done,) = engine.reap(wait=True)
            result = done.result
            engine.release(done)
            return int(result)

        # Aligned: two pages from file page 3, and a write of page 1 back to page 9.
        assert (
            transfer(engine.readv(backend, 3 * 4096, [view[:4096], view[8192:12288]], 8192, None))
            == 8192
        )
        assert engine.direct == 1
        assert view[:4096] == bytes([3]) * 4096 and view[8192:12288] == bytes([4]) * 4096
        view[4096:8192] = b"\xaa" * 4096
        assert (
            transfer(engine.writev(backend, 9 * 4096, [view[4096:8192]], 4096, False, None)) == 4096
        )
        assert engine.direct == 2
        assert (
            os.pread(backend.fd, 4096, 9 * 4096) == b"\xaa" * 4096
        )  # coherent for buffered readers
        # Not aligned (a buffer at a 512-byte offset, an offset inside a page): buffered.
        assert transfer(engine.readv(backend, 5 * 4096, [view[512:1024]], 512, None)) == 512
        assert transfer(engine.readv(backend, 512, [view[8192:8704]], 512, None)) == 512
        assert engine.direct == 2
        assert view[512:1024] == bytes([5]) * 512 and view[8192:8704] == bytes([0]) * 512
        # A window that starts inside a page: its offsets count from there.
        window = WindowBackend(backend, 512, 8 * 4096)
        assert transfer(engine.readv(window, 0, [view[:4096]], 4096, None)) == 4096
        assert engine.direct == 2 and view[:4096] == bytes(3584) + bytes([1]) * 512
        assert transfer(engine.readv(window, 4096 - 512, [view[:4096]], 4096, None)) == 4096
        assert engine.direct == 3 and view[:4096] == bytes([1]) * 4096
    finally:
        view.release()
        pages.close()
        engine.close()
        backend.close()
        path.unlink()


def test_direct_is_off_for_files_unless_asked_and_refused_where_impossible(
    tmp_path: Path,
) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(1 << 16))
    default = FileBackend(str(path))
    off = FileBackend(str(path), direct=False)
    try:
        for backend in (default, off):
            target = backend.io_target()
            assert target is not None and target.direct_fd == -1
    finally:
        default.close()
        off.close()


def test_direct_asked_for_where_the_filesystem_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(Kernels from 6.6 give even tmpfs O_DIRECT: the refusal is staged.)"""
    path = tmp_path / "img"
    path.write_bytes(bytes(1 << 16))
    real_open = os.open

    def no_direct(name: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(BackendError, match=r"img: O_DIRECT: Invalid argument \(use direct=off\)"):
        FileBackend(str(path), direct=True)
    buffered = FileBackend(str(path))  # a file by default: buffered, never asks
    target = buffered.io_target()
    assert target is not None and target.direct_fd == -1
    buffered.close()


def test_a_buffered_write_without_fua_is_left_to_the_synchronous_path(tmp_path: Path) -> None:
    """It only copies into the page cache; io_uring would punt it to a worker thread.
    With FUA it waits for the storage, and goes to the ring."""
    path = tmp_path / "img"
    path.write_bytes(bytes(1 << 16))
    backend = FileBackend(str(path))
    engine = uring.UringEngine(4)
    try:
        buf = memoryview(bytearray(512))
        in_place = engine.writev(backend, 0, [buf], 512, False, None)
        assert not in_place.submitted and in_place.result == 512
        engine.release(in_place)
        req = engine.writev(backend, 0, [buf], 512, True, None)
        assert req.submitted
        engine.submit()
        (done,) = engine.reap(wait=True)
        assert done is req and req.result == 512
        engine.release(req)
    finally:
        engine.close()
        backend.close()
