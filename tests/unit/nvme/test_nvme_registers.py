"""Controller properties and the enable / reset / shutdown state machine
(NVMe Base 2.0: Controller Properties; Controller Initialization; Shutdown Processing;
Controller Level Reset)."""

from __future__ import annotations

import errno

import pytest
from harness import PAGE, Host, NamespaceFactory, SpyBackend, prp

from nvme_mdev.backends.file import FileBackend
from nvme_mdev.nvme.identity import ControllerConfig
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import (
    DOORBELL_BASE,
    AdminOpcode,
    FeatureId,
    Reg,
)

CSTS_RDY, CSTS_CFS = 1, 2


def shst(csts: int) -> int:
    return (csts >> 2) & 3


def test_cap_fields() -> None:
    h = Host()
    cap = h.read_reg(Reg.CAP, 8)
    assert cap & 0xFFFF == 1023  # MQES: 1024 entries, 0's based
    assert (cap >> 16) & 1 == 1  # CQR: physically contiguous queues required
    assert (cap >> 17) & 3 == 0  # AMS: round robin only
    assert (cap >> 24) & 0xFF == 10  # TO: 5 s in 500 ms units
    assert (cap >> 32) & 0xF == 0  # DSTRD: 4-byte doorbell stride
    assert (cap >> 36) & 1 == 0  # NSSRS: no NVM subsystem reset
    assert (cap >> 37) & 0xFF == 0x01  # CSS: NVM command set only
    assert (cap >> 45) & 1 == 0  # BPS
    assert (cap >> 48) & 0xF == 0  # MPSMIN: 4 KiB
    assert (cap >> 52) & 0xF == 0  # MPSMAX: 4 KiB
    assert (cap >> 59) & 3 == 0b01  # CRMS: CRWMS (required from 2.0 on), no CRIMS
    # The two dword halves read the same 64-bit value.
    assert h.read_reg(Reg.CAP) | (h.read_reg(Reg.CAP + 4) << 32) == cap


def test_cap_mqes_follows_config() -> None:
    h = Host(config=ControllerConfig(max_queue_entries=64))
    assert h.read_reg(Reg.CAP) & 0xFFFF == 63


def test_version_is_2_0() -> None:
    assert Host().read_reg(Reg.VS) == 0x00020000


def test_controller_ready_timeouts_cover_cap_to() -> None:
    """CRTO.CRWMT (bits 15:00) is what CAP.TO reports with CC.CRIME clear (Linux warns
    "bad crto" if CRWMT is less); CRIMT (bits 31:16) is 0h without CAP.CRMS.CRIMS
    (Base 2.1, Figure 57)."""
    h = Host()
    crto = h.read_reg(Reg.CRTO)
    assert crto & 0xFFFF == (h.read_reg(Reg.CAP) >> 24) & 0xFF == 10
    assert crto >> 16 == 0


def test_cc_writable_bits() -> None:
    h = Host()
    h.write_reg(Reg.CC, 0xFFFF3FFE)  # everything but EN and SHN
    assert h.read_reg(Reg.CC) == 0x00FF3FF0  # EN, CSS, MPS, AMS, IOSQES, IOCQES; no CRIME
    assert h.read_reg(Reg.CSTS) == 0


def test_read_only_and_unknown_properties() -> None:
    h = Host()
    cap, vs = h.read_reg(Reg.CAP, 8), h.read_reg(Reg.VS)
    h.write_reg(Reg.CAP, 0xFFFFFFFF)
    h.write_reg(Reg.VS, 0)
    h.write_reg(Reg.CSTS, 0xFFFFFFFF)
    h.write_reg(Reg.NSSR, 0x4E564D65)  # "NVMe": not supported, ignored
    assert h.read_reg(Reg.CAP, 8) == cap
    assert h.read_reg(Reg.VS) == vs
    assert h.read_reg(Reg.CSTS) == 0
    assert h.read_reg(Reg.CMBSZ) == 0
    assert h.read_reg(DOORBELL_BASE) == 0  # doorbells are write-only


def test_asq_acq_written_as_two_dwords() -> None:
    h = Host()
    h.write_reg(Reg.ASQ, 0x12345FFF)  # bits 11:0 are reserved
    h.write_reg(Reg.ASQ + 4, 0x00000001)
    h.write_reg(Reg.ACQ + 4, 0x00000002)
    h.write_reg(Reg.ACQ, 0xABCDE000)
    assert h.read_reg(Reg.ASQ, 8) == 0x1_12345000
    assert h.read_reg(Reg.ASQ) == 0x12345000
    assert h.read_reg(Reg.ASQ + 4) == 1
    assert h.read_reg(Reg.ACQ, 8) == 0x2_ABCDE000
    # A later write of one half keeps the other.
    h.write_reg(Reg.ASQ, 0x00001000)
    assert h.read_reg(Reg.ASQ, 8) == 0x1_00001000


