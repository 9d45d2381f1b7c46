"""NVMe Base 2.2, 5.2 Memory-Based Transport Admin Commands: 5.2.1 Create I/O
Completion Queue, 5.2.2 Create I/O Submission Queue, 5.2.3 Delete I/O Completion
Queue, 5.2.4 Delete I/O Submission Queue, 5.2.5 Doorbell Buffer Config."""

from __future__ import annotations

import select

import pytest
from conformance_support import NS512, assert_ok, assert_status, wait_until

from nvme_mdev.nvme.spec import AdminOpcode, Reg, Status
from nvme_mdev.nvme_host import (
    BAR0,
    DOORBELL_BUFFER_CONFIG,
    HostQueuePair,
    NvmeHost,
    create_io_cq,
    create_io_sq,
    flush,
    read_write,
)

#: stands for "one entry more than CAP.MQES allows" in the parameters below
ABOVE_MQES = -1


def _max_entries(host: NvmeHost) -> int:
    """The largest I/O queue CAP.MQES allows, in entries (MQES is 0's based)."""
    return (host.client.read64(BAR0, Reg.CAP) & 0xFFFF) + 1


def _above_max_entries(host: NvmeHost) -> int:
    """One entry more than CAP.MQES allows (none is, when MQES is FFFFh)."""
    entries = _max_entries(host) + 1
    if entries > 0x10000:
        pytest.skip("CAP.MQES is FFFFh: every QSIZE is allowed")
    return entries


def _delete(host: NvmeHost, opcode: int, qid: int) -> int:
    return host.admin_command([opcode, 0, 0, 0, 0, 0, 0, 0, 0, 0, qid]).code


@pytest.mark.parametrize(
    ("qid", "entries", "expected"),
    [
        (0, 8, Status.INVALID_QUEUE_IDENTIFIER),
        (0xFFFF, 8, Status.INVALID_QUEUE_IDENTIFIER),
        (1, 1, Status.INVALID_QUEUE_SIZE),
        (1, ABOVE_MQES, Status.INVALID_QUEUE_SIZE),
    ],
    ids=["qid_0", "qid_beyond_allocated", "one_entry", "above_mqes"],
)
def test_5_2_1_create_cq_with_an_invalid_id_or_size_is_refused(
    host: NvmeHost, qid: int, entries: int, expected: int
) -> None:
    """QID 0 or above the allocated count: Invalid Queue Identifier; QSIZE 0h or above
    CAP.MQES: Invalid Queue Size."""
    if entries == ABOVE_MQES:
        entries = _above_max_entries(host)
    c = host.admin_command(create_io_cq(qid, host.alloc(4096), entries, vector=1))
    assert_status(c, expected, dnr=True)


def test_5_2_1_and_5_2_2_queues_of_cap_mqes_entries_are_accepted(host: NvmeHost) -> None:
    """QSIZE equal to CAP.MQES (the largest queue the controller reports) is accepted
    for a CQ and for an SQ, and the queue pair carries commands."""
    entries = _max_entries(host)
    q = host.create_queue_pair(1, entries=entries)
    assert q.command(flush(NS512)).ok


