"""Upgrade in place: the conversation between a serving process and its successor.

    old process                               new process (nvme-mdev takeover)
    -----------                               --------------------------------
    spawn the successor on a socket pair
                                      <-----  hello: the state versions it reads
    hold every controller: the transport
    between two messages, no admin command
    running, no I/O command in flight
    state document + every fd         ----->
                                              open the namespaces (the storage fds
                                              it inherited), rebuild each controller
                                              where the old one stopped; start nothing
                                      <-----  ready (or: refused, and why)
    commit                            ----->
    exit, touching nothing the guest sees     start: serve the same sockets

Until it sends commit the old process can go back to serving as if nothing happened:
the successor has only read (an interrupt it re-sends is harmless). A successor that
refuses, crashes or does not answer in time leaves the old one serving, and the
request gets one line saying why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from . import descriptors
from .document import READS, VERSION, Channel, HandoverError, check_document, new_document

if TYPE_CHECKING:
    from ..control import ControlServer
    from ..daemon import Daemon
    from ..metrics import MetricsServer

log = logging.getLogger(__name__)

#: how long the successor may take to start (import, hello) and to rebuild
START_TIMEOUT: Final = 60.0
RESTORE_TIMEOUT: Final = 60.0

_running = threading.Lock()
#: what stays held after a handover, until the process exits
_kept_until_exit: list[contextlib.ExitStack] = []


@dataclass
class Served:
    """What a process serves: the daemon and its control-plane listeners."""

    daemon: Daemon
    control: ControlServer
    metrics: MetricsServer | None
    #: the supervisor's checkpoint channel, when one runs this process (crash recovery)
    supervisor: Channel | None = None
    #: whether the supervisor confirms each checkpoint it kept (supervisor.py)
    supervisor_receipts: bool = False


@dataclass(frozen=True)
class Handed:
    """A successful handover: the successor's pid, and how long the guests waited."""

    pid: int
    paused_ms: float


def upgrade(served: Served, command: list[str] | None = None) -> Handed:
    """Hand everything to a new process (`command`, run with the handover socket's fd
    appended; default: this Python's `nvme_mdev takeover --fd`). On success this
    process must exit at once without touching anything it served. HandoverError
    (one line) if the new process cannot take over: this one is serving as before."""
    if not _running.acquire(blocking=False):
        raise HandoverError("an upgrade is already running")
    try:
        with served.daemon.lock:
            return _hand_over(served, command)
    finally:
        _running.release()


def _hand_over(served: Served, command: list[str] | None) -> Handed:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = Channel(ours)
    argv = (command or [sys.executable, "-m", "nvme_mdev.cli", "takeover", "--fd"]) + [
        str(theirs.fileno())
    ]
    try:
        child = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), close_fds=True)
    except OSError as exc:
        channel.close()
        raise HandoverError(f"cannot start the new process: {exc}") from exc
    finally:
        theirs.close()
    try:
        return _converse(served, channel, child)
    except BaseException:
        channel.close()  # the successor sees EOF and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)
        if child.poll() is None:
            child.kill()
            child.wait()
        raise


def _converse(served: Served, channel: Channel, child: subprocess.Popen[bytes]) -> Handed:
    if not channel.peer_is_us():
        raise HandoverError("the handover socket's peer is another user")
    hello, _ = _answer(channel, child, START_TIMEOUT)
    reads = hello.get("reads")
    if not isinstance(reads, list) or VERSION not in reads:
        raise HandoverError(
            f"the new process ({hello.get('version', '?')}) reads state versions {reads}, "
            f"this one writes version {VERSION}"
        )
    daemon = served.daemon
    with contextlib.ExitStack() as held:
        started = time.monotonic()
        for managed in daemon.controllers.values():
            held.enter_context(managed.device.held())
        fds: list[int] = []
        document = state_document(served, fds, checkpoint=False)
        try:
            released = daemon.release_cluster_locks()
        except Exception as exc:
            raise HandoverError(str(exc)) from exc
        held.callback(daemon.retake_cluster_locks, released)  # (unless committed)
        channel.send(document, fds)
        answer, _ = _answer(channel, child, RESTORE_TIMEOUT)
        if not answer.get("ready"):
            raise HandoverError(f"the new process refused: {answer.get('refused', answer)}")
        # CLOCK_MONOTONIC is the host's: the successor measures the pause to its start.
        channel.send({"commit": True, "held_at": started})
        # From here on the successor serves: nothing held may be let go, so the caller
        # exits. Kept referenced: a held() generator that is garbage-collected closes,
        # and closing it would resume this process's threads next to the successor's.
        _kept_until_exit.append(held.pop_all())
    paused_ms = (time.monotonic() - started) * 1000  # (at least)
    with contextlib.suppress(HandoverError):
        serving, _ = channel.receive(START_TIMEOUT)
        paused_ms = float(serving.get("paused_ms", paused_ms))
    if served.supervisor is not None:  # it waits for the successor now, not for us
        from .supervisor import exchange

        # Held until this process exits: the channel is the successor's now (no
        # checkpoint of ours may go, nor its receipt be read, after this).
        exchange.acquire()
        with contextlib.suppress(OSError, HandoverError):
            served.supervisor.send({"successor": child.pid})
            while not served.supervisor.receive(START_TIMEOUT)[0].get("ack"):
                pass  # (a late checkpoint receipt) the ack comes before we exit
    # The successor reads the supervisor's channel from now on (one reader at a time).
    with contextlib.suppress(OSError):
        channel.send({"released": True})
    log.info("handed over to pid %d (guests paused %.1f ms)", child.pid, paused_ms)
    return Handed(child.pid, paused_ms)