def test_aqa_reserved_bits() -> None:
    h = Host()
    h.write_reg(Reg.AQA, 0xFFFFFFFF)
    assert h.read_reg(Reg.AQA) == 0x0FFF0FFF


def test_enable_sets_ready() -> None:
    h = Host()
    assert h.read_reg(Reg.CSTS) == 0
    h.enable()
    assert h.read_reg(Reg.CSTS) == CSTS_RDY
    c, data = h.identify(1)
    assert c.status == 0 and data[24:33] == b"nvme-mdev"


def test_enable_with_bad_mps_is_fatal() -> None:
    h = Host()
    a = h.admin
    h.write_reg(Reg.AQA, ((a.entries - 1) << 16) | (a.entries - 1))
    h.write_reg(Reg.ASQ, a.sq_addr, 8)
    h.write_reg(Reg.ACQ, a.cq_addr, 8)
    h.write_reg(Reg.CC, h.cc_value(mps=1))  # 8 KiB pages: CAP.MPSMAX is 4 KiB
    assert h.read_reg(Reg.CSTS) == CSTS_CFS
    # Clearing EN resets the controller, CFS included; a good enable then works.
    h.write_reg(Reg.CC, h.cc_value(en=False))
    assert h.read_reg(Reg.CSTS) == 0
    h.enable()
    assert h.read_reg(Reg.CSTS) == CSTS_RDY


def test_enable_with_one_entry_admin_queue_is_fatal() -> None:
    h = Host()
    a = h.admin
    h.write_reg(Reg.AQA, 0)  # ASQS = ACQS = 0: one entry each
    h.write_reg(Reg.ASQ, a.sq_addr, 8)
    h.write_reg(Reg.ACQ, a.cq_addr, 8)
    h.write_reg(Reg.CC, h.cc_value())
    assert h.read_reg(Reg.CSTS) == CSTS_CFS


def test_enable_with_unsupported_css_is_fatal() -> None:
    h = Host()
    a = h.admin
    h.write_reg(Reg.AQA, ((a.entries - 1) << 16) | (a.entries - 1))
    h.write_reg(Reg.ASQ, a.sq_addr, 8)
    h.write_reg(Reg.ACQ, a.cq_addr, 8)
    h.write_reg(Reg.CC, h.cc_value(css=1))  # reserved
    assert h.read_reg(Reg.CSTS) == CSTS_CFS


def test_enable_with_unmapped_admin_queue_is_fatal() -> None:
    h = Host()
    h.write_reg(Reg.AQA, (31 << 16) | 31)
    h.write_reg(Reg.ASQ, 0x7_0000_0000, 8)
    h.write_reg(Reg.ACQ, h.admin.cq_addr, 8)
    h.write_reg(Reg.CC, h.cc_value())
    assert h.read_reg(Reg.CSTS) == CSTS_CFS


def test_disable_deletes_queues_and_clears_ready(file_ns: NamespaceFactory) -> None:
    h = Host([file_ns()])
    h.enable()
    h.create_io_queue_pair(1)
    h.create_io_queue_pair(2)
    h.write_reg(Reg.CC, h.cc_value(en=False))
    assert h.read_reg(Reg.CSTS) & CSTS_RDY == 0
    assert h.read_reg(Reg.CC) & 1 == 0
    assert not h.ctrl.io_queues and h.ctrl.data.queues() == []
    # After re-enabling, queue 1 can be created again (it is really gone).
    h.admin = type(h.admin)(h, 0, h.admin.entries)
    h.enable()
    h.create_io_queue_pair(1)


def test_disable_restores_feature_defaults() -> None:
    h = Host()
    h.enable()
    assert h.set_feature(FeatureId.VOLATILE_WRITE_CACHE, 0).status == 0
    assert h.set_feature(FeatureId.NUMBER_OF_QUEUES, 1 | (1 << 16)).status == 0
    assert h.set_feature(FeatureId.ASYNC_EVENT_CONFIG, 0x100).status == 0
    h.disable()
    h.enable()
    assert h.get_feature(FeatureId.VOLATILE_WRITE_CACHE).dw0 == 1
    assert h.get_feature(FeatureId.NUMBER_OF_QUEUES).dw0 == 63 | (63 << 16)
    assert h.get_feature(FeatureId.ASYNC_EVENT_CONFIG).dw0 == 0


def test_disable_resets_interrupt_mask() -> None:
    h = Host()
    h.enable()
    h.write_reg(Reg.INTMS, 1)
    h.disable()
    assert h.read_reg(Reg.INTMS) == 0


