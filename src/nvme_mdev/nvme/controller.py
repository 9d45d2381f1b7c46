"""The NVMe controller model: properties, the enable/reset/shutdown/fatal state
machine (NVMe Base 3.5), queues, and command dispatch.

The model does no I/O of its own and owns no thread. Its callers are:
- the PCI function, for property and doorbell accesses (`mmio_read`, `mmio_write`);
- the engine's admin worker (`process_admin`) and I/O thread (`process_io`);
- the control plane (namespaces, events).
Guest memory, interrupts and storage are adapters handed in at construction.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from ..backends.io_engine import IoEngine, Request, SyncEngine
from ..guest_memory import DmaError, GuestMemory
from ..statistics import ControllerStats
from . import registers as regs
from .admin import events, features, identify, log_pages
from .admin import queues as queue_admin
from .errors import CommandError, ControllerFatal
from .identity import ControllerConfig
from .interrupts import InterruptSink
from .io import IoCommandSet, IoCounters
from .media_errors import HostFailure
from .namespace import Namespace
from .queues import CompletionQueue, MappedDoorbell, SubmissionQueue, release_views
from .spec import (
    CSS_ADMIN_ONLY,
    CSS_NVM,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_COMPLETE,
    CSTS_SHST_NORMAL,
    DNR,
    DOORBELL_BASE,
    PAGE_SIZE,
    SQE,
    SQE_SIZE,
    AdminOpcode,
    FeatureId,
    IoOpcode,
    LogPage,
    Reg,
    Status,
    with_dnr,
)

log = logging.getLogger(__name__)

#: I/O commands whose NLB counts data moved between guest and storage (statistics)
DATA_OPCODES = frozenset((IoOpcode.READ, IoOpcode.WRITE, IoOpcode.COMPARE))


AdminHandler = Callable[["Controller", tuple[int, ...]], int]


class IoThreadHooks(Protocol):
    """What the controller needs from whoever runs its I/O queues."""

    def wake(self) -> None:
        """New work may be in an I/O queue."""
        ...

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """No I/O queue is being processed while this is held."""
        ...


class _Inline:
    """No I/O thread: tests drive process_io() themselves."""

    def wake(self) -> None:
        pass

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        yield


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        memory: GuestMemory,
        interrupts: InterruptSink,
        namespaces: list[Namespace] | None = None,
        doorbell_words: memoryview | None = None,
        io_engine: IoEngine | None = None,
    ) -> None:
        self.config = config
        #: BAR0's doorbell page as 32-bit words (see words32) when the client maps it
        #: (no trapped doorbells at all): word 0 is the admin SQ tail doorbell (BAR0 1000h)
        self.doorbell_words = doorbell_words
        self.memory = memory
        self.interrupts = interrupts
        self.io_thread: IoThreadHooks = _Inline()
        #: woken when an admin doorbell is rung or an event is queued
        self.admin_doorbell = threading.Event()
        # Serialises property writes, admin commands and resets against each other.
        self.lock = threading.RLock()
        self.registers = regs.RegisterFile(
            cap=regs.Capabilities(mqes=config.max_queue_entries - 1, timeout_500ms=10).encode()
        )
        self.namespaces: dict[int, Namespace] = {}
        self.counters = IoCounters()
        self.io = IoCommandSet(
            memory, self.namespaces, config.max_transfer, self.counters, config.max_namespaces
        )
        for ns in namespaces or []:
            self.add_namespace(ns)
        #: runs Read and Write transfers: synchronously, or many in flight (io_uring)
        self.engine: IoEngine = io_engine if io_engine is not None else SyncEngine()
        self.io.engine = self.engine
        self.features = features.FeatureState(config)
        self.io.write_cache_enabled = lambda: self.features.volatile_write_cache
        self.io.storage_event = self._storage_event
        self.events = events.AsyncEvents(config.aer_limit)
        self.error_log = log_pages.ErrorLog(config.error_log_entries)
        self.changed_namespaces: set[int] = set()
        self.power_on_time = time.monotonic()
        self.power_cycles = 1
        self.unsafe_shutdowns = 0
        self.admin_sq: SubmissionQueue | None = None
        self.admin_cq: CompletionQueue | None = None
        self.io_sqs: dict[int, SubmissionQueue] = {}
        self.io_cqs: dict[int, CompletionQueue] = {}
        #: the I/O thread's view: replaced whole, never mutated, so it reads without locks
        self.active_io_sqs: tuple[SubmissionQueue, ...] = ()
        self.shadow_doorbells: tuple[int, int] | None = None  # (shadow page, eventidx page)
        self.stats = ControllerStats(config.max_io_queues, config.msix_vectors)
        #: (SQID, CID) of queued commands an Abort marked: completed unrun when fetched
        self.aborts: set[tuple[int, int]] = set()
        #: MSI-X vectors held back by interrupt coalescing: [completions, deadline ns]
        self._coalesced: dict[int, list[int]] = {}
        self._admin_handlers: dict[int, AdminHandler] = {
            AdminOpcode.IDENTIFY: identify.identify,
            AdminOpcode.GET_LOG_PAGE: log_pages.get_log_page,
            AdminOpcode.GET_FEATURES: features.get_features,
            AdminOpcode.SET_FEATURES: features.set_features,
            AdminOpcode.CREATE_IO_CQ: queue_admin.create_io_cq,
            AdminOpcode.CREATE_IO_SQ: queue_admin.create_io_sq,
            AdminOpcode.DELETE_IO_SQ: queue_admin.delete_io_sq,
            AdminOpcode.DELETE_IO_CQ: queue_admin.delete_io_cq,
            AdminOpcode.DOORBELL_BUFFER_CONFIG: queue_admin.doorbell_buffer_config,
            AdminOpcode.ASYNC_EVENT_REQUEST: events.async_event_request,
            AdminOpcode.ABORT: queue_admin.abort,
            AdminOpcode.KEEP_ALIVE: _keep_alive,
        }

    # --- namespaces ---------------------------------------------------------

    def add_namespace(self, ns: Namespace) -> None:
        if not 1 <= ns.nsid <= self.config.max_namespaces:
            raise ValueError(f"nsid {ns.nsid} outside 1..{self.config.max_namespaces}")
        if ns.nsid in self.namespaces:
            raise ValueError(f"nsid {ns.nsid} already in use")
        if ns.passthrough:
            self._check_passthrough(ns)
            self.io.passthrough = True
        self.namespaces[ns.nsid] = ns

    def _check_passthrough(self, ns: Namespace) -> None:
        """A passthrough command reaches the host's queue whole (nothing splits it):
        the host must take our largest transfer, in as many pieces as a PRP list of
        it has pages (the kernel maps each page of guest memory as a segment)."""
        limit = getattr(ns.backend, "max_transfer", None) or self.config.max_transfer
        segments = getattr(ns.backend, "max_segments", None)
        if segments:
            limit = min(limit, (segments - 1) * PAGE_SIZE)
        if self.config.max_transfer > limit:
            mdts = max(0, (limit // PAGE_SIZE).bit_length() - 1)
            raise ValueError(
                f"{ns.backend.description}: the host's queue takes at most {limit} bytes "
                f"per command, less than this controller's MDTS ({self.config.max_transfer}"
                f" bytes): give the controller mdts {mdts} or less"
            )

    def attach_namespace(self, ns: Namespace) -> None:
        """Hot add: `ns` is active at once, and the host is told (Namespace Attribute
        Changed event, Changed Namespace List log) so that it rescans without a reset."""
        # Pause first, then lock: waiting for the I/O thread with the lock held could
        # wait on a DMA message the transport thread (blocked on the lock) never reads.
        with self.io_thread.paused(), self.lock:
            self.add_namespace(ns)
            self._namespace_changed(ns.nsid)

    def detach_namespace(self, nsid: int) -> Namespace:
        """Hot remove: commands already fetched have completed (the I/O thread is held
        between commands while this runs); later ones fail with Invalid Namespace.
        The caller flushes and closes the returned namespace's backend."""
        with self.io_quiesced(), self.lock:
            ns = self.namespaces.pop(nsid, None)
            if ns is None:
                raise ValueError(f"nsid {nsid} is not attached")
            self._namespace_changed(nsid)
        return ns

    def resize_namespace(self, nsid: int, size: int) -> bool:
        """The storage under `nsid` now holds `size` bytes (a rescan). If that changes
        its block count (NSZE, NCAP, NUSE), the host is told as for a hot add, so that
        it revalidates without a reset. Returns whether it was told."""
        with self.io_thread.paused(), self.lock:
            ns = self.namespaces.get(nsid)
            if ns is None:
                raise ValueError(f"nsid {nsid} is not attached")
            changed = ns.resize(size)
            if changed:
                self._namespace_changed(nsid)
        return changed

    def _namespace_changed(self, nsid: int) -> None:
        with self.events.lock:
            self.changed_namespaces.add(nsid)
        self.events.notice(
            events.NOTICE_NAMESPACE_ATTRIBUTE_CHANGED, LogPage.CHANGED_NAMESPACE_LIST, self
        )

    # --- host storage events and health ------------------------------------------

    def _storage_event(self, ns: Namespace, failure: HostFailure, reason: str) -> None:
        """A backend failure changed what `ns` is (media_errors.py). Runs on the I/O
        thread, between commands: it must not take the controller lock."""
        before = self.critical_warning()
        if failure.gone and ns.failure is None:
            log.error("nsid %d: storage gone, failing every command: %s", ns.nsid, reason)
            ns.failure = reason
        if failure.read_only and not ns.readonly:
            log.error("nsid %d: storage went read-only: %s", ns.nsid, reason)
            ns.host_read_only = reason
            ns.readonly = True
            self._namespace_changed(ns.nsid)  # NSATTR changed: Linux marks the disk ro
        self.events.smart_warning(self.critical_warning() & ~before, self)

    def critical_warning(self) -> int:
        """SMART / Health Critical Warning from the namespaces' storage: reliability
        degraded while any is gone; read-only when the host's storage made every
        namespace read-only (or gone) and at least one was writable."""
        warning = 0
        namespaces = list(self.namespaces.values())
        if any(ns.failure is not None for ns in namespaces):
            warning |= events.CRITICAL_WARNING_RELIABILITY_DEGRADED
        if any(ns.host_read_only for ns in namespaces) and all(
            ns.readonly or ns.failure is not None for ns in namespaces
        ):
            warning |= events.CRITICAL_WARNING_READ_ONLY
        return warning

    # --- properties (BAR0) ----------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        if offset >= DOORBELL_BASE:
            return 0  # doorbells are write-only
        with self.lock:
            return self.registers.read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if size == 8:  # two properties, or two doorbells, written at once
            self.mmio_write(offset, 4, value & 0xFFFFFFFF)
            self.mmio_write(offset + 4, 4, value >> 32)
            return
        if offset >= DOORBELL_BASE:
            self._doorbell_write(offset, value & 0xFFFFFFFF)
            return
        with self.lock:
            self._property_write(offset, value & 0xFFFFFFFF)

    def _property_write(self, offset: int, value: int) -> None:
        r = self.registers
        if offset == Reg.CC:
            self._cc_write(value)
        elif offset == Reg.INTMS:
            r.intms |= value
            self._update_intx()
        elif offset == Reg.INTMC:
            r.intms &= ~value
            self._update_intx()
        elif offset == Reg.AQA:
            r.aqa = value & 0x0FFF0FFF
        elif offset in (Reg.ASQ, Reg.ASQ + 4, Reg.ACQ, Reg.ACQ + 4):
            base = offset & ~0x7
            shift = 32 if offset & 4 else 0
            old = r.asq if base == Reg.ASQ else r.acq
            new = (old & ~(0xFFFFFFFF << shift)) | (value << shift)
            new &= ~0xFFF  # 4 KiB aligned: bits 11:0 are reserved
            if base == Reg.ASQ:
                r.asq = new
            else:
                r.acq = new
        elif offset == Reg.NSSR:
            pass  # NVM Subsystem Reset is not supported (CAP.NSSRS = 0)
        # everything else is read-only

    def _cc_write(self, value: int) -> None:
        r = self.registers
        old = r.cc
        r.cc = value & regs.CC_WRITABLE
        if regs.cc_enabled(old) and not regs.cc_enabled(value):
            self.reset()
            r.cc = value & regs.CC_WRITABLE
            return
        if not regs.cc_enabled(old) and regs.cc_enabled(value):
            self._enable()
        if regs.cc_shn(value) and not regs.cc_shn(old):
            self._shutdown()
        elif not regs.cc_shn(value) and regs.cc_shn(old):
            r.csts = regs.with_shst(r.csts, CSTS_SHST_NORMAL)

    def _enable(self) -> None:
        r = self.registers
        if r.fatal:
            return
        problem = self._enable_problem()
        if problem:
            log.warning("controller enable refused: %s", problem)
            r.csts |= CSTS_CFS
            return
        try:
            self.admin_cq = CompletionQueue(
                self.memory, 0, r.acq, r.admin_cq_size(), vector=0, interrupts_enabled=True
            )
            self.admin_sq = SubmissionQueue(self.memory, 0, r.asq, r.admin_sq_size(), self.admin_cq)
        except DmaError as exc:
            log.warning("controller enable refused: admin queue memory: %s", exc)
            r.csts |= CSTS_CFS
            return
        self.admin_cq.sq_ids.add(0)
        if self.doorbell_words is not None:
            self.admin_sq.shadow = MappedDoorbell(self.doorbell_words, 0)
            self.admin_cq.shadow = MappedDoorbell(self.doorbell_words, 4)
        r.csts |= CSTS_RDY
        self.io_thread.wake()  # with mapped doorbells it polls from now on

    def _enable_problem(self) -> str:
        r = self.registers
        if regs.cc_mps(r.cc) != 0:
            return "CC.MPS: only 4 KiB pages are supported"
        if regs.cc_css(r.cc) not in (CSS_NVM, CSS_ADMIN_ONLY):
            return "CC.CSS: unsupported command set"
        if regs.cc_shn(r.cc):
            return "CC.SHN set while enabling"
        if (r.aqa & 0xFFF) == 0 or ((r.aqa >> 16) & 0xFFF) == 0:
            return "AQA: admin queues need at least 2 entries"
        return ""

    def _shutdown(self) -> None:
        """Normal or abrupt shutdown: stop processing and make all data durable."""
        r = self.registers
        with self.io_quiesced():
            for ns in self.namespaces.values():
                with contextlib.suppress(OSError):
                    ns.backend.flush()
        r.csts = regs.with_shst(r.csts, CSTS_SHST_COMPLETE)

    def reset(self) -> None:
        """Controller Level Reset (CC.EN 1 → 0, FLR, DEVICE_RESET). Transfers in flight
        are waited for (the kernel is writing guest memory) and complete unposted: a
        reset aborts every outstanding command."""
        with self.lock, self.io_quiesced(post=False):
            queues: list[SubmissionQueue | CompletionQueue] = [
                *self.io_sqs.values(),
                *self.io_cqs.values(),
            ]
            if self.admin_sq and self.admin_cq:
                queues += [self.admin_sq, self.admin_cq]
            release_views(queues)
            self.io_sqs.clear()
            self.io_cqs.clear()
            self.active_io_sqs = ()
            self.admin_sq = self.admin_cq = None
            self.shadow_doorbells = None
            self.aborts.clear()
            if self.doorbell_words is not None:
                self.doorbell_words.cast("B")[:] = bytes(4 * len(self.doorbell_words))
            self._coalesced.clear()
            self.features.reset()
            self.events.reset()
            self.registers.reset()
            self.interrupts.set_intx(False)

    @contextlib.contextmanager
    def io_quiesced(self, post: bool = True) -> Iterator[None]:
        """The I/O thread held between commands and no transfer left in flight: each one
        the engine still runs is waited for and completed (posted, unless `post` is
        False or the controller is fatal)."""
        with self.io_thread.paused():
            self.drain_io(post)
            yield

    def drain_io(self, post: bool = True) -> None:
        """Wait for every transfer in flight and complete its command (from the I/O
        thread, or from a thread that holds it paused)."""
        engine = self.engine
        if not engine.in_flight:
            return
        post = post and not self.registers.csts & CSTS_CFS
        touched: list[CompletionQueue] = []
        engine.submit()
        while engine.in_flight:
            requests = engine.reap(wait=True)
            if not requests:
                break  # nothing left in the kernel (never wait for what cannot come)
            self._complete_requests(requests, touched, post)
        for cq in touched:
            self.signal(cq)

    def fatal(self, reason: str) -> None:
        """Controller Fatal Status: the host must reset us."""
        log.error("controller fatal: %s", reason)
        self.registers.csts |= CSTS_CFS

    def release_memory_views(self) -> None:
        """Drop every cached view of guest memory (the transport is about to unmap).
        Queues resolve their memory again on next use. Transfers in flight finish first:
        the kernel must be done with guest memory before it goes."""
        with self.lock, self.io_quiesced():
            queues: list[SubmissionQueue | CompletionQueue] = [
                *self.io_sqs.values(),
                *self.io_cqs.values(),
            ]
            if self.admin_sq and self.admin_cq:
                queues += [self.admin_sq, self.admin_cq]
            release_views(queues)

    # --- doorbells ---------------------------------------------------------------

    def _doorbell_write(self, offset: int, value: int) -> None:
        index = (offset - DOORBELL_BASE) >> 2
        qid, is_cq = index >> 1, bool(index & 1)
        if not self.registers.ready or self.registers.fatal:
            return
        self.stats.doorbell_traps += 1
        if qid == 0:
            queue: SubmissionQueue | CompletionQueue | None = (
                self.admin_cq if is_cq else self.admin_sq
            )
        else:
            queue = self.io_cqs.get(qid) if is_cq else self.io_sqs.get(qid)
        if queue is None:
            self.events.error(events.ERROR_INVALID_DOORBELL_REGISTER, self)
            return
        if value >= queue.size:
            self.events.error(events.ERROR_INVALID_DOORBELL_VALUE, self)
            return
        if self.doorbell_words is not None:
            # A client that did not map the page (or mapped it and also traps): the
            # register still holds what the guest wrote, where the poller looks.
            self.doorbell_words[index] = value
        if queue.shadow is not None:
            # The guest stored this value in the shadow doorbell before ringing, and
            # may have stored newer ones since (this write travelled over the socket):
            # the shadow is the truth, the MMIO write only says "look".
            self._shadow_doorbell_rung(queue)
            return
        if isinstance(queue, CompletionQueue):
            if not queue.set_head(value):
                self.events.error(events.ERROR_INVALID_DOORBELL_VALUE, self)
                return
            if not self.interrupts.msix_enabled():
                self._update_intx()
            if qid:
                self.io_thread.wake()  # completions may have waited for room
            else:
                self.admin_doorbell.set()
            return
        if not queue.set_tail(value):
            self.events.error(events.ERROR_INVALID_DOORBELL_VALUE, self)
            return
        if qid == 0:
            self.admin_doorbell.set()
        else:
            self.io_thread.wake()

    def _shadow_doorbell_rung(self, queue: SubmissionQueue | CompletionQueue) -> None:
        if isinstance(queue, CompletionQueue) and not self.interrupts.msix_enabled():
            queue.refresh_head()
            self._update_intx()
            # QEMU ends an INTx only on a BAR access: have the guest ring every time.
            queue.shadow.set_event_index(queue.head)  # type: ignore[union-attr]
        if queue.qid == 0:
            self.admin_doorbell.set()
        else:
            self.io_thread.wake()  # new commands, or room for waiting completions

    # --- command processing --------------------------------------------------------

    def process_admin(self) -> int:
        """Run every admin command the guest has submitted; returns how many."""
        done = 0
        with self.lock:
            sq, cq = self.admin_sq, self.admin_cq
            if sq is None or cq is None or self.registers.fatal:
                return 0
            sq.refresh_tail()  # a mapped doorbell
            try:
                while not sq.is_empty() and not cq.is_full():
                    dw = SQE.unpack(sq.fetch())
                    self._complete_admin(cq, sq, dw)
                    done += 1
                tail = cq.tail
                if self.events.deliverable():
                    self.events.deliver(self)
                posted = done or cq.tail != tail
            except DmaError as exc:
                self.fatal(f"admin queue memory: {exc}")
                return done
            if posted:
                self.signal(cq)
        return done

    def _complete_admin(
        self, cq: CompletionQueue, sq: SubmissionQueue, dw: tuple[int, ...]
    ) -> None:
        opcode = dw[0] & 0xFF
        cid = dw[0] >> 16
        handler = self._admin_handlers.get(opcode)
        result = 0
        try:
            if self.aborts:
                self._check_aborted(0, cid)
            if handler is None:
                raise CommandError(Status.INVALID_OPCODE, f"admin opcode {opcode:#x}")
            if dw[0] & 0xC300:  # FUSE or SGL on an admin command
                raise CommandError(Status.INVALID_FIELD, "fused/SGL admin command")
            result = handler(self, dw)
        except events.Deferred:
            return  # an AER: completed when an event arrives
        except CommandError as err:
            self.post_error(cq, sq, dw, err)
            return
        except ControllerFatal as exc:
            self.fatal(str(exc))
            return
        cq.post(result, 0, sq.head, 0, cid, Status.SUCCESS)

    def _check_aborted(self, sqid: int, cid: int) -> None:
        """A command an Abort marked while it was queued completes without running."""
        if (sqid, cid) in self.aborts:
            self.aborts.discard((sqid, cid))
            raise CommandError(Status.ABORT_REQUESTED, "aborted while queued")

    def post_error(
        self, cq: CompletionQueue, sq: SubmissionQueue, dw: tuple[int, ...], err: CommandError
    ) -> None:
        if err.dnr is None:
            sf = with_dnr(err.status)
        else:
            sf = err.status | DNR if err.dnr else err.status
        log.debug("sq %d cid %d opcode %#x: %s", sq.qid, dw[0] >> 16, dw[0] & 0xFF, err)
        self.error_log.record(sq.qid, dw[0] >> 16, sf, dw[1], err.lba)
        cq.post(err.result, 0, sq.head, sq.qid, dw[0] >> 16, sf)

    def process_io(self) -> int:
        """One round-robin pass over the I/O submission queues, at most the Arbitration
        Burst of commands from each (Base 3.4.4). Returns commands run."""
        if self.registers.csts & CSTS_CFS:
            return 0  # a fatal controller processes nothing until reset
        done = 0
        touched: list[CompletionQueue] = []
        io = self.io
        namespaces = self.namespaces
        burst = self.features.arbitration_burst
        clock = time.monotonic_ns
        try:
            for sq in self.active_io_sqs:
                sq.refresh_tail()
                if sq.head == sq.tail:
                    continue
                cq = sq.cq
                stats = sq.stats
                slots = sq.memory.view()  # None: reachable by messages only
                seen = clock()
                n = posted = 0
                while n < burst and sq.head != sq.tail and not cq.is_full():
                    if slots is not None:  # fetch(), inline: this runs for every command
                        dw = SQE.unpack_from(slots, sq.head * SQE_SIZE)
                        sq.head = 0 if sq.head + 1 == sq.size else sq.head + 1
                    else:
                        dw = SQE.unpack(sq.fetch())
                    opcode = dw[0] & 0xFF
                    n += 1
                    try:
                        if self.aborts:  # almost always empty: no call on the hot path
                            self._check_aborted(sq.qid, dw[0] >> 16)
                        req = io.execute(dw)
                    except CommandError as err:
                        self.post_error(cq, sq, dw, err)
                        stats.record(opcode, 0, True, clock() - seen)
                        posted += 1
                        continue
                    if req is not None:  # in flight: completed when the engine is done
                        req.dw, req.owner, req.seen = dw, sq, seen
                        cq.reserved += 1
                        continue
                    cq.post(0, 0, sq.head, sq.qid, dw[0] >> 16, 0)
                    posted += 1
                    nbytes = 0
                    if opcode in DATA_OPCODES:
                        ns = namespaces.get(dw[1])
                        if ns is not None:
                            nbytes = ((dw[12] & 0xFFFF) + 1) << ns.lba_shift
                    stats.record(opcode, nbytes, False, clock() - seen)
                if n:
                    done += n
                    if posted:
                        cq.unsignalled += posted
                        if cq not in touched:
                            touched.append(cq)
                    # Keep the guest from ringing while we poll (see queues.arm_event_index).
                    sq.arm_event_index(parked=False)
            engine = self.engine
            if engine.in_flight:
                engine.submit()  # the whole pass in one system call
                done += self._complete_requests(engine.reap(), touched, True)
        except DmaError as exc:
            self.fatal(f"I/O queue memory: {exc}")
        for cq in touched:
            self.signal(cq)
        if self._coalesced:
            self.flush_coalesced_interrupts(force=False)
        return done

    def _complete_requests(
        self, requests: list[Request], touched: list[CompletionQueue], post: bool
    ) -> int:
        """Complete the commands whose transfers the engine has finished: the same
        statuses, counters and statistics as a synchronous command. Every request is
        released, whatever happens to its completion."""
        io, engine, clock = self.io, self.engine, time.monotonic_ns
        unreachable: DmaError | None = None
        for req in requests:
            sq: SubmissionQueue = req.owner
            dw = req.dw
            cq = sq.cq
            cq.reserved -= 1
            opcode = dw[0] & 0xFF
            try:
                try:
                    io.finish(req)
                except CommandError as err:
                    if post:
                        self.post_error(cq, sq, dw, err)
                    sq.stats.record(opcode, 0, True, clock() - req.seen)
                else:
                    if post:  # Dword 0: a passthrough command's, from the host; else 0
                        cq.post(req.dw0, 0, sq.head, sq.qid, dw[0] >> 16, 0)
                    sq.stats.record(opcode, req.length, False, clock() - req.seen)
            except DmaError as exc:
                unreachable = exc  # the CQ's memory: fatal, once all are released
            finally:
                engine.release(req)
            if post:
                cq.unsignalled += 1
                if cq not in touched:
                    touched.append(cq)
        if unreachable is not None:
            raise unreachable
        return len(requests)

    def io_in_flight(self) -> int:
        """Commands whose transfers the engine is running."""
        return self.engine.in_flight

    def wait_io(self, timeout_ns: int) -> None:
        """Block until a transfer in flight ends, `timeout_ns` at most (the I/O thread,
        with nothing else to do: the completion is posted by the next process_io)."""
        self.engine.wait(timeout_ns)

    def signal(self, cq: CompletionQueue) -> None:
        """Tell the guest about new completions on `cq`: MSI-X (one message per batch,
        fewer if the host asked for interrupt coalescing) or INTx."""
        count, cq.unsignalled = cq.unsignalled, 0
        if not cq.interrupts_enabled:
            return
        if not self.interrupts.msix_enabled():
            self._update_intx()
            return
        vector = cq.vector
        coalescing = self.features.current[FeatureId.INTERRUPT_COALESCING]
        if (
            coalescing & 0xFF  # THR: 0 (one entry, 0's based) means no aggregation
            and coalescing >> 8  # TIME: 0 means no delay
            and cq.qid  # never the admin queue (Base 5.27.1.9)
            and vector not in self.features.coalescing_disabled
        ):
            pending = self._coalesced.get(vector)
            if pending is None:
                deadline = time.monotonic_ns() + (coalescing >> 8) * 100_000
                pending = self._coalesced[vector] = [0, deadline]
            pending[0] += max(count, 1)
            if pending[0] <= coalescing & 0xFF and time.monotonic_ns() < pending[1]:
                return
            del self._coalesced[vector]
        self.stats.interrupts[vector] += 1
        self.interrupts.signal(vector)

    def flush_coalesced_interrupts(self, force: bool) -> None:
        """Send the interrupts that coalescing held back past their aggregation time
        (all of them with `force`: the I/O thread is about to park)."""
        now = time.monotonic_ns()
        for vector, (_, deadline) in list(self._coalesced.items()):
            if force or now >= deadline:
                del self._coalesced[vector]
                self.stats.interrupts[vector] += 1
                self.interrupts.signal(vector)

    def _update_intx(self) -> None:
        """INTx is level-triggered: asserted while any interrupt-enabled CQ holds
        entries the host has not consumed and vector 0 is not masked (INTMS)."""
        if self.interrupts.msix_enabled():
            return
        if self.registers.intms & 1:
            self.interrupts.set_intx(False)
            return
        cqs = list(self.io_cqs.values())
        if self.admin_cq is not None:
            cqs.append(self.admin_cq)
        self.interrupts.set_intx(any(cq.interrupts_enabled and cq.has_unconsumed() for cq in cqs))

    @property
    def polls_doorbells(self) -> bool:
        """Whether I/O submissions can arrive without a trapped doorbell write."""
        return self.shadow_doorbells is not None or self.doorbell_words is not None

    def poll_mapped_doorbells(self) -> None:
        """With mapped doorbells nothing traps: notice admin submissions and CQ heads
        (for INTx, which must drop when the guest has consumed every entry)."""
        sq = self.admin_sq
        if sq is not None and sq.shadow is not None and sq.shadow.value() != sq.tail:
            self.admin_doorbell.set()
        if not self.interrupts.msix_enabled() and self.admin_cq is not None:
            for cq in (self.admin_cq, *self.io_cqs.values()):
                cq.refresh_head()
            self._update_intx()

    def io_pending(self) -> bool:
        """Whether any I/O submission queue has commands (reads shadow doorbells)."""
        for sq in self.active_io_sqs:
            sq.refresh_tail()
            if sq.head != sq.tail:
                return True
        return False

    def arm_event_indexes(self, parked: bool) -> None:
        for sq in self.active_io_sqs:
            sq.arm_event_index(parked)

    def uptime_hours(self) -> int:
        return int((time.monotonic() - self.power_on_time) // 3600)


def _keep_alive(ctrl: Controller, dw: tuple[int, ...]) -> int:
    return 0
