"""Host storage that fails or changes size under a namespace (media_errors.py): the
status each backend error completes its command with, the Error Information and
SMART / Health logs, a namespace whose storage is gone failing fast, storage gone
read-only, the SMART / Health asynchronous event; and a resize (a rescan) reported
as Namespace Attribute Changed."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from harness import (
    BROADCAST,
    PAGE,
    Host,
    NamespaceFactory,
    SpyBackend,
    events,
    listen,
    rw,
    u16,
    u64,
    u128,
    with_dnr,
)

from nvme_mdev.backends.file import BackendError, FileBackend
from nvme_mdev.backends.window import WindowBackend
from nvme_mdev.config import window
from nvme_mdev.nvme.admin import log_pages
from nvme_mdev.nvme.admin.events import (
    CRITICAL_WARNING_READ_ONLY,
    CRITICAL_WARNING_RELIABILITY_DEGRADED,
)
from nvme_mdev.nvme.controller import Controller
from nvme_mdev.nvme.media_errors import classify
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import DNR, AdminOpcode, Cns, IoOpcode, LogPage, Status

READ, WRITE, FLUSH = IoOpcode.READ, IoOpcode.WRITE, IoOpcode.FLUSH
SMART_EVENT = 0x1 | (0x00 << 8) | (LogPage.SMART_HEALTH << 16)
NS_ATTRIBUTE_CHANGED = 0x2 | (0x00 << 8) | (LogPage.CHANGED_NAMESPACE_LIST << 16)


def error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def spied(file_ns: NamespaceFactory, nsid: int = 1) -> tuple[Namespace, SpyBackend]:
    ns = file_ns(nsid=nsid)
    assert isinstance(ns.backend, FileBackend)
    spy = SpyBackend(ns.backend)
    return Namespace(nsid, spy), spy


def setup(*namespaces: Namespace) -> Host:
    h = Host(list(namespaces))
    h.enable()
    h.create_io_queue_pair(1)
    return h


def smart(h: Host) -> bytes:
    c, data = h.get_log(LogPage.SMART_HEALTH, 512)
    assert c.status == 0
    return data


def command(opcode: int, buf: int, slba: int = 8) -> list[int]:
    return [FLUSH, 1] if opcode == FLUSH else rw(opcode, 1, buf, slba, 1)


# --- the status each host error completes with -------------------------------------

MEDIA, NOT_MEDIA = True, False


@pytest.mark.parametrize(
    ("code", "opcode", "status", "media"),
    [
        (errno.EIO, READ, Status.UNRECOVERED_READ_ERROR, MEDIA),
        (errno.EIO, WRITE, Status.WRITE_FAULT, MEDIA),
        (errno.EIO, FLUSH, Status.WRITE_FAULT, MEDIA),
        (errno.EBADMSG, READ, Status.UNRECOVERED_READ_ERROR, MEDIA),
        (errno.ENOSPC, WRITE, with_dnr(Status.CAPACITY_EXCEEDED), NOT_MEDIA),
        (errno.EDQUOT, FLUSH, with_dnr(Status.CAPACITY_EXCEEDED), NOT_MEDIA),
        (errno.EFBIG, WRITE, with_dnr(Status.CAPACITY_EXCEEDED), NOT_MEDIA),
        (errno.EACCES, READ, with_dnr(Status.ACCESS_DENIED), NOT_MEDIA),
        (errno.EAGAIN, READ, Status.COMMAND_INTERRUPTED, NOT_MEDIA),
        (errno.ETIMEDOUT, WRITE, Status.COMMAND_INTERRUPTED, NOT_MEDIA),
        (errno.EROFS, WRITE, with_dnr(Status.NAMESPACE_WRITE_PROTECTED), NOT_MEDIA),
        (errno.ENODEV, READ, with_dnr(Status.NAMESPACE_NOT_READY), NOT_MEDIA),
        (errno.ENXIO, WRITE, with_dnr(Status.NAMESPACE_NOT_READY), NOT_MEDIA),
        (errno.ESTALE, FLUSH, with_dnr(Status.NAMESPACE_NOT_READY), NOT_MEDIA),
    ],
)
def test_status_per_host_error(
    file_ns: NamespaceFactory, code: int, opcode: int, status: int, media: bool
) -> None:
    ns, spy = spied(file_ns)
    h = setup(ns)
    spy.fail = {"readv": error(code), "writev": error(code), "flush": error(code)}
    c = h.io_cmd(1, command(opcode, h.alloc(PAGE)))
    assert c.status == status
    data = smart(h)
    assert u128(data, 160) == (1 if media else 0)  # Media and Data Integrity Errors
    assert u128(data, 176) == 1  # Number of Error Information Log Entries
    _, log = h.get_log(LogPage.ERROR_INFORMATION, 64)
    assert (u64(log, 0), u16(log, 10), u16(log, 12) >> 1) == (1, c.cid, status)
    assert u64(log, 16) == (0 if opcode == FLUSH else 8)  # the command's first LBA
    assert h.ctrl.counters.host_errors == 1  # statistics: backend I/O errors


def test_a_block_device_with_capacity_zero_is_gone(file_ns: NamespaceFactory) -> None:
    """The block layer fails I/O to a deleted disk with EIO (and writes past a
    device's end with ENOSPC): the capacity, asked after the error, tells them apart."""
    ns, spy = spied(file_ns)
    spy.is_block_device = True
    h = setup(ns)
    buf = h.alloc(PAGE)
    spy.fail = {"writev": error(errno.ENOSPC), "readv": error(errno.EIO)}
    spy.store = 512 * 1024  # the device shrank under the namespace, and is still there
    assert h.io_cmd(1, rw(WRITE, 1, buf, 2000, 1)).status == with_dnr(Status.LBA_OUT_OF_RANGE)
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1)).status == Status.UNRECOVERED_READ_ERROR
    assert ns.failure is None
    spy.store = 0  # and now it is gone
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1)).status == with_dnr(Status.NAMESPACE_NOT_READY)
    assert ns.failure is not None


