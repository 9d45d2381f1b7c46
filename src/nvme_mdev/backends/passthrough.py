"""NVMe passthrough to a host namespace, through its generic character device
/dev/ngXnY: the guest's I/O command goes to the host's controller almost as it is
(the user-space form of the original design's direct use of host queues).

The Linux interface (include/uapi/linux/nvme_ioctl.h):
- NVME_IOCTL_ID: the namespace's NSID on the host controller;
- NVME_IOCTL_ADMIN_CMD: an admin command (here only Identify Namespace, once);
- NVME_IOCTL_IO64_CMD(_VEC): one I/O command, synchronously (the sync I/O engine);
- NVME_URING_CMD_IO(_VEC): the same as an io_uring command (IORING_OP_URING_CMD on a
  ring with 128-byte SQEs and 32-byte CQEs; backends/uring.py), many in flight.
The command is struct nvme_uring_cmd (72 bytes; struct nvme_passthru_cmd64 is the
same with the 64-bit result after it). The kernel sets CID, PSDT and the data
pointer itself: we give it the opcode, the host's NSID, CDW2-3, CDW10-15 and the
guest's buffers as host virtual addresses of mapped guest memory (no copies). The
ioctl returns, and the CQE's res holds, 0, the NVMe Status Field (> 0: SCT, SC, CRD,
More, DNR; no phase tag), or -errno; the completion's Dword 0 comes back as the
ioctl's result field or the CQE32's big_cqe[0].

Whole namespaces only, without metadata or protection information (the guest's
LBA format is the host's, with no room for either here).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from ..handover import descriptors
from ..nvme.spec import AdminOpcode, IoOpcode
from .base import IoTarget
from .file import BackendError

_addressof = ctypes.addressof
_c_char = ctypes.c_char


def _iowr(nr: int, size: int) -> int:
    """_IOWR('N', nr, size) as <asm-generic/ioctl.h> builds it."""
    return (3 << 30) | (size << 16) | (ord("N") << 8) | nr


#: struct nvme_uring_cmd / nvme_passthru_cmd: opcode, flags, rsvd1, nsid, cdw2, cdw3,
#: metadata, addr, metadata_len, data_len (vec_cnt), cdw10..cdw15, timeout_ms, rsvd2
NVME_COMMAND: Final = struct.Struct("<BBHIIIQQII6III")
#: struct nvme_passthru_cmd64: the same, then the 64-bit result (Dword 0)
_PASSTHRU_CMD64: Final = struct.Struct("<72xQ")
assert NVME_COMMAND.size == 72

NVME_IOCTL_ID: Final = (ord("N") << 8) | 0x40
NVME_IOCTL_ADMIN_CMD: Final = _iowr(0x41, 72)
NVME_IOCTL_IO64_CMD: Final = _iowr(0x48, 80)
NVME_IOCTL_IO64_CMD_VEC: Final = _iowr(0x49, 80)
NVME_URING_CMD_IO: Final = _iowr(0x80, 72)
NVME_URING_CMD_IO_VEC: Final = _iowr(0x81, 72)

IDENTIFY_SIZE: Final = 4096
DEAC: Final = 1 << 25  # Write Zeroes: deallocate


def host_command(dw: Sequence[int], host_nsid: int, addr: int, data_len: int) -> bytes:
    """The host's struct nvme_uring_cmd for the guest's command dwords `dw`: the
    opcode, CDW2-3 and CDW10-15 as they are; the host's NSID; no metadata; FUSE and
    PSDT cleared (the kernel refuses any flags and builds the data pointer itself);
    `addr`/`data_len`: one buffer, or an iovec array and its count (the _VEC form)."""
    return NVME_COMMAND.pack(
        dw[0] & 0xFF, 0, 0, host_nsid, dw[2], dw[3], 0, addr, 0, data_len,
        dw[10], dw[11], dw[12], dw[13], dw[14], dw[15], 0, 0,
    )  # fmt: skip


def encode(
    dw: Sequence[int], host_nsid: int, views: Sequence[memoryview], iov: Any
) -> tuple[bytes, bool, Any]:
    """(command, vectored, iovec array) for the guest's command `dw` and its data
    buffers `views`: one buffer is passed by address, several as iovecs in `iov` (a
    ctypes u64 array of (address, length) pairs, replaced by a larger one if it is too
    small; the caller keeps it alive until the command completes). TypeError: a
    read-only buffer (the kernel would write it, or needs it pinned writable)."""
    count = len(views)
    if count == 0:
        return host_command(dw, host_nsid, 0, 0), False, iov
    if count == 1:
        view = views[0]
        address = _addressof(_c_char.from_buffer(view))
        return host_command(dw, host_nsid, address, view.nbytes), False, iov
    if len(iov) < 2 * count:
        iov = (ctypes.c_uint64 * (2 * count))()
    i = 0
    for view in views:
        iov[i] = _addressof(_c_char.from_buffer(view))
        iov[i + 1] = view.nbytes
        i += 2
    return host_command(dw, host_nsid, _addressof(iov), count), True, iov


def ng_name_for(block_name: str) -> str:
    """nvme0n1 → ng0n1: the generic device has the block device's numbers."""
    if not block_name.startswith("nvme"):
        raise ValueError(block_name)
    return "ng" + block_name[4:]


