"""Queue management admin commands (NVMe Base 2.0: Create/Delete I/O Completion Queue,
Create/Delete I/O Submission Queue, Doorbell Buffer Config, Abort, Keep Alive)."""

from __future__ import annotations

import pytest
from harness import PAGE, UNMAPPED, Completion, Host, NamespaceFactory, prp, rw, with_dnr

from nvme_mdev.dataplane.python import PythonDataPlane
from nvme_mdev.nvme.io import Outcome
from nvme_mdev.nvme.spec import DOORBELL_BASE, AdminOpcode, FeatureId, IoOpcode, Status


def flush(nsid: int = 1) -> list[int]:
    return [IoOpcode.FLUSH, nsid]


# --- Create I/O Completion Queue -------------------------------------------------


def test_create_cq_success_and_use(host: Host) -> None:
    q = host.create_io_queue_pair(1, entries=16)
    c = host.io_cmd(1, flush())
    assert c.status == 0 and c.sq_id == 1 and c.sq_head == 1
    assert q.cq_head == 1


@pytest.mark.parametrize("qid", [0, 65, 0xFFFF])
def test_create_cq_invalid_qid(host: Host, qid: int) -> None:
    assert host.create_cq(qid, 16).status == with_dnr(Status.INVALID_QUEUE_IDENTIFIER)


def test_create_cq_duplicate_qid(host: Host) -> None:
    assert host.create_cq(3, 16).status == 0
    assert host.create_cq(3, 16).status == with_dnr(Status.INVALID_QUEUE_IDENTIFIER)


def test_create_cq_highest_qid(host: Host) -> None:
    assert host.create_cq(64, 16, vector=1).status == 0


@pytest.mark.parametrize("entries", [1, 1025, 0x10000])
def test_create_cq_invalid_size(host: Host, entries: int) -> None:
    addr = host.alloc(PAGE)
    assert host.create_cq(1, entries, addr).status == with_dnr(Status.INVALID_QUEUE_SIZE)


def test_create_cq_size_limits(host: Host) -> None:
    assert host.create_cq(1, 2).status == 0  # the smallest queue
    assert host.create_cq(2, 1024).status == 0  # CAP.MQES + 1


def test_create_cq_not_contiguous(host: Host) -> None:
    assert host.create_cq(1, 16, pc=False).status == with_dnr(Status.INVALID_FIELD)


@pytest.mark.parametrize("vector", [65, 0xFFFF])
def test_create_cq_invalid_vector(host: Host, vector: int) -> None:
    c = host.create_cq(1, 16, vector=vector)
    assert c.status == with_dnr(Status.INVALID_INTERRUPT_VECTOR)


def test_create_cq_vector_limit(host: Host) -> None:
    assert host.create_cq(1, 16, vector=64).status == 0  # 65 MSI-X vectors: 0..64
    assert host.create_cq(2, 16, vector=0).status == 0  # may share the admin vector


def test_create_cq_nonzero_vector_without_msix(host: Host) -> None:
    """With MSI-X off only vector 0 exists (the Create I/O CQ IV field 'shall be cleared
    to 0h' then; QEMU answers Invalid Interrupt Vector)."""
    host.interrupts.msix = False
    assert host.create_cq(1, 16, vector=1).status == with_dnr(Status.INVALID_INTERRUPT_VECTOR)
    assert host.create_cq(1, 16, vector=0).status == 0


def test_create_cq_misaligned_base(host: Host) -> None:
    addr = host.alloc(2 * PAGE) + 0x100
    assert host.create_cq(1, 16, addr).status == with_dnr(Status.PRP_OFFSET_INVALID)


def test_create_cq_unmapped_base(host: Host) -> None:
    assert host.create_cq(1, 16, UNMAPPED).status == Status.DATA_TRANSFER_ERROR


def test_create_cq_respects_number_of_queues_per_type(host: Host) -> None:
    """NCQA and NSQA are separate limits (Number of Queues feature)."""
    c = host.set_feature(FeatureId.NUMBER_OF_QUEUES, 1 | (3 << 16))  # 2 SQs, 4 CQs
    assert c.status == 0 and c.dw0 == 1 | (3 << 16)
    assert host.create_cq(4, 16).status == 0
    assert host.create_cq(5, 16).status == with_dnr(Status.INVALID_QUEUE_IDENTIFIER)
    assert host.create_sq(2, 16, 4).status == 0
    assert host.create_sq(3, 16, 4).status == with_dnr(Status.INVALID_QUEUE_IDENTIFIER)


