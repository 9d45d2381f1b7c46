"""Queue management admin commands (NVMe Base 5.4, 5.5, 5.6, 5.7, 5.9):
Create/Delete I/O Completion/Submission Queue, Doorbell Buffer Config, Abort."""

from __future__ import annotations

import logging
from collections.abc import Container
from typing import TYPE_CHECKING

from ...guest_memory import DmaError
from ..errors import CommandError
from ..queues import (
    CompletionQueue,
    MappedDoorbell,
    ShadowDoorbell,
    SubmissionQueue,
    release_views,
)
from ..spec import PAGE_SIZE, FeatureId, Status

if TYPE_CHECKING:
    from ..controller import Controller

_PAGE_MASK = PAGE_SIZE - 1
log = logging.getLogger(__name__)


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
    qid, size = _queue_id_and_size(ctrl, dw, ctrl.io_cqs, _allocated(ctrl)[1])
    vector = dw[11] >> 16
    interrupts_enabled = bool(dw[11] & 0x2)
    if vector >= ctrl.config.msix_vectors:
        raise CommandError(Status.INVALID_INTERRUPT_VECTOR, f"vector {vector}")
    if vector and not ctrl.interrupts.msix_enabled():
        # Without MSI-X there is one vector (INTx): IV 'shall be cleared to 0h'.
        raise CommandError(Status.INVALID_INTERRUPT_VECTOR, f"vector {vector} without MSI-X")
    try:
        cq = CompletionQueue(
            ctrl.memory, qid, dw[6] | (dw[7] << 32), size, vector, interrupts_enabled
        )
    except DmaError as exc:
        raise CommandError(Status.DATA_TRANSFER_ERROR, f"CQ memory: {exc}") from exc
    _attach_shadow(ctrl, cq)
    ctrl.io_cqs[qid] = cq
    return 0


def create_io_sq(ctrl: Controller, dw: tuple[int, ...]) -> int:
    qid, size = _queue_id_and_size(ctrl, dw, ctrl.io_sqs, _allocated(ctrl)[0])
    cqid = dw[11] >> 16
    cq = ctrl.io_cqs.get(cqid)
    if cq is None:
        raise CommandError(Status.COMPLETION_QUEUE_INVALID, f"CQ {cqid}")
    try:
        sq = SubmissionQueue(
            ctrl.memory,
            qid,
            dw[6] | (dw[7] << 32),
            size,
            cq,
            priority=(dw[11] >> 1) & 0x3,
            stats=ctrl.stats.queues[qid],
        )
    except DmaError as exc:
        raise CommandError(Status.DATA_TRANSFER_ERROR, f"SQ memory: {exc}") from exc
    _attach_shadow(ctrl, sq)
    with ctrl.io_thread.paused():
        cq.sq_ids.add(qid)
        ctrl.io_sqs[qid] = sq
        ctrl.active_io_sqs = tuple(ctrl.io_sqs[q] for q in sorted(ctrl.io_sqs))
    return 0


def delete_io_sq(ctrl: Controller, dw: tuple[int, ...]) -> int:
    qid = dw[10] & 0xFFFF
    sq = ctrl.io_sqs.get(qid)
    if qid == 0 or sq is None:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"SQ {qid}")
    # Base 5.6: commands of the queue not completed yet are either completed or
    # aborted before this command completes. Those fetched run to completion (an I/O
    # engine's transfers in flight are waited for and posted with their real status:
    # the kernel cannot be stopped from writing guest memory); those not fetched are
    # dropped with the queue (implicitly aborted).
    with ctrl.io_quiesced():
        del ctrl.io_sqs[qid]
        ctrl.active_io_sqs = tuple(ctrl.io_sqs[q] for q in sorted(ctrl.io_sqs))
        sq.cq.sq_ids.discard(qid)
        release_views([sq])
    return 0


