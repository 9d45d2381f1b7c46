"""The vfio-user server: one UNIX socket, one client at a time, the client's
commands handled strictly in order by the Device interface (device.py).

Threads. The server thread reads and handles the client's messages. An acceptor
thread takes connections: one client is served, one more may wait its turn (a
restarted QEMU connecting before we finished cleaning up after the old one),
any other is closed at once. The device's own threads (I/O, admin) reach
fd-less guest memory through DMA_READ/DMA_WRITE requests (Session.dma_read/
dma_write): any thread may send; replies are routed to the waiting thread by
message id.

The device is called from the server thread only (region_read/region_write,
set_irqs, reset, quiesced), one call at a time, in the client's order. A
posted write (NO_REPLY) gets no reply, not even when it fails (logged).

Deadlocks this design avoids:

- The server thread may be inside a device call that waits for the device's
  threads (a controller reset, a quiesce) while one of them waits for a DMA
  reply only the socket reader would see. Whoever holds the reader role reads:
  normally the server thread; while it is busy in a device call, a thread
  waiting for a DMA reply takes the role, routes replies and queues the
  client's commands for the server thread, in order.
- QEMU cannot answer our DMA requests while it waits for one of our replies
  (it holds its big lock). So a DMA wait that overlaps a reply we have owed for
  longer than DMA_ABORT_GRACE fails with DmaError, letting the device finish
  and us reply within QEMU's 5 s timeout (a late reply would desynchronise
  QEMU's stream).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Protocol, TypeVar

from ..guest_memory import DmaError
from . import protocol as p
from .device import Device, DeviceError, IrqAction, IrqSet
from .framing import Message, MessageReader, send_message, wait_readable
from .memory import DmaMemory

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: a reply payload and the fds to pass with it
Reply = tuple[bytes, Sequence[int]]

#: QEMU's default x-msg-timeout; we allow the client the same for DMA replies
REPLY_TIMEOUT: Final = 5.0
#: how long a DMA wait may overlap a reply we owe the client (see module doc)
DMA_ABORT_GRACE: Final = 0.5
#: how long the server thread must have been busy before a DMA waiter reads
_TAKEOVER_AFTER: Final = 0.002
_POLL: Final = 0.005
#: data bytes per DMA_READ. QEMU (11.1) sends a reply with one non-blocking write
#: and drops whatever did not fit in its socket send buffer (~208 KiB by default,
#: less what we have not read yet; vfio_user_send_qio() takes a partial write for a
#: whole one): the reply arrives truncated and the stream is out of step from then
#: on. So DMA_READs are small and one at a time (replies of several in flight add
#: up). DMA_WRITE (QEMU reads those in pieces) is not limited this way.
DMA_READ_MAX: Final = 64 * 1024

_ACTIONS: Final = {
    p.IRQ_SET_ACTION_MASK: IrqAction.MASK,
    p.IRQ_SET_ACTION_UNMASK: IrqAction.UNMASK,
    p.IRQ_SET_ACTION_TRIGGER: IrqAction.TRIGGER,
}
#: GET_IRQ_INFO flags when the device does not say (vfio-pci's usual ones)
_DEFAULT_IRQ_FLAGS: Final = (
    p.IRQ_INFO_EVENTFD | p.IRQ_INFO_MASKABLE | p.IRQ_INFO_AUTOMASKED,  # INTx
    p.IRQ_INFO_EVENTFD | p.IRQ_INFO_NORESIZE,  # MSI
    p.IRQ_INFO_EVENTFD | p.IRQ_INFO_NORESIZE,  # MSI-X
    p.IRQ_INFO_EVENTFD,  # ERR
    p.IRQ_INFO_EVENTFD,  # REQ
)


class SocketInUse(Exception):
    """The socket path is taken: a live server, or not a socket at all."""


class _Pending:
    __slots__ = ("done", "error", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Message | None = None
        self.error: str | None = None


class RequestJournal(Protocol):
    """What a session records for a successor after a crash (handover/journal.py)."""

    def answered(self, msg_id: int) -> None:
        """The client's request `msg_id` is answered (or, posted, handled)."""

    def last_answered(self) -> int | None: ...

    def requested(self, next_id: int) -> None:
        """A request of ours went out; our next one will have `next_id`."""

    def next_request_id(self) -> int: ...


