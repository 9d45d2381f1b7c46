"""Controller Fatal Status (NVMe Base 3.5.x, CSTS.CFS): every way the device gives up
on a controller. An exception in the I/O thread (either data plane), in the admin
worker or in an admin command, and queue memory the device cannot reach, all end the
same way: CSTS.CFS is set, nothing more is processed and no completion is posted
while it is, and a Controller Level Reset (CC.EN 1 -> 0 -> 1) brings the controller
back, its I/O thread included."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from harness import PAGE, Completion, Host, HostQueue, completions, rw, wait_for

from nvme_mdev.engine.poller import AdminWorker
from nvme_mdev.nvme.errors import ControllerFatal
from nvme_mdev.nvme.spec import DOORBELL_BASE, AdminOpcode, FeatureId, IoOpcode, Reg

CSTS_RDY, CSTS_CFS = 1, 2
READ, COMPARE = IoOpcode.READ, IoOpcode.COMPARE


def is_fatal(h: Host) -> bool:
    """CSTS.CFS, after applying what the data plane reported (the admin worker's job)."""
    h.ctrl.data_plane_notified()
    return bool(h.read_reg(Reg.CSTS) & CSTS_CFS)


def shadowed_pair(h: Host, qid: int = 1) -> HostQueue:
    """An I/O queue pair whose SQ tail the guest stores in a shadow doorbell: the data
    plane sees new commands there whatever becomes of doorbell writes (so a fatal
    controller's ignoring of them does not hide whether the data plane still
    processes). The guest rings the real doorbell too when EventIdx asks, as Linux
    does, so that a parked I/O thread is woken."""
    shadow, eventidx = h.alloc(PAGE), h.alloc(PAGE)
    c = h.admin_cmd([AdminOpcode.DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, shadow, 0, eventidx, 0])
    assert c.status == 0
    q = h.create_io_queue_pair(qid, entries=16)
    q.use_shadow_doorbells(shadow, eventidx)
    return q


def ring(h: Host, q: HostQueue) -> None:
    """The real SQ doorbell, whatever EventIdx says."""
    h.ctrl.mmio_write(DOORBELL_BASE + 8 * q.qid, 4, q.sq_tail)


def wait_done(q: HostQueue, count: int) -> list[Completion]:
    done = completions(q, count)
    assert len(done) == count
    return done


def assert_nothing_posted_while_fatal(h: Host, q: HostQueue) -> None:
    """Commands reach the queues (shadow tail, a woken thread, a doorbell, the admin
    worker's call) and none is run: no completion anywhere."""
    buf = h.buffer(PAGE)
    q.submit(rw(READ, 1, buf, 0, 1))  # the shadow tail (and the doorbell if EventIdx asks)
    ring(h, q)  # the doorbell anyway: ignored by a fatal controller
    h.ctrl.data.wake()  # the I/O thread, if running, looks at the shadow tail
    h.admin.submit([AdminOpcode.KEEP_ALIVE])  # its doorbell is ignored too
    assert h.ctrl.process_admin() == 0
    time.sleep(0.05)
    assert q.peek() == []
    assert h.admin.peek() == []
    assert h.read_reg(Reg.CSTS) & CSTS_CFS


def reset_and_check_served(h: Host, io_thread: bool) -> None:
    """CC.EN 1 -> 0 clears CSTS (CFS included); 0 -> 1 makes it ready, and admin and I/O
    commands are served again (by the I/O thread when it runs)."""
    h.disable()
    assert h.read_reg(Reg.CSTS) == 0
    h.enable()
    assert h.read_reg(Reg.CSTS) & (CSTS_RDY | CSTS_CFS) == CSTS_RDY
    assert h.admin_cmd([AdminOpcode.KEEP_ALIVE]).status == 0
    q = shadowed_pair(h)
    buf = h.buffer(PAGE)
    cids = [q.submit(rw(READ, 1, buf, 0, 1)), q.submit(rw(COMPARE, 1, buf, 0, 1))]
    if io_thread:  # it polls the shadow tail, or was woken by the doorbell EventIdx asked for
        done = wait_done(q, 2)
    else:
        assert h.run_io() == 2
        done = q.reap()
    assert [(c.cid, c.status) for c in done] == [(cids[0], 0), (cids[1], 0)]
    assert not is_fatal(h)


@pytest.fixture
def io_thread(host: Host) -> Iterator[Host]:
    """The host with its data plane's thread running."""
    host.ctrl.data.poll_timeout = 0.01
    host.ctrl.data.start()
    yield host
    host.ctrl.data.stop()


def test_an_exception_in_the_io_thread_is_fatal_until_a_reset(
    io_thread: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the I/O path (here the Python command set raising; the native plane runs
    Compare through it too, on its own thread): the thread survives, the controller
    reports CSTS.CFS, and the command that hit the bug is never completed."""
    h = io_thread
    q = shadowed_pair(h)
    buf = h.buffer(PAGE)
    io = h.ctrl.data.io  # type: ignore[attr-defined]
    execute = io.execute

    def buggy(dw: tuple[int, ...]) -> object:
        if dw[0] & 0xFF == COMPARE:
            raise RuntimeError("a bug in the command set")
        return execute(dw)

    with monkeypatch.context() as m:
        m.setattr(io, "execute", buggy)
        ok = q.submit(rw(READ, 1, buf, 0, 1))
        assert [c.cid for c in wait_done(q, 1)] == [ok]
        q.submit(rw(COMPARE, 1, buf, 0, 1))
        wait_for(lambda: is_fatal(h))
    time.sleep(0.02)
    assert q.peek() == []  # the failed command got no completion
    assert_nothing_posted_while_fatal(h, q)
    reset_and_check_served(h, io_thread=True)


def test_an_exception_in_the_admin_worker_is_fatal_until_a_reset(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in an admin command (an exception, not a CommandError): the admin worker
    survives and makes the controller fatal; the data plane stops too."""
    q = shadowed_pair(host)
    worker = AdminWorker(host.ctrl)
    worker.start()
    try:

        def buggy(ctrl: object, dw: tuple[int, ...]) -> int:
            raise RuntimeError("a bug in an admin command")

        with monkeypatch.context() as m:
            m.setitem(host.ctrl._admin_handlers, AdminOpcode.KEEP_ALIVE, buggy)
            host.admin.submit([AdminOpcode.KEEP_ALIVE])  # its doorbell wakes the worker
            wait_for(lambda: host.ctrl.registers.fatal)
        assert host.admin.peek() == []
        assert_nothing_posted_while_fatal(host, q)
        assert host.run_io() == 0  # the data plane was halted with the controller
        assert q.peek() == []
        reset_and_check_served(host, io_thread=False)
    finally:
        worker.stop()


def test_controller_fatal_from_an_admin_command(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin command that cannot go on (ControllerFatal): CSTS.CFS, and neither it nor
    the commands queued behind it in the same batch, nor a waiting AER, completes."""
    q = shadowed_pair(host)
    assert host.set_feature(FeatureId.ASYNC_EVENT_CONFIG, 0xFF).status == 0
    host.admin.submit([AdminOpcode.ASYNC_EVENT_REQUEST])
    assert host.ctrl.process_admin() == 1 and host.admin.peek() == []  # it waits

    def fatal(ctrl: object, dw: tuple[int, ...]) -> int:
        raise ControllerFatal("cannot go on")

    with monkeypatch.context() as m:
        m.setitem(host.ctrl._admin_handlers, AdminOpcode.GET_FEATURES, fatal)
        host.admin.submit([AdminOpcode.GET_FEATURES, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07])
        host.admin.submit([AdminOpcode.KEEP_ALIVE])
        host.ctrl.events.error(0x01, host.ctrl)  # an event for the waiting AER, too
        host.ctrl.process_admin()
    assert host.read_reg(Reg.CSTS) & CSTS_CFS
    assert host.admin.peek() == []
    assert_nothing_posted_while_fatal(host, q)
    assert host.run_io() == 0
    reset_and_check_served(host, io_thread=False)


def test_admin_completion_queue_unmapped_is_fatal_until_a_reset(host: Host) -> None:
    """The guest takes the admin CQ's memory away (the transport released our views
    first): the command runs, its completion has nowhere to go, the controller is
    fatal, and the memory that was the CQ is never written."""
    q = shadowed_pair(host)
    cq = host.admin.cq_addr
    host.memory.unmap(cq, PAGE)
    host.ctrl.release_memory_views()
    before = bytes(host.memory.ram[cq - host.memory.base : cq - host.memory.base + PAGE])
    host.admin.submit([AdminOpcode.KEEP_ALIVE])
    host.ctrl.process_admin()
    assert host.read_reg(Reg.CSTS) & CSTS_CFS
    after = bytes(host.memory.ram[cq - host.memory.base : cq - host.memory.base + PAGE])
    assert after == before
    buf = host.buffer(PAGE)
    q.submit(rw(READ, 1, buf, 0, 1))
    assert host.run_io() == 0
    assert q.peek() == []
    reset_and_check_served(host, io_thread=False)  # new admin queues, in mapped memory
