"""NVMe Base 2.2, 3.1.4 Controller Properties, 3.5.1 Memory-based Controller
Initialization, 3.6.1 Memory-based Controller Shutdown, 3.7.2 Controller Level Reset."""

from __future__ import annotations

from conformance_support import (
    NS512,
    Device,
    assert_ok,
    assert_status,
    pattern,
    read_blocks,
    write_blocks,
)

from nvme_mdev.nvme.spec import FeatureId, Reg, Status
from nvme_mdev.nvme_host import BAR0, NvmeHost, create_io_sq

CC_ENABLED = (4 << 20) | (6 << 16) | 1  # IOCQES 16 B, IOSQES 64 B, EN
CC_CRIME = 1 << 24
CSTS_RDY, CSTS_CFS = 1, 2
#: CAP.CRMS (bits 60:59): Controller Ready With Media / Independent of Media Support
CAP_CRWMS, CAP_CRIMS = 1 << 59, 1 << 60


def _shst(csts: int) -> int:
    return (csts >> 2) & 0x3


def _program_admin_queues(h: NvmeHost, entries: int = 8) -> None:
    sq, cq = h.alloc(entries * 64), h.alloc(entries * 16)
    h.client.write32(BAR0, Reg.AQA, ((entries - 1) << 16) | (entries - 1))
    h.client.write64(BAR0, Reg.ASQ, sq)
    h.client.write64(BAR0, Reg.ACQ, cq)


def test_3_1_4_cap_describes_the_controller(host: NvmeHost) -> None:
    """CAP: MQES (0's based, 'the minimum value is 1h, indicating two entries'), CQR,
    TO, DSTRD 0, CSS bit 0 (NVM), MPSMIN/MPSMAX 4 KiB."""
    cap = host.client.read64(BAR0, Reg.CAP)
    assert cap & 0xFFFF >= 1  # MQES: at least two entries
    assert (cap >> 16) & 1 == 1  # CQR: contiguous queues required
    assert (cap >> 24) & 0xFF > 0  # TO: a ready timeout is given
    assert (cap >> 32) & 0xF == 0  # DSTRD: 4-byte doorbell stride
    assert (cap >> 37) & 1 == 1  # CSS bit 0: NVM Command Set
    assert (cap >> 48) & 0xF == 0 and (cap >> 52) & 0xF == 0  # MPSMIN = MPSMAX = 4 KiB


def test_3_1_4_cap_crms_crwms_is_set_from_version_2_0(host: NvmeHost) -> None:
    """CAP.CRMS.CRWMS 'shall be set to 1 on controllers compliant with NVM Express Base
    Specification, Revision 2.0 and later' (Figure 36); CRTO is then the property that
    bounds the wait for CSTS.RDY."""
    cap = host.client.read64(BAR0, Reg.CAP)
    if host.reg32(Reg.VS) >> 16 >= 2:
        assert cap & CAP_CRWMS
    if cap & CAP_CRIMS:  # CC.CRIME is only writable with CRMS 11b
        assert cap & CAP_CRWMS


def test_3_1_4_cap_to_is_crto_crwmt_in_controller_ready_with_media_mode(
    host: NvmeHost,
) -> None:
    """With CC.CRIME clear, CAP.TO 'shall be set to the value in CRTO.CRWMT, or FFh if
    CRTO.CRWMT is greater' (Figure 36, CAP.TO; Figure 57, CRTO bits 15:00): so CRWMT
    is never below CAP.TO, which Linux reports as "bad crto" at every probe."""
    assert host.reg32(Reg.CC) & CC_CRIME == 0
    to = (host.client.read64(BAR0, Reg.CAP) >> 24) & 0xFF
    crwmt = host.reg32(Reg.CRTO) & 0xFFFF
    assert to > 0, "CAP.TO: a worst-case ready time is given"
    assert crwmt >= to, f"CRTO.CRWMT {crwmt} below CAP.TO {to}"
    assert to == min(crwmt, 0xFF)


def test_3_1_4_crto_crimt_is_zero_without_crims_and_never_above_crwmt(host: NvmeHost) -> None:
    """CRTO.CRIMT (bits 31:16): 'If the CAP.CRMS.CRIMS bit is cleared to 0, then the
    controller shall clear this field to 0h'; CRWMT 'shall be greater than or equal to
    the value of the CRTO.CRIMT field' (Figure 57)."""
    crto = host.reg32(Reg.CRTO)
    crimt, crwmt = crto >> 16, crto & 0xFFFF
    if not host.client.read64(BAR0, Reg.CAP) & CAP_CRIMS:
        assert crimt == 0, f"CRTO {crto:#x}: CRIMT {crimt} without CAP.CRMS.CRIMS"
    assert crwmt >= crimt


