"""The data plane: one controller's I/O queues and the thread that serves them.

Everything a Read or Write touches on its way (doorbell → command → storage →
completion → interrupt) sits behind the `DataPlane` interface below, so that it can
run natively (the Rust crate in native/, no GIL: `native.py`) or in Python (the
readable reference the native one is tested against: `python.py`). The controller
model (nvme/controller.py) is the control side: registers, the admin queue, admin
commands, features, logs and events. It tells the data plane what the host set up
(queues, namespaces, guest memory, settings) and learns from it what happened
(`DataPlaneEvent`s: errors for the log, storage failures, a fatal error).

Who calls what, from which thread:

- The control side calls every method but `process` with `Controller.lock` held,
  except `doorbell` (the transport thread, on a trapped doorbell write), `wake`,
  `take_events` and the statistics (any thread).
- The data plane's own thread calls nothing on the control side but `notify()` (a
  callable given at construction that only wakes the admin worker: it takes no lock).
  The control side then calls `take_events()` and applies them.

Lock order, one for the whole device: `Controller.lock` → `DataPlane.paused()` →
the data plane's own locks → `Msix` lock → the interrupt routes. The data plane's
thread never takes `Controller.lock` (it would wait on whoever pauses it). Waiting
for the data plane to pause while holding `Controller.lock` is safe even when the
data plane waits for a DMA reply: the transport hands the socket reader's role to
a thread waiting for a reply while the server thread is busy (vfio_user/server.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

from .events import DataPlaneEvent

if TYPE_CHECKING:
    from ..backends.io_engine import IoEngine
    from ..guest_memory import GuestMemory, MemoryChange
    from ..handover.journal import Journal
    from ..nvme.identity import ControllerConfig
    from ..nvme.interrupts import InterruptSink, VectorRoutes
    from ..nvme.io import IoCounters
    from ..nvme.namespace import Namespace

#: the implementations of the seam, the default first
DATA_PLANES: Final = ("native", "python")


@dataclass(frozen=True)
class IoSettings:
    """What the host's features and the operator decide about I/O queue processing."""

    #: commands taken from one SQ before the next SQ's turn (Arbitration Burst)
    arbitration_burst: int = 32
    #: Interrupt Coalescing: Aggregation Threshold (0's based) and Time (100 µs units);
    #: either 0 means no coalescing
    coalescing_threshold: int = 0
    coalescing_time: int = 0
    #: vectors the host disabled coalescing for (Interrupt Vector Configuration)
    coalescing_disabled: frozenset[int] = field(default_factory=frozenset)
    #: Volatile Write Cache enabled; off, every write is made durable before it completes
    write_cache: bool = True


@dataclass(frozen=True)
class QueueState:
    """Where an I/O queue stands, for diagnostics and tests."""

    qid: int
    is_cq: bool
    size: int
    head: int
    tail: int


@dataclass(frozen=True)
class QueuePosition:
    """Where a queue stands, for a successor process to go on from (upgrade in place).
    An SQ's tail is the last one the guest gave (rung or in its doorbell); phase: a CQ's."""

    qid: int
    is_cq: bool
    head: int
    tail: int
    phase: int = 0


