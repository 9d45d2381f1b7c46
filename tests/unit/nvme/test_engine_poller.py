"""The data plane's thread: polling, parking and waking, with the controller model and
fake guest memory (no socket)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Host, HostQueue, completions, parks, rw, wait_for

from nvme_mdev.backends.file import FileBackend
from nvme_mdev.dataplane import DataPlane
from nvme_mdev.engine.poller import POLL_GROW_LIMIT_NS, POLL_WINDOW_START_NS, AdaptivePoll
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import DOORBELL_BASE


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    image = tmp_path / "ns.img"
    image.write_bytes(bytes(1 << 20))
    h = Host([Namespace(1, FileBackend(str(image)))])
    h.enable()
    yield h


def shadow_setup(host: Host) -> tuple[int, int]:
    shadow, eventidx = host.alloc(4096), host.alloc(4096)
    c = host.admin_cmd([0x7C, 0, 0, 0, 0, 0, shadow, 0, eventidx, 0])
    assert c.status == 0
    return shadow, eventidx


def shadowed_queue_pair(host: Host, shadow: int, eventidx: int) -> HostQueue:
    """An I/O queue pair whose tail and head the guest stores in the shadow buffer,
    ringing the real doorbell when EventIdx asks (as Linux does)."""
    q = host.create_io_queue_pair(1)
    q.use_shadow_doorbells(shadow, eventidx)
    return q


def doorbell_traps(host: Host) -> int:
    traps = host.ctrl.statistics()["doorbell_traps"]
    assert isinstance(traps, int)
    return traps


def sq_event_index(host: Host, q: HostQueue) -> int:
    assert q.eventidx_sq is not None
    return host.memory.u32(q.eventidx_sq)


def wait_until_parked(host: Host, q: HostQueue, parks_before: int) -> None:
    """Until the I/O thread has parked (its `parks` counter passed `parks_before`)
    with q's EventIdx armed at the tail it consumed: the guest's next submission
    must ring. (Polling, the thread keeps EventIdx one behind the tail; it arms it
    at the tail only on its way to park, once every command was consumed.)"""
    wait_for(lambda: parks(host) > parks_before and sq_event_index(host, q) == q.sq_tail)


def io_thread(host: Host, poll_timeout: float) -> DataPlane:
    """The host's data plane with its thread started."""
    host.ctrl.data.poll_timeout = poll_timeout
    host.ctrl.data.start()
    return host.ctrl.data


def ring_real_doorbell(host: Host, q: HostQueue) -> None:
    host.ctrl.mmio_write(DOORBELL_BASE + 8 * q.qid, 4, q.sq_tail)


def test_idle_parked_woken_polling_again_without_losing_commands(host: Host) -> None:
    shadow, eventidx = shadow_setup(host)
    q = shadowed_queue_pair(host, shadow, eventidx)
    io = io_thread(host, 0.05)
    try:
        buf = host.buffer(4096)
        before = parks(host)
        q.submit(rw(0x02, 1, buf, 0, 8))  # rings only if EventIdx asks
        assert len(completions(q, 1)) == 1
        # Idle past the poll window: parked, with EventIdx armed at the consumed tail.
        wait_until_parked(host, q, before)
        # While parked a submission that rings nothing (a guest ignoring EventIdx) is
        # not seen, however long it waits...
        q.eventidx_sq = None
        parked = parks(host)
        q.submit(rw(0x02, 1, buf, 0, 8))
        time.sleep(0.05)
        assert q.reap() == [] and parks(host) == parked
        # ...until the guest rings, as EventIdx told it to: woken, it polls again.
        ring_real_doorbell(host, q)
        assert len(completions(q, 1)) == 1
        q.eventidx_sq = eventidx + 8
        burst = 20
        for _ in range(burst):
            q.submit(rw(0x02, 1, buf, 0, 8))
        assert len(completions(q, burst)) == burst
    finally:
        io.stop()


