"""Namespaces attached and detached while the host runs (NVMe Base 5.2: Namespace
Attribute Changed notice; 5.16.1.5: Changed Namespace List log): what the host sees,
and what happens to commands for a namespace that went away."""

from __future__ import annotations

import struct
import threading

import pytest
from harness import Host, NamespaceFactory, SpyBackend, events, listen, rw, with_dnr

from nvme_mdev.backends.file import FileBackend
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import AdminOpcode, Cns, IoOpcode, LogPage, Status

NS_ATTRIBUTE_CHANGED = 0x2 | (0x00 << 8) | (LogPage.CHANGED_NAMESPACE_LIST << 16)


def changed_list(h: Host, rae: bool = False) -> list[int]:
    c, data = h.get_log(LogPage.CHANGED_NAMESPACE_LIST, 4096, rae=rae)
    assert c.status == 0
    ids = struct.unpack("<1024I", data)
    return [i for i in ids if i]


def active_list(h: Host) -> list[int]:
    c, data = h.identify(Cns.ACTIVE_NAMESPACE_LIST)
    assert c.status == 0
    return [i for i in struct.unpack("<1024I", data) if i]


def test_attach_tells_the_host(host: Host, file_ns: NamespaceFactory) -> None:
    cid = listen(host)
    host.ctrl.attach_namespace(file_ns(nsid=3))
    assert events(host) == [(cid, NS_ATTRIBUTE_CHANGED)]
    assert changed_list(host) == [3]
    assert changed_list(host) == []  # read without RAE: cleared
    assert active_list(host) == [1, 3]
    # The new namespace takes I/O at once.
    q = host.create_io_queue_pair(1)
    buf = host.alloc(4096)
    host.memory.write(buf, b"\x3c" * 4096)
    assert host.io_cmd(1, rw(IoOpcode.WRITE, 3, buf, 0, 8)).status == 0
    host.memory.write(buf, bytes(4096))
    assert host.io_cmd(1, rw(IoOpcode.READ, 3, buf, 0, 8)).status == 0
    assert host.memory.read(buf, 4096) == b"\x3c" * 4096
    assert q.qid == 1


def test_detach_tells_the_host_and_fails_later_commands(
    host: Host, file_ns: NamespaceFactory
) -> None:
    host.ctrl.add_namespace(file_ns(nsid=2))
    host.create_io_queue_pair(1)
    buf = host.alloc(4096)
    assert host.io_cmd(1, rw(IoOpcode.READ, 2, buf, 0, 1)).status == 0
    cid = listen(host)
    # A command queued before the detach, fetched after it.
    queued = host.io[1].submit(rw(IoOpcode.WRITE, 2, buf, 0, 1))
    ns = host.ctrl.detach_namespace(2)
    assert ns.nsid == 2 and 2 not in host.ctrl.namespaces
    ns.backend.close()
    host.run_io()
    (done,) = host.io[1].reap()
    assert (done.cid, done.status) == (queued, with_dnr(Status.INVALID_FIELD))
    assert host.io_cmd(1, rw(IoOpcode.READ, 2, buf, 0, 1)).status == with_dnr(Status.INVALID_FIELD)
    assert events(host) == [(cid, NS_ATTRIBUTE_CHANGED)]
    assert changed_list(host) == [2]
    assert active_list(host) == [1]
    # Identify Namespace of the detached NSID: an inactive namespace, all zeroes.
    c, data = host.identify(Cns.NAMESPACE, nsid=2)
    assert c.status == 0 and data == bytes(4096)
    # The other namespace is untouched; a broadcast Flush does not trip over the gap.
    assert host.io_cmd(1, rw(IoOpcode.READ, 1, buf, 0, 1)).status == 0
    assert host.io_cmd(1, [IoOpcode.FLUSH, 0xFFFFFFFF]).status == 0


def test_changes_gather_until_the_log_is_read(host: Host, file_ns: NamespaceFactory) -> None:
    cid = listen(host)
    host.ctrl.attach_namespace(file_ns(nsid=2))
    host.ctrl.attach_namespace(file_ns(nsid=5))
    assert events(host) == [(cid, NS_ATTRIBUTE_CHANGED)]
    # A second AER waits: notices are masked until the host reads the log (Base 5.2.1).
    second = host.admin.submit([AdminOpcode.ASYNC_EVENT_REQUEST])
    host.ctrl.detach_namespace(5).backend.close()
    assert events(host) == []
    assert changed_list(host, rae=True) == [2, 5]  # RAE: still masked, still listed
    assert events(host) == []
    assert changed_list(host) == [2, 5]
    # Unmasked: a change after the read is reported to the waiting AER.
    host.ctrl.attach_namespace(file_ns(nsid=6))
    assert events(host) == [(second, NS_ATTRIBUTE_CHANGED)]
    assert changed_list(host) == [6]


def test_no_notice_unless_the_host_asked(host: Host, file_ns: NamespaceFactory) -> None:
    host.admin.submit([AdminOpcode.ASYNC_EVENT_REQUEST])
    host.ctrl.attach_namespace(file_ns(nsid=2))
    assert events(host) == []  # Async Event Configuration bit 8 is clear
    assert changed_list(host) == [2]  # the log is kept anyway
    assert active_list(host) == [1, 2]


def test_attach_and_detach_refusals(host: Host, file_ns: NamespaceFactory) -> None:
    with pytest.raises(ValueError, match="already in use"):
        host.ctrl.attach_namespace(file_ns(nsid=1))
    with pytest.raises(ValueError, match=r"outside 1\.\.256"):
        host.ctrl.attach_namespace(file_ns(nsid=257))
    with pytest.raises(ValueError, match="nsid 4 is not attached"):
        host.ctrl.detach_namespace(4)
    assert host.ctrl.changed_namespaces == set()


def test_detach_waits_for_the_command_in_progress(host: Host, file_ns: NamespaceFactory) -> None:
    """With the real I/O thread: a write that is executing when the detach comes
    completes (successfully) before the namespace goes; nothing is left half done."""
    plain = file_ns(nsid=2)
    assert isinstance(plain.backend, FileBackend)
    # A Python backend (served by Python in either data plane) whose write blocks.
    spy = SpyBackend(plain.backend)
    ns2 = Namespace(2, spy)  # type: ignore[arg-type]
    host.ctrl.add_namespace(ns2)
    host.create_io_queue_pair(1)
    buf = host.alloc(4096)
    in_write = threading.Event()
    release = threading.Event()
    inner_writev = spy.writev

    def slow_writev(offset: int, buffers: list[memoryview], fua: bool) -> None:
        in_write.set()
        release.wait(10)
        inner_writev(offset, buffers, fua)

    spy.writev = slow_writev  # type: ignore[method-assign]
    host.ctrl.data.poll_timeout = 0
    host.ctrl.data.start()
    try:
        cid = host.io[1].submit(rw(IoOpcode.WRITE, 2, buf, 0, 8))
        assert in_write.wait(10)
        detached: list[int] = []
        detacher = threading.Thread(
            target=lambda: detached.append(host.ctrl.detach_namespace(2).nsid)
        )
        detacher.start()
        # The detach cannot finish while the write is in the backend.
        detacher.join(0.2)
        assert detached == [] and 2 in host.ctrl.namespaces
        release.set()
        detacher.join(10)
        assert detached == [2]
        (done,) = host.io[1].reap()
        assert (done.cid, done.status) == (cid, 0)
    finally:
        release.set()
        host.ctrl.data.stop()