def block_name_for(ng_name: str) -> str:
    """ng0n1 → nvme0n1."""
    return "nvme" + ng_name[2:]


def lba_format(identify: bytes) -> tuple[int, int, int, int]:
    """(NSZE, logical block size, metadata size, DPS) from Identify Namespace data."""
    nsze = int.from_bytes(identify[0:8], "little")
    flbas = identify[26]
    index = (flbas & 0xF) | ((flbas >> 5) & 0x3) << 4
    ms, lbads, _ = struct.unpack_from("<HBB", identify, 128 + 4 * index)
    return nsze, 1 << lbads if lbads else 0, ms, identify[29] & 0x7


class PassthroughBackend:
    """A host NVMe namespace, whole, through its generic character device. The
    command set passes the guest's commands to it (nvme/passthrough.py); the Backend
    methods (readv, writev, flush, ...) are NVMe commands too, synchronous, for the
    callers that need them outside a guest command (shutdown, hot remove)."""

    #: Identify Namespace DLFEAT, media_errors: a disk, not a file
    is_block_device = True
    #: the namespace passes the guest's commands here (Namespace.passthrough)
    passthrough = True

    def __init__(self, path: str, readonly: bool = False, sysfs: Path = Path("/sys")) -> None:
        self.description = path
        self.readonly = readonly
        try:
            st = os.stat(path)
        except OSError as exc:
            raise BackendError(f"{path}: {exc.strerror}") from exc
        if not stat.S_ISCHR(st.st_mode):
            raise BackendError(
                f"{path}: not an NVMe generic character device (/dev/ngXnY) for passthrough"
            )
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = descriptors.open_fd(path, flags)
        except OSError as exc:
            raise BackendError(f"{path}: {exc.strerror}") from exc
        try:
            try:
                self.host_nsid = fcntl.ioctl(self.fd, NVME_IOCTL_ID)
            except OSError as exc:
                raise BackendError(
                    f"{path}: not an NVMe namespace (NVME_IOCTL_ID: {exc.strerror})"
                ) from exc
            nsze, lba_size, ms, dps = lba_format(self.identify_namespace())
            if ms or dps:
                raise BackendError(
                    f"{path}: its LBA format has {ms} bytes of metadata per block"
                    + (" and protection information" if dps else "")
                    + "; passthrough needs a format without (nvme format --lbaf)"
                )
            if lba_size < 512:
                raise BackendError(f"{path}: LBA data size {lba_size}")
            self.block_size = lba_size
            self.size = nsze * lba_size
            self.max_transfer, self.max_segments = _queue_limits(Path(path).name, sysfs)
        except BaseException:
            descriptors.close_fd(self.fd)
            raise

    # --- the host's namespace ----------------------------------------------------

    def identify_namespace(self) -> bytes:
        """Identify Namespace (CNS 00h) from the host's controller."""
        data = ctypes.create_string_buffer(IDENTIFY_SIZE)
        # CDW10 0: CNS 00h, Identify Namespace
        fields = (AdminOpcode.IDENTIFY, 0, 0, self.host_nsid, 0, 0, 0, _addressof(data), 0)
        cmd = bytearray(NVME_COMMAND.pack(*fields, IDENTIFY_SIZE, 0, 0, 0, 0, 0, 0, 0, 0))
        status = fcntl.ioctl(self.fd, NVME_IOCTL_ADMIN_CMD, cmd)
        if status:
            raise OSError(errno.EIO, f"Identify Namespace: NVMe status {status:#x}")
        return data.raw

    def store_size(self) -> int:
        nsze, lba_size, _, _ = lba_format(self.identify_namespace())
        return nsze * lba_size

    def current_size(self) -> int:
        return self.store_size()

    def io_target(self) -> IoTarget | None:
        return None

    # --- one command, synchronously ---------------------------------------------

    def execute(self, dw: Sequence[int], views: Sequence[memoryview]) -> tuple[int, int]:
        """Run the guest's command `dw` (already checked) on the host's namespace, with
        its data in `views`; returns (NVMe status field, Dword 0). OSError: the kernel
        refused or failed it (-errno). TypeError: read-only buffers."""
        command, vectored, iov = encode(dw, self.host_nsid, views, ())
        cmd = bytearray(command + bytes(8))
        request = NVME_IOCTL_IO64_CMD_VEC if vectored else NVME_IOCTL_IO64_CMD
        status = fcntl.ioctl(self.fd, request, cmd)
        del iov  # (kept alive until here: the kernel reads the iovecs during the call)
        return int(status), _PASSTHRU_CMD64.unpack(cmd)[0]

    def _run(self, opcode: int, slba: int = 0, nlb: int = 0, cdw12: int = 0,
             views: Sequence[memoryview] = (), cdw10: int | None = None,
             cdw11: int = 0) -> None:  # fmt: skip
        """A command of our own (not the guest's); an NVMe error is EIO."""
        dw = [0] * 16
        dw[0] = opcode
        dw[10] = slba & 0xFFFFFFFF if cdw10 is None else cdw10
        dw[11] = slba >> 32 if cdw10 is None else cdw11
        dw[12] = cdw12 | ((nlb - 1) & 0xFFFF if nlb else 0)
        status, _ = self.execute(dw, views)
        if status:
            raise OSError(errno.EIO, f"{self.description}: NVMe status {status:#x}")

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.block_size, length // self.block_size

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        slba, nlb = self._blocks(offset, sum(b.nbytes for b in buffers))
        self._run(IoOpcode.READ, slba, nlb, views=buffers)

    def writev(self, offset: int, buffers: Sequence[memoryview], fua: bool) -> None:
        slba, nlb = self._blocks(offset, sum(b.nbytes for b in buffers))
        self._run(IoOpcode.WRITE, slba, nlb, (1 << 30) if fua else 0, buffers)

    def flush(self) -> None:
        if not self.readonly:
            self._run(IoOpcode.FLUSH)

    def write_zeroes(self, offset: int, length: int, deallocate: bool) -> None:
        slba, nlb = self._blocks(offset, length)
        while nlb:
            n = min(nlb, 0x10000)  # NLB is 16 bits, 0's based
            self._run(IoOpcode.WRITE_ZEROES, slba, n, DEAC if deallocate else 0)
            slba, nlb = slba + n, nlb - n

    def deallocate(self, offset: int, length: int) -> None:
        slba, nlb = self._blocks(offset, length)
        ranges = bytearray()
        while nlb:
            n = min(nlb, 0xFFFFFFFF)
            ranges += struct.pack("<IIQ", 0, n, slba)
            slba, nlb = slba + n, nlb - n
        for i in range(0, len(ranges), 4096):  # 256 ranges per Dataset Management
            chunk = ranges[i : i + 4096]
            self._run(IoOpcode.DATASET_MANAGEMENT, cdw10=len(chunk) // 16 - 1, cdw11=1 << 2,
                      views=[memoryview(chunk)])  # fmt: skip

    def close(self) -> None:
        if self.fd >= 0:
            descriptors.close_fd(self.fd)
            self.fd = -1


def _queue_limits(ng_name: str, sysfs: Path) -> tuple[int | None, int | None]:
    """(bytes, segments) one command may carry on the host's queue: the kernel maps a
    passthrough command's buffers in one request and fails it (EINVAL) beyond these.
    From the block device's queue (same queue); None where sysfs does not say."""
    queue = sysfs / "block" / block_name_for(ng_name) / "queue"
    limits: list[int | None] = []
    for name, unit in (("max_hw_sectors_kb", 1024), ("max_segments", 1)):
        try:
            limits.append(int((queue / name).read_text()) * unit)
        except (OSError, ValueError):
            limits.append(None)
    return limits[0], limits[1]