# --- Create I/O Submission Queue -------------------------------------------------


def test_create_sq_cq_missing(host: Host) -> None:
    assert host.create_sq(1, 16, 1).status == with_dnr(Status.COMPLETION_QUEUE_INVALID)
    # CQ 0 is the admin CQ: an I/O SQ may not use it.
    assert host.create_sq(1, 16, 0).status == with_dnr(Status.COMPLETION_QUEUE_INVALID)


@pytest.mark.parametrize("qid", [0, 65])
def test_create_sq_invalid_qid(host: Host, qid: int) -> None:
    assert host.create_cq(1, 16).status == 0
    assert host.create_sq(qid, 16, 1).status == with_dnr(Status.INVALID_QUEUE_IDENTIFIER)


def test_create_sq_duplicate_qid(host: Host) -> None:
    assert host.create_cq(1, 16).status == 0
    assert host.create_sq(1, 16, 1).status == 0
    assert host.create_sq(1, 16, 1).status == with_dnr(Status.INVALID_QUEUE_IDENTIFIER)


@pytest.mark.parametrize("entries", [1, 1025])
def test_create_sq_invalid_size(host: Host, entries: int) -> None:
    assert host.create_cq(1, 16).status == 0
    addr = host.alloc(PAGE)
    assert host.create_sq(1, entries, 1, addr).status == with_dnr(Status.INVALID_QUEUE_SIZE)


def test_create_sq_not_contiguous(host: Host) -> None:
    assert host.create_cq(1, 16).status == 0
    assert host.create_sq(1, 16, 1, pc=False).status == with_dnr(Status.INVALID_FIELD)


def test_create_sq_misaligned_and_unmapped_base(host: Host) -> None:
    assert host.create_cq(1, 16).status == 0
    addr = host.alloc(2 * PAGE) + 64
    assert host.create_sq(1, 16, 1, addr).status == with_dnr(Status.PRP_OFFSET_INVALID)
    assert host.create_sq(1, 16, 1, UNMAPPED).status == Status.DATA_TRANSFER_ERROR


# --- Delete I/O queues --------------------------------------------------------------


def test_delete_cq_with_sq_attached(host: Host) -> None:
    host.create_io_queue_pair(1)
    assert host.delete_cq(1).status == with_dnr(Status.INVALID_QUEUE_DELETION)
    assert host.delete_sq(1).status == 0
    assert host.delete_cq(1).status == 0
    assert not host.ctrl.io_queues and host.ctrl.data.queues() == []


def test_delete_nonexistent_queues(host: Host) -> None:
    for delete in (host.delete_sq, host.delete_cq):
        assert delete(0).status == with_dnr(Status.INVALID_QUEUE_IDENTIFIER)
        assert delete(7).status == with_dnr(Status.INVALID_QUEUE_IDENTIFIER)
    host.create_io_queue_pair(1)
    assert host.delete_sq(1).status == 0
    assert host.delete_sq(1).status == with_dnr(Status.INVALID_QUEUE_IDENTIFIER)


def test_deleted_sq_is_no_longer_processed(host: Host) -> None:
    q = host.create_io_queue_pair(1)
    assert host.delete_sq(1).status == 0
    q.submit(flush(), ring=False)
    assert host.run_io() == 0
    # Its id can be used again, with the queue starting empty.
    assert host.create_sq(1, 16, 1).status == 0
    assert host.sq(1).head == host.sq(1).tail == 0


def test_delete_cq_frees_the_id(host: Host) -> None:
    assert host.create_cq(2, 16).status == 0
    assert host.delete_cq(2).status == 0
    assert host.create_cq(2, 16).status == 0


# --- Abort, Keep Alive -------------------------------------------------------------------


def abort(host: Host, sqid: int, cid: int) -> Completion:
    return host.admin_cmd([AdminOpcode.ABORT, 0, 0, 0, 0, 0, 0, 0, 0, 0, sqid | (cid << 16)])


def test_abort_of_a_command_no_longer_queued_answers_not_aborted(host: Host) -> None:
    host.create_io_queue_pair(1)
    for sqid in (0, 1):
        c = abort(host, sqid, 5)
        assert c.status == 0
        assert c.dw0 & 1 == 1  # not aborted


