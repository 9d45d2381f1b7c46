"""NVMe passthrough, the parts that need no NVMe device: the Linux structures and
ioctl numbers, how a guest's command becomes the host's, what is refused before it
gets there, and the namespace specs that ask for it."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import pytest

from nvme_mdev.backends import passthrough as pt
from nvme_mdev.backends import uring
from nvme_mdev.config import ConfigError, NamespaceSpec
from nvme_mdev.nvme import passthrough as check
from nvme_mdev.nvme.errors import CommandError
from nvme_mdev.nvme.spec import DNR, IoOpcode, Status
from nvme_mdev.storage import resolve_passthrough

# --- the kernel's interface (include/uapi/linux/nvme_ioctl.h) -------------------------


def test_ioctl_numbers_are_the_kernels() -> None:
    # _IOWR('N', nr, struct): 72-byte nvme_uring_cmd / nvme_passthru_cmd, 80-byte _cmd64
    assert pt.NVME_IOCTL_ID == 0x4E40
    assert pt.NVME_IOCTL_ADMIN_CMD == 0xC0484E41
    assert pt.NVME_IOCTL_IO64_CMD == 0xC0504E48
    assert pt.NVME_IOCTL_IO64_CMD_VEC == 0xC0504E49
    assert pt.NVME_URING_CMD_IO == 0xC0484E80
    assert pt.NVME_URING_CMD_IO_VEC == 0xC0484E81
    assert uring.IORING_OP_URING_CMD == 46


def test_struct_nvme_uring_cmd_layout() -> None:
    """Field offsets as in struct nvme_uring_cmd: nsid at 4, cdw2 8, cdw3 12, metadata
    16, addr 24, metadata_len 32, data_len 36, cdw10..15 40..60, timeout_ms 64."""
    assert pt.NVME_COMMAND.size == 72
    raw = pt.NVME_COMMAND.pack(0x02, 0, 0, 7, 2, 3, 0xAA, 0xBB, 4, 5, 10, 11, 12, 13, 14, 15, 6, 0)
    assert raw[0] == 0x02
    assert struct.unpack_from("<IIIQQII6II", raw, 4) == (7, 2, 3, 0xAA, 0xBB, 4, 5,
                                                        10, 11, 12, 13, 14, 15, 6)  # fmt: skip


def guest_read(cid: int = 0x1234, flags: int = 0) -> tuple[int, ...]:
    """A guest's Read SQE: CID, FUSE/PSDT bits, MPTR and PRPs set to junk the host must
    never see."""
    return (
        (cid << 16) | flags | IoOpcode.READ, 1, 0xC2, 0xC3, 0x111, 0x222,
        0xDEAD000, 0, 0xBEEF000, 0, 0x10, 0x1, (1 << 30) | 7, 0xD13, 0xD14, 0xD15,
    )  # fmt: skip


def fields(cmd: bytes) -> tuple[int, ...]:
    return pt.NVME_COMMAND.unpack(cmd)


def test_host_command_keeps_the_dwords_and_replaces_nsid_and_pointers() -> None:
    cmd = pt.host_command(guest_read(flags=0x4000), 9, 0x7000, 4096)
    (opcode, flags, _, nsid, cdw2, cdw3, metadata, addr, metadata_len, data_len,
     *cdw10_15, timeout, _) = fields(cmd)  # fmt: skip
    assert opcode == IoOpcode.READ  # CID and PSDT are the kernel's to set
    assert flags == 0  # the kernel refuses any flags (FUSE, PSDT)
    assert nsid == 9  # the host's NSID, not the guest's 1
    assert (cdw2, cdw3) == (0xC2, 0xC3)
    assert (metadata, metadata_len) == (0, 0)  # no guest metadata pointer
    assert (addr, data_len) == (0x7000, 4096)
    assert cdw10_15 == [0x10, 0x1, (1 << 30) | 7, 0xD13, 0xD14, 0xD15]  # FUA kept
    assert timeout == 0


def test_encode_one_buffer_by_address_several_as_iovecs() -> None:
    a, b = bytearray(4096), bytearray(512)
    cmd, vectored, _ = pt.encode(guest_read(), 3, [memoryview(a)], ())
    assert not vectored
    assert fields(cmd)[7:10] == (uring.buffer_address(memoryview(a)), 0, 4096)

    cmd, vectored, iov = pt.encode(guest_read(), 3, [memoryview(a), memoryview(b)], ())
    assert vectored
    assert fields(cmd)[7] == ctypes.addressof(iov) and fields(cmd)[9] == 2  # vec count
    assert list(iov[:4]) == [uring.buffer_address(memoryview(a)), 4096,
                             uring.buffer_address(memoryview(b)), 512]  # fmt: skip

    cmd, vectored, _ = pt.encode((IoOpcode.FLUSH, 1, *[0] * 14), 3, [], ())
    assert not vectored and fields(cmd)[7:10] == (0, 0, 0)


def test_encode_refuses_read_only_buffers() -> None:
    with pytest.raises(TypeError):
        pt.encode(guest_read(), 1, [memoryview(bytes(512))], ())


def identify_ns(nsze: int, formats: dict[int, tuple[int, int]], flbas: int, dps: int = 0) -> bytes:
    data = bytearray(4096)
    struct.pack_into("<Q", data, 0, nsze)
    data[26] = flbas
    data[29] = dps
    for index, (ms, lbads) in formats.items():
        struct.pack_into("<HBB", data, 128 + 4 * index, ms, lbads, 0)
    return bytes(data)


def test_lba_format_from_identify_namespace() -> None:
    assert pt.lba_format(identify_ns(1000, {0: (0, 9), 1: (0, 12)}, 1)) == (1000, 4096, 0, 0)
    # FLBAS bits 6:5 are the format index's bits 5:4 (more than 16 formats)
    assert pt.lba_format(identify_ns(8, {17: (8, 12)}, (1 << 5) | 1, dps=1)) == (8, 4096, 8, 1)


def test_ng_and_block_names() -> None:
    assert pt.ng_name_for("nvme3n12") == "ng3n12"
    assert pt.block_name_for("ng3n12") == "nvme3n12"


# --- what is checked before a command is passed on --------------------------------------

BLOCKS = 1024


def run_check(dw: list[int] | tuple[int, ...], readonly: bool = False) -> check.Transfer:
    full = (*dw, *[0] * (16 - len(dw)))
    return check.check(full, BLOCKS, 9, 128 << 10, readonly)


def status_of(dw: list[int], readonly: bool = False) -> int:
    with pytest.raises(CommandError) as info:
        run_check(dw, readonly)
    return info.value.status


def rw(opcode: int, slba: int, nlb: int, dw12: int = 0) -> list[int]:
    return [opcode, 1, 0, 0, 0, 0, 0, 0, 0, 0, slba & 0xFFFFFFFF, slba >> 32, (nlb - 1) | dw12]


def test_allowed_opcodes_are_the_nvm_io_commands() -> None:
    assert set(check.ALLOWED_OPCODES) == {
        IoOpcode.FLUSH, IoOpcode.WRITE, IoOpcode.READ, IoOpcode.COMPARE,
        IoOpcode.WRITE_ZEROES, IoOpcode.DATASET_MANAGEMENT, IoOpcode.VERIFY, IoOpcode.COPY,
    }  # fmt: skip
    for opcode in (IoOpcode.WRITE_UNCORRECTABLE, IoOpcode.RESERVATION_REGISTER, 0x06, 0x80, 0xFF):
        assert status_of(rw(opcode, 0, 1)) == Status.INVALID_OPCODE


def test_transfer_length_and_direction() -> None:
    assert run_check(rw(IoOpcode.READ, 8, 4)) == check.Transfer(2048, True, 8)
    assert run_check(rw(IoOpcode.WRITE, 0, 1, 1 << 30)) == check.Transfer(512, False, 0)
    assert run_check(rw(IoOpcode.COMPARE, 0, 2)).length == 1024
    assert run_check(rw(IoOpcode.VERIFY, 0, 1024)).length == 0  # no data; MDTS not applied
    assert run_check(rw(IoOpcode.WRITE_ZEROES, 0, 1024)).length == 0
    assert run_check([IoOpcode.FLUSH, 1]).length == 0
    dsm = [IoOpcode.DATASET_MANAGEMENT, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1 << 2]
    assert run_check(dsm).length == 3 * 16
    copy = [IoOpcode.COPY, 1, 0, 0, 0, 0, 0, 0, 0, 0, 100, 0, 1]
    assert run_check(copy).length == 2 * 32
    copy[12] = (1 << 8) | 3
    assert run_check(copy).length == 4 * 40


def test_refusals() -> None:
    assert status_of(rw(IoOpcode.READ, BLOCKS - 1, 2)) == Status.LBA_OUT_OF_RANGE
    assert status_of(rw(IoOpcode.READ, 1 << 40, 1)) == Status.LBA_OUT_OF_RANGE
    assert status_of(rw(IoOpcode.VERIFY, BLOCKS, 1)) == Status.LBA_OUT_OF_RANGE
    assert status_of(rw(IoOpcode.WRITE, 0, 257)) == Status.INVALID_FIELD  # > MDTS
    fused = rw(IoOpcode.COMPARE, 0, 1)
    fused[0] |= 1 << 8
    assert status_of(fused) == Status.INVALID_FIELD
    reserved_psdt = rw(IoOpcode.READ, 0, 1)
    reserved_psdt[0] |= 3 << 14
    assert status_of(reserved_psdt) == Status.INVALID_FIELD
    copy = [IoOpcode.COPY, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2 << 8]
    assert status_of(copy) == Status.INVALID_FIELD  # descriptor format 2h
    copy = [IoOpcode.COPY, 1, 0, 0, 0, 0, 0, 0, 0, 0, BLOCKS, 0, 0]
    assert status_of(copy) == Status.LBA_OUT_OF_RANGE


def test_read_only_namespace_refuses_writes_only() -> None:
    for dw in (rw(IoOpcode.WRITE, 0, 1), rw(IoOpcode.WRITE_ZEROES, 0, 1),
               [IoOpcode.COPY, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
               [IoOpcode.DATASET_MANAGEMENT, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 << 2]):  # fmt: skip
        assert status_of(dw, readonly=True) == Status.NAMESPACE_WRITE_PROTECTED
    run_check(rw(IoOpcode.READ, 0, 1), readonly=True)
    run_check([IoOpcode.FLUSH, 1], readonly=True)
    run_check([IoOpcode.DATASET_MANAGEMENT, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], readonly=True)


def test_host_status_is_the_guests_as_is() -> None:
    err = check.host_status(DNR | (1 << 13) | 0x281, 0x55, 7)  # M, DNR, Unrecovered Read
    assert (err.status | (DNR if err.dnr else 0)) == DNR | (1 << 13) | 0x281
    assert (err.result, err.lba) == (0x55, 7)
    err = check.host_status(0x0080, 0, 0)
    assert err.status == Status.LBA_OUT_OF_RANGE and err.dnr is False


# --- namespace specs --------------------------------------------------------------------


def test_spec_ng_device_is_passthrough() -> None:
    spec = NamespaceSpec.parse("/dev/ng0n1")
    assert spec.passthrough
    assert spec.text() == "/dev/ng0n1"
    spec = NamespaceSpec.parse("nvme0:n1,passthrough,ro")
    assert spec.passthrough and spec.readonly
    assert NamespaceSpec.parse(spec.text()) == spec
    assert not NamespaceSpec.parse("/dev/nvme0n1").passthrough


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("/dev/ng0n1,offset=1M", "not a window"),
        ("/dev/ng0n1,size=1G", "not a window"),
        ("/dev/ng0n1,bs=4096", "leave out bs="),
        ("nvme0:n1,bs=512,passthrough", "leave out bs="),
        ("null:1G,passthrough", "not a window"),
    ],
)
def test_spec_refusals(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        NamespaceSpec.parse(text)


@pytest.fixture
def host_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A sysfs with controller nvme0 (namespace 1, partition 1) and its /dev nodes."""
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    ns = sysfs / "class" / "nvme" / "nvme0" / "nvme0n1"
    (ns / "nvme0n1p1").mkdir(parents=True)
    (ns / "nsid").write_text("1\n")
    dev.mkdir()
    for name in ("ng0n1", "nvme0n1", "nvme0n1p1", "ng0n2"):
        (dev / name).touch()
    return sysfs, dev


