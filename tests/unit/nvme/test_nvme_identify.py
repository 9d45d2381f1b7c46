"""Identify (NVMe Base 2.0, Identify command; NVM Command Set 1.0, its I/O Command Set
specific Identify data structures)."""

from __future__ import annotations

import pytest
from harness import BROADCAST, PAGE, UNMAPPED, Host, NamespaceFactory, prp, u16, u32, u64, with_dnr

from nvme_mdev.nvme.identity import ControllerConfig
from nvme_mdev.nvme.spec import AdminOpcode, Cns, Status


def test_identify_controller(host: Host) -> None:
    c, d = host.identify(Cns.CONTROLLER)
    assert c.status == 0 and c.dw0 == 0
    assert u16(d, 0) == 0x4E4D  # VID
    assert u16(d, 2) == 0x4E4D  # SSVID
    assert d[4:24] == b"NVMEMDEV0001".ljust(20)  # SN, space padded
    assert d[24:64] == b"nvme-mdev virtual NVMe controller".ljust(40)  # MN
    assert d[64:72] == b"0.1.0".ljust(8)  # FR
    assert d[77] == 7  # MDTS: 2^7 pages = 512 KiB
    assert u16(d, 78) == 1  # CNTLID
    assert u32(d, 80) == 0x00020000  # VER: 2.0
    assert u32(d, 92) == 1 << 8  # OAES: namespace attribute notices
    assert d[111] == 1  # CNTRLTYPE: I/O controller
    assert u16(d, 256) == 1 << 8  # OACS: Doorbell Buffer Config only
    assert d[258] == 3 and d[259] == 3  # ACL, AERL (0's based)
    assert d[260] == 0b11  # FRMW: one slot, slot 1 read only
    assert d[261] & 0b110 == 0b110  # LPA: commands supported & effects, extended data
    assert d[261] & 1 == 0  # no per-namespace SMART
    assert d[262] == 63  # ELPE
    assert u16(d, 266) == 343 and u16(d, 268) == 373  # WCTEMP, CCTEMP
    assert int.from_bytes(d[280:296], "little") == 1 << 20  # TNVMCAP
    assert d[512] == 0x66  # SQES: 64 bytes
    assert d[513] == 0x44  # CQES: 16 bytes
    assert u32(d, 516) == 256  # NN
    # ONCS: Compare, DSM, Write Zeroes, Save/Select, Timestamp, Verify, Copy, Copy atomicity;
    # not Write Uncorrectable (bit 1)
    assert u16(d, 520) == 0b11_1101_1101
    assert u16(d, 522) == 1  # FUSES: Compare and Write
    assert d[525] == 0b111  # VWC present, Flush with broadcast NSID supported
    assert u16(d, 532) == 127  # ACWU: 128 blocks, 512 KiB (MDTS) of 4 KiB blocks
    assert u16(d, 534) == 1  # CDFS: Copy descriptor format 0h
    # SGLS: byte-granular Data Blocks, Bit Bucket, SGLs longer than the transfer
    assert u32(d, 536) == 0b01 | (1 << 16) | (1 << 18)
    nqn = d[768:1024]
    assert nqn.rstrip(b"\0") == b"nqn.2026-11.io.nvme-mdev:subsys-nvmemdev0001"
    assert nqn[-1] == 0  # NUL terminated
    assert u16(d, 2048) == 2500  # PSD0 MP


def test_identify_controller_reflects_config(file_ns: NamespaceFactory) -> None:
    cfg = ControllerConfig(serial="S1", model="M", mdts=5, max_namespaces=8, aer_limit=2)
    h = Host([file_ns(1), file_ns(2, size=1 << 21)], config=cfg)
    h.enable()
    _, d = h.identify(Cns.CONTROLLER)
    assert d[4:24] == b"S1".ljust(20)
    assert d[24:64] == b"M".ljust(40)
    assert d[77] == 5
    assert u32(d, 516) == 8
    assert d[259] == 1
    assert int.from_bytes(d[280:296], "little") == 3 << 20