def test_3_1_4_vs_reports_a_version_of_at_least_1_2(host: NvmeHost) -> None:
    """VS: major version in bits 31:16, minor in 15:8."""
    vs = host.reg32(Reg.VS)
    assert (vs >> 16, (vs >> 8) & 0xFF) >= (1, 2)


def test_3_1_4_read_only_properties_ignore_writes(host: NvmeHost) -> None:
    """CAP and VS are read-only: a host write changes nothing."""
    cap, vs = host.client.read64(BAR0, Reg.CAP), host.reg32(Reg.VS)
    host.client.write32(BAR0, Reg.CAP, 0)
    host.client.write32(BAR0, Reg.VS, 0)
    assert host.client.read64(BAR0, Reg.CAP) == cap
    assert host.reg32(Reg.VS) == vs


def test_3_1_4_cc_aqa_asq_acq_read_back_what_the_host_wrote(host: NvmeHost) -> None:
    """CC, AQA, ASQ and ACQ hold the values the host programmed."""
    assert host.admin is not None
    assert host.reg32(Reg.CC) == CC_ENABLED
    assert host.reg32(Reg.AQA) == (31 << 16) | 31
    assert host.client.read64(BAR0, Reg.ASQ) == host.admin.sq_addr
    assert host.client.read64(BAR0, Reg.ACQ) == host.admin.cq_addr


def test_3_1_4_asq_and_acq_bits_11_0_are_reserved(raw_host: NvmeHost) -> None:
    """ASQB/ACQB are 4 KiB aligned: bits 11:0 read as zero whatever is written."""
    raw_host.client.write64(BAR0, Reg.ASQ, 0x10000123)
    raw_host.client.write64(BAR0, Reg.ACQ, 0x10002FFF)
    assert raw_host.client.read64(BAR0, Reg.ASQ) == 0x10000000
    assert raw_host.client.read64(BAR0, Reg.ACQ) == 0x10002000


def test_3_5_1_setting_cc_en_sets_csts_rdy_and_admin_commands_run(raw_host: NvmeHost) -> None:
    """After CC.EN 0 -> 1 the controller sets CSTS.RDY and processes admin commands."""
    assert raw_host.reg32(Reg.CSTS) & CSTS_RDY == 0
    raw_host.enable()
    assert raw_host.reg32(Reg.CSTS) & (CSTS_RDY | CSTS_CFS) == CSTS_RDY
    assert raw_host.identify(1)[24:33] == b"nvme-mdev"


def test_3_5_1_enable_with_unsupported_page_size_is_refused_with_cfs(raw_host: NvmeHost) -> None:
    """CC.MPS outside CAP.MPSMIN..MPSMAX: the controller does not become ready."""
    _program_admin_queues(raw_host)
    raw_host.client.write32(BAR0, Reg.CC, CC_ENABLED | (1 << 7))  # MPS 1: 8 KiB
    csts = raw_host.reg32(Reg.CSTS)
    assert csts & CSTS_RDY == 0 and csts & CSTS_CFS


def test_3_5_1_enable_with_unsupported_command_set_is_refused_with_cfs(
    raw_host: NvmeHost,
) -> None:
    """CC.CSS naming a command set CAP.CSS does not report: not ready, CFS."""
    _program_admin_queues(raw_host)
    raw_host.client.write32(BAR0, Reg.CC, CC_ENABLED | (1 << 4))  # CSS 001b: reserved
    csts = raw_host.reg32(Reg.CSTS)
    assert csts & CSTS_RDY == 0 and csts & CSTS_CFS


def test_3_5_1_enable_with_one_entry_admin_queue_is_refused_with_cfs(raw_host: NvmeHost) -> None:
    """AQA.ASQS/ACQS are 0's based with a minimum of 2 entries (1h)."""
    _program_admin_queues(raw_host)
    raw_host.client.write32(BAR0, Reg.AQA, 0)
    raw_host.client.write32(BAR0, Reg.CC, CC_ENABLED)
    csts = raw_host.reg32(Reg.CSTS)
    assert csts & CSTS_RDY == 0 and csts & CSTS_CFS