def test_resolve_passthrough(host_tree: tuple[Path, Path]) -> None:
    sysfs, dev = host_tree
    ng, block = str(dev / "ng0n1"), str(dev / "nvme0n1")
    assert resolve_passthrough("nvme0:n1", sysfs, dev) == (ng, block)
    assert resolve_passthrough(str(dev / "nvme0n1"), sysfs, dev) == (ng, block)
    assert resolve_passthrough(str(dev / "ng0n1"), sysfs, dev) == (ng, block)
    # a namespace the block layer does not take has an ng device only
    assert resolve_passthrough(str(dev / "ng0n2"), sysfs, dev) == (str(dev / "ng0n2"), None)


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("nvme0:n1p1", "a partition has no ng device"),
        ("DEV/nvme0n1p1", "a partition has no ng device"),
        ("DEV/disk.img", "passthrough takes a host NVMe namespace"),
        ("DEV/ng0n7", "no .*ng0n7"),
        ("nvme1:n1", "no host NVMe controller nvme1"),
    ],
)
def test_resolve_passthrough_refusals(host_tree: tuple[Path, Path], path: str, says: str) -> None:
    sysfs, dev = host_tree
    (dev / "disk.img").touch()
    with pytest.raises(ConfigError, match=says):
        resolve_passthrough(path.replace("DEV", str(dev)), sysfs, dev)
