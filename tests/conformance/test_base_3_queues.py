"""NVMe Base 2.2, 3.3.1 Memory-based Transport Queue Model, 3.4.4 Command
Arbitration, 4.2 Completion Queue Entry (4.2.4 Phase Tag), and the error events an
invalid doorbell write raises (5.1.2, Asynchronous Event Information - Error Status)."""

from __future__ import annotations

from conformance_support import NS512, Device, assert_ok, reap_unrung, settle

from nvme_mdev.nvme.spec import AER_TYPE_ERROR, FeatureId, LogPage
from nvme_mdev.nvme_host import (
    Completion,
    HostQueuePair,
    NvmeHost,
    async_event_request,
    flush,
)

ERROR_INVALID_DOORBELL_REGISTER = 0x00
ERROR_INVALID_DOORBELL_VALUE = 0x01


def _event(c: Completion) -> tuple[int, int, int]:
    """(Asynchronous Event Type, Asynchronous Event Information, Log Page Identifier)."""
    return c.dw0 & 0x7, (c.dw0 >> 8) & 0xFF, (c.dw0 >> 16) & 0xFF


def _arm_aer(host: NvmeHost) -> int:
    assert host.admin is not None
    return host.admin.submit(async_event_request())


def _wait_event(host: NvmeHost, cid: int) -> Completion:
    assert host.admin is not None
    (c,) = host.admin.wait(1)
    assert c.cid == cid
    assert_ok(c)
    return c


def _consumed(q: HostQueuePair, start: int, sq_head: int) -> int:
    """How many entries, counted from slot `start`, an SQ Head Pointer says the
    controller has consumed."""
    return (sq_head - start) % q.entries


def test_3_3_1_completion_entries_report_sq_head_sq_id_and_cid(io: HostQueuePair) -> None:
    """Each CQE carries the SQ Identifier, the Command Identifier and the SQ Head
    Pointer (4.2.1: the SQ entries 'that have been consumed and may be re-used'): the
    head is past the completed command's own entry, not past the tail, and never
    moves backwards from one CQE to the next."""
    start = io.sq_tail
    cids = io.submit_batch([flush(NS512) for _ in range(5)])
    slot = {cid: i for i, cid in enumerate(cids)}  # the entry each command occupies
    done = io.wait(5)
    assert sorted(c.cid for c in done) == sorted(cids)
    assert all(c.sq_id == 1 and c.ok for c in done)
    consumed = [_consumed(io, start, c.sq_head) for c in done]
    for c, n in zip(done, consumed, strict=True):
        assert slot[c.cid] < n <= len(cids), (
            f"SQHD {c.sq_head} for the command in slot {slot[c.cid]}"
        )
    assert consumed == sorted(consumed), f"SQHD went backwards: {[c.sq_head for c in done]}"


def test_3_3_1_sq_head_wraps_with_the_queue(host: NvmeHost) -> None:
    """SQHD counts modulo the queue size. One command at a time, each CQE's head has
    consumed exactly that command's entry: past it, and not past the tail just after it."""
    q = host.create_queue_pair(1, entries=4)
    heads = [q.command(flush(NS512)).sq_head for _ in range(6)]
    assert heads == [1, 2, 3, 0, 1, 2]


def test_4_2_4_phase_tag_inverts_on_each_pass_through_the_cq(host: NvmeHost) -> None:
    """The Phase Tag is 1 on the first pass through a CQ, 0 on the second, 1 on the
    third."""
    q = host.create_queue_pair(1, entries=4)
    phases = [q.command(flush(NS512)).phase for _ in range(10)]
    assert phases == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]


def test_3_3_1_controller_does_not_post_to_a_full_completion_queue(host: NvmeHost) -> None:
    """A CQ is full when Tail + 1 == Head: the controller holds further completions
    until the host consumes entries, then posts them."""
    q = host.create_queue_pair(1, entries=16, cq_entries=4)
    cids = q.submit_batch([flush(NS512) for _ in range(6)])
    first = reap_unrung(q, 3)
    assert len(first) == 3  # 4 slots, one always empty
    settle(0.05)
    assert q.reap(ring=False) == []  # nothing overwritten, nothing more posted
    q.ring_cq()
    rest = q.wait(3)
    assert [c.cid for c in first + rest] == cids
    assert all(c.ok for c in first + rest)


def test_3_3_1_several_submission_queues_may_share_one_completion_queue(host: NvmeHost) -> None:
    """SQs created on the same CQID post there, each CQE naming its own SQ."""
    q1 = host.create_queue_pair(1, entries=8)
    q2 = host.create_queue_pair(2, entries=8, shared_cq=q1)
    a = q1.submit(flush(NS512))
    b = q2.submit(flush(NS512))
    done = q1.wait(2)
    assert {(c.sq_id, c.cid, c.sq_head) for c in done} == {(1, a, 1), (2, b, 1)}
    assert all(c.ok for c in done)


