"""The native data plane: the Rust crate in native/ (nvme_mdev._native) behind the
DataPlane seam. Its thread holds no GIL; Python is entered only to run what it does
not run itself (the slow path below: every opcode but Read, Write, Flush and Write
Zeroes, namespaces served by Python backends, data in memory reachable only by
messages; and fused Compare and Write pairs, once it has drained its I/O), to reach
such memory, and to wake the control side.

This module turns the controller's Python objects into what the crate takes
(namespaces as descriptors, guest memory as a table of host addresses) and the
crate's answers back into the Python plane's shapes (events, statistics).
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .. import _native
from ..backends.file import FileBackend, NullBackend
from ..backends.io_engine import IoEngine, SyncEngine
from ..backends.rbd import RbdBackend
from ..backends.window import WindowBackend
from ..guest_memory import GuestMemory, MemoryChange
from ..handover.journal import Journal
from ..nvme.identity import ControllerConfig
from ..nvme.interrupts import InterruptSink
from ..nvme.io import Completed, IoCommandSet, IoCounters
from ..nvme.namespace import Namespace
from ..statistics import ControllerStats
from . import IoSettings, QueuePosition, QueueState
from .events import CommandFailed, DataPlaneEvent, Fatal, InvalidDoorbell, StorageFailed


def _weakly(callback: Callable[..., Any]) -> Callable[..., Any]:
    """`callback` as the crate keeps it: without keeping its object alive. What a native
    object references is invisible to Python's cycle collector, so a bound method of the
    plane's owner held there would make a cycle that is never collected: the plane, its
    thread, io_uring and eventfds would outlive every controller deleted. Once the
    object is gone the callback does nothing (the crate then treats the call as failed)."""
    if not inspect.ismethod(callback):
        return callback
    method = weakref.WeakMethod(callback)

    def call(*args: Any) -> Any:
        bound = method()
        return None if bound is None else bound(*args)

    return call


class NativeDataPlane:
    kind = "native"

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
        routes = interrupts.routes
        if not isinstance(routes, _native.VectorRoutes):
            raise TypeError("the native data plane needs native MSI-X routes (make_vector_routes)")
        self.config = config
        self.memory = memory
        self.namespaces = namespaces
        self._notify = notify
        # The slow path: the Python command set, synchronously on the native thread.
        self._slow_counters = IoCounters()
        #: I/O commands the plane handed to the slow path (`stats`: slow_commands)
        self._slow_commands = 0
        self.io = IoCommandSet(
            memory,
            namespaces,
            config.max_transfer,
            self._slow_counters,
            config.max_namespaces,
            config.sgl_support,
        )
        self.io.engine = SyncEngine()
        self.io.emit = self._emit
        self.io.passthrough = any(ns.passthrough for ns in namespaces.values())
        self._events: list[DataPlaneEvent] = []
        self._events_lock = threading.Lock()
        self._plane = _native.DataPlane(
            config.max_io_queues,
            config.max_transfer,
            config.max_namespaces,
            config.sgl_support,
            routes,
            engine.name == "uring",
            doorbell_words.cast("B") if doorbell_words is not None else None,
            _weakly(notify),
            _weakly(self._slow),
            _weakly(self._fused),
            weakref.proxy(memory),
        )
        self._poll_timeout = poll_timeout
        self._plane.set_poll_timeout_ns(round(poll_timeout * 1e9))
        self._cpus: set[int] | None = None
        self._started = False
        for ns in namespaces.values():
            self._attach(ns)
        self.memory_changed()

    # --- the slow path (the native thread, with the GIL) -------------------------------------

    def _slow(self, sqid: int, dw: tuple[int, ...]) -> tuple[int, int, int]:
        self._slow_commands += 1
        outcome = self.io.execute(dw)
        if not isinstance(outcome, Completed):  # (a synchronous engine: never)
            raise RuntimeError("the slow path's engine submitted a transfer")
        return outcome.status, outcome.dw0, outcome.lba

    def _fused(
        self, sqid: int, first: tuple[int, ...], second: tuple[int, ...]
    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """A fused operation, with nothing in flight (the plane drained its I/O): the
        Python command set runs both halves as one unit."""
        self._slow_commands += 2
        compared, written = self.io.fused(first, second)
        return (
            (compared.status, compared.dw0, compared.lba),
            (written.status, written.dw0, written.lba),
        )

    def _emit(self, event: DataPlaneEvent) -> None:
        with self._events_lock:
            self._events.append(event)
        self._notify()

    # --- the thread ---------------------------------------------------------------------------

    @property
    def poll_timeout(self) -> float:
        return self._poll_timeout

    @poll_timeout.setter
    def poll_timeout(self, seconds: float) -> None:
        self._poll_timeout = seconds
        self._plane.set_poll_timeout_ns(round(seconds * 1e9))

    def start(self) -> None:
        self._plane.start()
        self._started = True
        if self._cpus is not None:
            self._apply_cpus(self._cpus)

    def stop(self) -> None:
        self._plane.stop()

    def close(self) -> None:
        self.stop()
        # The last reference to the crate's plane: dropping it closes its io_uring and
        # eventfd now, not whenever a cycle through the controller is collected.
        del self._plane

    def wake(self) -> None:
        self._plane.wake()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._plane.pause()
        try:
            yield
        finally:
            self._plane.resume()

    def process(self) -> int:
        return int(self._plane.process())

    def pin(self, cpus: set[int] | None) -> None:
        if cpus is not None and not cpus <= os.sched_getaffinity(0):
            raise OSError(errno.EINVAL, f"CPUs {sorted(cpus)} not available to this process")
        if self._started:
            self._apply_cpus(cpus)
        self._cpus = cpus

    def _apply_cpus(self, cpus: set[int] | None) -> None:
        tid = self._wait_tid()
        if tid is not None:
            os.sched_setaffinity(tid, cpus if cpus is not None else os.sched_getaffinity(0))

    def _wait_tid(self) -> int | None:
        deadline = time.monotonic() + 5
        while (tid := self._plane.tid) is None and time.monotonic() < deadline:
            time.sleep(0.001)
        return None if tid is None else int(tid)

    @property
    def cpus(self) -> set[int] | None:
        return self._cpus

    @property
    def native_id(self) -> int | None:
        tid = self._plane.tid
        return None if tid is None else int(tid)

    # --- queues ---------------------------------------------------------------------------------

    def create_cq(
        self, qid: int, base: int, size: int, vector: int, interrupts_enabled: bool
    ) -> None:
        self._plane.create_cq(qid, base, size, vector, interrupts_enabled)

    def create_sq(self, qid: int, base: int, size: int, cqid: int, priority: int) -> None:
        self._plane.create_sq(qid, base, size, cqid)

    def delete_sq(self, qid: int) -> None:
        self._plane.delete_sq(qid)

    def delete_cq(self, qid: int) -> None:
        self._plane.delete_cq(qid)

    def set_journal(self, journal: Journal) -> None:
        self._plane.set_journal(journal.buffer, journal.queues)

    def positions(self) -> list[QueuePosition]:
        with self.paused():
            return [QueuePosition(*position) for position in self._plane.positions()]

    def restore(self, create: Callable[[], None], positions: list[QueuePosition]) -> None:
        self._plane.keep_doorbells(True)
        try:
            create()
        finally:
            self._plane.keep_doorbells(False)
        for p in positions:
            if not self._plane.restore_position(p.qid, p.is_cq, p.head, p.tail, p.phase):
                raise ValueError(f"no queue for {p}")

    def set_doorbell_buffers(self, shadow_page: int, eventidx_page: int) -> None:
        self._plane.set_doorbell_buffers(shadow_page, eventidx_page)

    def doorbell(self, qid: int, is_cq: bool, value: int) -> bool:
        return bool(self._plane.doorbell(qid, is_cq, value))

    def abort(self, sqid: int, cid: int) -> bool:
        return bool(self._plane.abort(sqid, cid))

    def marked_aborts(self) -> int:
        return int(self._plane.marked_aborts())

    def enable(self) -> None:
        self._plane.enable()

    def halt(self) -> None:
        self._plane.halt()

    def reset(self) -> None:
        self._plane.reset()

    def pending_interrupt(self) -> bool:
        return bool(self._plane.pending_interrupt())

    def enable_notifications(self) -> bool:
        return bool(self._plane.enable_notifications())

    def suppress_notifications(self) -> None:
        self._plane.suppress_notifications()

    # --- namespaces, memory, settings -------------------------------------------------------------

    def _attach(self, ns: Namespace) -> None:
        backend: Any = ns.backend
        store, fd, direct_fd, align, base, rbd_image = "python", -1, -1, 1, 0, 0
        inner = backend.inner if isinstance(backend, WindowBackend) else backend
        if isinstance(inner, NullBackend):
            store = "null"
        elif isinstance(backend, RbdBackend):
            store, rbd_image = "rbd", backend.image_handle()
        elif isinstance(inner, FileBackend) and not ns.passthrough:
            target = backend.io_target()
            if target is not None:
                store = "file"
                fd, base, direct_fd, align = (
                    target.fd,
                    target.base,
                    target.direct_fd,
                    target.direct_align,
                )
        if ns.passthrough:
            self.io.passthrough = True
        self._plane.attach_namespace(
            ns.nsid,
            store,
            fd,
            direct_fd,
            align,
            base,
            bool(getattr(backend, "is_block_device", False)),
            bool(backend.readonly),
            ns.lba_shift,
            ns.blocks,
            ns.readonly,
            ns.failure,
            ns.passthrough,
            backend.description,
            rbd_image,
        )

    def attach_namespace(self, ns: Namespace) -> None:
        with self.paused():
            self.namespaces[ns.nsid] = ns
            self._attach(ns)

    def detach_namespace(self, nsid: int) -> None:
        with self.paused():
            self._plane.detach_namespace(nsid)
            self.namespaces.pop(nsid, None)

    def update_namespace(self, ns: Namespace) -> None:
        self._plane.update_namespace(ns.nsid, ns.blocks, ns.readonly, ns.failure)

    def memory_changed(self, change: MemoryChange | None = None) -> None:
        if change is None:
            regions = getattr(self.memory, "mapped_regions", None)
            self._plane.set_memory(regions() if regions is not None else [])
            return
        # One map or unmap: the plane's table follows it without reading all of it again
        # (a client may map thousands of regions).
        if change.unmapped:
            self._plane.unmap_regions(list(change.unmapped))
        for region in change.mapped:
            self._plane.map_region(*region)

    def release_memory(self) -> None:
        pass  # the table changes with memory_changed(); queues look it up again then

    def configure(self, settings: IoSettings) -> None:
        self.io.write_cache = settings.write_cache
        self._plane.configure(
            settings.arbitration_burst,
            settings.coalescing_threshold,
            settings.coalescing_time,
            sorted(settings.coalescing_disabled),
            settings.write_cache,
        )

    # --- what the control side reads ------------------------------------------------------------

    def take_events(self) -> list[DataPlaneEvent]:
        events: list[DataPlaneEvent] = []
        for raw in self._plane.take_events():
            kind = raw[0]
            if kind == "failed":
                events.append(CommandFailed(*raw[1:]))
            elif kind == "storage":
                events.append(StorageFailed(*raw[1:]))
            elif kind == "doorbell":
                events.append(InvalidDoorbell(raw[1]))
            else:
                events.append(Fatal(raw[1]))
        with self._events_lock:
            events += self._events
            self._events.clear()
        return events

    def queues(self) -> list[QueueState]:
        return [QueueState(*q) for q in self._plane.queues()]

    def counters(self) -> IoCounters:
        native = self._plane.statistics()["counters"]
        slow = self._slow_counters
        return IoCounters(
            host_read_commands=native[0] + slow.host_read_commands,
            host_write_commands=native[1] + slow.host_write_commands,
            bytes_read=native[2] + slow.bytes_read,
            bytes_written=native[3] + slow.bytes_written,
            media_errors=native[4] + slow.media_errors,
            host_errors=native[5] + slow.host_errors,
        )

    def statistics(self) -> dict[str, Any]:
        raw = self._plane.statistics()
        stats = ControllerStats(self.config.max_io_queues, self.config.msix_vectors)
        for qid, commands, nbytes, errors, latency, latency_sum in raw["queues"]:
            q = stats.queues[qid]
            q.commands, q.bytes, q.errors = list(commands), list(nbytes), errors
            q.latency, q.latency_sum_ns = list(latency), latency_sum
        stats.interrupts = list(raw["interrupts"])
        stats.parks = raw["parks"]
        stats.doorbell_traps = raw["doorbell_traps"]
        snapshot = stats.snapshot(raw["polling_ns"], raw["parked_ns"], self.counters().host_errors)
        snapshot["data_plane"] = self.kind
        snapshot["direct_transfers"] = raw["direct_transfers"]
        snapshot["slow_commands"] = self._slow_commands
        return snapshot
