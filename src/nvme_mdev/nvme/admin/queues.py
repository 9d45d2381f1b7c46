"""Queue management admin commands (NVMe Base 5.4, 5.5, 5.6, 5.7, 5.9):
Create/Delete I/O Completion/Submission Queue, Doorbell Buffer Config, Abort."""

from __future__ import annotations

import logging
from collections.abc import Container
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...guest_memory import DmaError
from ..errors import CommandError
from ..spec import PAGE_SIZE, FeatureId, Status

if TYPE_CHECKING:
    from ...dataplane import DataPlane
    from ...handover.journal import Journal
    from ..controller import Controller

_PAGE_MASK = PAGE_SIZE - 1
log = logging.getLogger(__name__)


@dataclass
class IoCq:
    """An I/O completion queue as the host created it."""

    qid: int
    base: int
    size: int
    vector: int
    interrupts_enabled: bool
    #: the SQs that post to it (it cannot be deleted while it has any)
    sq_ids: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class IoSq:
    """An I/O submission queue as the host created it."""

    qid: int
    base: int
    size: int
    cqid: int
    priority: int


class IoQueueTable:
    """The I/O queues the host created and has not deleted: the one owner of that
    table. The admin commands check against it and change it through its methods,
    which hand each change to the data plane (where the queues' heads, tails and
    phases live, and their commands run)."""

    def __init__(self, data: DataPlane) -> None:
        self._data = data
        self._sqs: dict[int, IoSq] = {}
        self._cqs: dict[int, IoCq] = {}
        #: set while the controller keeps a journal (crash recovery)
        self.journal: Journal | None = None

    def sq(self, qid: int) -> IoSq | None:
        return self._sqs.get(qid)

    def cq(self, qid: int) -> IoCq | None:
        return self._cqs.get(qid)

    @property
    def sq_ids(self) -> Container[int]:
        return self._sqs

    @property
    def cq_ids(self) -> Container[int]:
        return self._cqs

    def cqs(self) -> list[IoCq]:
        return list(self._cqs.values())

    def __bool__(self) -> bool:
        return bool(self._sqs or self._cqs)

    def create_cq(self, cq: IoCq) -> None:
        """DmaError if its memory is not mapped."""
        if self.journal is not None:
            self.journal.reset_cq(cq.qid)
        self._data.create_cq(cq.qid, cq.base, cq.size, cq.vector, cq.interrupts_enabled)
        self._cqs[cq.qid] = cq

    def create_sq(self, sq: IoSq) -> None:
        """DmaError if its memory is not mapped."""
        if self.journal is not None:
            self.journal.reset_sq(sq.qid)
        self._data.create_sq(sq.qid, sq.base, sq.size, sq.cqid, sq.priority)
        self._sqs[sq.qid] = sq
        self._cqs[sq.cqid].sq_ids.add(sq.qid)

    def delete_sq(self, qid: int) -> None:
        self._data.delete_sq(qid)
        sq = self._sqs.pop(qid)
        self._cqs[sq.cqid].sq_ids.discard(qid)

    def delete_cq(self, qid: int) -> None:
        self._data.delete_cq(qid)
        del self._cqs[qid]

    def clear(self) -> None:
        """Forget every queue (a reset: the data plane's reset() dropped its own)."""
        self._sqs.clear()
        self._cqs.clear()

    def handover_state(self) -> dict[str, Any]:
        return {
            "cqs": [
                [c.qid, c.base, c.size, c.vector, c.interrupts_enabled] for c in self._cqs.values()
            ],
            "sqs": [[s.qid, s.base, s.size, s.cqid, s.priority] for s in self._sqs.values()],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Create a predecessor's queues again (in the data plane's restore())."""
        for qid, base, size, vector, ien in state["cqs"]:
            self.create_cq(IoCq(qid, base, size, vector, bool(ien)))
        for qid, base, size, cqid, priority in state["sqs"]:
            self.create_sq(IoSq(qid, base, size, cqid, priority))


def _queue_id_and_size(
    ctrl: Controller, dw: tuple[int, ...], existing: Container[int], allocated: int
) -> tuple[int, int]:
    """Check the QID (1..`allocated`, unused) and QSIZE of a Create I/O SQ/CQ command."""
    qid = dw[10] & 0xFFFF
    size = (dw[10] >> 16) + 1
    if qid == 0 or qid > allocated or qid in existing:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"queue id {qid}")
    if size < 2 or size > ctrl.config.max_queue_entries:
        raise CommandError(Status.INVALID_QUEUE_SIZE, f"queue size {size}")
    if not dw[11] & 1:
        raise CommandError(Status.INVALID_FIELD, "queues must be physically contiguous (CAP.CQR)")
    base = dw[6] | (dw[7] << 32)
    if base & _PAGE_MASK:
        raise CommandError(Status.PRP_OFFSET_INVALID, "queue base not page aligned")
    return qid, size


def _allocated(ctrl: Controller) -> tuple[int, int]:
    """(I/O SQs, I/O CQs) granted by the Number of Queues feature: NSQA and NCQA
    are separate limits."""
    nq = ctrl.features.current[FeatureId.NUMBER_OF_QUEUES]
    return (nq & 0xFFFF) + 1, (nq >> 16) + 1


def create_io_cq(ctrl: Controller, dw: tuple[int, ...]) -> int:
    qid, size = _queue_id_and_size(ctrl, dw, ctrl.io_queues.cq_ids, _allocated(ctrl)[1])
    vector = dw[11] >> 16
    interrupts_enabled = bool(dw[11] & 0x2)
    if vector >= ctrl.config.msix_vectors:
        raise CommandError(Status.INVALID_INTERRUPT_VECTOR, f"vector {vector}")
    if vector and not ctrl.interrupts.msix_enabled():
        # Without MSI-X there is one vector (INTx): IV 'shall be cleared to 0h'.
        raise CommandError(Status.INVALID_INTERRUPT_VECTOR, f"vector {vector} without MSI-X")
    try:
        ctrl.io_queues.create_cq(IoCq(qid, dw[6] | (dw[7] << 32), size, vector, interrupts_enabled))
    except DmaError as exc:
        raise CommandError(Status.DATA_TRANSFER_ERROR, f"CQ memory: {exc}") from exc
    return 0


def create_io_sq(ctrl: Controller, dw: tuple[int, ...]) -> int:
    qid, size = _queue_id_and_size(ctrl, dw, ctrl.io_queues.sq_ids, _allocated(ctrl)[0])
    cqid = dw[11] >> 16
    if ctrl.io_queues.cq(cqid) is None:
        raise CommandError(Status.COMPLETION_QUEUE_INVALID, f"CQ {cqid}")
    try:
        ctrl.io_queues.create_sq(
            IoSq(qid, dw[6] | (dw[7] << 32), size, cqid, priority=(dw[11] >> 1) & 0x3)
        )
    except DmaError as exc:
        raise CommandError(Status.DATA_TRANSFER_ERROR, f"SQ memory: {exc}") from exc
    return 0


def delete_io_sq(ctrl: Controller, dw: tuple[int, ...]) -> int:
    qid = dw[10] & 0xFFFF
    if qid == 0 or ctrl.io_queues.sq(qid) is None:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"SQ {qid}")
    # Base 5.6: commands of the queue not completed yet are either completed or
    # aborted before this command completes: the data plane runs those fetched to
    # completion and drops those not fetched with the queue (implicitly aborted).
    ctrl.io_queues.delete_sq(qid)
    return 0


def delete_io_cq(ctrl: Controller, dw: tuple[int, ...]) -> int:
    qid = dw[10] & 0xFFFF
    cq = ctrl.io_queues.cq(qid)
    if qid == 0 or cq is None:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"CQ {qid}")
    if cq.sq_ids:
        raise CommandError(Status.INVALID_QUEUE_DELETION, f"CQ {qid} still has SQs")
    ctrl.io_queues.delete_cq(qid)
    return 0


def doorbell_buffer_config(ctrl: Controller, dw: tuple[int, ...]) -> int:
    if ctrl.doorbell_words is not None:
        # Mapped doorbells never trap: there is nothing for shadows to save (OACS bit 8 clear).
        raise CommandError(Status.INVALID_OPCODE, "doorbells are mapped: no Doorbell Buffer Config")
    shadow_page = dw[6] | (dw[7] << 32)
    eventidx_page = dw[8] | (dw[9] << 32)
    if shadow_page & _PAGE_MASK or eventidx_page & _PAGE_MASK or shadow_page == eventidx_page:
        raise CommandError(Status.INVALID_FIELD, "doorbell buffers must be distinct pages")
    try:
        for page in (shadow_page, eventidx_page):
            view = ctrl.memory.view(page, PAGE_SIZE, True)
            if view is not None:
                view.release()
        ctrl.data.set_doorbell_buffers(shadow_page, eventidx_page)
        ctrl.doorbell_buffers = (shadow_page, eventidx_page)
    except DmaError as exc:
        # No data moves with this command: a buffer we cannot reach is a bad PRP field.
        raise CommandError(Status.INVALID_FIELD, f"doorbell buffer: {exc}") from exc
    log.info("shadow doorbells enabled (buffer %#x, EventIdx %#x)", shadow_page, eventidx_page)
    return 0


def abort(ctrl: Controller, dw: tuple[int, ...]) -> int:
    """Abort (Base 5.1): a command still waiting in its SQ is marked, and completes
    with Command Abort Requested instead of running when it is fetched (DW0 bit 0
    clear). A command that has been fetched runs to completion (its transfer may be
    in flight in an I/O engine: the kernel's I/O is not cancelled), so it is past
    aborting: 'not aborted' (DW0 bit 0 set)."""
    sqid, cid = dw[10] & 0xFFFF, dw[10] >> 16
    if sqid and ctrl.io_queues.sq(sqid) is None:
        raise CommandError(Status.INVALID_FIELD, f"SQ {sqid}")
    if len(ctrl.admin_aborts) + ctrl.data.marked_aborts() >= ctrl.config.abort_limit:
        raise CommandError(Status.ABORT_COMMAND_LIMIT_EXCEEDED)
    if sqid:
        return 0 if ctrl.data.abort(sqid, cid) else 1
    sq = ctrl.admin_sq
    assert sq is not None  # (admin commands run only while it exists)
    for index in range(sq.pending()):
        slot = (sq.head + index) % sq.size
        if int.from_bytes(sq.memory.read_entry(slot)[2:4], "little") == cid:
            ctrl.admin_aborts.add(cid)
            return 0
    return 1