class DataPlane(Protocol):
    """One controller's I/O queues, their thread, and what they need to run."""

    #: "native" or "python"
    kind: str
    #: seconds of polling with nothing to do before the thread parks (the upper bound
    #: of the adaptive window); 0 polls forever
    poll_timeout: float

    # --- the thread -------------------------------------------------------------------

    def start(self) -> None: ...

    def stop(self) -> None:
        """Finish the commands being processed and every transfer in flight (posted),
        then end the thread. The backends stay open (the caller closes them)."""
        ...

    def close(self) -> None:
        """Stop, and release what the plane holds of its own (rings, eventfds): for a
        controller going away. Nothing is called on a closed plane."""
        ...

    def wake(self) -> None:
        """New work may be in an I/O queue."""
        ...

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """While held: no I/O command is being processed and none is in flight (those
        in flight were completed and posted first)."""
        ...

    def process(self) -> int:
        """One pass over the I/O queues on the caller's thread, then every transfer in
        flight completed; returns commands fetched. For tests that drive the plane
        without starting its thread."""
        ...

    def pin(self, cpus: set[int] | None) -> None:
        """Run the thread on these CPUs (None: anywhere). OSError for CPUs that are not."""
        ...

    @property
    def cpus(self) -> set[int] | None: ...

    @property
    def native_id(self) -> int | None:
        """The thread's id for the OS (top -H, perf, taskset), once started."""
        ...

    # --- I/O queues (Create/Delete I/O SQ/CQ, Doorbell Buffer Config, reset) --------------

    def create_cq(
        self, qid: int, base: int, size: int, vector: int, interrupts_enabled: bool
    ) -> None:
        """DmaError if the queue's memory is not mapped."""
        ...

    def create_sq(self, qid: int, base: int, size: int, cqid: int, priority: int) -> None:
        """DmaError if the queue's memory is not mapped."""
        ...

    def delete_sq(self, qid: int) -> None:
        """Commands fetched from the queue run to completion first (Base 5.6); those not
        fetched go with it."""
        ...

    def delete_cq(self, qid: int) -> None: ...

    def set_journal(self, journal: Journal) -> None:
        """Keep `journal` (handover/journal.py) as the I/O queues fetch and post."""
        ...

    def positions(self) -> list[QueuePosition]:
        """Every queue's position (paused, for a successor process)."""
        ...

    def restore(
        self,
        create: Callable[[], None],
        positions: list[QueuePosition],
    ) -> None:
        """Recreate a predecessor's queues: `create()` makes them (create_cq, create_sq,
        set_doorbell_buffers) without touching their doorbells, which hold the guest's
        latest values; then each goes to its position. ValueError for a position that
        fits no queue. Before start()."""
        ...

    def set_doorbell_buffers(self, shadow_page: int, eventidx_page: int) -> None:
        """Shadow doorbells and EventIdx for every queue, present and future."""
        ...

    def doorbell(self, qid: int, is_cq: bool, value: int) -> bool:
        """A trapped doorbell write to I/O queue `qid`; False if the queue does not
        exist or the value is out of range (the caller raises the event). Values that
        are only known to be wrong later (a CQ head past the tail) become an
        InvalidDoorbell event."""
        ...

    def abort(self, sqid: int, cid: int) -> bool:
        """Mark command `cid` if it is still queued in I/O SQ `sqid`: it completes with
        Command Abort Requested when fetched. False if it was not found there."""
        ...

    def enable(self) -> None:
        """The controller became ready (CC.EN 0 → 1)."""
        ...

    def halt(self) -> None:
        """The controller is fatal (CSTS.CFS): process nothing until reset()."""
        ...

    def marked_aborts(self) -> int:
        """Commands marked by abort() and not fetched yet (the Abort Command Limit)."""
        ...

    def reset(self) -> None:
        """Controller Level Reset: transfers in flight are waited for and complete
        unposted, every I/O queue and the doorbell buffers go, marks are forgotten."""
        ...

    def enable_notifications(self) -> bool:
        """What the thread does before it parks: arm every SQ's EventIdx (shadow
        doorbells) so that the guest's next submission rings, fence, and look again;
        True if commands are waiting (then it must not park). For tests, with the
        thread not started."""
        ...

    def suppress_notifications(self) -> None:
        """What the thread does while it polls: EventIdx one behind each SQ's tail, so
        that the guest rings no doorbell. For tests, with the thread not started."""
        ...

    def pending_interrupt(self) -> bool:
        """Whether an interrupt-enabled I/O CQ holds entries the host has not consumed
        (the INTx level, with the admin CQ's)."""
        ...

    # --- what the I/O commands need -------------------------------------------------------

    def attach_namespace(self, ns: Namespace) -> None: ...

    def detach_namespace(self, nsid: int) -> None:
        """Commands for it already fetched have completed when this returns."""
        ...

    def update_namespace(self, ns: Namespace) -> None:
        """`ns` changed size, or state (failed, read-only)."""
        ...

    def memory_changed(self, change: MemoryChange | None = None) -> None:
        """The guest memory table changed (a DMA_MAP, or a DMA_UNMAP while paused), by
        `change` where the memory says (None: anything may have): no command touches
        what was unmapped once this returns."""
        ...

    def release_memory(self) -> None:
        """Drop every reference to guest memory (the transport is about to unmap; the
        plane is paused). It is looked up again on next use."""
        ...

    def configure(self, settings: IoSettings) -> None: ...

    # --- what the control side reads ------------------------------------------------------

    def take_events(self) -> list[DataPlaneEvent]:
        """What happened since the last call, in order."""
        ...

    def queues(self) -> list[QueueState]:
        """Every I/O queue's head and tail (SQs first, by QID; then CQs)."""
        ...

    def counters(self) -> IoCounters:
        """SMART / Health's I/O counters."""
        ...

    def statistics(self) -> dict[str, Any]:
        """Per-queue counters and latency histograms, interrupts by vector, the
        thread's time split: the `stats` snapshot (statistics.py's shape)."""
        ...


#: what the data plane calls to wake the control side after queueing an event
Notify = Callable[[], None]


def make_data_plane(
    kind: str,
    config: ControllerConfig,
    memory: GuestMemory,
    interrupts: InterruptSink,
    namespaces: dict[int, Namespace],
    engine: IoEngine,
    notify: Notify,
    doorbell_words: memoryview | None = None,
    poll_timeout: float = 0.5,
) -> DataPlane:
    """The data plane `kind` names (DATA_PLANES) for one controller. `namespaces` is
    the controller's table, which the data plane changes (attach, detach) while it is
    paused; `notify` wakes the control side (the admin worker)."""
    if kind == "python":
        from .python import PythonDataPlane

        return PythonDataPlane(
            config, memory, interrupts, namespaces, engine, notify, doorbell_words, poll_timeout
        )
    if kind == "native":
        from .native import NativeDataPlane

        return NativeDataPlane(
            config, memory, interrupts, namespaces, engine, notify, doorbell_words, poll_timeout
        )
    raise ValueError(f"data plane {kind!r}: one of {', '.join(DATA_PLANES)}")


def make_vector_routes(kind: str, vectors: int) -> VectorRoutes:
    """Where MSI-X vectors go, of the kind the data plane `kind` signals through: the
    PCI function's MSI-X capability decides the routes, the data plane uses them."""
    if kind == "native":
        from .. import _native

        routes: VectorRoutes = _native.VectorRoutes(vectors)
        return routes
    from ..pci.msix import EventfdRoutes

    return EventfdRoutes(vectors)