def test_abort_of_a_queued_io_command_completes_it_unrun(file_ns: NamespaceFactory) -> None:
    """Base 5.1: the aborted command completes with Command Abort Requested."""
    h = Host([file_ns(fill=b"\x11")])
    h.enable()
    q = h.create_io_queue_pair(1)
    buf = h.buffer(512)
    h.memory.write(buf, b"\x22" * 512)
    first = q.submit(rw(IoOpcode.WRITE, 1, buf, 0, 1))
    second = q.submit(rw(IoOpcode.WRITE, 1, buf, 1, 1))  # queued, not yet fetched
    c = abort(h, 1, second)
    assert c.status == 0 and c.dw0 & 1 == 0  # aborted
    h.run_io()
    done = {d.cid: d for d in q.reap()}
    assert done[first].status == 0
    assert done[second].sc == Status.ABORT_REQUESTED and not done[second].dnr
    h.memory.write(buf, bytes(512))
    assert h.io_cmd(1, rw(IoOpcode.READ, 1, buf, 1, 1)).status == 0
    assert h.memory.read(buf, 512) == b"\x11" * 512  # the aborted write never ran
    assert abort(h, 1, second).dw0 & 1 == 1  # and it is gone


def test_abort_limit(host: Host) -> None:
    q = host.create_io_queue_pair(1)
    cids = [q.submit([IoOpcode.FLUSH, 1]) for _ in range(host.ctrl.config.abort_limit + 1)]
    for cid in cids[:-1]:
        assert abort(host, 1, cid).dw0 & 1 == 0
    c = abort(host, 1, cids[-1])
    assert c.status == with_dnr(Status.ABORT_COMMAND_LIMIT_EXCEEDED)


def test_aborts_of_a_deleted_sq_are_forgotten_with_it(host: Host) -> None:
    """Aborts marked for commands of an SQ that is then deleted go with the queue (the
    commands were implicitly aborted by the deletion): they neither count against the
    Abort Command Limit nor abort fresh commands of a re-created SQ with the same CIDs."""
    q = host.create_io_queue_pair(1)
    limit = host.ctrl.config.abort_limit
    cids = [q.submit([IoOpcode.FLUSH, 1]) for _ in range(limit)]
    for cid in cids:
        assert abort(host, 1, cid).dw0 & 1 == 0  # marked: queued, not yet fetched
    assert host.delete_sq(1).status == 0
    assert host.delete_cq(1).status == 0
    q = host.create_io_queue_pair(1)
    again = [q.submit([IoOpcode.FLUSH, 1]) for _ in range(limit)]
    assert again == cids  # the same CIDs on the new SQ
    c = abort(host, 1, 0xFFF0)  # an Abort is accepted: the limit is free again
    assert c.status == 0 and c.dw0 & 1 == 1
    host.run_io()
    done = q.reap()
    assert sorted(d.cid for d in done) == sorted(cids)
    assert all(d.status == 0 for d in done)  # run, not completed as aborted


def test_abort_unknown_sq(host: Host) -> None:
    c = host.admin_cmd([AdminOpcode.ABORT, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9 | (5 << 16)])
    assert c.status == with_dnr(Status.INVALID_FIELD)


def test_keep_alive(host: Host) -> None:
    c = host.admin_cmd([AdminOpcode.KEEP_ALIVE])
    assert c.status == 0 and c.dw0 == 0


# --- Doorbell Buffer Config -------------------------------------------------------


def dbbc(host: Host, shadow: int, eventidx: int) -> int:
    c = host.admin_cmd(
        [AdminOpcode.DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, *prp(shadow), *prp(eventidx)]
    )
    return c.status


def test_doorbell_buffer_config_misaligned_or_bad_pages(host: Host) -> None:
    a, b = host.alloc(PAGE), host.alloc(PAGE)
    assert dbbc(host, a + 8, b) == with_dnr(Status.INVALID_FIELD)
    assert dbbc(host, a, b + 0x800) == with_dnr(Status.INVALID_FIELD)
    assert dbbc(host, a, a) == with_dnr(Status.INVALID_FIELD)  # one page for both
    assert dbbc(host, UNMAPPED, b) == with_dnr(Status.INVALID_FIELD)
    assert dbbc(host, a, UNMAPPED) == with_dnr(Status.INVALID_FIELD)
    host.memory.write(b, b"\xa5" * PAGE)
    host.create_io_queue_pair(1, entries=8)
    assert host.memory.read(b, 16) == b"\xa5" * 16  # refused: no EventIdx was written
    assert dbbc(host, a, b) == 0
    assert host.memory.u32(b + 8) == 0  # SQ 1's EventIdx, seeded with its tail


