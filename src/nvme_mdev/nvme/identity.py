"""What a controller says about itself: limits and identity chosen at creation."""

from __future__ import annotations

from dataclasses import dataclass

from .spec import PAGE_SIZE


@dataclass(frozen=True)
class ControllerConfig:
    serial: str = "NVMEMDEV0001"
    model: str = "nvme-mdev virtual NVMe controller"
    firmware: str = "0.1.0"
    controller_id: int = 1
    subsystem_nqn: str = "nqn.2026-11.io.nvme-mdev:subsys-nvmemdev0001"
    #: I/O submission/completion queue pairs offered (Number of Queues feature)
    max_io_queues: int = 64
    #: entries per queue, the largest CAP.MQES + 1 allows
    max_queue_entries: int = 1024
    #: Maximum Data Transfer Size, as a power of two of 4 KiB pages
    mdts: int = 7
    max_namespaces: int = 256
    #: Asynchronous Event Request Limit (outstanding AERs), 1-based
    aer_limit: int = 4
    #: Abort Command Limit, 1-based
    abort_limit: int = 4
    #: error log entries kept
    error_log_entries: int = 64
    #: SGL Support as Identify Controller reports it (SGLS bits 1:0): 0 PRPs only,
    #: 1 SGLs with byte granularity, 2 SGLs whose Data Blocks are dword aligned
    sgl_support: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.max_io_queues <= 64:
            raise ValueError("max_io_queues must be 1..64")
        if not 2 <= self.max_queue_entries <= 4096:
            raise ValueError("max_queue_entries must be 2..4096")
        if not 1 <= self.mdts <= 10:
            raise ValueError("mdts must be 1..10 (8 KiB .. 4 MiB)")
        if len(self.serial.encode()) > 20 or not self.serial.isascii():
            raise ValueError("serial: at most 20 ASCII characters")
        if len(self.model.encode()) > 40 or not self.model.isascii():
            raise ValueError("model: at most 40 ASCII characters")
        if self.sgl_support not in (0, 1, 2):
            raise ValueError("sgl_support must be 0 (none), 1 (byte) or 2 (dword granularity)")

    @property
    def max_transfer(self) -> int:
        return PAGE_SIZE << self.mdts

    @property
    def msix_vectors(self) -> int:
        return self.max_io_queues + 1