def test_submission_racing_the_park_is_not_lost(host: Host) -> None:
    """A guest that rings only when EventIdx asks (as Linux does), submitting at
    moments that race with the thread going to sleep: every command completes."""
    shadow, eventidx = shadow_setup(host)
    q = shadowed_queue_pair(host, shadow, eventidx)
    io = io_thread(host, 0.001)
    try:
        buf = host.buffer(4096)
        for i in range(200):
            before = parks(host)
            q.submit(rw(0x02, 1, buf, 0, 1))  # shadow doorbell; real one if asked
            assert len(completions(q, 1)) == 1
            if i % 50 == 49:
                wait_until_parked(host, q, before)  # some submissions find it parked
            elif i % 3 == 0:
                time.sleep(0.002)  # others race with its parking, or its polling
        assert parks(host) >= 4
    finally:
        io.stop()


@pytest.mark.parametrize("shared", [False, True], ids=["own-cq", "shared-cq"])
def test_a_guest_stalled_past_the_poll_timeout_still_completes(host: Host, shared: bool) -> None:
    """The guest (this test's thread) stalls between commands for longer than the
    poll timeout, as a loaded machine makes it do: meanwhile the I/O thread parks and
    arms EventIdx, so the guest's next shadow doorbell update finds that EventIdx asks
    for the real doorbell, rings it, and the command completes. (A guest that only
    stored the shadow value would strand it: nothing wakes a parked thread.)"""
    poll_timeout = 0.05
    shadow, eventidx = shadow_setup(host)
    q = shadowed_queue_pair(host, shadow, eventidx)
    queues = [q]
    if shared:  # and a second SQ posting to q's CQ, shadowed too
        q2 = HostQueue(host, 2, 16)
        assert host.create_sq(2, 16, cqid=1, addr=q2.sq_addr).status == 0
        q2.use_shadow_doorbells(shadow, eventidx)
        queues.append(q2)
    io = io_thread(host, poll_timeout)
    try:
        buf = host.buffer(4096)
        parked = False
        for round_ in range(4):
            for sq in queues:
                before, traps = parks(host), doorbell_traps(host)
                cid = sq.submit(rw(0x02, 1, buf, round_, 1))
                (c,) = completions(q, 1)
                assert (c.cid, c.sq_id, c.status) == (cid, sq.qid, 0)
                if parked:  # the guest rang, as EventIdx asked: that woke the thread
                    assert doorbell_traps(host) > traps
                # The stall: the thread parks (seen in its statistics, not guessed from
                # the time), and the guest stays away for three poll timeouts more.
                wait_until_parked(host, sq, before)
                parked = True
                time.sleep(3 * poll_timeout)
        assert parks(host) >= 4 * len(queues)
    finally:
        io.stop()


def test_without_shadow_doorbells_the_thread_parks_at_once(host: Host) -> None:
    q = host.create_io_queue_pair(1)
    io = io_thread(host, 10)
    try:
        wait_for(lambda: parks(host) >= 1)
        buf = host.buffer(4096)
        q.submit(rw(0x02, 1, buf, 0, 8))  # trapped doorbell wakes it
        assert len(completions(q, 1)) == 1
    finally:
        io.stop()


def test_paused_holds_the_thread_outside_the_queues(host: Host) -> None:
    q = host.create_io_queue_pair(1)
    io = io_thread(host, 0)
    try:
        buf = host.buffer(4096)
        with io.paused():
            q.submit(rw(0x02, 1, buf, 0, 8))
            time.sleep(0.05)
            assert q.reap() == []
        assert len(completions(q, 1)) == 1
    finally:
        io.stop()


# --- the adaptive poll window ---------------------------------------------------------