def test_a_failed_size_probe_says_gone_or_media() -> None:
    class Unaskable(SpyBackend):
        def __init__(self, probe: OSError) -> None:
            self.probe = probe
            self.is_block_device = True

        def store_size(self) -> int:
            raise self.probe

    gone = classify(error(errno.EIO), False, Unaskable(error(errno.ENXIO)))
    assert gone.gone and gone.status == Status.NAMESPACE_NOT_READY
    media = classify(error(errno.EIO), True, Unaskable(error(errno.EIO)))
    assert not media.gone and media.status == Status.WRITE_FAULT and media.media


NETWORK_DOWN = (
    errno.ETIMEDOUT,  # its operation timeout (backends/rbd.py OP_TIMEOUT_S)
    errno.ENOTCONN,
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
)


@pytest.mark.parametrize("code", NETWORK_DOWN)
@pytest.mark.parametrize("opcode", [READ, WRITE, FLUSH])
def test_a_network_store_out_of_reach_is_not_ready_and_worth_retrying(
    file_ns: NamespaceFactory, code: int, opcode: int
) -> None:
    """A cluster that does not answer (an RBD image): Namespace Not Ready without Do Not
    Retry; the namespace stays (not gone, not read-only), and serves again once the
    cluster is back."""
    ns, spy = spied(file_ns)
    spy.network = True  # type: ignore[attr-defined]
    h = setup(ns)
    buf = h.alloc(PAGE)
    spy.fail = {"readv": error(code), "writev": error(code), "flush": error(code)}
    c = h.io_cmd(1, command(opcode, buf))
    assert c.status == Status.NAMESPACE_NOT_READY  # no DNR
    assert (ns.failure, ns.readonly) == (None, False)
    data = smart(h)
    assert data[0] == 0  # no critical warning
    assert u128(data, 160) == 0  # not a media error
    spy.fail = {}
    assert h.io_cmd(1, command(opcode, buf)).status == 0