def test_doorbell_buffer_config_shadow_tail_processed_without_mmio(host: Host) -> None:
    shadow, eventidx = host.alloc(PAGE), host.alloc(PAGE)
    assert dbbc(host, shadow, eventidx) == 0
    q = host.create_io_queue_pair(1, entries=8)
    q.use_shadow_doorbells(shadow, eventidx)
    # EventIdx as the queue code seeds it: SQ = its tail, CQ = head - 1.
    assert host.memory.u32(eventidx + 8) == 0
    assert host.memory.u32(eventidx + 12) == 0xFFFF
    traps = host.ctrl.statistics()["doorbell_traps"]
    for _ in range(3):
        # The tail goes to the shadow buffer; only the first also rings (EventIdx, at
        # the tail the controller consumed, asks for the next one), with tail 1.
        q.submit(flush())
    assert host.ctrl.statistics()["doorbell_traps"] == traps + 1  # type: ignore[operator]
    assert host.memory.u32(shadow + 8) == 3
    assert host.run_io() == 3  # the shadow's tail, not the rung one
    done = q.reap()  # head goes to the shadow buffer
    assert [c.status for c in done] == [0, 0, 0]
    assert host.memory.u32(shadow + 12) == 3
    assert host.run_io() == 0


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Linux's nvme_dbbuf_need_event: ring iff (u16)(new - ei - 1) < (u16)(new - old)."""
    return ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def test_doorbell_buffer_config_event_index_arming(host: Host) -> None:
    shadow, eventidx = host.alloc(PAGE), host.alloc(PAGE)
    assert dbbc(host, shadow, eventidx) == 0
    q = host.create_io_queue_pair(2, entries=8)
    q.use_shadow_doorbells(shadow, eventidx)
    q.submit(flush())
    q.submit(flush())
    host.run_io()
    assert not host.ctrl.data.enable_notifications()  # nothing waiting: may park
    assert host.memory.u32(eventidx + 16) == 2  # ring on the next new tail
    host.ctrl.data.suppress_notifications()
    assert host.memory.u32(eventidx + 16) == 1  # tail - 1: no doorbell needed
    assert not need_event(1, 3, 2)
    host.ctrl.data.enable_notifications()
    assert need_event(2, 3, 2)
    q.submit(flush())  # a submission the poller has not seen: it must not park
    assert host.ctrl.data.enable_notifications()


def test_doorbell_buffer_config_event_index_wraps_at_zero(host: Host) -> None:
    shadow, eventidx = host.alloc(PAGE), host.alloc(PAGE)
    assert dbbc(host, shadow, eventidx) == 0
    host.create_io_queue_pair(1, entries=8)
    host.ctrl.data.suppress_notifications()
    assert host.memory.u32(eventidx + 8) == 0xFFFF  # tail 0 - 1, as a u16


def test_doorbell_buffer_config_after_queues_exist_seeds_shadow(host: Host) -> None:
    q = host.create_io_queue_pair(1, entries=8)
    host.io_cmd(1, flush())  # tail 1, head 1 through MMIO doorbells
    shadow, eventidx = host.alloc(PAGE), host.alloc(PAGE)
    host.memory.write(shadow, b"\xff" * PAGE)
    assert dbbc(host, shadow, eventidx) == 0
    assert host.memory.u32(shadow + 8) == 1  # SQ 1 tail
    assert host.memory.u32(shadow + 12) == 1  # CQ 1 head
    assert host.memory.u32(eventidx + 8) == 1
    assert host.memory.u32(eventidx + 12) == 0
    q.use_shadow_doorbells(shadow, eventidx)
    q.submit(flush())
    assert host.run_io() == 1
    assert q.reap()[0].status == 0


def test_doorbell_buffer_config_shadow_cq_head_frees_a_full_cq(host: Host) -> None:
    shadow, eventidx = host.alloc(PAGE), host.alloc(PAGE)
    assert dbbc(host, shadow, eventidx) == 0
    q = host.create_io_queue_pair(1, entries=16, cq_entries=4)
    q.use_shadow_doorbells(shadow, eventidx)
    for _ in range(7):
        q.submit(flush())
    assert host.run_io() == 3  # a 4-entry CQ holds 3
    assert host.run_io() == 0
    assert len(q.reap()) == 3  # the new head reaches the controller through memory only
    assert host.run_io() == 3
    assert len(q.reap()) == 3
    assert host.run_io() == 1
    assert len(q.reap()) == 1


