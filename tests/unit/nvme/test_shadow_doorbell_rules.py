"""Shadow doorbells (Doorbell Buffer Config, Base 5.9 and the shadow doorbell annex)
at their edges: the CQ head rule under INTx, and shadow values outside the queue.

INTx is a level: asserted while an interrupt-enabled CQ holds entries the host has
not consumed. QEMU ends an INTx only on a BAR access (pci/intx.py), so under INTx the
controller asks the guest to ring the real CQ head doorbell on every head update
(its CQ EventIdx is the head itself, where MSI-X would have it one behind: never
ring). When that doorbell arrives, the head is taken from the shadow doorbell (the
guest may have stored newer heads since the value the trapped write carries) and the
INTx level is computed again.

A shadow value past the end of its queue (SQ tail or CQ head >= the queue size) is
not a doorbell write (the spec raises Invalid Doorbell Write Value for those, and
this controller does: test_nvme_queue_admin.py); the controller ignores such a value
and keeps the last valid one: nothing outside the queue is fetched, no completion
overwrites one the host has not consumed, and the controller is not made fatal."""

from __future__ import annotations

import pytest
from harness import PAGE, Host, HostQueue, need_event

from nvme_mdev.nvme.spec import AER_TYPE_ERROR, DOORBELL_BASE, AdminOpcode, IoOpcode, LogPage

INVALID_DOORBELL_VALUE = 0x01
FLUSH = [IoOpcode.FLUSH, 1]


def shadowed(
    h: Host, qid: int = 1, entries: int = 8, cq_entries: int | None = None, vector: int = 0
) -> tuple[HostQueue, int, int]:
    """Doorbell Buffer Config, then an I/O queue pair whose tail and head the guest
    stores in the shadow page only (it rings nothing by itself: each test rings, or
    stores a broken value, where it means to). Returns the queue and the shadow and
    EventIdx pages. The tests drive the data plane themselves (host.run_io()): no I/O
    thread runs that a value nobody rings for could leave parked."""
    assert h.ctrl.data.native_id is None, "an I/O thread runs: use use_shadow_doorbells"
    shadow, eventidx = h.alloc(PAGE), h.alloc(PAGE)
    c = h.admin_cmd([AdminOpcode.DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, shadow, 0, eventidx, 0])
    assert c.status == 0
    q = h.create_io_queue_pair(qid, entries, vector=vector, cq_entries=cq_entries)
    q.shadow_sq, q.shadow_cq = shadow + 8 * qid, shadow + 8 * qid + 4
    return q, shadow, eventidx


def ring_cq(h: Host, q: HostQueue, value: int) -> None:
    h.ctrl.mmio_write(DOORBELL_BASE + 8 * q.qid + 4, 4, value)


def only_invalid_value_events(h: Host) -> bool:
    """Whatever events are queued are Invalid Doorbell Write Value errors: a shadow
    value may be reported so, or ignored (it is not a doorbell write)."""
    return all(
        e == (AER_TYPE_ERROR, INVALID_DOORBELL_VALUE, LogPage.ERROR_INFORMATION)
        for e in h.ctrl.events.pending
    )


# --- INTx -----------------------------------------------------------------------------


def test_under_intx_the_cq_head_comes_from_the_shadow_when_the_doorbell_rings(
    host: Host,
) -> None:
    host.interrupts.msix = False
    q, _, eventidx = shadowed(host)
    cq_event = eventidx + 8 * q.qid + 4
    # Under INTx every head update must ring: EventIdx is the head, not head - 1.
    assert host.memory.u32(cq_event) == 0
    for _ in range(2):
        q.submit(FLUSH)
    assert host.run_io() == 2
    assert host.interrupts.intx
    assert len(q.reap()) == 2  # head 2, in the shadow doorbell only
    assert host.interrupts.intx  # no BAR access yet: the level stays
    assert need_event(host.memory.u32(cq_event), 2, 0)  # the guest is asked to ring
    # Its trapped write carries an older head than the shadow holds: the shadow wins.
    ring_cq(host, q, 1)
    assert not host.interrupts.intx
    assert host.memory.u32(cq_event) == 2  # the next head update rings again
    q.submit(FLUSH)
    assert host.run_io() == 1
    assert host.interrupts.intx
    assert len(q.reap()) == 1
    assert need_event(host.memory.u32(cq_event), 3, 2)
    ring_cq(host, q, 3)
    assert not host.interrupts.intx
    assert not host.ctrl.events.pending