def delete_io_cq(ctrl: Controller, dw: tuple[int, ...]) -> int:
    qid = dw[10] & 0xFFFF
    cq = ctrl.io_cqs.get(qid)
    if qid == 0 or cq is None:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"CQ {qid}")
    if cq.sq_ids:
        raise CommandError(Status.INVALID_QUEUE_DELETION, f"CQ {qid} still has SQs")
    with ctrl.io_thread.paused():
        del ctrl.io_cqs[qid]
        release_views([cq])
    return 0


def _doorbell_slot(ctrl: Controller, queue: SubmissionQueue | CompletionQueue) -> int:
    index = 2 * queue.qid + (1 if isinstance(queue, CompletionQueue) else 0)
    return index * 4  # CAP.DSTRD = 0


def _attach_shadow(ctrl: Controller, queue: SubmissionQueue | CompletionQueue) -> None:
    """Point a queue at its shadow doorbell slots, seeded with its current index
    (or at its register in the mapped doorbell page)."""
    if ctrl.doorbell_words is not None:
        queue.shadow = MappedDoorbell(ctrl.doorbell_words, _doorbell_slot(ctrl, queue))
        queue.shadow.set_value(0)  # a new queue's doorbell starts at 0, whatever was there
        return
    if ctrl.shadow_doorbells is None:
        return
    shadow_page, eventidx_page = ctrl.shadow_doorbells
    slot = _doorbell_slot(ctrl, queue)
    try:
        shadow = ShadowDoorbell(ctrl.memory, shadow_page + slot, eventidx_page + slot)
    except DmaError as exc:
        raise CommandError(Status.DATA_TRANSFER_ERROR, f"shadow doorbell: {exc}") from exc
    if isinstance(queue, SubmissionQueue):
        shadow.set_value(queue.tail)
        shadow.set_event_index(queue.tail)
    else:
        shadow.set_value(queue.head)
        # With MSI-X the guest's CQ head matters only when a CQ is full, and then we
        # poll it; INTx ends only on a BAR access, so then every head update must ring.
        msix = ctrl.interrupts.msix_enabled()
        shadow.set_event_index(queue.head - 1 if msix else queue.head)
    queue.shadow = shadow


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
    except DmaError as exc:
        # No data moves with this command: a buffer we cannot reach is a bad PRP field.
        raise CommandError(Status.INVALID_FIELD, f"doorbell buffer: {exc}") from exc
    with ctrl.io_thread.paused():
        ctrl.shadow_doorbells = (shadow_page, eventidx_page)
        queues: list[SubmissionQueue | CompletionQueue] = [
            *ctrl.io_sqs.values(),
            *ctrl.io_cqs.values(),
        ]
        for queue in queues:
            if queue.shadow is not None:
                queue.shadow.release()
                queue.shadow = None
            _attach_shadow(ctrl, queue)
    log.info("shadow doorbells enabled (buffer %#x, EventIdx %#x)", shadow_page, eventidx_page)
    return 0


def abort(ctrl: Controller, dw: tuple[int, ...]) -> int:
    """Abort (Base 5.1): a command still waiting in its SQ is marked, and completes
    with Command Abort Requested instead of running when it is fetched (DW0 bit 0
    clear). A command that has been fetched runs to completion (its transfer may be
    in flight in an I/O engine: the kernel's I/O is not cancelled), so it is past
    aborting: 'not aborted' (DW0 bit 0 set)."""
    sqid, cid = dw[10] & 0xFFFF, dw[10] >> 16
    sq = ctrl.admin_sq if sqid == 0 else ctrl.io_sqs.get(sqid)
    if sq is None:
        raise CommandError(Status.INVALID_FIELD, f"SQ {sqid}")
    if len(ctrl.aborts) >= ctrl.config.abort_limit:
        raise CommandError(Status.ABORT_COMMAND_LIMIT_EXCEEDED)
    # Paused, the I/O thread cannot fetch the command between our look and our mark.
    with ctrl.io_thread.paused():
        sq.refresh_tail()
        for index in range(sq.pending()):
            slot = (sq.head + index) % sq.size
            if int.from_bytes(sq.memory.read_entry(slot)[2:4], "little") == cid:
                ctrl.aborts.add((sqid, cid))
                return 0
    return 1
