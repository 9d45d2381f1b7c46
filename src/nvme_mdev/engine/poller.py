"""The I/O thread: polls the guest's I/O queues while there is work, parks when
there is none, and is woken by the guest's next doorbell.

With shadow doorbells the guest writes new SQ tails into its own memory, and
the thread sees them by polling. Before parking it arms every EventIdx so the
guest's next submission rings the real (trapped) doorbell, then looks once more
for a submission that raced with the arming. Without shadow doorbells every
doorbell traps anyway, so the thread parks as soon as the queues are empty.
With mapped doorbells (BAR0's doorbell page in the client's memory) nothing ever
traps: the thread polls for good, admin doorbell included, at the cost of a core.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Iterator

from ..nvme.controller import Controller

log = logging.getLogger(__name__)

DEFAULT_POLL_TIMEOUT = 0.5
#: longest wait for an in-flight transfer before looking at the queues again (ns)
IN_FLIGHT_WAIT_NS = 200_000


class IoThread:
    def __init__(
        self, controller: Controller, poll_timeout: float = DEFAULT_POLL_TIMEOUT, name: str = "io"
    ) -> None:
        self.controller = controller
        #: seconds of idle polling before parking; 0 polls forever
        self.poll_timeout = poll_timeout
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._pause_requests = 0
        self._is_paused = False
        self._running = False
        # A full memory barrier (an atomic instruction) between arming EventIdx and
        # re-reading the shadow tails, so neither side misses the other's store.
        self._barrier = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._cpus: set[int] | None = None
        self._started_ns = 0
        self._parked_since = 0  # monotonic ns while parked, else 0
        self.parks = 0
        self.wakeups = 0
        controller.io_thread = self

    def start(self) -> None:
        self._running = True
        self._started_ns = time.monotonic_ns()
        self._thread.start()

    @property
    def native_id(self) -> int | None:
        return self._thread.native_id

    @property
    def cpus(self) -> set[int] | None:
        return self._cpus

    def pin(self, cpus: set[int] | None) -> None:
        """Run the thread on these CPUs only (None: wherever the process may run).
        Takes effect at once on a running thread. OSError for CPUs that do not exist."""
        allowed = cpus if cpus is not None else os.sched_getaffinity(0)
        tid = self._thread.native_id
        if tid is not None and self._thread.is_alive():
            os.sched_setaffinity(tid, allowed)
        elif cpus is not None and not cpus <= os.sched_getaffinity(0):
            raise OSError(errno.EINVAL, f"CPUs {sorted(cpus)} not available to this process")
        self._cpus = cpus

    def time_split_ns(self) -> tuple[int, int]:
        """(polling, parked) nanoseconds since start; polling includes processing."""
        stats = self.controller.stats
        now = time.monotonic_ns()
        parked = stats.parked_ns + (now - self._parked_since if self._parked_since else 0)
        total = now - self._started_ns if self._started_ns else 0
        return max(total - parked, 0), parked

    def stop(self) -> None:
        """Finish the commands being processed, then end the thread."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._wake.set()
        # (the loop ends after its current pass; in-flight transfers are drained below)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        # Whatever is still in flight completes before the caller closes the backends.
        self.controller.drain_io()

    def wake(self) -> None:
        self._wake.set()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the thread at the top of its loop, outside any queue."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            yield
            return
        with self._cond:
            self._pause_requests += 1
            self._wake.set()
            while not self._is_paused and self._thread.is_alive() and self._running:
                self._cond.wait(0.1)
        try:
            yield
        finally:
            with self._cond:
                self._pause_requests -= 1
                self._cond.notify_all()

    def _hold_if_asked(self) -> None:
        with self._cond:
            while self._pause_requests and self._running:
                self._is_paused = True
                self._cond.notify_all()
                self._cond.wait()
            self._is_paused = False

    def _run(self) -> None:
        ctrl = self.controller
        if self._cpus is not None:
            os.sched_setaffinity(0, self._cpus)
        idle_since = time.monotonic()
        while self._running:
            if self._pause_requests:
                self._hold_if_asked()
                continue
            try:
                if ctrl.process_io():
                    idle_since = time.monotonic()
                    continue
            except Exception:
                # A bug, not a guest error (those become status codes): stop this
                # controller until the guest resets it, but keep serving.
                log.exception("I/O processing failed")
                ctrl.fatal("I/O processing failed")
            if ctrl.io_in_flight() and not ctrl.registers.fatal:
                # Never park with transfers in flight: nothing would post their
                # completions. Sleep in the kernel until one ends, briefly, so that
                # new submissions are still seen.
                ctrl.wait_io(IN_FLIGHT_WAIT_NS)
                idle_since = time.monotonic()
                continue
            if ctrl.doorbell_words is not None and ctrl.registers.ready:
                # Mapped doorbells never trap: nothing would wake a parked thread.
                # (Disabled, it parks: enabling the controller wakes it.)
                ctrl.poll_mapped_doorbells()
                time.sleep(0)  # let the transport thread have the GIL
                continue
            polling = ctrl.polls_doorbells and not ctrl.registers.fatal
            if polling and (
                self.poll_timeout == 0 or time.monotonic() - idle_since < self.poll_timeout
            ):
                time.sleep(0)  # let the transport thread have the GIL
                continue
            self._park()
            idle_since = time.monotonic()

    def _park(self) -> None:
        ctrl = self.controller
        ctrl.flush_coalesced_interrupts(force=True)  # nobody would send them while parked
        self._wake.clear()
        ctrl.arm_event_indexes(parked=True)
        with self._barrier:
            pass
        if ctrl.io_pending() or self._pause_requests or not self._running:
            ctrl.arm_event_indexes(parked=False)
            return
        self.parks += 1
        ctrl.stats.parks += 1
        self._parked_since = time.monotonic_ns()
        self._wake.wait()
        ctrl.stats.parked_ns += time.monotonic_ns() - self._parked_since
        self._parked_since = 0
        self.wakeups += 1
        ctrl.arm_event_indexes(parked=False)


class AdminWorker:
    """Runs admin commands (and delivers asynchronous events) off the transport's
    thread, so that an admin command may wait on the transport (DMA messages)."""

    def __init__(self, controller: Controller, name: str = "admin") -> None:
        self.controller = controller
        self._running = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self.controller.admin_doorbell.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        doorbell = self.controller.admin_doorbell
        while self._running:
            doorbell.wait()
            doorbell.clear()
            if not self._running:
                break
            try:
                self.controller.process_admin()
            except Exception:
                log.exception("admin command processing failed")
                self.controller.fatal("admin worker failed")