@pytest.mark.parametrize(("block_size", "lbads"), [(512, 9), (4096, 12)])
def test_identify_namespace(file_ns: NamespaceFactory, block_size: int, lbads: int) -> None:
    ns = file_ns(size=2 << 20, block_size=block_size)
    h = Host([ns])
    h.enable()
    c, d = h.identify(Cns.NAMESPACE, nsid=1)
    assert c.status == 0
    blocks = (2 << 20) // block_size
    assert (u64(d, 0), u64(d, 8), u64(d, 16)) == (blocks, blocks, blocks)  # NSZE NCAP NUSE
    assert d[25] == 0  # NLBAF: one format (0's based)
    assert d[26] == 0  # FLBAS: format 0, no metadata
    assert u32(d, 128) == lbads << 16  # LBAF0: MS 0, LBADS, RP 0
    assert d[132:192] == bytes(60)  # no other formats
    assert d[33] == 0b1001  # DLFEAT: WZ DEAC supported, deallocated blocks read zeroes
    assert d[99] == 0  # NSATTR: writable
    assert d[104:120] == ns.nguid and d[120:128] == ns.eui64
    assert int.from_bytes(d[48:64], "little") == 2 << 20  # NVMCAP
    # Copy limits: one MDTS (512 KiB) of blocks per command and per range, 128 ranges
    assert u16(d, 74) == (512 << 10) // block_size  # MSSRL
    assert u32(d, 76) == (512 << 10) // block_size  # MCL
    assert d[80] == 127  # MSRC, 0's based


def test_identify_namespace_read_only(file_ns: NamespaceFactory) -> None:
    h = Host([file_ns(readonly=True)])
    h.enable()
    _, d = h.identify(Cns.NAMESPACE, nsid=1)
    assert d[99] == 1  # NSATTR bit 0: write protected
    _, d = h.identify(Cns.CS_INDEPENDENT_NAMESPACE, nsid=1)
    assert d[8] == 1


def test_identify_inactive_namespace_is_zeroes(host: Host) -> None:
    c, d = host.identify(Cns.NAMESPACE, nsid=5)  # <= NN, not attached
    assert c.status == 0
    assert d == bytes(PAGE)


@pytest.mark.parametrize("nsid", [0, 257, 0xFFFFFFFE])
def test_identify_namespace_invalid_nsid(host: Host, nsid: int) -> None:
    c, _ = host.identify(Cns.NAMESPACE, nsid=nsid)
    assert c.status == with_dnr(Status.INVALID_NAMESPACE)


def test_identify_namespace_broadcast_without_namespace_management(host: Host) -> None:
    """OACS bit 3 is clear: NSID FFFFFFFFh is 'Invalid Namespace or Format' (UNH-IOL 9.1 case 6)."""
    c, _ = host.identify(Cns.NAMESPACE, nsid=BROADCAST)
    assert c.status == with_dnr(Status.INVALID_NAMESPACE)


def test_active_namespace_list(file_ns: NamespaceFactory) -> None:
    h = Host([file_ns(7), file_ns(1), file_ns(3)])
    h.enable()

    def listed(start: int) -> list[int]:
        c, d = h.identify(Cns.ACTIVE_NAMESPACE_LIST, nsid=start)
        assert c.status == 0
        ids = [u32(d, i) for i in range(0, PAGE, 4)]
        n = ids.index(0)
        assert ids[n:] == [0] * (1024 - n)
        return ids[:n]

    assert listed(0) == [1, 3, 7]
    assert listed(1) == [3, 7]
    assert listed(3) == [7]
    assert listed(7) == []
    assert listed(0xFFFFFFFD) == []
    for bad in (0xFFFFFFFE, BROADCAST):
        c, _ = h.identify(Cns.ACTIVE_NAMESPACE_LIST, nsid=bad)
        assert c.status == with_dnr(Status.INVALID_NAMESPACE)


def test_namespace_identification_descriptors(host: Host) -> None:
    ns = host.ctrl.namespaces[1]
    c, d = host.identify(Cns.NAMESPACE_ID_DESCRIPTORS, nsid=1)
    assert c.status == 0
    expected = (
        bytes([1, 8, 0, 0])
        + ns.eui64
        + bytes([2, 16, 0, 0])
        + ns.nguid
        + bytes([3, 16, 0, 0])
        + ns.uuid
        + bytes([4, 1, 0, 0, 0])  # CSI: NVM
    )
    assert d[: len(expected)] == expected
    assert d[len(expected) :] == bytes(PAGE - len(expected))
    assert ns.uuid[6] >> 4 == 5 and ns.uuid[8] >> 6 == 0b10  # RFC 4122 version/variant


@pytest.mark.parametrize("nsid", [0, 2, BROADCAST])
def test_descriptors_need_an_active_nsid(host: Host, nsid: int) -> None:
    c, _ = host.identify(Cns.NAMESPACE_ID_DESCRIPTORS, nsid=nsid)
    assert c.status == with_dnr(Status.INVALID_NAMESPACE)


def test_cns05_nvm_specific_namespace(host: Host) -> None:
    c, d = host.identify(Cns.CS_NAMESPACE, nsid=1, csi=0)
    assert c.status == 0
    assert d == bytes(PAGE)  # no PI, no extended LBA formats
    c, _ = host.identify(Cns.CS_NAMESPACE, nsid=1, csi=2)  # zoned: not supported
    assert c.status == with_dnr(Status.INVALID_FIELD)
    c, _ = host.identify(Cns.CS_NAMESPACE, nsid=0, csi=0)
    assert c.status == with_dnr(Status.INVALID_NAMESPACE)