class Session:
    """One connected client: its socket, negotiated capabilities, and our own
    requests to it (MessageDma for DmaMemory)."""

    def __init__(self, sock: socket.socket, exact: bool = False) -> None:
        """`exact`: read no further than the message at hand (MessageReader)."""
        self.sock = sock
        self.reader = MessageReader(sock, exact=exact)
        self.negotiated = False
        self.client_caps = p.Capabilities()
        self.limits = p.Limits()
        #: data bytes per DMA_READ/DMA_WRITE: what both sides accept
        self.dma_chunk = p.MAX_DATA_XFER_SIZE
        self._send_lock = threading.Lock()
        #: the reader role (see module doc)
        self._read_lock = threading.Lock()
        self._backlog: collections.deque[Message] = collections.deque()
        self._eof: BaseException | None = None
        self._pending: dict[int, _Pending] = {}
        self._pending_lock = threading.Lock()
        #: one DMA_READ in flight at a time (see DMA_READ_MAX)
        self._dma_read_lock = threading.Lock()
        self._next_id = 0
        self._closed: str | None = None
        #: when the server thread began a device call, and whether it owes a reply
        self._busy_since: float | None = None
        self._busy_thread = 0
        self._owed_since: float | None = None
        #: where a successor learns what this session did (crash recovery)
        self.journal: RequestJournal | None = None
        #: after a crash: the last request the dead process answered (see replayed())
        self._answered_before: int | None = None

    # --- receiving (server thread) ------------------------------------------------------

    def next_command(self, wake_fd: int) -> Message | None:
        """The client's next command, in order; replies met on the way are routed.
        None when `wake_fd` became readable first (the server is asked to hold).
        Raises ConnectionError / OSError / ProtocolError when the stream ends."""
        while True:
            with self._read_lock:
                if self._backlog:
                    return self._backlog.popleft()
                if self._eof is not None:
                    raise self._eof
                ready = self.reader.buffered()
                message = self._receive_locked() if ready else None
            if message is None:
                if _wait_either(self.sock.fileno(), wake_fd) == wake_fd:
                    return None
                with self._read_lock:
                    if self._backlog or self._eof is not None:
                        continue
                    message = self._receive_locked()
            if message.header.is_reply:
                self._route(message)
            elif self._answered_before is not None and self._replayed(message):
                continue
            else:
                return message

    def answered(self, msg_id: int) -> None:
        """The request `msg_id` is answered (or, posted, handled): record it, then take it
        out of the socket. A process that dies before the record leaves the request in
        the socket for its successor, which handles it again; one that dies after it,
        but before the request is out, leaves a successor that knows to skip it."""
        if self.journal is not None:
            self.journal.answered(msg_id)
        with self._read_lock, contextlib.suppress(OSError):  # (a dead socket: read next)
            self.reader.consume()

    def replayed(self, journal: RequestJournal) -> None:
        """This session goes on after a crash, from `journal`: the first request may be
        one the dead process was handling; the dead process's own requests may still
        be answered (their ids are not used again)."""
        answered = journal.last_answered()
        self._answered_before = -1 if answered is None else answered
        self._next_id = journal.next_request_id()

    def _replayed(self, message: Message) -> bool:
        """Whether the first request after a crash was answered already (skip it);
        if not, it is marked as replayed (handled again)."""
        before, self._answered_before = self._answered_before, None
        if message.header.msg_id == before:
            log.info("request %d was answered before the crash: skipped", before)
            message.close_fds()
            with self._read_lock:
                self.reader.consume()
            return True
        message.replayed = True
        return False

    def handover_state(self, fds: list[int], held: bool = True) -> dict[str, object]:
        """What a successor needs to go on with this client: the negotiated terms, our
        next request id, and every byte (with its fds) read from the socket and not yet
        handled, backlog first. The server must be held (no thread reads or requests);
        not `held` (a checkpoint): without the bytes read, which a crash loses anyway."""
        with self._read_lock if held else contextlib.nullcontext():
            unread = bytearray()
            unread_fds: list[tuple[int, int]] = []  # (offset in unread, fd index)
            for message in self._backlog if held else ():
                for fd in message.fds:
                    unread_fds.append((len(unread), len(fds)))
                    fds.append(fd)
                unread += message.header.encode() + message.payload
            tail, pending = self.reader.unread() if held else (b"", [])
            for offset, got in pending:
                for fd in got:
                    unread_fds.append((len(unread) + offset, len(fds)))
                    fds.append(fd)
            unread += tail
        fds_at = len(fds)
        fds.append(self.sock.fileno())
        return {
            "socket": fds_at,
            "negotiated": self.negotiated,
            "client_capabilities": self.client_caps.to_json(),
            "max_data_xfer_size": self.limits.max_data_xfer_size,
            "max_msg_fds": self.limits.max_msg_fds,
            "dma_chunk": self.dma_chunk,
            "next_request_id": self._next_id,
            "unread": bytes(unread).hex(),
            "unread_fds": unread_fds,
        }

    @classmethod
    def resume(cls, state: dict[str, Any], fds: Sequence[int], exact: bool = False) -> Session:
        """A predecessor's session (handover_state) on the socket it passed."""
        session = cls(socket.socket(fileno=fds[state["socket"]]), exact)
        session.negotiated = bool(state["negotiated"])
        session.client_caps = p.Capabilities.from_json(state["client_capabilities"])
        session.limits = p.Limits(int(state["max_data_xfer_size"]), int(state["max_msg_fds"]))
        session.dma_chunk = int(state["dma_chunk"])
        session._next_id = int(state["next_request_id"]) & 0xFFFF
        pending: dict[int, list[int]] = {}
        for offset, index in state["unread_fds"]:
            pending.setdefault(int(offset), []).append(fds[index])
        session.reader.preload(bytes.fromhex(state["unread"]), pending)
        return session

    def _receive_locked(self) -> Message:
        try:
            return self.reader.receive()
        except (OSError, p.ProtocolError) as exc:  # ConnectionError is an OSError
            self._eof = exc
            self.close(f"connection lost: {exc}")
            raise

    def busy(self, owes_reply: bool) -> None:
        """The server thread enters a device call."""
        now = time.monotonic()
        self._busy_thread = threading.get_ident()
        self._busy_since = now
        self._owed_since = now if owes_reply else None

    def idle(self) -> None:
        self._busy_since = self._owed_since = None

    # --- sending --------------------------------------------------------------------

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        with self._send_lock:
            send_message(self.sock, data, fds)

    # --- our requests (DMA_READ / DMA_WRITE) ---------------------------------------------

    def dma_read(self, addr: int, length: int) -> bytes:
        out = []
        while length > 0:
            sent = p.DmaAccess(addr, min(length, self.dma_chunk, DMA_READ_MAX))
            self._acquire_dma_read(sent)
            try:
                reply = self._request(p.Command.DMA_READ, sent)
            finally:
                self._dma_read_lock.release()
            try:
                data = p.DmaAccess.decode_read_reply(reply.payload, sent)
            except p.ProtocolError as exc:
                raise DmaError(f"DMA_READ {addr:#x}+{sent.count:#x}: bad reply: {exc}") from None
            if not data:
                raise DmaError(f"DMA_READ {addr:#x}+{sent.count:#x}: the client read nothing")
            out.append(data)
            addr += len(data)
            length -= len(data)
        return b"".join(out)

    def dma_write(self, addr: int, data: p.Bytes) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        pos = 0
        while pos < len(view):
            sent = p.DmaAccess(addr + pos, min(len(view) - pos, self.dma_chunk))
            sent = p.DmaAccess(sent.address, sent.count, bytes(view[pos : pos + sent.count]))
            reply = self._request(p.Command.DMA_WRITE, sent)
            try:
                written = p.DmaAccess.decode_write_reply(reply.payload, sent)
            except p.ProtocolError as exc:
                raise DmaError(f"DMA_WRITE {sent.address:#x}: bad reply: {exc}") from None
            if not written:
                raise DmaError(f"DMA_WRITE {sent.address:#x}: the client wrote nothing")
            pos += written

    def _acquire_dma_read(self, access: p.DmaAccess) -> None:
        """Wait for the DMA_READ in flight (another thread's) to be answered, as long
        as we would wait for our own reply."""
        deadline = time.monotonic() + REPLY_TIMEOUT
        while not self._dma_read_lock.acquire(timeout=_POLL):
            self._check_wait(None, p.Command.DMA_READ, access, deadline)
            if self._closed is not None:
                raise DmaError(f"DMA_READ: {self._closed}")

    def _request(self, command: p.Command, access: p.DmaAccess) -> Message:
        pending = _Pending()
        with self._pending_lock:
            if self._closed is not None:
                raise DmaError(f"{command.name}: {self._closed}")
            msg_id = self._next_id
            while msg_id in self._pending:
                msg_id = (msg_id + 1) & 0xFFFF
            self._next_id = (msg_id + 1) & 0xFFFF
            self._pending[msg_id] = pending
            if self.journal is not None:
                self.journal.requested(self._next_id)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("-> id=%d %s %#x+%#x", msg_id, command.name, access.address, access.count)
        try:
            try:
                self.send(p.encode_message(msg_id, command, access.encode()))
            except OSError as exc:
                raise DmaError(f"{command.name}: {exc}") from None
            self._wait(pending, command, access)
        finally:
            with self._pending_lock:
                self._pending.pop(msg_id, None)
        reply = pending.reply
        assert reply is not None
        if reply.header.is_error:
            err = reply.header.error or errno.EIO
            raise DmaError(
                f"{command.name} {access.address:#x}+{access.count:#x}: "
                f"client error {err} ({os.strerror(err)})"
            )
        return reply

    def _wait(self, pending: _Pending, command: p.Command, access: p.DmaAccess) -> None:
        deadline = time.monotonic() + REPLY_TIMEOUT
        while not pending.done.is_set():
            self._check_wait(pending, command, access, deadline)
            busy = self._busy_since
            if (
                busy is not None
                # at once when a device call on the server thread itself does DMA
                and (
                    self._busy_thread == threading.get_ident()
                    or time.monotonic() - busy > _TAKEOVER_AFTER
                )
                and self._read_lock.acquire(blocking=False)
            ):
                try:
                    self._pump(pending, command, access, deadline)
                finally:
                    self._read_lock.release()
            else:
                pending.done.wait(_POLL)
        if pending.error is not None:
            raise DmaError(f"{command.name} {access.address:#x}+{access.count:#x}: {pending.error}")

    def _check_wait(
        self, pending: _Pending | None, command: p.Command, access: p.DmaAccess, deadline: float
    ) -> None:
        now = time.monotonic()
        what = f"{command.name} {access.address:#x}+{access.count:#x}"
        if now > deadline:
            raise DmaError(f"{what}: no reply in {REPLY_TIMEOUT} s")
        owed = self._owed_since
        if owed is not None and now - owed > DMA_ABORT_GRACE:
            raise DmaError(f"{what}: abandoned, the client is waiting for our reply")

    def _pump(
        self, pending: _Pending, command: p.Command, access: p.DmaAccess, deadline: float
    ) -> None:
        """Read for the busy server thread until our reply is in (reader lock held)."""
        while not pending.done.is_set() and self._eof is None:
            self._check_wait(pending, command, access, deadline)
            if not self.reader.buffered() and not wait_readable(self.sock.fileno(), _POLL):
                continue
            try:
                message = self._receive_locked()
            except (OSError, p.ProtocolError):
                return  # close() failed every waiter, us included
            if message.header.is_reply:
                self._route(message)
            else:
                self._backlog.append(message)

    def _route(self, message: Message) -> None:
        message.close_fds()  # no reply to DMA_READ/WRITE carries fds
        with self._pending_lock:
            pending = self._pending.get(message.header.msg_id)
        if pending is None or pending.done.is_set():
            log.info(
                "dropped a reply to message %d (command %d): nobody waits for it",
                message.header.msg_id,
                message.header.command,
            )
            return
        pending.reply = message
        pending.done.set()

    def close(self, reason: str) -> None:
        """No more requests; every waiter fails."""
        with self._pending_lock:
            if self._closed is None:
                self._closed = reason
            waiting = list(self._pending.values())
        for pending in waiting:
            if not pending.done.is_set():
                pending.error = reason
                pending.done.set()

    def discard(self) -> None:
        """Close the socket and whatever fds are still unclaimed."""
        with self._read_lock:
            for message in self._backlog:
                message.close_fds()
            self._backlog.clear()
            self.reader.close()
        with contextlib.suppress(OSError):
            self.sock.close()