def test_doorbell_buffer_config_reset_forgets_shadow_doorbells(host: Host) -> None:
    shadow, eventidx = host.alloc(PAGE), host.alloc(PAGE)
    assert dbbc(host, shadow, eventidx) == 0
    host.disable()
    host.enable()
    host.memory.write(eventidx, b"\xa5" * PAGE)
    host.create_io_queue_pair(1, entries=8)
    assert host.memory.u32(eventidx + 8) == 0xA5A5A5A5  # no EventIdx: no shadow doorbells
    host.memory.put_u32(shadow + 8, 5)  # a stale shadow tail is not looked at
    assert host.run_io() == 0
    assert host.io_cmd(1, flush()).status == 0  # the MMIO doorbell works


def test_stale_mmio_sq_doorbell_does_not_move_a_shadowed_tail_back(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest rings the real doorbell with the tail it just stored in the shadow;
    the write crosses the socket (another thread) while the guest stores newer tails
    and the I/O thread works on them. Taking the stale value would send the I/O thread
    round the whole queue: stale entries, completions with ids the guest never issued
    (Linux: "invalid id 0 completed on queue 1")."""
    shadow, eventidx = host.alloc(PAGE), host.alloc(PAGE)
    assert dbbc(host, shadow, eventidx) == 0
    q = host.create_io_queue_pair(1, entries=8)
    q.use_shadow_doorbells(shadow, eventidx)
    for _ in range(3):
        q.submit(flush())
    assert host.run_io() == 3
    for _ in range(2):
        q.submit(flush())  # shadow tail 5

    late_doorbells = [3]  # the doorbell that went with tail 3 arrives now
    if isinstance(host.ctrl.data, PythonDataPlane):
        io = host.ctrl.data.io
        execute = io.execute

        def execute_while_a_doorbell_arrives(dw: tuple[int, ...]) -> Outcome:
            outcome = execute(dw)
            if late_doorbells:
                host.ctrl.mmio_write(DOORBELL_BASE + 8, 4, late_doorbells.pop())
            return outcome

        monkeypatch.setattr(io, "execute", execute_while_a_doorbell_arrives)
    else:  # the native plane takes doorbells between passes: the late one comes first
        host.ctrl.mmio_write(DOORBELL_BASE + 8, 4, late_doorbells.pop())
    assert host.run_io() == 2
    assert [c.cid for c in q.reap()] == [0, 1, 2, 3, 4]
    assert host.run_io() == 0
    assert not host.ctrl.events.pending


def test_stale_mmio_cq_doorbell_on_a_shadowed_cq_is_not_an_error(host: Host) -> None:
    shadow, eventidx = host.alloc(PAGE), host.alloc(PAGE)
    assert dbbc(host, shadow, eventidx) == 0
    q = host.create_io_queue_pair(1, entries=16, cq_entries=4)
    q.use_shadow_doorbells(shadow, eventidx)
    for _ in range(3):
        q.submit(flush())
    assert host.run_io() == 3  # CQ full
    assert len(q.reap()) == 3  # shadow CQ head 3
    q.submit(flush())
    assert host.run_io() == 1  # took head 3 from the shadow
    host.ctrl.mmio_write(DOORBELL_BASE + 12, 4, 1)  # a late MMIO head from before
    assert not host.ctrl.events.pending
    assert len(q.reap()) == 1
    for _ in range(3):  # 3 more fit only if the controller kept head 3 and took 0
        q.submit(flush())
    assert host.run_io() == 3
    assert len(q.reap()) == 3


def test_mmio_doorbell_past_a_shadowed_queue_is_an_invalid_value(host: Host) -> None:
    shadow, eventidx = host.alloc(PAGE), host.alloc(PAGE)
    assert dbbc(host, shadow, eventidx) == 0
    host.create_io_queue_pair(1, entries=8)
    host.ctrl.mmio_write(DOORBELL_BASE + 8, 4, 8)
    assert [t[1] for t in host.ctrl.events.pending] == [0x01]  # Invalid Doorbell Write Value


# --- Arbitration (Base 3.4.4) ----------------------------------------------------------


@pytest.mark.parametrize(("ab", "per_turn"), [(0, 1), (2, 4), (5, 32), (7, 40)])
def test_round_robin_takes_an_arbitration_burst_from_each_sq(
    host: Host, ab: int, per_turn: int
) -> None:
    assert host.set_feature(FeatureId.ARBITRATION, ab).status == 0
    queues = [host.create_io_queue_pair(qid, entries=64) for qid in (1, 2)]
    for q in queues:
        for _ in range(40):
            q.submit(flush())
    assert host.run_io() == 2 * per_turn  # one pass: a burst from each SQ
    assert [len(q.reap()) for q in queues] == [per_turn, per_turn]