def test_poll_window_grows_when_parking_was_premature_and_shrinks_when_idle() -> None:
    poll = AdaptivePoll(limit_ns=500_000_000)
    assert poll.window_ns == POLL_WINDOW_START_NS
    assert poll.keep_polling(POLL_WINDOW_START_NS - 1)
    assert not poll.keep_polling(POLL_WINDOW_START_NS)
    # Woken soon after parking: polling a little longer would have caught it.
    poll.woken(gap_ns=300_000)
    assert poll.window_ns == 2 * POLL_WINDOW_START_NS
    for _ in range(30):
        poll.woken(gap_ns=300_000)
    assert poll.window_ns == 500_000_000  # bounded by --poll-timeout-ms
    # Woken long after: the guest had gone idle; halve, down to parking at once.
    poll.woken(gap_ns=POLL_GROW_LIMIT_NS)
    assert poll.window_ns == 250_000_000
    for _ in range(40):
        poll.woken(gap_ns=5_000_000_000)
    assert poll.window_ns == 0 and not poll.keep_polling(0)
    # And back up once the guest is busy again.
    poll.woken(gap_ns=10_000)
    assert poll.window_ns == POLL_WINDOW_START_NS


def test_poll_window_of_zero_means_poll_forever_and_a_lower_limit_bounds_it() -> None:
    forever = AdaptivePoll(limit_ns=0)
    assert forever.keep_polling(10**12)
    poll = AdaptivePoll(limit_ns=500_000_000)
    for _ in range(30):
        poll.woken(gap_ns=1000)
    poll.set_limit(1_000_000)
    assert poll.window_ns == 1_000_000
    assert not poll.keep_polling(1_000_000)


def test_eventidx_unmapped_while_parking_makes_the_controller_fatal_not_the_thread(
    host: Host,
) -> None:
    """The guest takes its EventIdx page away: arming it before parking fails. The
    controller becomes fatal (the guest resets it); the thread lives on and serves
    the controller after the reset."""
    shadow, eventidx = shadow_setup(host)
    shadowed_queue_pair(host, shadow, eventidx)
    io = io_thread(host, 0.001)
    try:
        host.memory.unmap(eventidx, 4096)
        host.ctrl.release_memory_views()  # as the transport does before it unmaps

        def fatal() -> bool:
            host.ctrl.data_plane_notified()
            return host.ctrl.registers.fatal

        wait_for(fatal)
        host.disable()
        host.enable()
        q = host.create_io_queue_pair(1)
        cid = q.submit(rw(0x02, 1, host.buffer(4096), 0, 8))  # a trapped doorbell
        (c,) = completions(q, 1)
        assert c.cid == cid and c.status == 0
    finally:
        io.stop()


def test_a_fused_first_waits_parked_for_its_second(host: Host) -> None:
    """A Compare with FUSE 01b rung alone waits in the SQ for its second (Base 3.4.2):
    meanwhile the I/O thread parks, with EventIdx armed at the tail that holds it, rather
    than polling it for ever; the Write rung later wakes it and the pair runs."""
    shadow, eventidx = shadow_setup(host)
    q = shadowed_queue_pair(host, shadow, eventidx)
    io = io_thread(host, 0.05)
    try:
        expected, new = host.buffer(512), host.buffer(512)  # the image is zeros
        host.memory.write(new, b"\xa5" * 512)
        compare, write = rw(0x05, 1, expected, 0, 1), rw(0x01, 1, new, 0, 1)
        compare[0] |= 0x1 << 8
        write[0] |= 0x2 << 8
        before = parks(host)
        first = q.submit(compare)
        wait_until_parked(host, q, before)
        assert q.reap() == []  # not answered alone
        second = q.submit(write)  # rings: EventIdx asks
        done = {c.cid: c.status for c in completions(q, 2)}
        assert done == {first: 0, second: 0}
        read = host.buffer(512)
        q.submit(rw(0x02, 1, read, 0, 1))
        assert [c.status for c in completions(q, 1)] == [0]
        assert host.memory.read(read, 512) == b"\xa5" * 512
    finally:
        io.stop()