def _arbitration_order(device: Device, host: NvmeHost, burst_log2: int, each: int) -> list[int]:
    """The SQ of each completion, in the order posted, after `each` Flushes were queued
    on two SQs at once with Arbitration Burst 2^`burst_log2`. Every command completes,
    successfully. (The device completes the Flushes of one namespace in the order it
    launches them, so this is the order arbitration took them in.)"""
    assert_ok(host.set_features(FeatureId.ARBITRATION, burst_log2))
    q1 = host.create_queue_pair(1, entries=32)
    q2 = host.create_queue_pair(2, entries=32, shared_cq=q1)
    with device.controller.data.paused():
        cids = {q.qid: q.submit_batch([flush(NS512) for _ in range(each)]) for q in (q1, q2)}
        host.sync()  # both tails are known before arbitration starts
    done = q1.wait(2 * each)
    assert all(c.ok for c in done)
    for qid, submitted in cids.items():  # each command once: all fetched, none twice
        assert sorted(c.cid for c in done if c.sq_id == qid) == sorted(submitted)
    return [c.sq_id for c in done]


def _turns(order: list[int]) -> list[int]:
    """The lengths of the runs of consecutive commands taken from one SQ."""
    runs: list[int] = []
    previous = None
    for sqid in order:
        if sqid == previous:
            runs[-1] += 1
        else:
            runs.append(1)
        previous = sqid
    return runs


def _assert_bursts_within(order: list[int], burst: int) -> None:
    """While both SQs hold commands, no turn takes more than `burst` from one of them
    (the last run is what is left of one SQ once the other is empty)."""
    turns = _turns(order)
    assert max(turns[:-1], default=0) <= burst, f"turns {turns} exceed the burst {burst}: {order}"


def test_3_4_4_round_robin_takes_one_command_per_queue_with_burst_1(
    device: Device, host: NvmeHost
) -> None:
    """Round robin with Arbitration Burst 1 (AB 0: 'the maximum number of commands that
    the controller may launch at one time from a particular Submission Queue'): the
    SQs alternate while both hold commands."""
    order = _arbitration_order(device, host, 0, 4)
    _assert_bursts_within(order, 1)


def test_3_4_4_arbitration_burst_is_the_most_taken_from_one_queue_per_turn(
    device: Device, host: NvmeHost
) -> None:
    """With AB 2 the controller launches at most 4 commands from an SQ per turn: with 6
    commands in each of two SQs, neither is drained before the other gets a turn."""
    order = _arbitration_order(device, host, 2, 6)
    _assert_bursts_within(order, 4)


def test_3_3_1_doorbell_of_a_nonexistent_queue_raises_an_error_event(host: NvmeHost) -> None:
    """A write to the doorbell of a queue that does not exist: Error event, Write to
    Invalid Doorbell Register, Error Information log page."""
    cid = _arm_aer(host)
    host.write_doorbell(5, 1)
    c = _wait_event(host, cid)
    assert _event(c) == (
        AER_TYPE_ERROR,
        ERROR_INVALID_DOORBELL_REGISTER,
        LogPage.ERROR_INFORMATION,
    )


def test_3_3_1_sq_tail_beyond_the_queue_size_raises_an_invalid_doorbell_value_event(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """An SQ Tail doorbell value >= the queue size: Invalid Doorbell Write Value; the
    queue keeps working."""
    cid = _arm_aer(host)
    host.write_doorbell(1, io.entries)
    c = _wait_event(host, cid)
    assert _event(c) == (AER_TYPE_ERROR, ERROR_INVALID_DOORBELL_VALUE, LogPage.ERROR_INFORMATION)
    assert io.command(flush(NS512)).ok


def test_3_3_1_admin_sq_tail_beyond_the_queue_size_raises_an_invalid_doorbell_value_event(
    host: NvmeHost,
) -> None:
    """The admin SQ's doorbell is checked as well."""
    cid = _arm_aer(host)
    host.write_doorbell(0, 40)  # the admin SQ has 32 entries
    c = _wait_event(host, cid)
    assert _event(c)[:2] == (AER_TYPE_ERROR, ERROR_INVALID_DOORBELL_VALUE)


def test_3_3_1_cq_head_past_the_tail_raises_an_invalid_doorbell_value_event(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """A CQ Head doorbell that would consume entries never posted: Invalid Doorbell
    Write Value."""
    cid = _arm_aer(host)
    host.write_doorbell(1, 5, completion=True)
    c = _wait_event(host, cid)
    assert _event(c)[:2] == (AER_TYPE_ERROR, ERROR_INVALID_DOORBELL_VALUE)
    assert io.command(flush(NS512)).ok


def test_5_1_2_error_events_are_masked_until_the_error_log_is_read(host: NvmeHost) -> None:
    """After an Error event is reported, further Error events wait until the host reads
    the Error Information log page (with RAE clear)."""
    first = _arm_aer(host)
    host.write_doorbell(5, 1)
    _wait_event(host, first)
    second = _arm_aer(host)
    host.write_doorbell(6, 1)
    settle(0.1)
    assert host.admin is not None
    assert host.admin.reap() == []  # masked
    c, _ = host.get_log_page(LogPage.ERROR_INFORMATION, 64)
    assert_ok(c)
    assert _event(_wait_event(host, second))[:2] == (
        AER_TYPE_ERROR,
        ERROR_INVALID_DOORBELL_REGISTER,
    )
