"""Crash recovery: a small supervisor runs the daemon (or `serve`) as its worker, and
keeps what a successor needs if the worker dies (SIGKILL, a segfault in native code, an
out-of-memory kill):

- duplicates of every fd the worker serves with (its vfio-user connections, guest
  memory, eventfds, storage, listeners), so that no socket closes when it dies;
- the worker's last checkpoint: the state document of an upgrade (document.py), sent
  by the worker at every change of controller state that is not I/O (admin commands,
  DMA maps, interrupt setup, config space, namespaces);
- each controller's I/O journal (journal.py), a memfd whose records the queues keep at
  every command.

When the worker dies, the supervisor hands the checkpoint to `nvme-mdev takeover
--crashed` as an old process would hand its state over in an upgrade; the successor
brings it up to date from the journals and completes the commands that were in flight
with Command Interrupted (recovery.py). That successor is started ahead of need (a
standby that has started Python and imported nvme-mdev, most of the time a recovery
would take otherwise), and another one soon after it takes over. An upgrade of a
supervised worker tells the supervisor its successor's pid (the supervisor is a child
subreaper: it inherits it).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any, Final

from .. import systemd
from ..vfio_user.framing import close_fds
from .document import VERSION, Channel, HandoverError
from .fdstore import CheckpointStore, stored_checkpoint

if TYPE_CHECKING:
    from .upgrade import Served

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER: Final = 36
#: how long a successor may take to start and rebuild after a crash
RECOVERY_TIMEOUT: Final = 60.0
#: how long after a recovery the next standby successor starts
STANDBY_DELAY: Final = 2.0


# --- the worker's side ---------------------------------------------------------------

_changed = threading.Event()
_generations = threading.Condition()
#: changes so far, and the last change a checkpoint sent covers
_changes = 0
_covered = 0
#: whether a checkpointer runs (otherwise nothing waits for one)
_active = False
#: the longest a change waits for its checkpoint
CHECKPOINT_WAIT: Final = 2.0


#: one exchange at a time on the supervisor's channel (a checkpoint and its receipt, an
#: upgrade's news and its ack): the supervisor answers each in order
exchange = threading.Lock()


def state_changed() -> None:
    """Controller state that is not I/O changed: checkpoint it (if supervised), and
    wait until the supervisor has kept the checkpoint (in systemd's fd store too, when
    run by systemd), so that the guest never learns of a change (a completion's
    interrupt, a reply) that a crash could lose. Call it with no lock held."""
    global _changes
    if not _active:
        return
    with _generations:
        _changes += 1
        mine = _changes
    _changed.set()
    with _generations:
        _generations.wait_for(lambda: _covered >= mine or not _active, CHECKPOINT_WAIT)


class Checkpointer:
    """Sends the supervisor a checkpoint after every change (state_changed())."""

    def __init__(self, served: Served) -> None:
        self._served = served
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)

    def start(self) -> None:
        global _active
        _active = True
        _changed.set()  # the first one now
        self._thread.start()

    def stop(self) -> None:
        global _active
        self._stopping = True
        with _generations:
            _active = False
            _generations.notify_all()
        _changed.set()
        self._thread.join(10)

    def _run(self) -> None:
        from .upgrade import state_document

        served = self._served
        channel = served.supervisor
        assert channel is not None
        served.supervisor_receipts = served.supervisor_receipts or _says_hello(channel)
        global _covered
        while True:
            _changed.wait()
            if self._stopping:
                return
            _changed.clear()
            with _generations:
                covers = _changes
            fds: list[int] = []
            try:
                with served.daemon.lock:
                    document = state_document(served, fds, checkpoint=True)
                with exchange:
                    if served.supervisor_receipts:
                        channel.send({"checkpoint": document, "receipt": covers}, fds)
                        _await_receipt(channel, covers)
                    else:  # (a supervisor of an older nvme-mdev: sent is all we know)
                        channel.send({"checkpoint": document}, fds)
            except OSError as exc:
                log.error("checkpoint not sent: %s", exc)
                return
            except Exception:
                log.exception("checkpoint failed")
            with _generations:
                _covered = max(_covered, covers)
                _generations.notify_all()


#: what a supervisor sends first on a worker's channel, before the worker has it
HELLO: Final = {"supervisor": {"receipts": True}}


def _says_hello(channel: Channel) -> bool:
    """Whether the supervisor confirms each checkpoint it keeps: it said so before this
    process got the channel (one of an older nvme-mdev says nothing)."""
    try:
        message, fds = channel.receive(0)
    except HandoverError:
        return False  # (nothing there)
    finally:
        channel.sock.settimeout(None)  # (sending blocks, as ever)
    close_fds(fds)
    return bool(message.get("supervisor", {}).get("receipts"))


def _await_receipt(channel: Channel, covers: int) -> None:
    try:
        while True:
            message, fds = channel.receive(CHECKPOINT_WAIT)
            close_fds(fds)
            if message.get("kept") == covers:
                return
    except HandoverError as exc:
        log.warning("checkpoint %d: no receipt from the supervisor (%s)", covers, exc)
    finally:
        channel.sock.settimeout(None)  # (sending blocks, as ever)


# --- the supervisor ------------------------------------------------------------------


class Supervisor:
    def __init__(self, worker: list[str], successor: list[str]) -> None:
        """`worker`: the command that runs the daemon, to which `--checkpoint-fd FD` is
        appended; `successor`: the one that takes over after a crash (`takeover
        --crashed`), to which `--fd FD` is appended."""
        self.worker = worker
        self.successor = successor
        self.pid = 0
        self._listener: threading.Thread | None = None
        self._checkpoint: tuple[dict[str, Any], list[int]] | None = None
        self._lock = threading.Lock()
        self._stop_signal: int | None = None
        #: systemd's fd store, where checkpoints are kept too (when run by systemd)
        self._store: CheckpointStore | None = None
        #: the successor that waits for the next crash
        self._standby: Successor | None = None
        self._closing = False
        #: crashes recovered from, and the time from each crash to the successor serving
        self.recoveries: list[float] = []

    def run(self) -> int:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log.warning("supervisor: cannot become a child subreaper: upgrades lose it")
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._forward)
        try:
            return self._supervise()
        finally:
            self._closing = True
            self._discard_standby()

    def _supervise(self) -> int:
        if not self._start():
            return 1
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                return 0
            except InterruptedError:
                continue
            if pid != self.pid:
                # an upgraded worker's predecessor, a successor that failed, a standby
                self._reaped(pid)
                continue
            code = os.waitstatus_to_exitcode(status)
            if self._stop_signal is not None or code == 0:
                return max(code, 0)
            # What the worker sent before it died is still to be read: read it all
            # (the channel ends with the worker) before taking its last checkpoint.
            if self._listener is not None:
                self._listener.join(RECOVERY_TIMEOUT)
            with self._lock:
                recoverable = self._checkpoint is not None
            if not recoverable:  # it never served (a configuration error, say)
                return code if code > 0 else 1
            log.error("supervisor: worker %d died (%s): recovering", pid, _how(code))
            if not self._recover():
                return 1

    def _start(self) -> bool:
        """Start the worker, or, when systemd restarted us with a checkpoint in its fd
        store (the last supervisor died), recover from that."""
        if systemd.under_systemd():
            self._store, stored = stored_checkpoint()
            if stored is not None:
                log.error("supervisor: restarted by systemd: recovering from its fd store")
                self._checkpoint = stored
                return self._recover()
        ours, theirs = socket.socketpair()
        Channel(ours).send(HELLO)  # (there before the worker looks)
        try:
            child = subprocess.Popen(
                [*self.worker, "--checkpoint-fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        self.pid = child.pid
        self._listen(Channel(ours))
        self._start_standby(delay=STANDBY_DELAY)
        return True

    def _reaped(self, pid: int) -> None:
        """A child other than the worker ended: if it was the standby, forget it."""
        with self._lock:
            standby = self._standby
            if standby is None or standby.process.pid != pid:
                return
            self._standby = None
        log.warning("supervisor: the standby successor %d ended: starting another", pid)
        standby.process.returncode = -1  # (reaped: never to be signalled again)
        standby.discard()
        self._start_standby(delay=STANDBY_DELAY)

    def _forward(self, signum: int, frame: object) -> None:
        if signum != signal.SIGHUP:
            self._stop_signal = signum
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def _listen(self, channel: Channel) -> None:
        """Take checkpoints (and news of an upgrade) from the worker, on a thread."""

        def run() -> None:
            while True:
                try:
                    message, fds = channel.receive(None)
                except HandoverError:
                    channel.close()
                    return  # the worker died (or stopped): run() sees it
                if "checkpoint" in message:
                    # Its copy of the worker's end of this channel: not kept (the channel
                    # must end when the worker does; a successor gets a new one).
                    mine = message["checkpoint"].get("supervisor")
                    if mine is not None and 0 <= mine < len(fds):
                        close_fds([fds[mine]])
                        fds[mine] = -1
                    with self._lock:
                        old, self._checkpoint = self._checkpoint, (message["checkpoint"], fds)
                    if self._store is not None:
                        self._store.keep(message["checkpoint"], fds)
                    if old is not None:
                        close_fds(old[1])
                    if "receipt" in message:
                        with contextlib.suppress(OSError):
                            channel.send({"kept": message["receipt"]})
                elif "successor" in message:
                    self.pid = int(message["successor"])
                    log.info("supervisor: the worker is pid %d now (upgraded)", self.pid)
                    with contextlib.suppress(OSError):
                        channel.send({"ack": True})  # the old worker may exit now
                    # The standby imported the code installed before: start one that has
                    # what the upgrade brought.
                    self._discard_standby()
                    self._start_standby(delay=STANDBY_DELAY)
                else:
                    close_fds(fds)

        self._listener = threading.Thread(target=run, name="supervisor", daemon=True)
        self._listener.start()

    def _recover(self) -> bool:
        crashed_at = time.monotonic()
        with self._lock:
            checkpoint = self._checkpoint
            successor, self._standby = self._standby, None
        if checkpoint is None:
            log.error("supervisor: no checkpoint to recover from")
            if successor is not None:
                successor.discard()
            return False
        document, held = checkpoint
        hello: dict[str, Any] | None = None
        if successor is not None:
            try:
                hello = successor.hello()
            except HandoverError as exc:
                log.warning("supervisor: the standby successor failed (%s): starting one", exc)
                successor.discard()
        if hello is None:
            successor = Successor(self.successor)
            try:
                hello = successor.hello()
            except HandoverError as exc:
                log.error("supervisor: recovery failed: %s", exc)
                successor.discard()
                return False
        assert successor is not None
        # The successor's checkpoint channel replaces the dead worker's.
        fds = list(held)
        if document.get("supervisor") is not None:
            fds[document["supervisor"]] = successor.theirs.fileno()
        channel = successor.channel
        Channel(successor.ours).send(HELLO)  # (there before the successor looks)
        try:
            if VERSION not in hello.get("reads", []):
                raise HandoverError(f"the successor reads state versions {hello.get('reads')}")
            channel.send(document, fds)
            successor.theirs.close()
            answer, _ = channel.receive(RECOVERY_TIMEOUT)
            if not answer.get("ready"):
                raise HandoverError(f"the successor refused: {answer.get('refused', answer)}")
            channel.send({"commit": True, "held_at": crashed_at})
            serving, _ = channel.receive(RECOVERY_TIMEOUT)
            log.info(
                "supervisor: the successor served %s ms after the crash", serving.get("paused_ms")
            )
        except HandoverError as exc:
            log.error("supervisor: recovery failed: %s", exc)
            successor.discard()
            return False
        channel.close()
        self.pid = successor.process.pid
        self._listen(Channel(successor.ours))
        took = (time.monotonic() - crashed_at) * 1000
        self.recoveries.append(took)
        log.info(
            "supervisor: pid %d serves again, %.0f ms after the crash was seen", self.pid, took
        )
        self._start_standby(delay=STANDBY_DELAY)
        return True

    def _start_standby(self, delay: float = 0.0) -> None:
        """Have a successor ready for the next crash, after `delay` seconds (its start
        competes for the CPUs with the worker that just took over)."""

        def start() -> None:
            with self._lock:
                if self._standby is None and not self._closing and self._stop_signal is None:
                    self._standby = Successor(self.successor)

        if delay:
            timer = threading.Timer(delay, start)
            timer.daemon = True
            timer.start()
        else:
            start()

    def _discard_standby(self) -> None:
        with self._lock:
            standby, self._standby = self._standby, None
        if standby is not None:
            standby.discard()


class Successor:
    """A `takeover --crashed` process, started ahead of need: it has started Python and
    imported nvme-mdev, and waits for a checkpoint, so that a crash costs none of that.
    If it died meanwhile, hello() says so and the supervisor starts another."""

    def __init__(self, command: list[str]) -> None:
        #: its channel to the supervisor once it serves (checkpoints): ours, and its end
        self.ours, self.theirs = socket.socketpair()
        handover, remote = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [*command, "--fd", str(remote.fileno())],
                pass_fds=(remote.fileno(), self.theirs.fileno()),
            )
        finally:
            remote.close()
        self.channel = Channel(handover)

    def hello(self) -> dict[str, Any]:
        """Its first message (which versions it reads), once it has started."""
        message, fds = self.channel.receive(RECOVERY_TIMEOUT)
        close_fds(fds)
        return message

    def discard(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
                self.process.wait(10)
        for sock in (self.channel.sock, self.ours, self.theirs):
            sock.close()


def _how(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def supervise(worker: list[str], successor: list[str]) -> int:
    return Supervisor(worker, successor).run()