def test_a_network_store_that_fenced_this_client_off_is_gone(file_ns: NamespaceFactory) -> None:
    """EBLOCKLISTED (ESHUTDOWN): someone broke this client's lock on the image and the
    cluster fenced it off; it never writes again, so retrying cannot help: the
    namespace is gone (Namespace Not Ready, DNR, every later command too)."""
    ns, spy = spied(file_ns)
    spy.network = True  # type: ignore[attr-defined]
    h = setup(ns)
    buf = h.alloc(PAGE)
    spy.fail = {"writev": error(errno.ESHUTDOWN)}
    c = h.io_cmd(1, command(WRITE, buf))
    assert c.status == Status.NAMESPACE_NOT_READY | DNR
    assert ns.failure is not None
    spy.fail = {}
    assert h.io_cmd(1, command(READ, buf)).status == Status.NAMESPACE_NOT_READY | DNR


@pytest.mark.parametrize("code", NETWORK_DOWN)
def test_the_network_errnos_from_a_file_keep_their_status(code: int) -> None:
    """Only a backend that says it is a network store is treated as one: for files and
    block devices the table (and the native data plane's copy of it) is unchanged."""

    class Store(SpyBackend):
        def __init__(self, network: bool) -> None:
            self.network = network
            self.is_block_device = False

        def store_size(self) -> int:
            return 1 << 20

    network = classify(error(code), True, Store(True))
    assert (network.status, network.dnr, network.gone) == (Status.NAMESPACE_NOT_READY, False, False)
    local = classify(error(code), True, Store(False))
    if code == errno.ETIMEDOUT:
        assert local.status == Status.COMMAND_INTERRUPTED and not local.dnr
    elif code == errno.ENOTCONN:
        assert local.gone and local.dnr
    else:
        assert local.status == Status.WRITE_FAULT and local.media


def test_a_read_past_the_end_of_a_shrunk_file(tmp_path: Path) -> None:
    """Truncated under a namespace not yet rescanned: the blocks past the end are out of
    range (the host wrote them? it reads LBA Out of Range, not made-up zeroes)."""
    path = tmp_path / "shrunk.img"
    path.write_bytes(b"\x5a" * (1 << 20))
    backend = FileBackend(str(path))
    try:
        h = setup(Namespace(1, backend))
        os.truncate(path, 256 << 10)
        buf = h.alloc(PAGE)
        assert h.io_cmd(1, rw(READ, 1, buf, 0, 8)).status == 0
        assert h.io_cmd(1, rw(READ, 1, buf, 600, 8)).status == with_dnr(Status.LBA_OUT_OF_RANGE)
        assert u128(smart(h), 160) == 0
    finally:
        backend.close()


# --- storage that went away --------------------------------------------------------------


def test_gone_storage_fails_every_later_command_at_once(file_ns: NamespaceFactory) -> None:
    ns, spy = spied(file_ns)
    other = file_ns(nsid=2)
    h = setup(ns, other)
    cid = listen(h, CRITICAL_WARNING_RELIABILITY_DEGRADED)
    buf = h.alloc(PAGE)
    spy.fail = {"readv": error(errno.ENODEV)}
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1)).status == with_dnr(Status.NAMESPACE_NOT_READY)
    touched = len(spy.calls)
    # Later commands never reach the storage: reads, writes, flushes, zeroes.
    for cmd in (
        rw(READ, 1, buf, 0, 1),
        rw(WRITE, 1, buf, 0, 1),
        [FLUSH, 1],
        rw(IoOpcode.WRITE_ZEROES, 1, 0, 0, 1),
    ):
        assert h.io_cmd(1, cmd).status == with_dnr(Status.NAMESPACE_NOT_READY)
    assert len(spy.calls) == touched
    # The host hears it once: SMART / Health event, critical warning bit 2.
    assert events(h) == [(cid, SMART_EVENT)]
    assert smart(h)[0] == CRITICAL_WARNING_RELIABILITY_DEGRADED
    # Identify: not ready (I/O Command Set Independent Identify Namespace, NSTAT).
    c, data = h.identify(Cns.CS_INDEPENDENT_NAMESPACE, nsid=1)
    assert c.status == 0 and data[14] == 0
    assert h.identify(Cns.CS_INDEPENDENT_NAMESPACE, nsid=2)[1][14] == 1
    # The other namespace works; a broadcast flush flushes it and reports the gone one.
    assert h.io_cmd(1, rw(WRITE, 2, buf, 0, 1)).status == 0
    assert h.io_cmd(1, [FLUSH, BROADCAST]).status == with_dnr(Status.NAMESPACE_NOT_READY)
    # Removing the gone namespace clears the warning.
    h.ctrl.detach_namespace(1)
    assert smart(h)[0] == 0


