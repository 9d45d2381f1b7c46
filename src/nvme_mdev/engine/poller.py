"""The threads that serve a controller: the Python data plane's I/O thread (with the
adaptive poll window both data planes use) and the admin worker."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ..guest_memory import DmaError

if TYPE_CHECKING:
    from ..dataplane.python import PythonDataPlane
    from ..nvme.controller import Controller

log = logging.getLogger(__name__)

DEFAULT_POLL_TIMEOUT = 0.5
#: longest wait for an in-flight transfer before looking at the queues again (ns)
IN_FLIGHT_WAIT_NS = 200_000
#: the adaptive poll window: where it starts, and the longest idle gap that makes it
#: grow (AdaptivePoll)
POLL_WINDOW_START_NS = 64_000
POLL_GROW_LIMIT_NS = 1_000_000


class AdaptivePoll:
    """How long the I/O thread polls with nothing to do before it parks: a window that
    grows while parking proves premature and shrinks while it does not, as QEMU's
    iothreads adapt theirs (util/aio-posix.c, poll-grow / poll-shrink).

    After a park, the guest's next doorbell says how long the queues were idle (the
    gap from the last work to the wake-up). A gap under POLL_GROW_LIMIT_NS means
    polling a little longer would have caught that submission without a trapped
    doorbell (each costs the transport a message and the thread a wake-up): the window
    doubles, up to the operator's poll timeout. A longer gap means the guest went
    idle: polling longer would only have burnt a CPU that a small host needs for the
    guest's own vCPUs, so the window halves (to 0: park at once). Polling that finds
    work before the window ends changes nothing."""

    __slots__ = ("limit_ns", "window_ns")

    def __init__(self, limit_ns: int) -> None:
        #: the operator's bound (--poll-timeout-ms); 0: poll forever
        self.limit_ns = limit_ns
        self.window_ns = min(POLL_WINDOW_START_NS, limit_ns)

    def set_limit(self, limit_ns: int) -> None:
        self.limit_ns = limit_ns
        self.window_ns = min(self.window_ns or POLL_WINDOW_START_NS, limit_ns)

    def keep_polling(self, idle_ns: int) -> bool:
        """Whether to poll on after `idle_ns` without work."""
        return self.limit_ns == 0 or idle_ns < self.window_ns

    def woken(self, gap_ns: int) -> None:
        """The thread parked and was woken by work `gap_ns` after the last work."""
        if gap_ns < POLL_GROW_LIMIT_NS:
            self.window_ns = min(max(2 * self.window_ns, POLL_WINDOW_START_NS), self.limit_ns)
        else:
            self.window_ns //= 2
            if self.window_ns < POLL_WINDOW_START_NS // 4:
                self.window_ns = 0


class IoThread:
    """The Python data plane's thread: polls its I/O queues while there is work, parks
    when there is none, and is woken by the guest's next doorbell.

    With shadow doorbells the guest writes new SQ tails into its own memory, and the
    thread sees them by polling. Before parking it arms every EventIdx so the guest's
    next submission rings the real (trapped) doorbell, then looks once more for a
    submission that raced with the arming. Without shadow doorbells every doorbell
    traps anyway, so the thread parks as soon as the queues are empty. With mapped
    doorbells (BAR0's doorbell page in the client's memory) nothing ever traps: the
    thread polls for good, admin doorbell included, at the cost of a core."""

    def __init__(
        self, plane: PythonDataPlane, poll_timeout: float = DEFAULT_POLL_TIMEOUT, name: str = "io"
    ) -> None:
        self.plane = plane
        self.poll = AdaptivePoll(round(poll_timeout * 1e9))
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._pause_requests = 0
        self._is_paused = False
        self._running = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._cpus: set[int] | None = None
        self._started_ns = 0
        self._parked_since = 0  # monotonic ns while parked, else 0
        self.parks = 0
        self.wakeups = 0

    @property
    def poll_timeout(self) -> float:
        """Seconds of idle polling before parking, at most; 0 polls forever."""
        return self.poll.limit_ns / 1e9

    @poll_timeout.setter
    def poll_timeout(self, seconds: float) -> None:
        self.poll.set_limit(round(seconds * 1e9))

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
        stats = self.plane.stats
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
        self.plane.drain()

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
        plane = self.plane
        if self._cpus is not None:
            os.sched_setaffinity(0, self._cpus)
        last_work = time.monotonic_ns()
        while self._running:
            if self._pause_requests:
                self._hold_if_asked()
                continue
            try:
                if plane.process_pass():
                    last_work = time.monotonic_ns()
                    continue
            except Exception:
                # A bug, not a guest error (those become status codes): stop this
                # controller until the guest resets it, but keep serving.
                log.exception("I/O processing failed")
                plane._fatal("I/O processing failed")
            if plane.in_flight and not plane.halted:
                # Never park with transfers in flight: nothing would post their
                # completions. Sleep in the kernel until one ends, briefly, so that
                # new submissions are still seen.
                plane.wait_io(IN_FLIGHT_WAIT_NS)
                last_work = time.monotonic_ns()
                continue
            if plane.polls_forever:
                plane.poll_mapped_doorbells()
                time.sleep(0)  # let the transport thread have the GIL
                continue
            polling = plane.polls_doorbells and not plane.halted
            if polling and self.poll.keep_polling(time.monotonic_ns() - last_work):
                time.sleep(0)  # let the transport thread have the GIL
                continue
            try:
                if self._park():
                    self.poll.woken(time.monotonic_ns() - last_work)
            except DmaError as exc:
                # EventIdx in memory the guest unmapped: this controller cannot go on
                # (the guest resets it), but the thread must, or nothing ever would.
                plane._fatal(f"shadow doorbells: {exc}")
            last_work = time.monotonic_ns()

    def _park(self) -> bool:
        """Sleep until a doorbell (or a pause, or stop) wakes the thread; False if work
        arrived while arming the doorbells, and it did not sleep."""
        plane = self.plane
        plane.flush_coalesced_interrupts(force=True)  # nobody would send them while parked
        self._wake.clear()
        # (A fatal controller asks the guest for nothing: it sleeps until reset.)
        arming = not plane.halted
        if (arming and plane.enable_notifications()) or self._pause_requests or not self._running:
            plane.suppress_notifications()
            return False
        self.parks += 1
        stats = plane.stats
        stats.parks += 1
        self._parked_since = time.monotonic_ns()
        self._wake.wait()
        stats.parked_ns += time.monotonic_ns() - self._parked_since
        self._parked_since = 0
        self.wakeups += 1
        if arming:
            plane.suppress_notifications()
        return True


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