def test_cns06_nvm_specific_controller(host: Host) -> None:
    c, d = host.identify(Cns.CS_CONTROLLER, csi=0)
    assert c.status == 0
    assert d[0] == 7  # VSL: Verify recommended at most MDTS (a hint: Verify is supported)
    assert d[1:4] == bytes(3)  # WZSL, WUSL, DMRL: no limits
    assert d[4:16] == bytes(12)  # DMRSL, DMSL
    assert d[16:] == bytes(PAGE - 16)
    c, _ = host.identify(Cns.CS_CONTROLLER, csi=1)
    assert c.status == with_dnr(Status.INVALID_FIELD)


def test_cns07_active_list_for_command_set(file_ns: NamespaceFactory) -> None:
    h = Host([file_ns(1), file_ns(2)])
    h.enable()
    c, d = h.identify(Cns.CS_ACTIVE_NAMESPACE_LIST, nsid=0, csi=0)
    assert c.status == 0 and (u32(d, 0), u32(d, 4), u32(d, 8)) == (1, 2, 0)
    c, d = h.identify(Cns.CS_ACTIVE_NAMESPACE_LIST, nsid=0, csi=2)
    assert c.status == 0 and d == bytes(PAGE)


def test_cns08_command_set_independent_namespace(host: Host) -> None:
    c, d = host.identify(Cns.CS_INDEPENDENT_NAMESPACE, nsid=1)
    assert c.status == 0
    assert d[8] == 0  # NSATTR
    assert d[14] == 1  # NSTAT: namespace ready
    assert d[:8] == bytes(8) and d[15:] == bytes(PAGE - 15)
    c, d = host.identify(Cns.CS_INDEPENDENT_NAMESPACE, nsid=9)  # inactive
    assert c.status == 0 and d == bytes(PAGE)
    c, _ = host.identify(Cns.CS_INDEPENDENT_NAMESPACE, nsid=0)
    assert c.status == with_dnr(Status.INVALID_NAMESPACE)


def test_cns12_cns13_controller_lists(host: Host) -> None:
    c, d = host.identify(Cns.NAMESPACE_ATTACHED_CONTROLLER_LIST, nsid=1)
    assert c.status == 0 and (u16(d, 0), u16(d, 2)) == (1, 1)
    c, d = host.identify(Cns.NAMESPACE_ATTACHED_CONTROLLER_LIST, nsid=2)
    assert c.status == 0 and d == bytes(PAGE)
    c, d = host.identify(Cns.CONTROLLER_LIST, cntid=0)
    assert c.status == 0 and (u16(d, 0), u16(d, 2)) == (1, 1)
    c, d = host.identify(Cns.CONTROLLER_LIST, cntid=2)
    assert c.status == 0 and d == bytes(PAGE)


def test_cns1c_io_command_set_vector(host: Host) -> None:
    c, d = host.identify(Cns.IO_COMMAND_SET)
    assert c.status == 0
    assert u64(d, 0) == 1  # combination 0: NVM only
    assert d[8:] == bytes(PAGE - 8)


@pytest.mark.parametrize("cns", [0x04, 0x09, 0x10, 0x11, 0x14, 0x15, 0x16, 0x17, 0x1F, 0xFF])
def test_unknown_cns_is_invalid_field(host: Host, cns: int) -> None:
    c, _ = host.identify(cns, nsid=1)
    assert c.status == with_dnr(Status.INVALID_FIELD)


def test_identify_data_through_prp1_offset_and_prp2(host: Host) -> None:
    """Identify data crossing a page: PRP1 with an offset, PRP2 the next page."""
    _, expected = host.identify(Cns.CONTROLLER)
    buf = host.alloc(2 * PAGE)
    c = host.admin_cmd(
        [AdminOpcode.IDENTIFY, 0, 0, 0, 0, 0, *prp(buf + 0x800), *prp(buf + PAGE), Cns.CONTROLLER]
    )
    assert c.status == 0
    assert host.memory.read(buf + 0x800, PAGE) == expected


def test_identify_prp_errors(host: Host) -> None:
    c = host.admin_cmd([AdminOpcode.IDENTIFY, 0, 0, 0, 0, 0, *prp(host.scratch + 2), 0, 0, 1])
    assert c.status == with_dnr(Status.PRP_OFFSET_INVALID)
    c = host.admin_cmd([AdminOpcode.IDENTIFY, 0, 0, 0, 0, 0, *prp(UNMAPPED), 0, 0, 1])
    assert c.status == Status.DATA_TRANSFER_ERROR