def state_document(served: Served, fds: list[int], checkpoint: bool) -> dict[str, Any]:
    """Everything `served` is, for a successor: held (an upgrade) or as it is now (a
    checkpoint for crash recovery); the fds to pass appended to `fds`."""
    control = len(fds)
    fds.append(served.control.listener.fileno())
    metrics = None
    if served.metrics is not None:
        metrics = len(fds)
        fds.append(served.metrics.listener.fileno())
    controllers = served.daemon.handover_state(fds, checkpoint)
    storage = []
    for key, fd in descriptors.held():
        storage.append([*key, len(fds)])
        fds.append(fd)
    supervisor = None
    if served.supervisor is not None:
        supervisor = len(fds)
        fds.append(served.supervisor.sock.fileno())
    return new_document(
        len(fds),
        control={"path": served.control.path, "listener": control},
        metrics={"listener": metrics} if metrics is not None else None,
        storage=storage,
        controllers=controllers,
        supervisor=supervisor,
        supervisor_receipts=served.supervisor_receipts,
    )


def _answer(
    channel: Channel, child: subprocess.Popen[bytes], timeout: float
) -> tuple[dict[str, Any], list[int]]:
    try:
        return channel.receive(timeout)
    except HandoverError as exc:
        try:  # a successor that closed its end is exiting: give it time to be reaped
            code: int | None = child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            raise HandoverError(f"the new process exited ({code}) during take-over") from exc
        raise


def exit_now() -> None:
    """Leave without a word to anything served (the successor has it all): no
    shutdown, no reset, no flush (the storage descriptions live on in the successor)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


# --- the new process -----------------------------------------------------------------


def take_over(fd: int, serve: Callable[[Served], int], crashed: bool = False) -> int:
    """`nvme-mdev takeover --fd FD`: rebuild what the process at the other end of FD
    serves, start once it lets go, then `serve` (the usual main loop). `crashed`: the
    other end is the supervisor of a process that died (handover/supervisor.py)."""
    from .. import __version__
    from ..control import ControlServer
    from ..daemon import Daemon
    from ..metrics import MetricsServer

    channel = Channel(socket.socket(fileno=fd))
    if not channel.peer_is_us():
        log.error("takeover: the handover socket's peer is another user")
        return 1
    channel.send({"reads": sorted(READS), "version": __version__, "pid": os.getpid()})
    try:
        doc, fds = channel.receive(None)
    except HandoverError as exc:
        log.error("takeover: %s", exc)
        return 1
    try:
        doc = check_document(doc, len(fds))
        descriptors.inherit(
            [((path, flags, tag), fds[i]) for path, flags, tag, i in doc["storage"]]
        )
        supervisor = None
        if doc.get("supervisor") is not None:
            supervisor = Channel(socket.socket(fileno=fds[doc["supervisor"]]))
        daemon = Daemon(journal=supervisor is not None)
        daemon.restore_controllers(doc["controllers"], fds, crashed)
        leftover = descriptors.close_unclaimed()
        if leftover:
            log.warning("takeover: %d storage descriptor(s) nobody took", leftover)
        control = ControlServer(
            doc["control"]["path"],
            daemon.methods(),
            listener=socket.socket(fileno=fds[doc["control"]["listener"]]),
        )
        metrics = None
        if doc["metrics"] is not None:
            metrics = MetricsServer.from_listener(
                socket.socket(fileno=fds[doc["metrics"]["listener"]]), daemon.snapshots
            )
    except Exception as exc:  # whatever it is, the old process must hear it and go on
        log.exception("takeover failed")
        reason = str(exc) if isinstance(exc, HandoverError) else f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            channel.send({"refused": reason})
        return 1
    channel.send({"ready": True})
    try:
        commit, _ = channel.receive(RESTORE_TIMEOUT)
    except HandoverError as exc:
        log.error("takeover: no commit (%s): the old process goes on", exc)
        return 1
    daemon.start_restored()
    paused_ms = (time.monotonic() - float(commit.get("held_at", time.monotonic()))) * 1000
    with contextlib.suppress(OSError):
        channel.send({"serving": True, "paused_ms": round(paused_ms, 2)})
    if supervisor is not None and not crashed:
        # The predecessor still talks to the supervisor over the channel we share:
        # start checkpointing (and reading it) once it is done, or gone.
        with contextlib.suppress(HandoverError):
            channel.receive(START_TIMEOUT)
    channel.close()
    log.info(
        "took over %d controller(s); guests paused %.1f ms", len(daemon.controllers), paused_ms
    )
    return serve(Served(daemon, control, metrics, supervisor, bool(doc.get("supervisor_receipts"))))
