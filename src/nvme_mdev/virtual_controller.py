"""One virtual NVMe controller, assembled: vfio-user server → PCI function →
NVMe controller ← I/O thread and admin worker, with namespaces on backends."""

from __future__ import annotations

import contextlib
import enum
import fcntl
import logging
import mmap
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any, Final

from .backends.io_engine import make_io_engine
from .config import ConfigError
from .dataplane import DATA_PLANES, make_vector_routes
from .engine.poller import DEFAULT_POLL_TIMEOUT, AdminWorker
from .guest_memory import words32
from .handover.journal import Journal
from .handover.recovery import recover
from .handover.supervisor import state_changed
from .nvme.controller import Controller
from .nvme.identity import ControllerConfig
from .nvme.namespace import Namespace
from .nvme.spec import DOORBELL_BASE, PAGE_SIZE
from .pci.function import NvmePciFunction
from .vfio_user.device import MmapArea
from .vfio_user.memory import DmaMemory
from .vfio_user.server import Session, VfioUserServer

log = logging.getLogger(__name__)

BAR0_SIZE = 16 * 1024  # Windows' NVMe driver masks BAR0 with 16 KiB alignment


class Unset(enum.Enum):
    """An argument left out (None means something: unpin the I/O thread)."""

    UNSET = enum.auto()


UNSET: Final = Unset.UNSET


