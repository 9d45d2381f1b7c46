"""The NVMe controller model: properties, the enable/reset/shutdown/fatal state
machine (NVMe Base 3.5), the admin queue and admin commands, namespaces, features,
logs and events: the control side of the device.

The model does no I/O of its own and owns no thread. Its callers are:
- the PCI function, for property and doorbell accesses (`mmio_read`, `mmio_write`);
- the admin worker (`process_admin`), woken by admin doorbells and by its data plane;
- the control plane (namespaces, events).
The I/O queues and their thread are the data plane's (dataplane/), behind one seam:
the controller tells it what the host set up and applies what it reports. Guest
memory, interrupts and storage are adapters handed in at construction.

Lock order (dataplane/__init__.py): `lock`, then the data plane's `paused()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from ..backends.io_engine import IoEngine, SyncEngine
from ..dataplane import DataPlane, IoSettings, QueuePosition, make_data_plane
from ..dataplane.events import CommandFailed, DataPlaneEvent, Fatal, InvalidDoorbell, StorageFailed
from ..guest_memory import DmaError, GuestMemory
from ..handover.journal import Journal
from ..handover.supervisor import state_changed
from ..statistics import add_snapshots
from . import registers as regs
from .admin import events, features, identify, log_pages
from .admin import queues as queue_admin
from .errors import CommandError, ControllerFatal
from .identity import ControllerConfig
from .interrupts import InterruptSink
from .io import IoCounters
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
    AdminOpcode,
    FeatureId,
    LogPage,
    Reg,
    Status,
    with_dnr,
)

log = logging.getLogger(__name__)


AdminHandler = Callable[["Controller", tuple[int, ...]], int]


class Controller:
    def __init__(
        self,
        config: ControllerConfig,
        memory: GuestMemory,
        interrupts: InterruptSink,
        namespaces: list[Namespace] | None = None,
        doorbell_words: memoryview | None = None,
        io_engine: IoEngine | None = None,
        data_plane: str = "python",
        poll_timeout: float = 0.5,
    ) -> None:
        """`data_plane`: which implementation serves the I/O queues (dataplane/)."""
        self.config = config
        #: BAR0's doorbell page as 32-bit words (see words32) when the client maps it
        #: (no trapped doorbells at all): word 0 is the admin SQ tail doorbell (BAR0 1000h)
        self.doorbell_words = doorbell_words
        self.memory = memory
        self.interrupts = interrupts
        #: woken when an admin doorbell is rung, an event is queued, or the data plane
        #: has something to report
        self.admin_doorbell = threading.Event()
        # Serialises property writes, admin commands and resets against each other.
        self.lock = threading.RLock()
        self.registers = regs.RegisterFile(
            cap=regs.Capabilities(mqes=config.max_queue_entries - 1, timeout_500ms=10).encode()
        )
        self.namespaces: dict[int, Namespace] = {}
        for ns in namespaces or []:
            self._check_namespace(ns)
            self.namespaces[ns.nsid] = ns
        self.data: DataPlane = make_data_plane(
            data_plane,
            config,
            memory,
            interrupts,
            self.namespaces,
            io_engine if io_engine is not None else SyncEngine(),
            notify=self.admin_doorbell.set,
            doorbell_words=doorbell_words,
            poll_timeout=poll_timeout,
        )
        self.features = features.FeatureState(config)
        self.events = events.AsyncEvents(config.aer_limit)
        self.error_log = log_pages.ErrorLog(config.error_log_entries)
        self.changed_namespaces: set[int] = set()
        self.power_on_time = time.monotonic()
        self.power_cycles = 1
        self.unsafe_shutdowns = 0
        self.admin_sq: SubmissionQueue | None = None
        self.admin_cq: CompletionQueue | None = None
        #: the I/O queues the host created: what the admin commands check (their
        #: runtime state is the data plane's)
        self.io_queues = queue_admin.IoQueueTable(self.data)
        #: admin doorbell writes that trapped (the data plane counts the I/O queues')
        self.admin_doorbell_traps = 0
        #: admin commands an Abort marked while queued: completed unrun when fetched
        self.admin_aborts: set[int] = set()
        #: Doorbell Buffer Config's (shadow doorbell page, EventIdx page), once set
        self.doorbell_buffers: tuple[int, int] | None = None
        #: SMART counters a predecessor process had counted (upgrade in place)
        self._carried_counters = IoCounters()
        #: and its statistics (the `stats` snapshot)
        self._carried_statistics: dict[str, Any] = {}
        #: where the queues stand, for a successor after a crash (attach_journal)
        self.journal: Journal | None = None
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
        self.apply_settings()

    # --- namespaces ---------------------------------------------------------

    def add_namespace(self, ns: Namespace) -> None:
        """Add `ns`, telling the host nothing (a hot add is attach_namespace)."""
        with self.lock:
            self._check_namespace(ns)
            try:
                self.data.attach_namespace(ns)
            except BaseException:
                # Leave no half-added namespace: the data plane (whose own table the
                # native one keeps) and ours forget it; the caller closes its backend.
                with contextlib.suppress(Exception):
                    self.data.detach_namespace(ns.nsid)
                self.namespaces.pop(ns.nsid, None)
                raise

    def _check_namespace(self, ns: Namespace) -> None:
        if not 1 <= ns.nsid <= self.config.max_namespaces:
            raise ValueError(f"nsid {ns.nsid} outside 1..{self.config.max_namespaces}")
        if ns.nsid in self.namespaces:
            raise ValueError(f"nsid {ns.nsid} already in use")
        if ns.passthrough:
            self._check_passthrough(ns)

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
        with self.lock:
            self.add_namespace(ns)
            self._namespace_changed(ns.nsid)

    def detach_namespace(self, nsid: int) -> Namespace:
        """Hot remove: commands already fetched have completed (the data plane is held
        between commands while this runs); later ones fail with Invalid Field (an
        inactive NSID). The caller flushes and closes the returned namespace's backend."""
        with self.lock:
            ns = self.namespaces.get(nsid)
            if ns is None:
                raise ValueError(f"nsid {nsid} is not attached")
            self.data.detach_namespace(nsid)
            self.namespaces.pop(nsid, None)
            self._namespace_changed(nsid)
        return ns

    def resize_namespace(self, nsid: int, size: int) -> bool:
        """The storage under `nsid` now holds `size` bytes (a rescan). If that changes
        its block count (NSZE, NCAP, NUSE), the host is told as for a hot add, so that
        it revalidates without a reset. Returns whether it was told."""
        with self.lock, self.data.paused():
            ns = self.namespaces.get(nsid)
            if ns is None:
                raise ValueError(f"nsid {nsid} is not attached")
            changed = ns.resize(size)
            self.data.update_namespace(ns)
            if changed:
                self._namespace_changed(nsid)
        return changed

    def _namespace_changed(self, nsid: int) -> None:
        with self.events.lock:
            self.changed_namespaces.add(nsid)
        self.events.notice(
            events.NOTICE_NAMESPACE_ATTRIBUTE_CHANGED, LogPage.CHANGED_NAMESPACE_LIST, self
        )

    # --- what the data plane reports -------------------------------------------------

    def data_plane_notified(self) -> None:
        """Apply what the data plane reported (the admin worker, on its notify()): error
        log entries, storage failures, a fatal error; and the INTx level, which its
        completions may have changed."""
        events = self.data.take_events()
        for event in events:
            self._apply(event)
        if events:
            state_changed()
        if not self.interrupts.msix_enabled():
            self._update_intx()

    def _apply(self, event: DataPlaneEvent) -> None:
        if isinstance(event, CommandFailed):
            self.error_log.record(event.sqid, event.cid, event.status, event.nsid, event.lba)
        elif isinstance(event, StorageFailed):
            self._storage_failed(event)
        elif isinstance(event, InvalidDoorbell):
            self.events.error(event.info, self)
        elif isinstance(event, Fatal):
            self.fatal(event.reason)

    def _storage_failed(self, event: StorageFailed) -> None:
        """A backend failure changed what a namespace is (media_errors.py)."""
        ns = self.namespaces.get(event.nsid)
        if ns is None:
            return  # removed since
        before = self.critical_warning()
        if event.gone and ns.failure is None:
            log.error("nsid %d: storage gone, failing every command: %s", ns.nsid, event.reason)
            ns.failure = event.reason
        if event.read_only and not ns.readonly:
            log.error("nsid %d: storage went read-only: %s", ns.nsid, event.reason)
            ns.host_read_only = event.reason
            ns.readonly = True
            self._namespace_changed(ns.nsid)  # NSATTR changed: Linux marks the disk ro
        self.data.update_namespace(ns)
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

    @property
    def counters(self) -> IoCounters:
        """SMART / Health's I/O counters (the data plane counts them)."""
        now, carried = self.data.counters(), self._carried_counters
        return IoCounters(
            *(getattr(now, f.name) + getattr(carried, f.name) for f in fields(IoCounters))
        )

    def apply_settings(self) -> None:
        """Tell the data plane what the features now say (after Set Features, reset)."""
        f = self.features
        coalescing = f.current[FeatureId.INTERRUPT_COALESCING]
        self.data.configure(
            IoSettings(
                arbitration_burst=f.arbitration_burst,
                coalescing_threshold=coalescing & 0xFF,
                coalescing_time=coalescing >> 8,
                coalescing_disabled=frozenset(f.coalescing_disabled),
                write_cache=f.volatile_write_cache,
            )
        )

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
        if self.journal is not None:
            self.journal.reset_sq(0)
            self.journal.reset_cq(0)
            self.admin_sq.journal = self.admin_cq.journal = self.journal
        r.csts |= CSTS_RDY
        self.data.enable()  # with mapped doorbells it polls from now on

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
        failed = []
        with self.data.paused():
            for ns in self.namespaces.values():
                try:
                    ns.backend.flush()
                except OSError as exc:
                    failed.append(f"nsid {ns.nsid}: {exc}")
        if failed:
            # What the host wrote may not be durable: never report the shutdown complete
            # then; the host sees a fatal controller instead.
            self.fatal(f"shutdown: flush failed: {'; '.join(failed)}")
            return
        r.csts = regs.with_shst(r.csts, CSTS_SHST_COMPLETE)

    def reset(self) -> None:
        """Controller Level Reset (CC.EN 1 → 0, FLR, DEVICE_RESET). Transfers in flight
        are waited for (the kernel is writing guest memory) and complete unposted: a
        reset aborts every outstanding command."""
        with self.lock:
            self.data.reset()
            if self.admin_sq and self.admin_cq:
                release_views([self.admin_sq, self.admin_cq])
            self.io_queues.clear()
            self.admin_sq = self.admin_cq = None
            self.admin_aborts.clear()
            self.doorbell_buffers = None
            self.features.reset()
            self.apply_settings()
            self.events.reset()
            self.registers.reset()
            self.interrupts.set_intx(False)

    # --- upgrade in place ------------------------------------------------------------

    def attach_journal(self, journal: Journal) -> None:
        """Keep the queues' positions and commands in flight in `journal` (crash recovery)."""
        with self.lock:
            self.journal = journal
            self.io_queues.journal = journal
            self.data.set_journal(journal)
            for queue in (self.admin_sq, self.admin_cq):
                if queue is not None:
                    queue.journal = journal

    def handover_state(self) -> dict[str, Any]:
        """Everything the host set up and the controller keeps, for a successor process
        to go on from. The caller holds the lock with the data plane paused."""
        admin = None
        if self.admin_sq is not None and self.admin_cq is not None:
            sq, cq = self.admin_sq, self.admin_cq
            admin = {"sq": [sq.head, sq.tail], "cq": [cq.head, cq.tail, cq.phase]}
        r = self.registers
        return {
            "registers": {
                "intms": r.intms,
                "cc": r.cc,
                "csts": r.csts,
                "aqa": r.aqa,
                "asq": r.asq,
                "acq": r.acq,
            },
            "admin_queues": admin,
            "io_queues": self.io_queues.handover_state(),
            "doorbell_buffers": self.doorbell_buffers,
            "positions": [dataclasses.asdict(p) for p in self.data.positions()],
            "features": self.features.handover_state(),
            "events": self.events.handover_state(),
            "error_log": self.error_log.handover_state(),
            "changed_namespaces": sorted(self.changed_namespaces),
            "power_on_time": self.power_on_time,  # CLOCK_MONOTONIC: the same in any process
            "power_cycles": self.power_cycles,
            "unsafe_shutdowns": self.unsafe_shutdowns,
            "admin_doorbell_traps": self.admin_doorbell_traps,
            "admin_aborts": sorted(self.admin_aborts),
            "namespaces": {
                str(ns.nsid): {
                    "failure": ns.failure,
                    "host_read_only": ns.host_read_only,
                    "readonly": ns.readonly,
                }
                for ns in self.namespaces.values()
            },
            "counters": dataclasses.asdict(self.counters),
            "statistics": self.statistics(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Go on where a predecessor (handover_state) stopped: the same registers,
        queues at the same positions, features, events and logs. Before the data plane
        starts. ValueError/KeyError/DmaError for a state that does not fit."""
        with self.lock:
            r = self.registers
            for name, value in state["registers"].items():
                if name not in ("intms", "cc", "csts", "aqa", "asq", "acq"):
                    raise ValueError(f"register {name!r}")
                setattr(r, name, int(value))
            admin = state["admin_queues"]
            if admin is not None:
                self.admin_cq = CompletionQueue(
                    self.memory, 0, r.acq, r.admin_cq_size(), vector=0, interrupts_enabled=True
                )
                self.admin_sq = SubmissionQueue(
                    self.memory, 0, r.asq, r.admin_sq_size(), self.admin_cq
                )
                self.admin_cq.sq_ids.add(0)
                if self.doorbell_words is not None:
                    self.admin_sq.shadow = MappedDoorbell(self.doorbell_words, 0)
                    self.admin_cq.shadow = MappedDoorbell(self.doorbell_words, 4)
                self.admin_sq.head, self.admin_sq.tail = admin["sq"]
                self.admin_cq.head, self.admin_cq.tail, self.admin_cq.phase = admin["cq"]
                self.admin_sq.journal = self.admin_cq.journal = self.journal
            buffers = state["doorbell_buffers"]
            self.doorbell_buffers = (int(buffers[0]), int(buffers[1])) if buffers else None

            def create() -> None:
                self.io_queues.restore(state["io_queues"])
                if self.doorbell_buffers is not None:
                    self.data.set_doorbell_buffers(*self.doorbell_buffers)

            positions = [QueuePosition(**p) for p in state["positions"]]
            self.data.restore(create, positions)
            if self.journal is not None:  # (creating the queues reset their records)
                for p in positions:
                    if p.is_cq:
                        self.journal.set_position(p.qid, None, (p.tail, p.phase))
                    else:
                        self.journal.set_position(p.qid, p.head, None)
                        self.journal.rung(p.qid, p.tail)
                if admin is not None:
                    self.journal.set_position(0, admin["sq"][0], (admin["cq"][1], admin["cq"][2]))
                    self.journal.rung(0, admin["sq"][1])
            self.features.restore(state["features"])
            self.apply_settings()
            self.events.restore(state["events"])
            self.error_log.restore(state["error_log"])
            self.changed_namespaces = {int(n) for n in state["changed_namespaces"]}
            self.power_on_time = float(state["power_on_time"])
            self.power_cycles = int(state["power_cycles"])
            self.unsafe_shutdowns = int(state["unsafe_shutdowns"])
            self.admin_doorbell_traps = int(state["admin_doorbell_traps"])
            self.admin_aborts = {int(cid) for cid in state["admin_aborts"]}
            for nsid, flags in state["namespaces"].items():
                ns = self.namespaces.get(int(nsid))
                if ns is None:
                    raise ValueError(f"nsid {nsid} is not attached here")
                ns.failure = flags["failure"]
                ns.host_read_only = flags["host_read_only"]
                ns.readonly = bool(flags["readonly"])
                self.data.update_namespace(ns)
            self._carried_counters = IoCounters(**state["counters"])
            if "statistics" in state:
                self._carried_statistics = state["statistics"]
                self.admin_doorbell_traps = 0  # (counted in those)
            if r.fatal:
                self.data.halt()
            elif r.ready:
                self.data.enable()

    def fatal(self, reason: str) -> None:
        """Controller Fatal Status: the host must reset us."""
        log.error("controller fatal: %s", reason)
        self.registers.csts |= CSTS_CFS
        self.data.halt()

    def release_memory_views(self) -> None:
        """Drop every cached view of guest memory (the transport is about to unmap).
        Queues resolve their memory again on next use. Transfers in flight finish first:
        the kernel must be done with guest memory before it goes."""
        with self.lock:
            self.data.release_memory()
            if self.admin_sq and self.admin_cq:
                release_views([self.admin_sq, self.admin_cq])

    # --- doorbells ---------------------------------------------------------------

    def _doorbell_write(self, offset: int, value: int) -> None:
        index = (offset - DOORBELL_BASE) >> 2
        qid, is_cq = index >> 1, bool(index & 1)
        if not self.registers.ready or self.registers.fatal:
            return
        journal = self.journal
        if journal is not None and not is_cq and qid < journal.queues and value < 0x10000:
            journal.rung(qid, value)  # (checked against the queue's size by recovery)
        if qid:
            if not self.data.doorbell(qid, is_cq, value):
                exists = self.io_queues.cq(qid) if is_cq else self.io_queues.sq(qid)
                self.events.error(
                    events.ERROR_INVALID_DOORBELL_VALUE
                    if exists is not None
                    else events.ERROR_INVALID_DOORBELL_REGISTER,
                    self,
                )
            elif is_cq and not self.interrupts.msix_enabled():
                self._update_intx()  # the host consumed entries: the level may drop
            return
        self.admin_doorbell_traps += 1
        queue: SubmissionQueue | CompletionQueue | None = self.admin_cq if is_cq else self.admin_sq
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
        if isinstance(queue, CompletionQueue):
            if not queue.set_head(value):
                self.events.error(events.ERROR_INVALID_DOORBELL_VALUE, self)
                return
            if not self.interrupts.msix_enabled():
                self._update_intx()
        elif not queue.set_tail(value):
            self.events.error(events.ERROR_INVALID_DOORBELL_VALUE, self)
            return
        self.admin_doorbell.set()

    # --- command processing --------------------------------------------------------

    def process_admin(self) -> int:
        """Apply what the data plane reported, then run every admin command the guest
        has submitted; returns how many."""
        self.data_plane_notified()
        done = 0
        with self.lock:
            sq, cq = self.admin_sq, self.admin_cq
            if sq is None or cq is None or self.registers.fatal:
                return 0
            sq.refresh_tail()  # a mapped doorbell
            try:
                # (A command may make the controller fatal: nothing is run or posted after.)
                while not sq.is_empty() and not cq.is_full() and not self.registers.fatal:
                    dw = SQE.unpack(sq.fetch())
                    self._complete_admin(cq, sq, dw)
                    done += 1
                tail = cq.tail
                if self.events.deliverable() and not self.registers.fatal:
                    self.events.deliver(self)
                posted = done or cq.tail != tail
            except DmaError as exc:
                self.fatal(f"admin queue memory: {exc}")
                return done
        if posted:
            # A supervisor has this state before the guest hears of it (crash recovery).
            state_changed()
            with self.lock:
                self.signal_admin()
        return done

    def _complete_admin(
        self, cq: CompletionQueue, sq: SubmissionQueue, dw: tuple[int, ...]
    ) -> None:
        opcode = dw[0] & 0xFF
        cid = dw[0] >> 16
        handler = self._admin_handlers.get(opcode)
        result = 0
        try:
            if cid in self.admin_aborts:
                self.admin_aborts.discard(cid)
                raise CommandError(Status.ABORT_REQUESTED, "aborted while queued")
            if handler is None:
                raise CommandError(Status.INVALID_OPCODE, f"admin opcode {opcode:#x}")
            if dw[0] & 0xC300:  # FUSE or SGL on an admin command
                raise CommandError(Status.INVALID_FIELD, "fused/SGL admin command")
            result = handler(self, dw)
            if opcode == AdminOpcode.SET_FEATURES:
                self.apply_settings()
        except events.Deferred:
            return  # an AER: completed when an event arrives
        except CommandError as err:
            self.post_error(cq, sq, dw, err)
            return
        except ControllerFatal as exc:
            self.fatal(str(exc))
            return
        cq.post(result, 0, sq.head, 0, cid, Status.SUCCESS)

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

    def signal_admin(self) -> None:
        """Tell the guest about new admin completions: MSI-X vector 0 (never coalesced,
        Base 5.27.1.9), or INTx."""
        if not self.interrupts.msix_enabled():
            self._update_intx()
        else:
            self.interrupts.signal(0)

    def _update_intx(self) -> None:
        """INTx is level-triggered: asserted while any interrupt-enabled CQ holds
        entries the host has not consumed and vector 0 is not masked (INTMS)."""
        if self.interrupts.msix_enabled():
            return
        if self.registers.intms & 1:
            self.interrupts.set_intx(False)
            return
        admin = self.admin_cq
        if admin is not None and self.doorbell_words is not None:
            admin.refresh_head()
        self.interrupts.set_intx(
            (admin is not None and admin.has_unconsumed()) or self.data.pending_interrupt()
        )

    def statistics(self) -> dict[str, object]:
        """The data plane's statistics, with the admin doorbells that trapped."""
        snapshot = self.data.statistics()
        snapshot["doorbell_traps"] = int(snapshot["doorbell_traps"]) + self.admin_doorbell_traps
        return add_snapshots(self._carried_statistics, snapshot)

    def uptime_hours(self) -> int:
        return int((time.monotonic() - self.power_on_time) // 3600)


def _keep_alive(ctrl: Controller, dw: tuple[int, ...]) -> int:
    return 0
