"""NVMe Base 2.2, 5.1.1 Abort command.

A command is held in its SQ (not yet fetched) by filling the CQ it posts to: the
controller fetches nothing while it could not post the completion (3.3.1)."""

from __future__ import annotations

from conformance_support import NS512, assert_ok, assert_status, completion_waiting, wait_until

from nvme_mdev.nvme.spec import Status
from nvme_mdev.nvme_host import HostQueuePair, NvmeHost, abort, flush


def _stalled_queue(host: NvmeHost, queued: int) -> tuple[HostQueuePair, list[int]]:
    """An SQ with a CQ of 2 entries (room for one completion, left unconsumed) and
    `queued` more commands waiting in the SQ behind it."""
    q = host.create_queue_pair(1, entries=16, cq_entries=2)
    cids = q.submit_batch([flush(NS512) for _ in range(queued + 1)])
    # The first completion fills the CQ: from then on the controller fetches nothing.
    wait_until(lambda: completion_waiting(q), "the first completion")
    return q, cids


def test_5_1_1_abort_aborts_a_queued_command(host: NvmeHost) -> None:
    """A command still in its SQ is aborted: Abort DW0 bit 0 is 0, and the command
    completes with Command Abort Requested (retryable: DNR clear) without running."""
    q, (first, second, third) = _stalled_queue(host, 2)
    c = host.admin_command(abort(1, third))
    assert_ok(c)
    assert c.dw0 & 1 == 0
    done = q.wait(3)
    by_cid = {d.cid: d for d in done}
    assert by_cid[first].ok and by_cid[second].ok
    assert_status(by_cid[third], Status.ABORT_REQUESTED, dnr=False)


def test_5_1_1_abort_of_an_unknown_command_reports_not_aborted(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """No such command outstanding: the Abort succeeds with DW0 bit 0 set ('not
    aborted')."""
    c = host.admin_command(abort(1, 0xBEEF))
    assert_ok(c)
    assert c.dw0 & 1 == 1


def test_5_1_1_abort_of_a_completed_command_reports_not_aborted(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """A command that has completed is past aborting: DW0 bit 0 set."""
    done = io.command(flush(NS512))
    c = host.admin_command(abort(1, done.cid))
    assert_ok(c)
    assert c.dw0 & 1 == 1


def test_5_1_1_abort_naming_a_nonexistent_sq_is_refused(host: NvmeHost) -> None:
    """An SQID with no queue behind it: Invalid Field in Command, DNR."""
    assert_status(host.admin_command(abort(7, 0)), Status.INVALID_FIELD, dnr=True)


def test_5_1_1_aborts_beyond_the_abort_command_limit_are_refused(host: NvmeHost) -> None:
    """More outstanding aborts than ACL + 1: Abort Command Limit Exceeded."""
    acl = host.identify(1)[258] + 1
    q, cids = _stalled_queue(host, acl + 1)
    for cid in cids[1 : acl + 1]:
        c = host.admin_command(abort(1, cid))
        assert_ok(c)
        assert c.dw0 & 1 == 0
    assert_status(host.admin_command(abort(1, cids[-1])), Status.ABORT_COMMAND_LIMIT_EXCEEDED)
    done = {c.cid: c for c in q.wait(len(cids))}
    assert [done[cid].code for cid in cids] == (
        [Status.SUCCESS] + [Status.ABORT_REQUESTED] * acl + [Status.SUCCESS]
    )
