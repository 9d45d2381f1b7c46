"""Controller properties (NVMe Base 3.1.4): CAP, VS, CC, CSTS, AQA, ASQ, ACQ, INTMS/INTMC.

The register file stores values and answers the bit-level questions; what an
enable, disable or shutdown *does* lives in the controller.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import (
    CC_CSS_MASK,
    CC_CSS_SHIFT,
    CC_EN,
    CC_IOCQES_MASK,
    CC_IOCQES_SHIFT,
    CC_IOSQES_MASK,
    CC_IOSQES_SHIFT,
    CC_MPS_MASK,
    CC_MPS_SHIFT,
    CC_SHN_MASK,
    CC_SHN_SHIFT,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_SHIFT,
    Reg,
)

# 2.0.0: the NVM Command Set's Copy, CNS 05h-08h/1Ch and the CSI descriptor are 2.0
# features; Linux uses NS descriptors and 64-bit LBAs from 1.3 on.
NVME_VERSION = 2 << 16

# Writable CC bits: EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES (CRIME is not supported).
CC_WRITABLE = 0x00FFFFF1


@dataclass(frozen=True)
class Capabilities:
    """CAP fields we choose; everything else reads as zero."""

    mqes: int  # maximum queue entries, 0's based
    timeout_500ms: int  # CAP.TO: worst-case time to become ready, in 500 ms units
    doorbell_stride_shift: int = 0  # CAP.DSTRD: doorbells 4 << DSTRD bytes apart
    contiguous_queues_required: bool = True  # CAP.CQR

    def encode(self) -> int:
        cap = self.mqes & 0xFFFF
        cap |= int(self.contiguous_queues_required) << 16
        # CAP.AMS stays 0: only the mandatory round-robin arbitration.
        cap |= (self.timeout_500ms & 0xFF) << 24
        cap |= (self.doorbell_stride_shift & 0xF) << 32
        cap |= 1 << 37  # CSS: NVM command set
        cap |= 0 << 48  # MPSMIN: 4 KiB
        cap |= 0 << 52  # MPSMAX: 4 KiB
        # CRMS.CRWMS, required from 2.0 on: ready means ready with media, within CRTO.CRWMT.
        # CRIMS stays clear (no "ready independent of media" mode).
        cap |= 1 << 59
        return cap


def cc_enabled(cc: int) -> bool:
    return bool(cc & CC_EN)


def cc_css(cc: int) -> int:
    return (cc >> CC_CSS_SHIFT) & CC_CSS_MASK


def cc_mps(cc: int) -> int:
    return (cc >> CC_MPS_SHIFT) & CC_MPS_MASK


def cc_shn(cc: int) -> int:
    return (cc >> CC_SHN_SHIFT) & CC_SHN_MASK


def cc_iosqes(cc: int) -> int:
    return (cc >> CC_IOSQES_SHIFT) & CC_IOSQES_MASK


def cc_iocqes(cc: int) -> int:
    return (cc >> CC_IOCQES_SHIFT) & CC_IOCQES_MASK


def csts_shst(csts: int) -> int:
    return (csts >> CSTS_SHST_SHIFT) & 0x3


def with_shst(csts: int, shst: int) -> int:
    return (csts & ~(0x3 << CSTS_SHST_SHIFT)) | (shst << CSTS_SHST_SHIFT)


@dataclass
class RegisterFile:
    cap: int
    vs: int = NVME_VERSION
    intms: int = 0  # interrupt mask (shared by INTMS/INTMC), only meaningful without MSI-X
    cc: int = 0
    csts: int = 0
    aqa: int = 0
    asq: int = 0
    acq: int = 0

    def reset(self) -> None:
        """Controller Level Reset: every property back to its default except CAP, VS and
        the admin queue properties: 'The Admin Queue registers (AQA, ASQ, or ACQ) are not
        reset as part of a controller reset' (Base 1.4 7.3.2; 2.0, Controller Level Reset)."""
        self.intms = self.cc = self.csts = 0

    @property
    def ready(self) -> bool:
        return bool(self.csts & CSTS_RDY)

    @property
    def fatal(self) -> bool:
        return bool(self.csts & CSTS_CFS)

    def admin_sq_size(self) -> int:
        return (self.aqa & 0xFFF) + 1

    def admin_cq_size(self) -> int:
        return ((self.aqa >> 16) & 0xFFF) + 1

    def read(self, offset: int, size: int) -> int:
        """A 4- or 8-byte read of the property at `offset`; unknown offsets read as zero."""
        if size == 8:
            return self.read(offset, 4) | (self.read(offset + 4, 4) << 32)
        base, high = offset & ~0x7, offset & 0x4
        if base in (Reg.CAP, Reg.ASQ, Reg.ACQ):
            word = self.cap if base == Reg.CAP else self.asq if base == Reg.ASQ else self.acq
            return (word >> (32 if high else 0)) & 0xFFFFFFFF
        if offset == Reg.VS:
            return self.vs
        if offset in (Reg.INTMS, Reg.INTMC):
            return self.intms
        if offset == Reg.CC:
            return self.cc
        if offset == Reg.CSTS:
            return self.csts
        if offset == Reg.AQA:
            return self.aqa
        if offset == Reg.CRTO:
            return controller_ready_timeouts(self.cap)
        return 0


def controller_ready_timeouts(cap: int) -> int:
    """CRTO for a controller with capabilities `cap` (Base 2.1, Figure 57 'CRTO -
    Controller Ready Timeouts', and CAP.TO in Figure 36).

    CRWMT (bits 15:00, 500 ms units) is the worst-case time to ready in Controller
    Ready With Media mode, the only mode here (CC.CRIME reads 0): CAP.TO 'shall be set
    to the value in CRTO.CRWMT, or FFh if that is greater', so CRWMT is CAP.TO.
    CRIMT (bits 31:16): 'If the CAP.CRMS.CRIMS bit is cleared to 0, then the controller
    shall clear this field to 0h'. Linux reads CRWMT when CAP.CRMS.CRWMS is set and
    warns "bad crto" if it is below CAP.TO."""
    return (cap >> 24) & 0xFF  # CRIMT 0h (CAP.CRMS.CRIMS is never set), CRWMT = CAP.TO
