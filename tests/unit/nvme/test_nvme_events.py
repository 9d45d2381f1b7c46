"""Asynchronous Event Request and the events that complete it
(NVMe Base 2.0, Asynchronous Event Request command)."""

from __future__ import annotations

from harness import Completion, Host, with_dnr

from nvme_mdev.nvme.spec import DOORBELL_BASE, AdminOpcode, FeatureId, LogPage, Status

ERROR_LOG = LogPage.ERROR_INFORMATION


def aer_dw0(event_type: int, info: int, log_page: int) -> int:
    return event_type | (info << 8) | (log_page << 16)


WRITE_TO_INVALID_DOORBELL = aer_dw0(0, 0x00, ERROR_LOG)
INVALID_DOORBELL_VALUE = aer_dw0(0, 0x01, ERROR_LOG)


def submit_aer(h: Host) -> int:
    cid = h.admin.submit([AdminOpcode.ASYNC_EVENT_REQUEST])
    h.ctrl.process_admin()
    assert h.admin.peek() == [], "an AER completes only when an event arrives"
    return cid


def events(h: Host) -> list[Completion]:
    h.ctrl.process_admin()
    return h.admin.reap()


def test_aer_limit_exceeded(host: Host) -> None:
    for _ in range(4):  # AERL + 1
        submit_aer(host)
    c = host.admin_cmd([AdminOpcode.ASYNC_EVENT_REQUEST])
    assert c.status == with_dnr(Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED)


def test_aer_write_to_invalid_doorbell_register(host: Host) -> None:
    cid = submit_aer(host)
    host.write_reg(DOORBELL_BASE + 8 * 5, 1)  # SQ 5 does not exist
    done = events(host)
    assert len(done) == 1
    c = done[0]
    assert c.cid == cid and c.status == 0 and c.sq_id == 0
    assert c.dw0 == WRITE_TO_INVALID_DOORBELL


def test_aer_cq_doorbell_of_missing_queue(host: Host) -> None:
    cid = submit_aer(host)
    host.write_reg(DOORBELL_BASE + 8 * 3 + 4, 0)  # CQ 3 head
    assert [(c.cid, c.dw0) for c in events(host)] == [(cid, WRITE_TO_INVALID_DOORBELL)]


def test_aer_invalid_sq_tail_value(host: Host) -> None:
    host.create_io_queue_pair(1, entries=16)
    cid = submit_aer(host)
    host.write_reg(DOORBELL_BASE + 8, 16)  # tail == size
    assert [(c.cid, c.dw0) for c in events(host)] == [(cid, INVALID_DOORBELL_VALUE)]
    assert host.sq(1).tail == 0  # the value was not taken


def test_aer_invalid_cq_head_value(host: Host) -> None:
    host.create_io_queue_pair(1, entries=16)
    cid = submit_aer(host)
    host.write_reg(DOORBELL_BASE + 8 + 4, 3)  # head past the tail: nothing was posted
    assert [(c.cid, c.dw0) for c in events(host)] == [(cid, INVALID_DOORBELL_VALUE)]
    cid = submit_aer(host)
    assert host.get_log(ERROR_LOG, 64)[0].status == 0  # unmask errors
    host.write_reg(DOORBELL_BASE + 8 + 4, 16)  # head == size
    assert [(c.cid, c.dw0) for c in events(host)] == [(cid, INVALID_DOORBELL_VALUE)]


def test_aer_event_waits_for_a_request(host: Host) -> None:
    host.write_reg(DOORBELL_BASE + 8 * 9, 1)
    assert events(host) == []
    cid = host.admin.submit([AdminOpcode.ASYNC_EVENT_REQUEST])
    assert [(c.cid, c.dw0) for c in events(host)] == [(cid, WRITE_TO_INVALID_DOORBELL)]


def test_aer_error_type_masked_until_error_log_read(host: Host) -> None:
    first = submit_aer(host)
    host.write_reg(DOORBELL_BASE + 8 * 5, 1)
    assert [c.cid for c in events(host)] == [first]
    second = submit_aer(host)
    host.write_reg(DOORBELL_BASE + 8 * 6 + 4, 1)
    assert events(host) == []  # error events are masked until log page 01h is read
    c, _ = host.get_log(ERROR_LOG, 64, rae=True)
    assert c.status == 0
    assert events(host) == []  # RAE keeps the mask
    # Reading the log page without RAE: the Get Log Page and the AER complete together.
    cid = host.admin.submit(
        [AdminOpcode.GET_LOG_PAGE, 0, 0, 0, 0, 0, host.scratch, 0, 0, 0, ERROR_LOG | (15 << 16)]
    )
    done = events(host)
    assert [c.cid for c in done] == [cid, second]
    assert done[1].dw0 == WRITE_TO_INVALID_DOORBELL


def test_aer_reading_another_log_does_not_unmask(host: Host) -> None:
    submit_aer(host)
    host.write_reg(DOORBELL_BASE + 8 * 5, 1)
    assert len(events(host)) == 1
    submit_aer(host)
    host.write_reg(DOORBELL_BASE + 8 * 6, 1)
    assert host.get_log(LogPage.SMART_HEALTH, 512)[0].status == 0
    assert events(host) == []


def test_aer_namespace_attribute_notice_needs_enabling(host: Host) -> None:
    cid = submit_aer(host)
    host.ctrl.events.notice(0x00, LogPage.CHANGED_NAMESPACE_LIST, host.ctrl)
    assert events(host) == []  # Async Event Configuration bit 8 is clear
    assert host.set_feature(FeatureId.ASYNC_EVENT_CONFIG, 1 << 8).status == 0
    host.ctrl.events.notice(0x00, LogPage.CHANGED_NAMESPACE_LIST, host.ctrl)
    done = events(host)
    assert [(c.cid, c.dw0) for c in done] == [(cid, aer_dw0(2, 0x00, 0x04))]


def test_aer_outstanding_requests_dropped_by_reset(host: Host) -> None:
    for _ in range(4):
        submit_aer(host)
    host.disable()
    host.enable()
    for _ in range(4):
        submit_aer(host)  # the limit counts from zero again
    c = host.admin_cmd([AdminOpcode.ASYNC_EVENT_REQUEST])
    assert c.status == with_dnr(Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED)


def test_aer_failed_log_read_does_not_unmask(host: Host) -> None:
    submit_aer(host)
    host.write_reg(DOORBELL_BASE + 8 * 5, 1)
    assert len(events(host)) == 1
    submit_aer(host)
    host.write_reg(DOORBELL_BASE + 8 * 6, 1)
    cid = host.admin.submit(
        [AdminOpcode.GET_LOG_PAGE, 0, 0, 0, 0, 0, host.scratch + 1, 0, 0, 0, ERROR_LOG | (15 << 16)]
    )
    done = events(host)
    assert [(c.cid, c.status) for c in done] == [(cid, with_dnr(Status.PRP_OFFSET_INVALID))]