def test_3_5_1_enable_with_admin_queues_outside_host_memory_is_refused_with_cfs(
    raw_host: NvmeHost,
) -> None:
    """Admin queues the controller cannot reach: it reports a fatal status, not ready."""
    raw_host.client.write32(BAR0, Reg.AQA, (7 << 16) | 7)
    raw_host.client.write64(BAR0, Reg.ASQ, 0x7000_0000_0000)
    raw_host.client.write64(BAR0, Reg.ACQ, 0x7000_0000_1000)
    raw_host.client.write32(BAR0, Reg.CC, CC_ENABLED)
    csts = raw_host.reg32(Reg.CSTS)
    assert csts & CSTS_RDY == 0 and csts & CSTS_CFS


def test_3_7_2_clearing_cc_en_clears_csts_including_cfs(raw_host: NvmeHost) -> None:
    """CC.EN 1 -> 0 is a Controller Level Reset: CSTS.RDY and CSTS.CFS clear, and the
    controller can be enabled again."""
    _program_admin_queues(raw_host)
    raw_host.client.write32(BAR0, Reg.CC, CC_ENABLED | (1 << 7))
    assert raw_host.reg32(Reg.CSTS) & CSTS_CFS
    raw_host.client.write32(BAR0, Reg.CC, 0)
    assert raw_host.reg32(Reg.CSTS) == 0
    raw_host.enable()
    assert raw_host.reg32(Reg.CSTS) & (CSTS_RDY | CSTS_CFS) == CSTS_RDY


def test_3_7_2_controller_level_reset_deletes_io_queues(host: NvmeHost) -> None:
    """After a Controller Level Reset no I/O queue exists: an SQ naming the old CQ is
    refused with Completion Queue Invalid."""
    q = host.create_queue_pair(1, entries=16)
    host.disable()
    host.enable()
    c = host.admin_command(create_io_sq(1, q.sq_addr, 16, cqid=1))
    assert_status(c, Status.COMPLETION_QUEUE_INVALID, dnr=True)


def test_3_7_2_controller_level_reset_keeps_admin_queue_properties(host: NvmeHost) -> None:
    """AQA, ASQ and ACQ are not reset by a Controller Level Reset."""
    assert host.admin is not None
    sq, cq = host.admin.sq_addr, host.admin.cq_addr
    host.disable()
    assert host.reg32(Reg.AQA) == (31 << 16) | 31
    assert host.client.read64(BAR0, Reg.ASQ) == sq
    assert host.client.read64(BAR0, Reg.ACQ) == cq
    assert host.reg32(Reg.CC) & 1 == 0


def test_3_7_2_controller_level_reset_restores_feature_defaults(host: NvmeHost) -> None:
    """Features without saved values return to their defaults at a reset."""
    assert_ok(host.set_features(FeatureId.VOLATILE_WRITE_CACHE, 0))
    assert host.get_features(FeatureId.VOLATILE_WRITE_CACHE)[0].dw0 == 0
    host.disable()
    host.enable()
    c, _ = host.get_features(FeatureId.VOLATILE_WRITE_CACHE)
    assert c.dw0 == host.get_features(FeatureId.VOLATILE_WRITE_CACHE, sel=1)[0].dw0 == 1


def test_3_6_1_normal_shutdown_completes_and_written_data_is_on_the_medium(
    device: Device, host: NvmeHost
) -> None:
    """CC.SHN 01b: the controller finishes, makes data durable and reports SHST 10b."""
    q = host.create_queue_pair(1, entries=16)
    data = pattern(4096, 31)
    assert_ok(write_blocks(host, q, NS512, 100, data))
    host.shutdown()
    assert _shst(host.reg32(Reg.CSTS)) == 0b10
    assert device.stored(NS512, 100, 8) == data


def test_3_6_1_abrupt_shutdown_completes(host: NvmeHost) -> None:
    """CC.SHN 10b (abrupt): SHST reaches 10b."""
    host.shutdown(abrupt=True)
    assert _shst(host.reg32(Reg.CSTS)) == 0b10


def test_3_6_1_reset_after_shutdown_brings_the_controller_back(host: NvmeHost) -> None:
    """After a shutdown the host resets (CC.EN = 0): SHST returns to 00b and the
    controller can be enabled and used again."""
    host.shutdown()
    host.client.write32(BAR0, Reg.CC, 0)
    host.wait_csts(CSTS_RDY, 0)
    assert _shst(host.reg32(Reg.CSTS)) == 0
    host.enable()
    q = host.create_queue_pair(1, entries=16)
    c, _ = read_blocks(host, q, NS512, 0, 1)
    assert_ok(c)
