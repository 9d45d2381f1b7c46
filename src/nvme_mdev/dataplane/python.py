"""The Python data plane: the readable reference for the I/O queues' hot path.

Everything between a doorbell and an interrupt for the I/O queues, written to be read:
the queue table (nvme/queues.py's queues, created and deleted here), one pass of
round-robin arbitration over the submission queues, the I/O command set (nvme/io.py)
with its engine, the one place completions are written (`_complete`), MSI-X with
interrupt coalescing, and the polling thread (engine/poller.py). The native data
plane (native/) does the same, command for command, and is tested against this one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from ..backends.io_engine import IoEngine, Transfer
from ..engine.poller import IoThread
from ..guest_memory import DmaError, GuestMemory, MemoryChange
from ..handover.journal import Journal
from ..nvme.identity import ControllerConfig
from ..nvme.interrupts import InterruptSink
from ..nvme.io import (
    CDW0_FUSE,
    CDW0_FUSE_FIRST,
    CDW0_FUSE_SECOND,
    MISSING_FUSED,
    Completed,
    IoCommandSet,
    IoCounters,
)
from ..nvme.namespace import Namespace
from ..nvme.queues import (
    CompletionQueue,
    MappedDoorbell,
    ShadowDoorbell,
    SubmissionQueue,
    release_views,
)
from ..nvme.spec import SQE, SQE_SIZE, IoOpcode, Status, with_dnr
from ..statistics import ControllerStats
from . import IoSettings, QueuePosition, QueueState
from .events import CommandFailed, DataPlaneEvent, Fatal, InvalidDoorbell, StorageFailed

#: I/O commands whose NLB counts data moved between guest and storage (statistics)
DATA_OPCODES = frozenset((IoOpcode.READ, IoOpcode.WRITE, IoOpcode.COMPARE))
#: a command an Abort marked while it was queued: completed without running
ABORTED = Completed(with_dnr(Status.ABORT_REQUESTED), message="aborted while queued")
#: Base 5.2 Figure 148, Error Information
ERROR_INVALID_DOORBELL_REGISTER = 0x00
ERROR_INVALID_DOORBELL_VALUE = 0x01

Queue = SubmissionQueue | CompletionQueue


class PythonDataPlane:
    kind = "python"

    def __init__(
        self,
        config: ControllerConfig,
        memory: GuestMemory,
        interrupts: InterruptSink,
        namespaces: dict[int, Namespace],
        engine: IoEngine,
        notify: Callable[[], None],
        doorbell_words: memoryview | None = None,
        poll_timeout: float = 0.5,
    ) -> None:
        self.config = config
        self.memory = memory
        self.interrupts = interrupts
        #: the controller's table (changed only while this plane is paused)
        self.namespaces = namespaces
        self.engine = engine
        self._notify = notify
        #: BAR0's doorbell page as words, when the client maps it (no trapped doorbells)
        self.doorbell_words = doorbell_words
        self._counters = IoCounters()
        self.io = IoCommandSet(
            memory,
            namespaces,
            config.max_transfer,
            self._counters,
            config.max_namespaces,
            config.sgl_support,
        )
        self.io.engine = engine
        self.io.emit = self._emit
        self.io.passthrough = any(ns.passthrough for ns in namespaces.values())
        self.stats = ControllerStats(config.max_io_queues, config.msix_vectors)
        self.settings = IoSettings()
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        #: the I/O thread's view of the SQs, by QID: replaced whole, never mutated
        self._active: tuple[SubmissionQueue, ...] = ()
        #: (shadow doorbell page, EventIdx page), once Doorbell Buffer Config set them
        self.shadow_pages: tuple[int, int] | None = None
        self._keep_doorbells = False  # restoring a predecessor's queues (restore())
        self.journal: Journal | None = None
        #: (SQID, CID) of queued commands an Abort marked: completed unrun when fetched
        self.aborts: set[tuple[int, int]] = set()
        #: MSI-X vectors held back by interrupt coalescing: [completions, deadline ns]
        self._coalesced: dict[int, list[int]] = {}
        #: CQs with completions posted in this pass and not yet signalled
        self._touched: list[CompletionQueue] = []
        self._events: deque[DataPlaneEvent] = deque()
        self._events_lock = threading.Lock()
        #: the admin doorbells last seen in the mapped page (to wake the admin worker)
        self._admin_words = (0, 0)
        #: the controller is enabled (with mapped doorbells the thread then polls for good)
        self.enabled = False
        #: fatal: nothing is processed until reset()
        self.halted = False
        self.thread = IoThread(self, poll_timeout)

    # --- the thread -----------------------------------------------------------------------

    @property
    def poll_timeout(self) -> float:
        return self.thread.poll_timeout

    @poll_timeout.setter
    def poll_timeout(self, seconds: float) -> None:
        self.thread.poll_timeout = seconds

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()

    def close(self) -> None:
        self.stop()  # the thread is all it holds; the engine is the caller's

    def wake(self) -> None:
        self.thread.wake()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with self.thread.paused():
            self.drain()
            yield

    def process(self) -> int:
        n = self.process_pass()
        self.drain()
        return n

    def pin(self, cpus: set[int] | None) -> None:
        self.thread.pin(cpus)

    @property
    def cpus(self) -> set[int] | None:
        return self.thread.cpus

    @property
    def native_id(self) -> int | None:
        return self.thread.native_id

    # --- queues -----------------------------------------------------------------------------

    def create_cq(
        self, qid: int, base: int, size: int, vector: int, interrupts_enabled: bool
    ) -> None:
        cq = CompletionQueue(self.memory, qid, base, size, vector, interrupts_enabled)
        cq.journal = self.journal
        self._attach_doorbell(cq)
        with self.paused():
            self.cqs[qid] = cq

    def create_sq(self, qid: int, base: int, size: int, cqid: int, priority: int) -> None:
        cq = self.cqs[cqid]
        sq = SubmissionQueue(self.memory, qid, base, size, cq, priority, self.stats.queues[qid])
        sq.journal = self.journal
        self._attach_doorbell(sq)
        with self.paused():
            cq.sq_ids.add(qid)
            self.sqs[qid] = sq
            self._active = tuple(self.sqs[q] for q in sorted(self.sqs))

    def delete_sq(self, qid: int) -> None:
        # Base 5.6: the queue's commands that were fetched run to completion (a transfer
        # in flight is waited for and posted with its real status: the kernel cannot be
        # stopped from writing guest memory); those not fetched go with the queue.
        with self.paused():
            sq = self.sqs.pop(qid)
            self._active = tuple(self.sqs[q] for q in sorted(self.sqs))
            sq.cq.sq_ids.discard(qid)
            self.aborts = {(s, c) for s, c in self.aborts if s != qid}
            release_views([sq])

    def delete_cq(self, qid: int) -> None:
        with self.paused():
            release_views([self.cqs.pop(qid)])

    def set_journal(self, journal: Journal) -> None:
        with self.paused():
            self.journal = journal
            queues: list[Queue] = [*self.sqs.values(), *self.cqs.values()]
            for queue in queues:
                queue.journal = journal

    def positions(self) -> list[QueuePosition]:
        with self.paused():
            return [
                *(QueuePosition(q, False, sq.head, sq.tail) for q, sq in sorted(self.sqs.items())),
                *(
                    QueuePosition(q, True, cq.head, cq.tail, cq.phase)
                    for q, cq in sorted(self.cqs.items())
                ),
            ]

    def restore(self, create: Callable[[], None], positions: list[QueuePosition]) -> None:
        self._keep_doorbells = True
        try:
            create()
        finally:
            self._keep_doorbells = False
        for pos in positions:
            queue: Queue | None = self.cqs.get(pos.qid) if pos.is_cq else self.sqs.get(pos.qid)
            if queue is None or not 0 <= pos.head < queue.size or not 0 <= pos.tail < queue.size:
                raise ValueError(f"no queue for {pos}")
            queue.head, queue.tail = pos.head, pos.tail
            if isinstance(queue, CompletionQueue):
                queue.phase = pos.phase & 1

    def set_doorbell_buffers(self, shadow_page: int, eventidx_page: int) -> None:
        with self.paused():
            self.shadow_pages = (shadow_page, eventidx_page)
            queues: list[Queue] = [*self.sqs.values(), *self.cqs.values()]
            for queue in queues:
                if queue.shadow is not None:
                    queue.shadow.release()
                    queue.shadow = None
                self._attach_doorbell(queue)

    def _attach_doorbell(self, queue: Queue) -> None:
        """Point a queue at its shadow doorbell slots, seeded with its current index (or
        at its register in the mapped doorbell page). DmaError if they are unmapped."""
        index = 2 * queue.qid + (1 if isinstance(queue, CompletionQueue) else 0)
        if self.doorbell_words is not None:
            queue.shadow = MappedDoorbell(self.doorbell_words, 4 * index)
            if not self._keep_doorbells:
                queue.shadow.set_value(0)  # a new queue's doorbell starts at 0
            return
        if self.shadow_pages is None:
            return
        shadow_page, eventidx_page = self.shadow_pages
        shadow = ShadowDoorbell(self.memory, shadow_page + 4 * index, eventidx_page + 4 * index)
        if self._keep_doorbells:
            pass  # (restored: the guest's values stand)
        elif isinstance(queue, SubmissionQueue):
            shadow.set_value(queue.tail)
            shadow.set_event_index(queue.tail)
        else:
            shadow.set_value(queue.head)
            # With MSI-X the guest's CQ head matters only when a CQ is full, and then we
            # poll it; INTx ends only on a BAR access, so then every head update must ring.
            msix = self.interrupts.msix_enabled()
            shadow.set_event_index(queue.head - 1 if msix else queue.head)
        queue.shadow = shadow

    def doorbell(self, qid: int, is_cq: bool, value: int) -> bool:
        queue: Queue | None = self.cqs.get(qid) if is_cq else self.sqs.get(qid)
        if queue is None or value >= queue.size:
            return False
        self.stats.doorbell_traps += 1
        if self.doorbell_words is not None:
            # A client that did not map the page (or mapped it and also traps): the
            # register still holds what the guest wrote, where the poller looks.
            self.doorbell_words[2 * qid + int(is_cq)] = value
        if queue.shadow is not None:
            # The guest stored this value in the shadow doorbell before ringing, and may
            # have stored newer ones since (this write travelled over the socket): the
            # shadow is the truth, the MMIO write only says "look".
            if isinstance(queue, CompletionQueue) and not self.interrupts.msix_enabled():
                queue.refresh_head()  # (the caller recomputes the INTx level)
                # QEMU ends an INTx only on a BAR access: have the guest ring every time.
                queue.shadow.set_event_index(queue.head)
            self.wake()  # new commands, or room for completions that waited
            return True
        if isinstance(queue, CompletionQueue):
            if not queue.set_head(value):
                self._emit(InvalidDoorbell(ERROR_INVALID_DOORBELL_VALUE))
                return True
        else:
            queue.set_tail(value)
        self.wake()
        return True

    def abort(self, sqid: int, cid: int) -> bool:
        with self.paused():  # so the thread cannot fetch it between our look and our mark
            sq = self.sqs.get(sqid)
            if sq is None:
                return False
            sq.refresh_tail()
            for index in range(sq.pending()):
                slot = (sq.head + index) % sq.size
                if int.from_bytes(sq.memory.read_entry(slot)[2:4], "little") == cid:
                    self.aborts.add((sqid, cid))
                    return True
        return False

    def marked_aborts(self) -> int:
        return len(self.aborts)

    def enable(self) -> None:
        self.enabled = True
        self.wake()

    def halt(self) -> None:
        self.halted = True

    def reset(self) -> None:
        with self.thread.paused():
            self.drain(post=False)
            self.enabled = self.halted = False
            release_views([*self.sqs.values(), *self.cqs.values()])
            self.sqs.clear()
            self.cqs.clear()
            self._active = ()
            self.shadow_pages = None
            self.aborts.clear()
            self._coalesced.clear()
            if self.doorbell_words is not None:
                self.doorbell_words.cast("B")[:] = bytes(4 * len(self.doorbell_words))
                self._admin_words = (0, 0)

    def pending_interrupt(self) -> bool:
        return any(cq.interrupts_enabled and cq.has_unconsumed() for cq in self.cqs.values())

    # --- namespaces, memory, settings -------------------------------------------------------

    def attach_namespace(self, ns: Namespace) -> None:
        with self.paused():
            self.namespaces[ns.nsid] = ns
            self.io.gone.pop(ns.nsid, None)  # (storage the operator gave anew)
            if ns.passthrough:
                self.io.passthrough = True

    def detach_namespace(self, nsid: int) -> None:
        with self.paused():
            self.namespaces.pop(nsid, None)
            self.io.gone.pop(nsid, None)

    def update_namespace(self, ns: Namespace) -> None:
        pass  # the command set reads the Namespace itself

    def memory_changed(self, change: MemoryChange | None = None) -> None:
        pass  # queues look memory up again on next use after release_memory()

    def release_memory(self) -> None:
        with self.paused():
            release_views([*self.sqs.values(), *self.cqs.values()])

    def configure(self, settings: IoSettings) -> None:
        self.settings = settings
        self.io.write_cache = settings.write_cache

    # --- what the control side reads ----------------------------------------------------------

    def _emit(self, event: DataPlaneEvent) -> None:
        with self._events_lock:
            self._events.append(event)
        self._notify()

    def take_events(self) -> list[DataPlaneEvent]:
        with self._events_lock:
            events = list(self._events)
            self._events.clear()
        return events

    def queues(self) -> list[QueueState]:
        with self.paused():
            return [
                *(
                    QueueState(q, False, sq.size, sq.head, sq.tail)
                    for q, sq in sorted(self.sqs.items())
                ),
                *(
                    QueueState(q, True, cq.size, cq.head, cq.tail)
                    for q, cq in sorted(self.cqs.items())
                ),
            ]

    def counters(self) -> IoCounters:
        return self._counters

    def statistics(self) -> dict[str, Any]:
        polling_ns, parked_ns = self.thread.time_split_ns()
        snapshot = self.stats.snapshot(polling_ns, parked_ns, self._counters.host_errors)
        snapshot["data_plane"] = self.kind
        snapshot["direct_transfers"] = getattr(self.engine, "direct", 0)
        snapshot["slow_commands"] = 0  # (it is the slow path: the native plane's count)
        return snapshot

    # --- one pass (the I/O thread) ----------------------------------------------------------

    def process_pass(self) -> int:
        """One round-robin pass over the I/O submission queues, at most the Arbitration
        Burst of commands from each (Base 3.4.4). Returns commands fetched."""
        if self.halted:
            return 0
        done = 0
        io = self.io
        burst = self.settings.arbitration_burst
        clock = time.monotonic_ns
        complete = self._complete
        try:
            for sq in self._active:
                sq.refresh_tail()
                if sq.head == sq.tail:
                    continue
                cq = sq.cq
                slots = sq.memory.view()  # None: reachable by messages only
                seen = clock()
                n = 0
                while n < burst and sq.head != sq.tail and not cq.is_full():
                    # fetch(), inline: this runs for every command
                    if slots is not None:
                        dw = SQE.unpack_from(slots, sq.head * SQE_SIZE)
                    else:
                        dw = SQE.unpack(sq.memory.read_entry(sq.head))
                    if dw[0] & 0x100 and (taken := self._fused_operation(sq, dw, seen)):
                        if taken < 0:
                            break  # its second has not come yet, or no room for both
                        n += taken
                        continue
                    sq.head = 0 if sq.head + 1 == sq.size else sq.head + 1
                    if sq.journal is not None:
                        sq.journal.fetched(sq.qid, sq.head, dw[0] >> 16)
                    n += 1
                    if self.aborts and (sq.qid, dw[0] >> 16) in self.aborts:
                        self.aborts.discard((sq.qid, dw[0] >> 16))
                        complete(sq, dw, ABORTED, seen)
                        continue
                    outcome = io.execute(dw)
                    if isinstance(outcome, Completed):
                        complete(sq, dw, outcome, seen)
                    else:  # submitted: completed when the engine hands it back
                        outcome.context = (sq, dw, seen)
                        cq.reserved += 1
                if n:
                    done += n
                    # Keep the guest from ringing while we poll.
                    sq.suppress_notification()
            engine = self.engine
            if engine.in_flight:
                engine.submit()  # the whole pass in one system call
                self._finish(engine.reap(), post=True)
        except DmaError as exc:
            self._fatal(f"I/O queue memory: {exc}")
        self._signal_touched()
        if self._coalesced:
            self.flush_coalesced_interrupts(force=False)
        return done

    def _fused_operation(self, sq: SubmissionQueue, first: tuple[int, ...], seen: int) -> int:
        """The entry at the head of `sq` is the first of a fused operation (FUSE 01b; or
        11b): run it with its second as one unit. Returns the entries taken; 0 if the
        usual path takes this one (FUSE 11b, not a Compare, or an Abort marked it); -1
        if it stays in the SQ, unfetched, until its second arrives (a guest may ring
        between the two) or the CQ has room for both completions."""
        sq.fused_wait = -1
        if (
            first[0] & CDW0_FUSE != CDW0_FUSE_FIRST
            or first[0] & 0xFF != IoOpcode.COMPARE  # (no such operation: refused at once)
            or (self.aborts and (sq.qid, first[0] >> 16) in self.aborts)
        ):
            return 0
        after = 0 if sq.head + 1 == sq.size else sq.head + 1
        if after == sq.tail:
            sq.fused_wait = sq.tail  # nothing new for the poller until the tail moves
            return -1
        second = SQE.unpack(sq.memory.read_entry(after))
        if second[0] & CDW0_FUSE != CDW0_FUSE_SECOND or (
            self.aborts and (sq.qid, second[0] >> 16) in self.aborts
        ):
            sq.fetch()
            self._complete(sq, first, MISSING_FUSED, seen)
            return 1  # the next entry goes the usual way
        cq = sq.cq
        cq.reserved += 1  # (is_full() asks for room for one beside the reserved)
        try:
            if cq.is_full():
                return -1
        finally:
            cq.reserved -= 1
        sq.fetch()
        sq.fetch()
        # Atomic against every other command of this controller: nothing in flight, and
        # nothing else submitted until both are done (this thread runs them).
        self.drain()
        if self.halted:
            return 2
        compared, written = self.io.fused(first, second)
        self._complete(sq, first, compared, seen)
        self._complete(sq, second, written, seen)
        return 2

    def _finish(self, transfers: list[Transfer], post: bool) -> None:
        """Complete the commands whose transfers the engine hands back. Every transfer
        goes back to the engine, whatever happens to its completion."""
        io, engine = self.io, self.engine
        unreachable: DmaError | None = None
        for t in transfers:
            sq, dw, seen = t.context
            sq.cq.reserved -= 1
            try:
                completion = io.finish(t)
                if post:
                    self._complete(sq, dw, completion, seen)
            except DmaError as exc:
                unreachable = exc  # the CQ's memory: fatal, once all are released
            finally:
                engine.release(t)
        if unreachable is not None:
            raise unreachable

    def _complete(
        self, sq: SubmissionQueue, dw: tuple[int, ...], completion: Completed, seen: int
    ) -> None:
        """The one place an I/O completion is written: the CQE, the statistics, the
        error log's event; the CQ's interrupt goes out at the end of the pass."""
        cq = sq.cq
        status = completion.status
        cq.post(completion.dw0, 0, sq.head, sq.qid, dw[0] >> 16, status)
        opcode = dw[0] & 0xFF
        nbytes = 0
        if status:
            self._emit(CommandFailed(sq.qid, dw[0] >> 16, status, dw[1], completion.lba))
        elif opcode in DATA_OPCODES:
            ns = self.namespaces.get(dw[1])
            if ns is not None:
                nbytes = ((dw[12] & 0xFFFF) + 1) << ns.lba_shift
        sq.stats.record(opcode, nbytes, bool(status), time.monotonic_ns() - seen)
        cq.unsignalled += 1
        if cq.unsignalled == 1:
            self._touched.append(cq)

    def drain(self, post: bool = True) -> None:
        """Wait for every transfer in flight and complete its command (the I/O thread,
        or a thread that holds it paused)."""
        engine = self.engine
        if not engine.in_flight:
            return
        engine.submit()
        try:
            while engine.in_flight:
                transfers = engine.reap(wait=True)
                if not transfers:
                    break  # nothing left in the kernel (never wait for what cannot come)
                self._finish(transfers, post)
        except DmaError as exc:
            self._fatal(f"I/O queue memory: {exc}")
        self._signal_touched()

    def _fatal(self, reason: str) -> None:
        self.halted = True
        self._emit(Fatal(reason))

    # --- interrupts -------------------------------------------------------------------------

    def _signal_touched(self) -> None:
        for cq in self._touched:
            self._signal(cq)
        self._touched.clear()

    def _signal(self, cq: CompletionQueue) -> None:
        """Tell the guest about new completions on `cq`: MSI-X (one message per pass,
        fewer if the host asked for interrupt coalescing); without MSI-X the control
        side recomputes the INTx level."""
        count, cq.unsignalled = cq.unsignalled, 0
        if not cq.interrupts_enabled:
            return
        if not self.interrupts.msix_enabled():
            self._notify()
            return
        vector = cq.vector
        s = self.settings
        if s.coalescing_threshold and s.coalescing_time and vector not in s.coalescing_disabled:
            pending = self._coalesced.get(vector)
            if pending is None:
                deadline = time.monotonic_ns() + s.coalescing_time * 100_000
                pending = self._coalesced[vector] = [0, deadline]
            pending[0] += max(count, 1)
            if pending[0] <= s.coalescing_threshold and time.monotonic_ns() < pending[1]:
                return
            del self._coalesced[vector]
        self.stats.interrupts[vector] += 1
        self.interrupts.signal(vector)

    def flush_coalesced_interrupts(self, force: bool) -> None:
        """Send the interrupts coalescing held back past their aggregation time (all of
        them with `force`: the I/O thread is about to park)."""
        now = time.monotonic_ns()
        for vector, (_, deadline) in list(self._coalesced.items()):
            if force or now >= deadline:
                del self._coalesced[vector]
                self.stats.interrupts[vector] += 1
                self.interrupts.signal(vector)

    # --- what the polling thread asks -------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self.engine.in_flight

    def wait_io(self, timeout_ns: int) -> None:
        self.engine.wait(timeout_ns)

    @property
    def polls_doorbells(self) -> bool:
        """Whether I/O submissions can arrive without a trapped doorbell write."""
        return self.shadow_pages is not None or self.doorbell_words is not None

    def poll_mapped_doorbells(self) -> None:
        """With mapped doorbells nothing traps: the admin doorbells and (for INTx, which
        must drop once the guest has consumed every entry) the CQ heads are watched."""
        words = self.doorbell_words
        if words is None:
            return
        admin = (words[0], words[1])
        if admin != self._admin_words:
            self._admin_words = admin
            self._notify()
        if not self.interrupts.msix_enabled():
            for cq in self.cqs.values():
                if not cq.interrupts_enabled:
                    continue  # a polled CQ never moves the INTx level
                head = cq.head
                cq.refresh_head()
                if cq.head != head:
                    self._notify()

    def io_pending(self) -> bool:
        """Whether any I/O submission queue has commands (reads shadow doorbells)."""
        for sq in self._active:
            sq.refresh_tail()
            if sq.has_work():
                return True
        return False

    def enable_notifications(self) -> bool:
        """Arm every queue's EventIdx before parking; True if commands arrived meanwhile."""
        waiting = False
        for sq in self._active:
            waiting |= sq.enable_notification()
        return waiting

    def suppress_notifications(self) -> None:
        for sq in self._active:
            sq.suppress_notification()

    @property
    def polls_forever(self) -> bool:
        """Mapped doorbells never trap, so nothing would wake a parked thread: it polls
        for as long as the controller is enabled (disabled, it parks: enabling wakes it)."""
        return self.doorbell_words is not None and self.enabled and not self.halted


__all__ = ["PythonDataPlane", "StorageFailed"]
