"""One virtual NVMe controller, assembled: vfio-user server → PCI function →
NVMe controller ← I/O thread and admin worker, with namespaces on backends."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from .engine.poller import DEFAULT_POLL_TIMEOUT, AdminWorker, IoThread
from .nvme.controller import Controller
from .nvme.identity import ControllerConfig
from .nvme.namespace import Namespace
from .pci.function import NvmePciFunction
from .vfio_user.memory import DmaMemory
from .vfio_user.server import VfioUserServer

log = logging.getLogger(__name__)

BAR0_SIZE = 16 * 1024  # Windows' NVMe driver masks BAR0 with 16 KiB alignment


class VirtualController:
    def __init__(
        self,
        socket_path: str,
        namespaces: list[Namespace],
        config: ControllerConfig | None = None,
        poll_timeout: float = DEFAULT_POLL_TIMEOUT,
    ) -> None:
        config = config or ControllerConfig()
        self.memory = DmaMemory()
        self.function = NvmePciFunction(
            None, BAR0_SIZE, config.msix_vectors, quiesce=self._quiesced
        )
        self.controller = Controller(config, self.memory, self.function, namespaces)
        self.function.attach_bar0(self.controller)
        self.io_thread = IoThread(self.controller, poll_timeout)
        self.admin_worker = AdminWorker(self.controller)
        self.server = VfioUserServer(socket_path, self.function, self.memory)

    @contextlib.contextmanager
    def _quiesced(self) -> Iterator[None]:
        """While guest memory is unmapped: no DMA in flight and no stale views."""
        with self.controller.lock, self.io_thread.paused():
            self.controller.release_memory_views()
            yield

    def start(self) -> None:
        self.io_thread.start()
        self.admin_worker.start()
        self.server.start()

    def stop(self) -> None:
        """Finish in-flight commands, make written data durable, release everything."""
        self.server.stop()
        self.admin_worker.stop()
        self.io_thread.stop()
        for ns in self.controller.namespaces.values():
            try:
                ns.backend.flush()
            except OSError as exc:
                log.error("flushing nsid %d: %s", ns.nsid, exc)
            ns.backend.close()
        self.function.close()