def test_controller_reset_keeps_admin_queue_properties() -> None:
    """'The Admin Queue registers (AQA, ASQ, or ACQ) are not reset as part of a
    controller reset' (Base 1.4 7.3.2; 2.0 3.7.2)."""
    h = Host()
    h.enable()
    aqa, asq, acq = h.read_reg(Reg.AQA), h.read_reg(Reg.ASQ, 8), h.read_reg(Reg.ACQ, 8)
    h.write_reg(Reg.CC, h.cc_value(en=False))
    assert (h.read_reg(Reg.AQA), h.read_reg(Reg.ASQ, 8), h.read_reg(Reg.ACQ, 8)) == (aqa, asq, acq)
    # So setting EN again brings the admin queue back at the same place, emptied.
    h.admin = type(h.admin)(h, 0, h.admin.entries)
    h.admin.sq_addr, h.admin.cq_addr = asq, acq
    h.ctrl.memory.write(acq, bytes(h.admin.entries * 16))
    h.write_reg(Reg.CC, h.cc_value())
    assert h.read_reg(Reg.CSTS) == CSTS_RDY
    assert h.identify(1)[0].status == 0


def _spied(file_ns: NamespaceFactory) -> tuple[Host, SpyBackend]:
    ns = file_ns()
    assert isinstance(ns.backend, FileBackend)
    spy = SpyBackend(ns.backend)
    h = Host([Namespace(1, spy)])
    h.enable()
    return h, spy


def test_normal_shutdown_flushes_and_reports_complete(file_ns: NamespaceFactory) -> None:
    h, spy = _spied(file_ns)
    h.write_reg(Reg.CC, h.cc_value(shn=0b01))
    csts = h.read_reg(Reg.CSTS)
    assert shst(csts) == 0b10  # shutdown processing complete
    assert csts & CSTS_RDY
    assert spy.count("flush") == 1
    # A reset afterwards brings SHST back to normal operation.
    h.disable()
    assert h.read_reg(Reg.CSTS) == 0


def test_abrupt_shutdown_flushes_and_reports_complete(file_ns: NamespaceFactory) -> None:
    h, spy = _spied(file_ns)
    h.write_reg(Reg.CC, h.cc_value(shn=0b10))
    assert shst(h.read_reg(Reg.CSTS)) == 0b10
    assert spy.count("flush") == 1


def test_a_shutdown_whose_flush_fails_is_not_reported_complete(
    file_ns: NamespaceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host takes SHST complete as "everything I wrote is durable": if the flush
    failed it is not, so the controller reports a fatal error instead."""
    h, spy = _spied(file_ns)

    def failing_flush() -> None:
        raise OSError(errno.EIO, "flush failed")

    monkeypatch.setattr(spy, "flush", failing_flush)
    h.write_reg(Reg.CC, h.cc_value(shn=0b01))
    csts = h.read_reg(Reg.CSTS)
    assert shst(csts) != 0b10
    assert csts & CSTS_CFS
    h.disable()  # a reset clears it
    assert h.read_reg(Reg.CSTS) == 0


def test_intms_intmc_share_the_mask() -> None:
    h = Host()
    h.write_reg(Reg.INTMS, 0b101)
    assert h.read_reg(Reg.INTMS) == 0b101
    assert h.read_reg(Reg.INTMC) == 0b101
    h.write_reg(Reg.INTMS, 0b010)  # set bits accumulate
    assert h.read_reg(Reg.INTMS) == 0b111
    h.write_reg(Reg.INTMC, 0b001)  # writing 1 clears
    assert h.read_reg(Reg.INTMS) == 0b110
    assert h.read_reg(Reg.INTMC) == 0b110


def test_doorbell_writes_ignored_when_not_ready() -> None:
    h = Host()
    # An Identify sits in the admin SQ memory and its doorbell is rung before enable:
    buf = h.alloc(PAGE)
    h.admin.submit([AdminOpcode.IDENTIFY, 0, 0, 0, 0, 0, *prp(buf), 0, 0, 1])
    h.write_reg(DOORBELL_BASE + 8 * 5, 3)  # and a doorbell of a queue that does not exist
    h.enable()
    assert h.ctrl.process_admin() == 0
    assert h.admin.peek() == []
    # An AER now is not completed by the pre-enable invalid doorbell write.
    h.admin.sq_tail = 0
    h.admin.next_cid = 10
    cid = h.admin.submit([AdminOpcode.ASYNC_EVENT_REQUEST])
    assert h.ctrl.process_admin() == 1
    assert h.admin.peek() == []
    # Other admin commands are still answered.
    c = h.admin_cmd([AdminOpcode.KEEP_ALIVE])
    assert c.status == 0 and c.cid == cid + 1


def test_doorbell_writes_ignored_after_disable(file_ns: NamespaceFactory) -> None:
    h = Host([file_ns()])
    h.enable()
    q = h.create_io_queue_pair(1)
    h.write_reg(Reg.CC, h.cc_value(en=False))
    q.submit([0x00, 1])  # Flush
    assert h.run_io() == 0
    assert h.ctrl.process_admin() == 0