class VirtualController:
    def __init__(
        self,
        socket_path: str,
        namespaces: list[Namespace],
        config: ControllerConfig | None = None,
        poll_timeout: float = DEFAULT_POLL_TIMEOUT,
        mmap_doorbells: bool = False,
        io_engine: str = "auto",
        data_plane: str = DATA_PLANES[0],
        predecessor: tuple[dict[str, Any], Sequence[int]] | None = None,
        journal: bool = False,
        crashed: bool = False,
    ) -> None:
        """`io_engine`: auto, sync or uring (backends/io_engine.py); ConfigError if uring
        is asked for and the kernel refuses it. `data_plane`: native or python
        (dataplane/). `predecessor`: the state a predecessor process handed over
        (handover_state) and the fds that came with it: this controller goes on where
        that one stopped, on its sockets and the guest's memory. `journal`: keep the
        queues' positions and commands in flight in shared memory (crash recovery: a
        supervisor holds it); `crashed`: the predecessor died, its state is a checkpoint
        that the journal brings up to date (handover/recovery.py)."""
        config = config or ControllerConfig()
        try:
            engine = self.engine = make_io_engine(io_engine)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--io-engine {io_engine}: {exc}") from exc
        self.memory = DmaMemory()
        state, fds = predecessor if predecessor is not None else ({}, ())
        if predecessor is not None:
            self.memory.max_regions = state["memory"]["max_regions"]
            for r in state["memory"]["regions"]:
                fd = fds[r["fd"]] if r["fd"] is not None else None
                self.memory.map(r["iova"], r["size"], r["readable"], r["writable"], fd, r["offset"])
        self.journal: Journal | None = None
        if state.get("journal_memfd") is not None:
            queues = config.max_io_queues + 1
            self.journal = Journal(fds[state["journal_memfd"]], queues, fresh=False)
        elif journal:
            self.journal = Journal.create(config.max_io_queues + 1)
        if crashed and self.journal is not None:
            interrupted = recover(state["controller"], self.journal, self.memory, config.aer_limit)
            log.info("after the crash: %d command(s) in flight completed interrupted", interrupted)
        self._bar0_fd: int | None = None
        self._bar0_map: mmap.mmap | None = None
        doorbell_words: memoryview | None = None
        areas: tuple[MmapArea, ...] = ()
        if mmap_doorbells:
            # The doorbell page is ordinary shared memory: the client maps it into the
            # guest, doorbell writes land there without a trap, the I/O thread polls it.
            if state.get("bar0_memfd") is not None:
                self._bar0_fd = fds[state["bar0_memfd"]]  # the guest's doorbells are in it
            else:
                self._bar0_fd = os.memfd_create(
                    "nvme-mdev-bar0", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
                )
                os.ftruncate(self._bar0_fd, BAR0_SIZE)
                # The client gets this fd: sealed, it cannot shrink it under our mapping
                # (the next doorbell poll would raise SIGBUS).
                fcntl.fcntl(
                    self._bar0_fd,
                    fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
                )
            self._bar0_map = mmap.mmap(self._bar0_fd, BAR0_SIZE)
            with memoryview(self._bar0_map) as bar0:
                doorbell_words = words32(bar0[DOORBELL_BASE : DOORBELL_BASE + PAGE_SIZE])
            areas = (MmapArea(DOORBELL_BASE, PAGE_SIZE),)
        if data_plane not in DATA_PLANES:
            raise ConfigError(f"data plane {data_plane!r}: one of {', '.join(DATA_PLANES)}")
        self.function = NvmePciFunction(
            None,
            BAR0_SIZE,
            config.msix_vectors,
            quiesce=self._quiesced,
            bar0_mmap_fd=self._bar0_fd,
            bar0_mmap_areas=areas,
            routes=make_vector_routes(data_plane, config.msix_vectors),
        )
        try:
            self.controller = Controller(
                config,
                self.memory,
                self.function,
                namespaces,
                doorbell_words=doorbell_words,
                io_engine=engine,
                data_plane=data_plane,
                poll_timeout=poll_timeout,
            )
        except ValueError as exc:  # a namespace this controller cannot serve
            engine.close()
            raise ConfigError(str(exc)) from exc
        self.function.attach_bar0(self.controller)
        if self.journal is not None:
            self.controller.attach_journal(self.journal)
        self.data = self.controller.data
        self.memory.add_listener(self.data.memory_changed)
        self.memory.on_lost(self._guest_memory_lost)
        self.admin_worker = AdminWorker(self.controller)
        if predecessor is None:
            self.server = VfioUserServer(
                socket_path, self.function, self.memory, exact_reads=self.journal is not None
            )
            self._watch_server()
            return
        served = state["server"]
        session = None
        if served["session"]:
            session = Session.resume(served["session"], fds, self.journal is not None)
            if crashed and self.journal is not None:
                session.replayed(self.journal)
        self.server = VfioUserServer(
            socket_path,
            self.function,
            self.memory,
            listener=socket.socket(fileno=fds[served["listener"]]),
            session=session,
            clients=[socket.socket(fileno=fds[i]) for i in served["clients"]],
            exact_reads=self.journal is not None,
        )
        self._watch_server()
        self.function.restore(state["pci"], fds)
        self.controller.restore(state["controller"])

    def _watch_server(self) -> None:
        """Checkpoint each change a request makes, and journal each request answered
        (crash recovery: both are no-ops unless supervised)."""
        self.server.on_change = state_changed
        self.server.journal = self.journal

    # --- upgrade in place ----------------------------------------------------------------

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Stopped for a handover: the transport between two messages (the one it was
        handling answered), no admin command running, no I/O command in flight (those
        fetched completed and posted). Leaving it goes on as before."""
        with self.server.held(), self.controller.lock, self.data.paused():
            yield

    def checkpoint_state(self, fds: list[int]) -> dict[str, Any]:
        """handover_state() without the hold: what a successor goes on from after a crash
        (the queues' positions then come from the journal)."""
        with self.controller.lock, self.data.paused():
            return self.handover_state(fds, held=False)

    def handover_state(self, fds: list[int], held: bool = True) -> dict[str, Any]:
        """Everything a successor needs (held()), the fds it needs appended to `fds`."""
        regions = []
        for r in self.memory.regions:
            index = None
            if r.fd is not None:
                index = len(fds)
                fds.append(r.fd)
            regions.append(
                {
                    "iova": r.iova,
                    "size": r.size,
                    "readable": r.readable,
                    "writable": r.writable,
                    "fd": index,
                    "offset": r.offset,
                }
            )
        bar0 = None
        if self._bar0_fd is not None:
            bar0 = len(fds)
            fds.append(self._bar0_fd)
        journal = None
        if self.journal is not None:
            journal = len(fds)
            fds.append(self.journal.fd)
        return {
            "memory": {"max_regions": self.memory.max_regions, "regions": regions},
            "bar0_memfd": bar0,
            "journal_memfd": journal,
            "server": self.server.handover_state(fds, held),
            "pci": self.function.handover_state(fds),
            "controller": self.controller.handover_state(),
        }

    def signal_unconsumed(self) -> None:
        """Interrupt every vector with completions the host has not consumed: those a
        predecessor posted may not have been signalled yet (coalescing), and one more
        interrupt than needed is harmless."""
        with self.controller.lock:
            vectors = {q.vector for q in self.controller.io_queues.cqs() if q.interrupts_enabled}
            vectors.add(0)
        if self.function.msix_enabled():
            for vector in sorted(vectors):
                self.function.signal(vector)
        else:
            self.controller.signal_admin()  # INTx: the level is recomputed

    def _guest_memory_lost(self) -> None:
        """The client truncated memory it had mapped (it reads as zeroes now): this
        controller cannot go on, the others in the process are not affected."""
        with self.controller.lock:
            self.controller.fatal("the client truncated guest memory mapped for DMA")

    @contextlib.contextmanager
    def _quiesced(self) -> Iterator[None]:
        """While guest memory is unmapped: no DMA in flight and no stale views."""
        with self.controller.lock, self.data.paused():
            self.controller.release_memory_views()
            yield

    def statistics(self) -> dict[str, Any]:
        return self.controller.statistics()

    def io_thread_settings(self) -> dict[str, Any]:
        cpus = self.data.cpus
        return {
            "tid": self.data.native_id,  # for top -H, perf, taskset
            "cpus": sorted(cpus) if cpus is not None else None,
            "poll_timeout_ms": round(self.data.poll_timeout * 1000),
            "data_plane": self.data.kind,
        }

    def set_io_thread(
        self, cpus: set[int] | Unset | None = UNSET, poll_timeout_ms: int | Unset = UNSET
    ) -> None:
        """Pin the I/O thread (None: unpin) and/or change its poll timeout, at run time."""
        if not isinstance(poll_timeout_ms, Unset):
            if poll_timeout_ms < 0:
                raise ValueError("poll timeout must be 0 or more")
            self.data.poll_timeout = poll_timeout_ms / 1000
        if not isinstance(cpus, Unset):
            self.data.pin(cpus)

    def add_namespace(self, ns: Namespace) -> None:
        """Attach `ns` while the guest runs (it is told by an asynchronous event)."""
        self.controller.attach_namespace(ns)

    def remove_namespace(self, nsid: int) -> Namespace:
        """Detach a namespace while the guest runs; its data is made durable and its
        backend closed before this returns."""
        ns = self.controller.detach_namespace(nsid)
        try:
            ns.backend.flush()
        except OSError as exc:
            log.error("flushing nsid %d: %s", nsid, exc)
        ns.backend.close()
        return ns

    def start(self) -> None:
        self.data.start()
        self.admin_worker.start()
        self.server.start()

    def stop(self) -> None:
        """Finish in-flight commands, make written data durable, release everything."""
        self.server.stop()
        self.admin_worker.stop()
        self.data.close()  # and every transfer in flight drained
        self.engine.close()
        for ns in self.controller.namespaces.values():
            try:
                ns.backend.flush()
            except OSError as exc:
                log.error("flushing nsid %d: %s", ns.nsid, exc)
            ns.backend.close()
        self.function.close()
        if self._bar0_map is not None:
            page, self.controller.doorbell_words = self.controller.doorbell_words, None
            if page is not None:
                page.release()
            self._bar0_map.close()
        if self._bar0_fd is not None:
            os.close(self._bar0_fd)
        if self.journal is not None:
            self.journal.close()
            os.close(self.journal.fd)