def test_5_2_1_create_cq_with_an_id_in_use_is_invalid_queue_identifier(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """A CQ identifier that is already in use: Invalid Queue Identifier."""
    c = host.admin_command(create_io_cq(1, host.alloc(4096), 8, vector=1))
    assert_status(c, Status.INVALID_QUEUE_IDENTIFIER, dnr=True)


def test_5_2_1_create_cq_not_physically_contiguous_is_invalid_field(host: NvmeHost) -> None:
    """PC cleared while CAP.CQR is set: Invalid Field in Command."""
    c = host.admin_command(create_io_cq(1, host.alloc(4096), 8, 1, contiguous=False))
    assert_status(c, Status.INVALID_FIELD, dnr=True)


def test_5_2_1_create_cq_with_an_interrupt_vector_beyond_msix_is_refused(host: NvmeHost) -> None:
    """An IV the controller has no vector for: Invalid Interrupt Vector."""
    c = host.admin_command(create_io_cq(1, host.alloc(4096), 8, vector=2048))
    assert_status(c, Status.INVALID_INTERRUPT_VECTOR, dnr=True)


def test_5_2_1_create_cq_with_an_offset_in_prp1_is_prp_offset_invalid(host: NvmeHost) -> None:
    """A contiguous queue's PRP Entry 1 must be page aligned: PRP Offset Invalid."""
    c = host.admin_command(create_io_cq(1, host.alloc(8192) + 64, 8, vector=1))
    assert_status(c, Status.PRP_OFFSET_INVALID, dnr=True)


def test_5_2_1_cq_with_interrupts_disabled_posts_without_an_interrupt(host: NvmeHost) -> None:
    """IEN cleared: completions are posted to the CQ, and no interrupt is sent."""
    q = HostQueuePair(host, 1, 8, vector=1)
    assert_ok(host.admin_command(create_io_cq(1, q.cq_addr, 8, 1, interrupts=False)))
    assert_ok(host.admin_command(create_io_sq(1, q.sq_addr, 8, cqid=1)))
    cid = q.submit(flush(NS512))
    done: list[object] = []
    for _ in range(200):
        done = list(q.reap())
        if done:
            break
        select.select([], [], [], 0.005)
    assert [c.cid for c in done] == [cid]  # type: ignore[attr-defined]
    assert select.select([host.irq_fds[1]], [], [], 0.05)[0] == []


def test_5_2_2_create_sq_on_a_cq_that_does_not_exist_is_completion_queue_invalid(
    host: NvmeHost,
) -> None:
    """CQID naming no I/O CQ (0 included: the admin CQ): Completion Queue Invalid."""
    for cqid in (0, 5):
        c = host.admin_command(create_io_sq(1, host.alloc(4096), 8, cqid=cqid))
        assert_status(c, Status.COMPLETION_QUEUE_INVALID, dnr=True)


def test_5_2_2_create_sq_with_an_id_in_use_is_invalid_queue_identifier(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """An SQ identifier already in use: Invalid Queue Identifier."""
    c = host.admin_command(create_io_sq(1, host.alloc(4096), 8, cqid=1))
    assert_status(c, Status.INVALID_QUEUE_IDENTIFIER, dnr=True)


def test_5_2_2_create_sq_larger_than_mqes_is_invalid_queue_size(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """QSIZE above CAP.MQES: Invalid Queue Size."""
    c = host.admin_command(create_io_sq(2, host.alloc(4096), _above_max_entries(host), cqid=1))
    assert_status(c, Status.INVALID_QUEUE_SIZE, dnr=True)


def test_5_2_3_delete_cq_with_an_sq_on_it_is_invalid_queue_deletion(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """A CQ cannot be deleted while an SQ is associated with it: Invalid Queue
    Deletion; once the SQ is deleted it can."""
    assert _delete(host, AdminOpcode.DELETE_IO_CQ, 1) == Status.INVALID_QUEUE_DELETION
    assert _delete(host, AdminOpcode.DELETE_IO_SQ, 1) == Status.SUCCESS
    assert _delete(host, AdminOpcode.DELETE_IO_CQ, 1) == Status.SUCCESS


@pytest.mark.parametrize("opcode", [AdminOpcode.DELETE_IO_SQ, AdminOpcode.DELETE_IO_CQ])
@pytest.mark.parametrize("qid", [0, 9])
def test_5_2_3_and_5_2_4_deleting_the_admin_queue_or_a_missing_queue_is_refused(
    host: NvmeHost, opcode: int, qid: int
) -> None:
    """QID 0h (the admin queue) or one that does not exist: Invalid Queue Identifier."""
    assert _delete(host, opcode, qid) == Status.INVALID_QUEUE_IDENTIFIER


def test_5_2_4_a_deleted_sq_takes_no_more_commands_and_its_id_can_be_reused(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """After Delete I/O SQ the identifier is free: the queue can be created again and
    used."""
    host.delete_queue_pair(io)
    q = host.create_queue_pair(1, entries=8)
    assert q.command(flush(NS512)).ok


def test_5_2_5_doorbell_buffer_config_rejects_unaligned_or_identical_pages(
    host: NvmeHost,
) -> None:
    """The shadow doorbell and EventIdx buffers are distinct, page-aligned pages:
    otherwise Invalid Field in Command."""
    page = host.alloc(8192)
    for shadow, eventidx in ((page + 8, page + 4096), (page, page)):
        c = host.admin_command([DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, shadow, 0, eventidx, 0])
        assert_status(c, Status.INVALID_FIELD, dnr=True)


def test_5_2_5_shadow_doorbells_carry_submissions_and_eventidx_asks_for_a_doorbell(
    host: NvmeHost,
) -> None:
    """With Doorbell Buffer Config the host publishes SQ tails in the shadow buffer and
    rings only when EventIdx asks; an idle controller sets EventIdx to the tail it has
    consumed, so that the next submission rings."""
    host.enable_shadow_doorbells()
    assert host.shadow_doorbells is not None
    shadow, eventidx = host.shadow_doorbells
    q = host.create_queue_pair(1, entries=16)
    buf = host.alloc(4096)
    for _ in range(5):
        assert q.command(read_write(0x02, NS512, buf, 0, 8)).ok
    assert int.from_bytes(host.ram.read(shadow + 8, 4), "little") == q.sq_tail == 5
    # Idle past the poll timeout (however long this machine takes to get there), the
    # I/O thread arms EventIdx at the tail it consumed, and parks...
    wait_until(
        lambda: int.from_bytes(host.ram.read(eventidx + 8, 4), "little") == q.sq_tail,
        "EventIdx armed at the consumed tail",
    )
    # ...so the next submission rings the real doorbell, which wakes it.
    assert q.command(flush(NS512)).ok