def test_smart_event_only_when_the_host_enabled_it(file_ns: NamespaceFactory) -> None:
    ns, spy = spied(file_ns)
    h = setup(ns)
    listen(h, 1 << 8)  # namespace notices only, as Linux asks
    spy.fail = {"writev": error(errno.ENXIO)}
    assert h.io_cmd(1, rw(WRITE, 1, h.alloc(PAGE), 0, 1)).status == with_dnr(
        Status.NAMESPACE_NOT_READY
    )
    assert events(h) == []
    assert smart(h)[0] == CRITICAL_WARNING_RELIABILITY_DEGRADED  # the log says it anyway


def test_smart_event_is_masked_until_the_log_is_read(file_ns: NamespaceFactory) -> None:
    (ns1, spy1), (ns2, spy2) = spied(file_ns, 1), spied(file_ns, 2)
    h = setup(ns1, ns2)
    first = listen(h, 0xFF)
    spy1.fail = {"readv": error(errno.ENODEV)}
    spy2.fail = {"writev": error(errno.EROFS)}
    buf = h.alloc(PAGE)
    h.io_cmd(1, rw(READ, 1, buf, 0, 1))
    assert events(h) == [(first, SMART_EVENT)]
    second = h.admin.submit([AdminOpcode.ASYNC_EVENT_REQUEST])
    # The other namespace goes read-only: all the media is now read-only (bit 3), but
    # the SMART event type stays masked until the host reads the SMART log.
    assert h.io_cmd(1, rw(WRITE, 2, buf, 0, 1)).status == with_dnr(Status.NAMESPACE_WRITE_PROTECTED)
    assert events(h) == []
    assert smart(h)[0] == CRITICAL_WARNING_RELIABILITY_DEGRADED | CRITICAL_WARNING_READ_ONLY
    assert events(h) == []  # the host has just read the warning it was held back for
    # Unmasked: the next rise is reported (a third namespace's storage goes).
    ns3, spy3 = spied(file_ns, 3)
    h.ctrl.attach_namespace(ns3)
    h.ctrl.detach_namespace(1)
    h.ctrl.detach_namespace(2)
    assert smart(h)[0] == 0
    spy3.fail = {"flush": error(errno.ENODEV)}
    assert h.io_cmd(1, [FLUSH, 3]).status == with_dnr(Status.NAMESPACE_NOT_READY)
    assert events(h) == [(second, SMART_EVENT)]


# --- storage gone read-only (EROFS) ------------------------------------------------------


