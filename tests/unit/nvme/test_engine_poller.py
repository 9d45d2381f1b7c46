"""The data plane's thread: polling, parking and waking, with the controller model and
fake guest memory (no socket)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Host, HostQueue, rw

from nvme_mdev.backends.file import FileBackend
from nvme_mdev.dataplane import DataPlane
from nvme_mdev.engine.poller import POLL_GROW_LIMIT_NS, POLL_WINDOW_START_NS, AdaptivePoll
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import DOORBELL_BASE


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


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


def shadowed_queue_pair(host: Host, shadow: int, eventidx: int | None = None) -> HostQueue:
    """An I/O queue pair whose tail and head the guest stores in the shadow buffer;
    with `eventidx`, it rings the real doorbell when EventIdx asks (as Linux does)."""
    q = host.create_io_queue_pair(1)
    q.shadow_sq, q.shadow_cq = shadow + 8, shadow + 12
    if eventidx is not None:
        q.eventidx_sq = eventidx + 8
    return q


def parks(host: Host) -> int:
    return int(host.ctrl.statistics()["io_thread"]["parks"])  # type: ignore[index]


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
        q.submit(rw(0x02, 1, buf, 0, 8))  # rings only if EventIdx asks
        wait_for(lambda: len(q.reap()) == 1)
        # Idle past the poll window: parked, with EventIdx armed at the consumed tail.
        wait_for(lambda: parks(host) >= 1)
        assert int.from_bytes(host.memory.read(eventidx + 8, 4), "little") == q.sq_tail
        # While parked a submission that rings nothing is not seen...
        q.eventidx_sq = None
        q.submit(rw(0x02, 1, buf, 0, 8))
        time.sleep(0.05)
        assert q.reap() == []
        # ...until the guest rings, as EventIdx told it to: woken, it polls again.
        ring_real_doorbell(host, q)
        wait_for(lambda: len(q.reap()) == 1)
        q.eventidx_sq = eventidx + 8
        burst = 20
        for _ in range(burst):
            q.submit(rw(0x02, 1, buf, 0, 8))
        got: list[object] = []
        wait_for(lambda: got.extend(q.reap()) or len(got) == burst)
    finally:
        io.stop()


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Linux's nvme_dbbuf_need_event: ring the real doorbell or not."""
    return (new - event_idx - 1) & 0xFFFF < (new - old) & 0xFFFF


def test_submission_racing_the_park_is_not_lost(host: Host) -> None:
    """A guest that rings only when EventIdx asks (as Linux does), submitting at
    moments that race with the thread going to sleep: every command completes."""
    shadow, eventidx = shadow_setup(host)
    q = shadowed_queue_pair(host, shadow)
    io = io_thread(host, 0.001)
    try:
        buf = host.buffer(4096)
        for i in range(200):
            old = q.sq_tail
            q.submit(rw(0x02, 1, buf, 0, 1))  # into the shadow doorbell
            ei = int.from_bytes(host.memory.read(eventidx + 8, 4), "little")
            if need_event(ei, q.sq_tail, old):
                ring_real_doorbell(host, q)
            wait_for(lambda: len(q.reap()) == 1)
            if i % 3 == 0:
                time.sleep(0.002)  # sometimes long enough to park
        assert parks(host) > 0
    finally:
        io.stop()


def test_without_shadow_doorbells_the_thread_parks_at_once(host: Host) -> None:
    q = host.create_io_queue_pair(1)
    io = io_thread(host, 10)
    try:
        wait_for(lambda: parks(host) >= 1)
        buf = host.buffer(4096)
        q.submit(rw(0x02, 1, buf, 0, 8))  # trapped doorbell wakes it
        wait_for(lambda: len(q.reap()) == 1)
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
        wait_for(lambda: len(q.reap()) == 1)
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
        done: list[object] = []
        wait_for(lambda: done.extend(q.reap()) or len(done) == 1)
        assert done[0].cid == cid and done[0].status == 0  # type: ignore[attr-defined]
    finally:
        io.stop()