Handler = Callable[[Session, p.Decoded, Message], Reply]


class VfioUserServer:
    """Serves `device` on a UNIX socket at `socket_path` (created owner-only).

    `memory` is the guest memory the device does its DMA through: construct it
    first and give it to both the device layer and the server (a fresh one is made
    when omitted; `server.memory` returns it either way). `irq_info_flags`
    overrides the VFIO_IRQ_INFO_* flags per IRQ index (default: the device's
    `irq_info_flags` attribute if it has one, else vfio-pci's usual flags).
    """

    def __init__(
        self,
        socket_path: str,
        device: Device,
        memory: DmaMemory | None = None,
        *,
        irq_info_flags: Sequence[int] | None = None,
        listener: socket.socket | None = None,
        session: Session | None = None,
        clients: Sequence[socket.socket] = (),
        exact_reads: bool = False,
    ) -> None:
        """`listener`, `session`, `clients`: what a predecessor process handed over (its
        listening socket, the client it served, those waiting): served from start()."""
        self.socket_path = socket_path
        #: read each client no further than the message at hand (crash recovery)
        self.exact_reads = exact_reads
        self.device = device
        self._memory = memory if memory is not None else DmaMemory()
        self._irq_info_flags = irq_info_flags
        self._stopping = threading.Event()
        self._lifecycle = threading.Lock()
        self._session: Session | None = None
        self._thread: threading.Thread | None = None
        self._acceptor: threading.Thread | None = None
        self._listener = listener if listener is not None else listen_unix(socket_path)
        self._inode = os.stat(socket_path).st_ino
        # Clients accepted and waiting for the one being served to go; the server and
        # acceptor threads' turns; the hold (upgrade in place): all under one condition.
        self._turns = threading.Condition()
        self._clients: collections.deque[socket.socket] = collections.deque(clients)
        self._resumed = session
        if session is not None and session.negotiated:
            self._memory.attach(session)
        #: called after a command that changed device state other than by a doorbell
        #: (a supervisor checkpoints it: crash recovery)
        self.on_change: Callable[[], None] | None = None
        #: given to each session (Session.journal)
        self.journal: RequestJournal | None = None
        self._hold_requested = False
        #: the threads stopped by a hold ("server", "acceptor") and the session held
        self._parked: set[str] = set()
        self._held_session: Session | None = None
        # Readable while a hold is requested: wakes both threads from their poll().
        self._hold_r, self._hold_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._handlers: dict[p.Command, Handler] = {
            p.Command.VERSION: self._version,
            p.Command.DMA_MAP: self._dma_map,
            p.Command.DMA_UNMAP: self._dma_unmap,
            p.Command.DEVICE_GET_INFO: self._device_info,
            p.Command.DEVICE_GET_REGION_INFO: self._region_info,
            p.Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            p.Command.DEVICE_SET_IRQS: self._set_irqs,
            p.Command.REGION_READ: self._region_read,
            p.Command.REGION_WRITE: self._region_write,
            p.Command.REGION_WRITE_MULTI: self._region_write_multi,
            p.Command.DEVICE_RESET: self._device_reset,
        }

    @property
    def memory(self) -> DmaMemory:
        """The GuestMemory the device does its DMA through."""
        return self._memory

    @property
    def connected(self) -> bool:
        return self._session is not None

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Serve in background threads."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._start_acceptor()
        self._thread = threading.Thread(target=self.serve_forever, name="vfio-user", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Serve clients one after another until stop()."""
        self._start_acceptor()
        session, self._resumed = self._resumed, None
        if session is not None:
            self._serve(session)
        while (sock := self._next_client()) is not None:
            self._serve(Session(sock, self.exact_reads))

    def _next_client(self) -> socket.socket | None:
        """The next waiting client; None once stopping."""
        with self._turns:
            while not self._stopping.is_set():
                if self._hold_requested:
                    self._park_locked("server")
                elif self._clients:
                    return self._clients.popleft()
                else:
                    self._turns.wait()
            return None

    def _park_locked(self, thread: str) -> None:
        """Stay stopped while a hold lasts (turns held)."""
        self._parked.add(thread)
        self._turns.notify_all()
        while self._hold_requested:
            self._turns.wait()
        self._parked.discard(thread)

    def _park_session(self, session: Session) -> None:
        """Hold between two messages of `session`. It counts as busy meanwhile, so that a
        device thread waiting for a DMA reply reads the socket for itself."""
        session.busy(owes_reply=False)
        try:
            with self._turns:
                self._held_session = session
                self._park_locked("server")
                self._held_session = None
        finally:
            session.idle()

    # --- upgrade in place ----------------------------------------------------------------

    @contextlib.contextmanager
    def held(self, timeout: float = 10.0) -> Iterator[None]:
        """While held, the server thread is between two messages (it answered the one it
        was handling) and the acceptor accepts nobody: the connection, the listener and
        every byte read can be handed to another process. TimeoutError if the server
        thread stays inside a device call for `timeout` seconds."""
        with self._turns:
            if self._hold_requested:
                raise RuntimeError("the server is held already")
            self._hold_requested = True
        os.write(self._hold_w, b"h")
        try:
            with self._turns:
                running = {
                    name
                    for name, thread in (("server", self._thread), ("acceptor", self._acceptor))
                    if thread is not None and thread.is_alive()
                }
                if not self._turns.wait_for(lambda: running <= self._parked, timeout):
                    raise TimeoutError("the vfio-user server did not stop between messages")
            yield
        finally:
            with self._turns:
                self._hold_requested = False
                with contextlib.suppress(BlockingIOError):
                    os.read(self._hold_r, 64)
                self._turns.notify_all()

    def handover_state(self, fds: list[int], held: bool = True) -> dict[str, Any]:
        """The listener, the clients waiting and the session being served (held()),
        their fds appended to `fds`; not `held`: a checkpoint, taken as things are."""
        listener = len(fds)
        fds.append(self._listener.fileno())
        clients = []
        with self._turns:
            for sock in self._clients:
                clients.append(len(fds))
                fds.append(sock.fileno())
        session = self._held_session if held else self._session
        return {
            "listener": listener,
            "clients": clients,
            "session": session.handover_state(fds, held) if session is not None else None,
        }

    def _start_acceptor(self) -> None:
        with self._lifecycle:
            if self._acceptor is None and not self._stopping.is_set():
                self._acceptor = threading.Thread(
                    target=self._accept_loop, name="vfio-user-accept", daemon=True
                )
                self._acceptor.start()

    def stop(self) -> None:
        """Disconnect the client (the device is reset as for any disconnect), stop
        the threads and remove the socket file."""
        with self._lifecycle:
            self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        session = self._session
        if session is not None:
            with contextlib.suppress(OSError):
                session.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
        with self._turns:
            self._turns.notify_all()
        me = threading.current_thread()
        with self._lifecycle:
            threads = (self._acceptor, self._thread)
        for thread in threads:
            if thread is not None and thread is not me and thread.ident is not None:
                thread.join()
        self._listener.close()
        with self._turns:
            while self._clients:  # clients that waited their turn
                self._clients.popleft().close()
        os.close(self._hold_r)
        os.close(self._hold_w)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self._inode:  # still ours
                os.unlink(self.socket_path)

    def __enter__(self) -> VfioUserServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            if _wait_either(self._listener.fileno(), self._hold_r) == self._hold_r:
                with self._turns:
                    if self._hold_requested:
                        self._park_locked("acceptor")
                continue
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)  # EMFILE and friends: do not spin
                continue
            with self._turns:
                if self._stopping.is_set():
                    sock.close()
                    return
                if self._clients:
                    log.warning("refused a client: one is being served and one is waiting")
                    sock.close()
                    continue
                self._clients.append(sock)
                self._turns.notify_all()

    # --- one client --------------------------------------------------------------------

    def _serve(self, session: Session) -> None:
        log.info("client connected")
        session.journal = self.journal
        self._session = session
        if self._stopping.is_set():  # stop() came before it could see this session
            with contextlib.suppress(OSError):
                session.sock.shutdown(socket.SHUT_RDWR)
        try:
            while True:
                if self._hold_requested:
                    self._park_session(session)
                try:
                    message = session.next_command(self._hold_r)
                    if message is None:
                        continue  # a hold: park at the top
                except ConnectionError:
                    log.info("client disconnected")
                    return
                except OSError as exc:
                    log.info("client connection failed: %s", exc)
                    return
                except p.ProtocolError as exc:
                    log.error("dropping the client: message framing broken: %s", exc)
                    return
                self._dispatch(session, message)
        finally:
            self._disconnect(session)

    def _dispatch(self, session: Session, message: Message) -> None:
        header = message.header
        debug = log.isEnabledFor(logging.DEBUG)
        payload: bytes = b""
        reply_fds: Sequence[int] = ()
        error = 0
        session.busy(owes_reply=not header.no_reply)
        try:
            header.check_command_flags()
            if message.fds_truncated:
                raise p.ProtocolError(errno.EINVAL, "more fds than could be received")
            decoded = p.decode_request(
                header.command, message.payload, len(message.fds), session.limits
            )
            if debug:
                log.debug(
                    "<- id=%d%s fds=%d %s %s",
                    header.msg_id,
                    " posted" if header.no_reply else "",
                    len(message.fds),
                    decoded.command.name,
                    decoded.request,
                )
            if not session.negotiated and decoded.command != p.Command.VERSION:
                raise p.ProtocolError(errno.EINVAL, f"{decoded.command.name} before VERSION")
            payload, reply_fds = self._handlers[decoded.command](session, decoded, message)
            if self.on_change is not None and _changes_state(decoded):
                self.on_change()
        except (p.ProtocolError, DeviceError) as exc:
            error = exc.errno or errno.EINVAL
            if debug:
                log.debug("<- id=%d %s refused: %s", header.msg_id, header, exc)
        except Exception as exc:  # a device bug must not take the server down with it
            log.exception("%s failed", _command_name(header.command))
            error = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        finally:
            session.idle()
            message.close_fds()  # whatever no handler took
        if header.no_reply:
            if error:
                log.warning(
                    "posted %s failed: %s", _command_name(header.command), os.strerror(error)
                )
            session.answered(header.msg_id)
            return
        reply = p.encode_message(header.msg_id, header.command, payload, reply=True, error=error)
        if debug:
            log.debug(
                "-> reply id=%d size=%d error=%d fds=%d",
                header.msg_id,
                len(reply),
                error,
                len(reply_fds),
            )
        try:
            session.send(reply, () if error else reply_fds)
        except OSError as exc:
            log.info("reply not sent: %s", exc)
        session.answered(header.msg_id)

    def _disconnect(self, session: Session) -> None:
        """The client is gone: the device goes back to power-on state and every
        mapping of the client's memory goes (spec: Client Disconnection)."""
        session.close("the client disconnected")
        self._memory.attach(None)
        try:
            self.device.reset()
        except Exception:
            log.exception("resetting the device after the client left")
        try:
            with self.device.quiesced():
                DmaMemory.release(self._memory.unmap_all())
        except Exception:
            log.exception("dropping the client's DMA mappings")
        session.discard()
        self._session = None
        log.info("device reset; ready for the next client")

    # --- handlers: (session, decoded request, message) -> (reply payload, reply fds) -------

    def _version(self, session: Session, decoded: p.Decoded, message: Message) -> Reply:
        request = _request(decoded, p.Version)
        if session.negotiated:
            raise p.ProtocolError(errno.EINVAL, "VERSION again")
        if request.major != p.MAJOR:
            raise p.ProtocolError(errno.ENOTSUP, f"protocol {request.major}.{request.minor}")
        client = request.capabilities or p.Capabilities()
        ours = p.negotiate(client)
        session.client_caps = client
        session.limits = p.Limits(max_data_xfer_size=ours.effective_max_data_xfer_size)
        session.dma_chunk = min(
            ours.effective_max_data_xfer_size, client.effective_max_data_xfer_size
        )
        self._memory.max_regions = ours.effective_max_dma_maps
        session.negotiated = True
        self._memory.attach(session)
        log.info("client speaks vfio-user %d.%d: %s", request.major, request.minor, client)
        return p.Version(p.MAJOR, min(request.minor, p.MINOR), ours).encode(), ()

    def _dma_map(self, session: Session, decoded: p.Decoded, message: Message) -> Reply:
        request = _request(decoded, p.DmaMap)
        fd = message.fds.pop() if message.fds else None
        if message.replayed and self._memory.has_mapping(
            request.iova, request.size, request.readable, request.writable, fd, request.offset
        ):
            if fd is not None:
                os.close(fd)
            log.info("DMA_MAP %#x+%#x replayed: mapped already", request.iova, request.size)
            return b"", ()
        region = self._memory.map(
            request.iova, request.size, request.readable, request.writable, fd, request.offset
        )
        log.debug(
            "DMA_MAP %#x+%#x %s",
            request.iova,
            request.size,
            "mmap" if region.fd_backed else "messages",
        )
        return b"", ()

    def _dma_unmap(self, session: Session, decoded: p.Decoded, message: Message) -> Reply:
        request = _request(decoded, p.DmaUnmap)
        memory = self._memory
        if request.unmap_all:
            mapped = memory.regions
        else:
            mapped = tuple(
                r for r in memory.regions if r.iova == request.iova and r.size == request.size
            )
            if message.replayed and not mapped and not memory.overlaps(request.iova, request.size):
                log.info("DMA_UNMAP %#x+%#x replayed: unmapped already", request.iova, request.size)
                return b"", ()
        if any(r.fd_backed for r in mapped):
            # Views of these may be in use: the device lets go of them first.
            with self.device.quiesced():
                removed = (
                    memory.unmap_all()
                    if request.unmap_all
                    else memory.unmap(request.iova, request.size)
                )
                DmaMemory.release(removed)
        else:
            # Message-based regions hand out no views: nothing to wait for.
            removed = (
                memory.unmap_all()
                if request.unmap_all
                else memory.unmap(request.iova, request.size)
            )
        log.debug("DMA_UNMAP %#x+%#x: %d region(s)", request.iova, request.size, len(removed))
        return request.encode(), ()

    def _device_info(self, session: Session, decoded: p.Decoded, message: Message) -> Reply:
        info = p.DeviceInfo(
            p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET,
            len(self.device.regions),
            len(self.device.irq_counts),
        )
        return info.encode(), ()

    def _region_info(self, session: Session, decoded: p.Decoded, message: Message) -> Reply:
        request = _request(decoded, p.RegionInfoRequest)
        regions = self.device.regions
        if request.index >= len(regions):
            raise p.ProtocolError(errno.EINVAL, f"no region {request.index}")
        region = regions[request.index]
        flags = 0
        if region.size:
            flags |= p.REGION_INFO_FLAG_READ if region.read else 0
            flags |= p.REGION_INFO_FLAG_WRITE if region.write else 0
        mmap_fd = (
            region.mmap_fd if region.size and session.client_caps.effective_max_msg_fds else None
        )
        areas: list[tuple[int, int]] = []
        if mmap_fd is not None:
            # The fd maps the region at its own offset 0; no areas: all of it.
            flags |= p.REGION_INFO_FLAG_MMAP
            areas = [(a.offset, a.size) for a in region.mmap_areas]
        info, payload = p.RegionInfo.build(
            request.argsz, request.index, flags, region.size, 0, areas
        )
        # The fd goes with the complete reply only (QEMU closes one sent with a short one).
        fds = [mmap_fd] if mmap_fd is not None and info.argsz <= request.argsz else []
        return payload, fds

    def _irq_info(self, session: Session, decoded: p.Decoded, message: Message) -> Reply:
        request = _request(decoded, p.IrqInfo)
        counts = self.device.irq_counts
        if request.index >= len(counts):
            raise p.ProtocolError(errno.EINVAL, f"no IRQ index {request.index}")
        count = counts[request.index]
        return p.IrqInfo(request.index, self._irq_flags(request.index, count), count).encode(), ()

    def _irq_flags(self, index: int, count: int) -> int:
        flags = self._irq_info_flags
        if flags is None:
            flags = getattr(self.device, "irq_info_flags", None)
        if flags is not None and index < len(flags):
            return int(flags[index])
        if not count:
            return 0
        return _DEFAULT_IRQ_FLAGS[index] if index < len(_DEFAULT_IRQ_FLAGS) else p.IRQ_INFO_EVENTFD

    def _set_irqs(self, session: Session, decoded: p.Decoded, message: Message) -> Reply:
        request = _request(decoded, p.IrqSet)
        counts = self.device.irq_counts
        if request.index >= len(counts):
            raise p.ProtocolError(errno.EINVAL, f"no IRQ index {request.index}")
        if request.count and request.start + request.count > counts[request.index]:
            raise p.ProtocolError(
                errno.EINVAL,
                f"IRQ index {request.index}: vectors {request.start}+{request.count} "
                f"of {counts[request.index]}",
            )
        fds: list[int] | None = None
        if request.data_type == p.IRQ_SET_DATA_EVENTFD:
            # No fds at all: QEMU's way to detach a run of vectors.
            fds = message.fds or [-1] * request.count
            for fd in fds:
                if fd >= 0:
                    _interrupt_eventfd(fd)
            message.fds = []  # the device owns them from here on, even if it fails
        self.device.set_irqs(
            IrqSet(
                index=request.index,
                action=_ACTIONS[request.action],
                start=request.start,
                count=request.count,
                fds=fds,
                flags=request.bools,
            )
        )
        return b"", ()

    def _region_read(self, session: Session, decoded: p.Decoded, message: Message) -> Reply:
        request = _request(decoded, p.RegionAccess)
        self._check_region(request.region)
        data = self.device.region_read(request.region, request.offset, request.count)
        if len(data) != request.count:
            raise p.ProtocolError(errno.EIO, f"device read {len(data)} of {request.count} bytes")
        return p.RegionAccess(
            request.region, request.offset, request.count, bytes(data)
        ).encode(), ()

    def _region_write(self, session: Session, decoded: p.Decoded, message: Message) -> Reply:
        request = _request(decoded, p.RegionAccess)
        self._check_region(request.region)
        self.device.region_write(request.region, request.offset, request.data)
        return p.REGION_RW.pack(request.offset, request.region, request.count), ()

    def _region_write_multi(self, session: Session, decoded: p.Decoded, message: Message) -> Reply:
        request = _request(decoded, p.WriteMulti)
        for write in request.writes:  # in order; the first failure stops the rest
            self._check_region(write.region)
            self.device.region_write(write.region, write.offset, write.data)
        return p.WRITE_MULTI_COUNT.pack(len(request.writes)), ()

    def _device_reset(self, session: Session, decoded: p.Decoded, message: Message) -> Reply:
        self.device.reset()
        return b"", ()

    def _check_region(self, index: int) -> None:
        if index >= len(self.device.regions):
            raise p.ProtocolError(errno.EINVAL, f"no region {index}")


_READS: Final = frozenset(
    (p.Command.DEVICE_GET_INFO, p.Command.DEVICE_GET_REGION_INFO, p.Command.DEVICE_GET_IRQ_INFO,
     p.Command.REGION_READ)
)  # fmt: skip
#: BAR0 from here on: the doorbells (their values are the I/O journal's business)
_DOORBELLS: Final = 0x1000


def _changes_state(decoded: p.Decoded) -> bool:
    """Whether a command changed state a checkpoint keeps (not a read, not a doorbell)."""
    if decoded.command in _READS:
        return False
    request = decoded.request
    if isinstance(request, p.RegionAccess):
        return not (request.region == 0 and request.offset >= _DOORBELLS)
    if isinstance(request, p.WriteMulti):
        return any(not (w.region == 0 and w.offset >= _DOORBELLS) for w in request.writes)
    return True


def _wait_either(sock_fd: int, wake_fd: int) -> int:
    """Block until the socket or the wake fd is readable; which one (the wake fd first)."""
    poller = select.poll()
    poller.register(sock_fd, select.POLLIN)
    poller.register(wake_fd, select.POLLIN)
    while True:
        ready = {fd for fd, _ in poller.poll()}
        if wake_fd in ready:
            return wake_fd
        if ready:
            return sock_fd


def _interrupt_eventfd(fd: int) -> None:
    """Make sure an interrupt fd is an eventfd that never blocks the device. Any other
    fd (a pipe, a socket) could block the interrupt write, with the MSI-X lock held,
    and with it resets and the daemon's management. O_NONBLOCK is set on the shared
    file description: QEMU creates its eventfds non-blocking anyway; a write to a full
    counter then fails, and the interrupt it would have sent is pending already."""
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        kind = "?"
    if kind != "anon_inode:[eventfd]":
        raise p.ProtocolError(errno.EINVAL, f"SET_IRQS: fd is not an eventfd ({kind})")
    os.set_blocking(fd, False)


def _request(decoded: p.Decoded, kind: type[_T]) -> _T:
    request = decoded.request
    if not isinstance(request, kind):
        raise p.ProtocolError(errno.EINVAL, f"expected {kind.__name__}")
    return request


def _command_name(command: int) -> str:
    try:
        return p.Command(command).name
    except ValueError:
        return f"command {command}"


def listen_unix(path: str, backlog: int = 2) -> socket.socket:
    """A listening socket at `path`, owner-only from the start; a stale socket file
    (nobody listening) is replaced, anything else refused. `backlog`: connections
    the kernel queues before accept()."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: its server is gone
        except OSError as exc:
            raise SocketInUse(f"{path}: {exc.strerror}") from None
        else:
            raise SocketInUse(f"{path}: in use by a running server")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _UMASK_LOCK:
        old = os.umask(0o177)  # bind() creates the file 0600: never wider, not even briefly
        try:
            listener.bind(path)
        except OSError as exc:
            listener.close()
            raise SocketInUse(f"{path}: {exc.strerror}") from None
        finally:
            os.umask(old)
    listener.listen(backlog)
    return listener


_UMASK_LOCK = threading.Lock()