def test_read_only_storage_write_protects_the_namespace(file_ns: NamespaceFactory) -> None:
    ns, spy = spied(file_ns)
    h = setup(ns)
    cid = listen(h, 1 << 8)
    buf = h.alloc(PAGE)
    spy.fail = {"writev": error(errno.EROFS)}
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 1)).status == with_dnr(Status.NAMESPACE_WRITE_PROTECTED)
    writes = spy.count("writev")
    assert h.io_cmd(1, rw(WRITE, 1, buf, 0, 1)).status == with_dnr(Status.NAMESPACE_WRITE_PROTECTED)
    assert spy.count("writev") == writes  # refused before the storage
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1)).status == 0  # reads go on
    # The namespace's attributes changed (NSATTR write protected): the host is told.
    assert events(h) == [(cid, NS_ATTRIBUTE_CHANGED)]
    c, data = h.identify(Cns.NAMESPACE, nsid=1)
    assert c.status == 0 and data[99] & 1
    assert smart(h)[0] == CRITICAL_WARNING_READ_ONLY


# --- the I/O thread is never lost to a failing backend -----------------------------------


def test_unexpected_backend_errors_do_not_stop_the_queue(file_ns: NamespaceFactory) -> None:
    ns, spy = spied(file_ns)
    h = setup(ns)
    buf = h.alloc(PAGE)
    spy.fail = {"readv": error(errno.EINVAL)}  # a bug somewhere below: still a completion
    cids = [h.io[1].submit(rw(READ, 1, buf, i, 1)) for i in range(8)]
    h.run_io()
    done = h.io[1].reap()
    assert [c.cid for c in done] == cids
    assert {c.status for c in done} == {Status.UNRECOVERED_READ_ERROR}
    spy.fail = {}
    assert h.io_cmd(1, rw(READ, 1, buf, 0, 1)).status == 0


# --- resize (nvme-mdev ns rescan) ----------------------------------------------------------


def sizes(h: Host, nsid: int) -> tuple[int, int, int, int]:
    """NSZE, NCAP, NUSE and NVMCAP (bytes) of Identify Namespace."""
    c, data = h.identify(Cns.NAMESPACE, nsid=nsid)
    assert c.status == 0
    nsze, ncap, nuse = struct.unpack_from("<QQQ", data)
    return nsze, ncap, nuse, u128(data, 48)


def changed_list(h: Host) -> list[int]:
    c, data = h.get_log(LogPage.CHANGED_NAMESPACE_LIST, 4096)
    assert c.status == 0
    return [i for i in struct.unpack("<1024I", data) if i]


def test_resize_is_reported_to_the_host(host: Host) -> None:
    host.create_io_queue_pair(1)
    cid = listen(host, 1 << 8)
    assert sizes(host, 1) == (2048, 2048, 2048, 1 << 20)
    backend = host.ctrl.namespaces[1].backend
    assert isinstance(backend, FileBackend)
    os.ftruncate(backend.fd, 2 << 20)  # the file grew
    assert host.ctrl.resize_namespace(1, backend.current_size()) is True
    assert events(host) == [(cid, NS_ATTRIBUTE_CHANGED)]
    assert changed_list(host) == [1]
    assert sizes(host, 1) == (4096, 4096, 4096, 2 << 20)
    buf = host.alloc(PAGE)
    assert host.io_cmd(1, rw(READ, 1, buf, 4095, 1)).status == 0
    # Shrinking below what the host used: allowed, reported the same way; a partial
    # last block is left out.
    second = host.admin.submit([AdminOpcode.ASYNC_EVENT_REQUEST])
    assert host.ctrl.resize_namespace(1, (1 << 19) + 100) is True
    assert events(host) == [(second, NS_ATTRIBUTE_CHANGED)]
    assert sizes(host, 1) == (1024, 1024, 1024, 1 << 19)
    assert host.io_cmd(1, rw(READ, 1, buf, 1024, 1)).status == with_dnr(Status.LBA_OUT_OF_RANGE)
    # A size change smaller than a block changes nothing the host sees: no event.
    host.admin.submit([AdminOpcode.ASYNC_EVENT_REQUEST])
    assert changed_list(host) == [1]
    assert host.ctrl.resize_namespace(1, (1 << 19) + 500) is False
    assert events(host) == []
    assert changed_list(host) == []
    with pytest.raises(ValueError, match="nsid 3 is not attached"):
        host.ctrl.resize_namespace(3, 1 << 20)