def test_under_msix_the_guest_is_not_asked_to_ring_for_cq_heads(host: Host) -> None:
    q, _, eventidx = shadowed(host, vector=1)
    cq_event = eventidx + 8 * q.qid + 4
    assert host.memory.u32(cq_event) == 0xFFFF  # head - 1
    q.submit(FLUSH)
    assert host.run_io() == 1
    assert len(q.reap()) == 1
    assert not need_event(host.memory.u32(cq_event), 1, 0)
    assert not host.interrupts.intx


def test_under_intx_a_shadow_cq_head_past_the_queue_is_not_taken(host: Host) -> None:
    host.interrupts.msix = False
    q, _, _ = shadowed(host)
    q.submit(FLUSH)
    assert host.run_io() == 1 and host.interrupts.intx
    host.memory.put_u32(q.shadow_cq, q.cq_entries)  # type: ignore[arg-type]
    ring_cq(host, q, 1)  # a valid value on the wire, a broken one in the shadow
    assert host.interrupts.intx  # nothing was consumed as far as the controller knows
    assert host.sq(1).tail == 1 and not host.ctrl.registers.fatal
    assert only_invalid_value_events(host)
    assert len(q.reap()) == 1  # now the shadow says 1
    ring_cq(host, q, 1)
    assert not host.interrupts.intx


# --- shadow values outside the queue --------------------------------------------------


@pytest.mark.parametrize("bad", [8, 9, 0xFFFF, 0x10000, 0xFFFFFFFF])
def test_a_shadow_sq_tail_past_the_queue_is_ignored(host: Host, bad: int) -> None:
    q, _, _ = shadowed(host, entries=8)
    for _ in range(2):
        q.submit(FLUSH)
    assert host.run_io() == 2 and len(q.reap()) == 2
    host.memory.put_u32(q.shadow_sq, bad)  # type: ignore[arg-type]
    assert host.run_io() == 0  # no slot outside the queue is fetched
    assert not host.ctrl.data.enable_notifications()  # nor is that work to wait for
    host.ctrl.data.suppress_notifications()
    assert host.run_io() == 0
    assert q.peek() == []
    assert host.sq(1).tail == 2  # the last valid tail is kept
    assert not host.ctrl.registers.fatal
    assert only_invalid_value_events(host)
    # A valid tail again: exactly the commands it covers run.
    cids = [q.submit(FLUSH) for _ in range(3)]
    assert host.run_io() == 3
    assert [(c.cid, c.status) for c in q.reap()] == [(cid, 0) for cid in cids]


def test_with_shadow_doorbells_a_rung_tail_only_says_look(host: Host) -> None:
    """The shadow is the truth: a register write with another tail (here a valid one
    while the shadow holds garbage) makes the controller look at the shadow, not take
    the written value, so no stale entry past what the shadow covers is fetched."""
    q, _, _ = shadowed(host, entries=8)
    q.submit(FLUSH)
    assert host.run_io() == 1 and len(q.reap()) == 1
    host.memory.put_u32(q.shadow_sq, 0xFFFF)  # type: ignore[arg-type]
    host.ctrl.mmio_write(DOORBELL_BASE + 8 * q.qid, 4, 3)  # a valid tail, rung
    assert host.run_io() == 0
    assert host.sq(1).tail == 1
    cid = q.submit(FLUSH)  # the shadow valid again: exactly its command runs
    assert host.run_io() == 1
    assert [(c.cid, c.status) for c in q.reap()] == [(cid, 0)]


@pytest.mark.parametrize("bad", [4, 5, 0xFFFF, 0xFFFFFFFF])
def test_a_shadow_cq_head_past_the_queue_is_ignored(host: Host, bad: int) -> None:
    """A full CQ stays full: no completion overwrites one the host has not consumed."""
    q, _, _ = shadowed(host, entries=16, cq_entries=4)
    for _ in range(5):
        q.submit(FLUSH)
    assert host.run_io() == 3  # a 4-entry CQ holds 3
    host.memory.put_u32(q.shadow_cq, bad)  # type: ignore[arg-type]
    assert host.run_io() == 0
    assert len(q.peek()) == 3  # (peek fails if an entry was overwritten)
    assert not host.ctrl.registers.fatal
    assert only_invalid_value_events(host)
    assert len(q.reap()) == 3  # shadow head 3: valid again
    assert host.run_io() == 2
    assert [c.status for c in q.reap()] == [0, 0]
