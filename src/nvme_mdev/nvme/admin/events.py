"""Asynchronous Event Request (NVMe Base 5.2): events held until the host asks,
and AER commands held until an event arrives."""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from ..errors import CommandError
from ..spec import (
    AER_TYPE_ERROR,
    AER_TYPE_NOTICE,
    AER_TYPE_SMART,
    LogPage,
    Status,
)

if TYPE_CHECKING:
    from ..controller import Controller
    from ..queues import CompletionQueue, SubmissionQueue

ERROR_INVALID_DOORBELL_REGISTER = 0x00  # Write to Invalid Doorbell Register
ERROR_INVALID_DOORBELL_VALUE = 0x01  # Invalid Doorbell Write Value
NOTICE_NAMESPACE_ATTRIBUTE_CHANGED = 0x00
# SMART / Health Status: 'NVM subsystem reliability has been compromised' (media
# errors, an internal error, media placed in read-only mode...), Base 5.2 Figure 150.
SMART_NVM_SUBSYSTEM_RELIABILITY = 0x00

# SMART / Health Information log, Critical Warning (byte 0) bits that are ours to set.
CRITICAL_WARNING_RELIABILITY_DEGRADED = 1 << 2
CRITICAL_WARNING_READ_ONLY = 1 << 3

# Async Event Configuration (feature 0x0B) bit that enables each notice.
_NOTICE_ENABLE_BIT = {NOTICE_NAMESPACE_ATTRIBUTE_CHANGED: 1 << 8}


#: logs that report a state rather than a history: reading one answers every event for it
_STATE_LOGS = frozenset((LogPage.CHANGED_NAMESPACE_LIST, LogPage.SMART_HEALTH))


class Deferred(Exception):
    """The command completes later (an AER waiting for an event)."""


class AsyncEvents:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.outstanding: deque[int] = deque()  # CIDs of waiting AER commands
        self.pending: deque[tuple[int, int, int]] = deque()  # (type, info, log page)
        #: event types reported and not yet cleared by reading their log page (Base 5.2.1)
        self.masked_types: set[int] = set()
        #: events are raised from the I/O thread too (a backend failure), which must
        #: never take the controller's lock: this one guards the pending events and the
        #: controller's changed namespace list, and nothing is waited for under it.
        self.lock = threading.Lock()

    def reset(self) -> None:
        with self.lock:
            self.outstanding.clear()
            self.pending.clear()
            self.masked_types.clear()

    def handover_state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "outstanding": list(self.outstanding),
                "pending": [list(e) for e in self.pending],
                "masked_types": sorted(self.masked_types),
            }

    def restore(self, state: dict[str, Any]) -> None:
        with self.lock:
            self.outstanding = deque(int(cid) for cid in state["outstanding"])
            self.pending = deque((int(t), int(i), int(p)) for t, i, p in state["pending"])
            self.masked_types = {int(t) for t in state["masked_types"]}

    def queue(self, event_type: int, info: int, log_page: int) -> None:
        with self.lock:
            if (event_type, info, log_page) not in self.pending:
                self.pending.append((event_type, info, log_page))

    def error(self, info: int, ctrl: Controller) -> None:
        """An error event (raised from any thread; delivered by the admin worker)."""
        self.queue(AER_TYPE_ERROR, info, LogPage.ERROR_INFORMATION)
        ctrl.admin_doorbell.set()

    def notice(self, info: int, log_page: int, ctrl: Controller) -> None:
        enable = _NOTICE_ENABLE_BIT.get(info, 0)
        if enable and not ctrl.features.async_event_config & enable:
            return
        self.queue(AER_TYPE_NOTICE, info, log_page)
        ctrl.admin_doorbell.set()

    def smart_warning(self, raised: int, ctrl: Controller) -> None:
        """Critical Warning bits just set (SMART / Health log byte 0): one event, if the
        host enabled any of them (Async Event Configuration bits 7:0)."""
        if raised & ctrl.features.async_event_config & 0xFF:
            self.queue(AER_TYPE_SMART, SMART_NVM_SUBSYSTEM_RELIABILITY, LogPage.SMART_HEALTH)
            ctrl.admin_doorbell.set()

    def log_page_read(self, log_page: int, all_reported: bool = True) -> None:
        """Reading a log page (with RAE clear) unmasks the event type that reported it.
        `all_reported`: the read left nothing unreported in that log."""
        with self.lock:
            if log_page in _STATE_LOGS and all_reported:
                # The host has just read the state these events were held back to tell
                # (every change, the critical warnings): sending them now would only
                # send it to read the same again.
                self.pending = deque(e for e in self.pending if e[2] != log_page)
            self.masked_types = {
                t
                for t in self.masked_types
                if not (
                    (t == AER_TYPE_ERROR and log_page == LogPage.ERROR_INFORMATION)
                    or (t == AER_TYPE_NOTICE and log_page == LogPage.CHANGED_NAMESPACE_LIST)
                    or (t == AER_TYPE_SMART and log_page == LogPage.SMART_HEALTH)
                )
            }

    def deliverable(self) -> bool:
        if not self.outstanding:
            return False
        with self.lock:
            return any(t not in self.masked_types for t, _, _ in self.pending)

    def deliver(self, ctrl: Controller) -> None:
        """Complete waiting AERs with pending events (admin worker, controller lock held)."""
        cq, sq = ctrl.admin_cq, ctrl.admin_sq
        if cq is None or sq is None:
            return
        with self.lock:
            self._deliver(cq, sq)

    def _deliver(self, cq: CompletionQueue, sq: SubmissionQueue) -> None:
        for event in list(self.pending):
            if not self.outstanding or cq.is_full():
                return
            event_type, info, log_page = event
            if event_type in self.masked_types:
                continue
            self.pending.remove(event)
            self.masked_types.add(event_type)
            cid = self.outstanding.popleft()
            cq.post(event_type | (info << 8) | (log_page << 16), 0, sq.head, 0, cid, 0)


def async_event_request(ctrl: Controller, dw: tuple[int, ...]) -> int:
    events = ctrl.events
    if len(events.outstanding) >= events.limit:
        raise CommandError(Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED)
    events.outstanding.append(dw[0] >> 16)
    raise Deferred