def test_a_change_while_the_log_is_read_stays_listed(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Changed Namespace List is cleared of what the host read, not of a change
    that came after it was built (the I/O thread can add one at any time), and that
    change is still notified."""
    cid = listen(host, 1 << 8)
    host.ctrl.resize_namespace(1, 2 << 20)
    assert events(host) == [(cid, NS_ATTRIBUTE_CHANGED)]
    second = host.admin.submit([AdminOpcode.ASYNC_EVENT_REQUEST])
    build = log_pages.changed_namespaces

    def racing(ctrl: Controller) -> tuple[bytes, list[int]]:
        page = build(ctrl)
        ctrl._namespace_changed(7)  # as the I/O thread would, meanwhile
        return page

    monkeypatch.setattr(log_pages, "changed_namespaces", racing)
    buf = host.alloc(PAGE)
    read = host.admin.submit(
        [AdminOpcode.GET_LOG_PAGE, BROADCAST, 0, 0, 0, 0, buf, 0, 0, 0,
         LogPage.CHANGED_NAMESPACE_LIST | (1023 << 16)]
    )  # fmt: skip
    host.ctrl.process_admin()
    # The read reports 1; the change to 7 is notified at once (the read unmasked it).
    done = {c.cid: c for c in host.admin.reap()}
    assert done[read].status == 0 and host.memory.read(buf, 8) == struct.pack("<2I", 1, 0)
    assert done[second].dw0 == NS_ATTRIBUTE_CHANGED
    monkeypatch.undo()
    assert changed_list(host) == [7]


# --- backend sizes ------------------------------------------------------------------------


def test_window_sizes_on_rescan(tmp_path: Path) -> None:
    path = tmp_path / "store.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    fixed = window(FileBackend(str(path)), 1 << 20, 2 << 20)
    to_end = window(FileBackend(str(path)), 4 << 20, None)
    try:
        assert isinstance(fixed, WindowBackend) and isinstance(to_end, WindowBackend)
        assert (fixed.current_size(), to_end.current_size()) == (2 << 20, 4 << 20)
        os.truncate(path, 16 << 20)
        assert (fixed.current_size(), to_end.current_size()) == (2 << 20, 12 << 20)
        assert fixed.store_size() == 16 << 20
        os.truncate(path, 2 << 20)  # the fixed window now reaches past the end
        with pytest.raises(BackendError, match="now reaches past the end"):
            fixed.current_size()
        with pytest.raises(BackendError, match="now reaches past the end"):
            to_end.current_size()
    finally:
        fixed.close()
        to_end.close()


def test_gone_storage_fails_the_next_command_before_the_event_is_applied(
    file_ns: NamespaceFactory,
) -> None:
    """The data plane marks a namespace whose storage is gone itself: a command that
    comes before the control side has applied the event fails too, even one the storage
    would take (a flush of a loop device shrunk to nothing succeeds)."""
    ns, spy = spied(file_ns)
    h = setup(ns)
    q = h.io[1]
    buf = h.alloc(PAGE)
    spy.fail = {"readv": error(errno.ENODEV)}
    q.submit(rw(READ, 1, buf, 0, 1))
    h.ctrl.data.process()  # (and no event applied)
    assert [c.status for c in q.reap()] == [with_dnr(Status.NAMESPACE_NOT_READY)]
    touched = len(spy.calls)
    spy.fail = {}
    for cmd in (rw(WRITE, 1, buf, 0, 1), [FLUSH, 1], rw(READ, 1, buf, 0, 1)):
        q.submit(cmd)
        h.ctrl.data.process()
        assert [c.status for c in q.reap()] == [with_dnr(Status.NAMESPACE_NOT_READY)]
    assert len(spy.calls) == touched
    assert ns.failure is None  # the control side has not seen it yet
    h.ctrl.data_plane_notified()
    assert ns.failure is not None and smart(h)[0] == CRITICAL_WARNING_RELIABILITY_DEGRADED
