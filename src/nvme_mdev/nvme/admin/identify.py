"""Identify (NVMe Base 5.17; NVM Command Set 4.1.5): the data structures the
controller describes itself and its namespaces with."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from ... import __version__
from ..errors import CommandError
from ..io import COPY_DESCRIPTOR_FORMATS, acwu_blocks, copy_limits
from ..namespace import Namespace
from ..prp import send_to_host
from ..sgl import sgls_field
from ..spec import CSI_NVM, Cns, Status
from .features import DEFAULT_ARBITRATION_BURST, WARNING_TEMPERATURE

if TYPE_CHECKING:
    from ..controller import Controller

IDENTIFY_SIZE = 4096
PCI_VENDOR_ID = 0x4E4D  # see pci.config_space: unregistered IDs chosen for this project
BROADCAST_NSID = 0xFFFFFFFF

# OACS: Doorbell Buffer Config (bit 8)
OACS = 1 << 8
# ONCS: Compare (0), Dataset Management (2), Write Zeroes (3), Save/Select in features (4),
# Timestamp (6), Verify (7), Copy (8), Copy Single Atomicity (9: the write portion of a
# Copy is one write). Not Write Uncorrectable (1): see io.py.
ONCS = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9)
# FUSES: Compare and Write (bit 0; see io.py)
FUSES = 1 << 0
# LPA: commands supported and effects (1), extended data for Get Log Page (2)
LPA = (1 << 1) | (1 << 2)
# OAES: Namespace Attribute Notices (8)
OAES = 1 << 8
# VWC: present (0), flush with broadcast NSID supported (2:1 = 11b)
VWC = 0b111
CRITICAL_TEMPERATURE = 373


def _ascii(text: str, width: int) -> bytes:
    return text.encode("ascii")[:width].ljust(width, b" ")


def controller_data(ctrl: Controller) -> bytes:
    cfg = ctrl.config
    data = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", data, 0, PCI_VENDOR_ID, PCI_VENDOR_ID)
    data[4:24] = _ascii(cfg.serial, 20)
    data[24:64] = _ascii(cfg.model, 40)
    data[64:72] = _ascii(cfg.firmware or __version__, 8)
    data[72] = DEFAULT_ARBITRATION_BURST  # RAB
    data[76] = 0  # CMIC: one port, one controller
    data[77] = cfg.mdts
    struct.pack_into("<HI", data, 78, cfg.controller_id, ctrl.registers.vs)
    struct.pack_into("<I", data, 92, OAES)
    data[111] = 1  # CNTRLTYPE: I/O controller
    # Mapped doorbells never trap, so shadow doorbells would have nothing to save.
    struct.pack_into("<H", data, 256, OACS if ctrl.doorbell_words is None else 0)
    data[258] = cfg.abort_limit - 1  # ACL, 0's based
    data[259] = cfg.aer_limit - 1  # AERL, 0's based
    data[260] = (1 << 1) | 1  # FRMW: one slot, read only
    data[261] = LPA
    data[262] = cfg.error_log_entries - 1  # ELPE, 0's based
    data[263] = 0  # NPSS: one power state
    struct.pack_into("<HH", data, 266, WARNING_TEMPERATURE, CRITICAL_TEMPERATURE)
    capacity = sum(ns.blocks << ns.lba_shift for ns in ctrl.namespaces.values())
    data[280:296] = capacity.to_bytes(16, "little")  # TNVMCAP
    data[512] = (6 << 4) | 6  # SQES: 64 bytes required and maximum
    data[513] = (4 << 4) | 4  # CQES: 16 bytes
    struct.pack_into("<HIHH", data, 514, 0, cfg.max_namespaces, ONCS, FUSES)  # MAXCMD NN
    data[525] = VWC
    struct.pack_into("<H", data, 532, acwu_blocks(cfg.max_transfer) - 1)  # ACWU, 0's based
    struct.pack_into("<H", data, 534, COPY_DESCRIPTOR_FORMATS)  # CDFS (OCFS)
    struct.pack_into("<I", data, 536, sgls_field(ctrl.config.sgl_support))  # SGLS
    struct.pack_into("<I", data, 540, 0)  # MNAN
    data[768 : 768 + 256] = cfg.subsystem_nqn.encode("ascii")[:255].ljust(256, b"\0")
    # Power state 0: 25 W max power, nothing else to say about it.
    struct.pack_into("<H", data, 2048, 2500)
    return bytes(data)


def namespace_data(ns: Namespace | None, max_transfer: int) -> bytes:
    """Identify Namespace (CNS 00h); an inactive namespace is all zeroes."""
    data = bytearray(IDENTIFY_SIZE)
    if ns is None:
        return bytes(data)
    struct.pack_into("<QQQ", data, 0, ns.blocks, ns.blocks, ns.blocks)
    data[24] = 0  # NSFEAT
    data[25] = 0  # NLBAF: one format
    data[26] = 0  # FLBAS: format 0
    deallocated_read_zeroes = not getattr(ns.backend, "is_block_device", False)
    # DLFEAT: Write Zeroes may deallocate (bit 3); deallocated blocks read 0 (001b) for files.
    data[33] = (1 << 3) | (1 if deallocated_read_zeroes else 0)
    data[48:64] = (ns.blocks << ns.lba_shift).to_bytes(16, "little")  # NVMCAP
    limits = copy_limits(ns, max_transfer)
    struct.pack_into("<HIB", data, 74, limits.mssrl, limits.mcl, limits.msrc)  # MSSRL MCL MSRC
    data[99] = 1 if ns.readonly else 0  # NSATTR: write protected
    data[104:120] = ns.nguid
    data[120:128] = ns.eui64
    struct.pack_into("<I", data, 128, ns.lba_shift << 16)  # LBAF0: no metadata, LBADS
    return bytes(data)


def active_namespace_list(ctrl: Controller, after: int) -> bytes:
    ids = sorted(n for n in ctrl.namespaces if n > after)[:1024]
    return struct.pack(f"<{len(ids)}I", *ids).ljust(IDENTIFY_SIZE, b"\0")


def namespace_descriptors(ns: Namespace) -> bytes:
    """Namespace Identification Descriptor list (CNS 03h): EUI-64, NGUID, UUID, CSI."""
    out = bytearray()
    for nidt, value in ((1, ns.eui64), (2, ns.nguid), (3, ns.uuid), (4, bytes([CSI_NVM]))):
        out += bytes([nidt, len(value), 0, 0]) + value
    return bytes(out.ljust(IDENTIFY_SIZE, b"\0"))


def nvm_controller_data(ctrl: Controller) -> bytes:
    """I/O Command Set specific Identify Controller for NVM (NVM Command Set 4.1.5.4)."""
    data = bytearray(IDENTIFY_SIZE)
    # VSL: the Verify size recommended (Verify is supported, so not a limit), MDTS's units
    data[0] = ctrl.config.mdts
    data[1] = 0  # WZSL: Write Zeroes size limit (none)
    data[2] = 0  # WUSL
    data[3] = 0  # DMRL: DSM ranges limit (no limit beyond 256)
    struct.pack_into("<IQ", data, 4, 0, 0)  # DMRSL, DMSL: no limits
    return bytes(data)


def nvm_namespace_data(ns: Namespace | None) -> bytes:
    """I/O Command Set specific Identify Namespace for NVM: no extended formats, no PI."""
    return bytes(IDENTIFY_SIZE)


def independent_namespace_data(ns: Namespace | None) -> bytes:
    """I/O Command Set Independent Identify Namespace (CNS 08h)."""
    data = bytearray(IDENTIFY_SIZE)
    if ns is None:
        return bytes(data)
    # NSFEAT, NMIC, RESCAP, FPI, ANAGRPID stay zero.
    data[8] = 1 if ns.readonly else 0  # NSATTR: write protected
    data[14] = 0 if ns.failure is not None else 1  # NSTAT: ready unless its storage is gone
    return bytes(data)


def controller_list(ctrl: Controller) -> bytes:
    """CNS 12h/13h: a list holding our one controller."""
    return struct.pack("<HH", 1, ctrl.config.controller_id).ljust(IDENTIFY_SIZE, b"\0")


def command_set_vector(ctrl: Controller) -> bytes:
    """CNS 1Ch: I/O command set combinations; index 0 = NVM only."""
    return struct.pack("<Q", 1).ljust(IDENTIFY_SIZE, b"\0")


def identify(ctrl: Controller, dw: tuple[int, ...]) -> int:
    cns = dw[10] & 0xFF
    cntid = dw[10] >> 16
    csi = dw[11] >> 24
    nsid = dw[1]
    ns = ctrl.namespaces.get(nsid)

    def need_valid_nsid() -> None:
        # FFFFFFFFh would name the capabilities common to all namespaces, which only a
        # controller with Namespace Management (OACS bit 3) answers (Identify, CNS 00h):
        # without it that NSID is Invalid Namespace or Format, like any NSID above NN.
        if nsid == 0 or nsid > ctrl.config.max_namespaces:
            raise CommandError(Status.INVALID_NAMESPACE, f"nsid {nsid:#x}")

    if cns == Cns.NAMESPACE:
        need_valid_nsid()
        data = namespace_data(ns, ctrl.config.max_transfer)
    elif cns == Cns.CONTROLLER:
        data = controller_data(ctrl)
    elif cns in (Cns.ACTIVE_NAMESPACE_LIST, Cns.CS_ACTIVE_NAMESPACE_LIST):
        if nsid >= 0xFFFFFFFE:
            raise CommandError(Status.INVALID_NAMESPACE, f"nsid {nsid:#x}")
        if cns == Cns.CS_ACTIVE_NAMESPACE_LIST and csi != CSI_NVM:
            data = bytes(IDENTIFY_SIZE)
        else:
            data = active_namespace_list(ctrl, nsid)
    elif cns == Cns.NAMESPACE_ID_DESCRIPTORS:
        need_valid_nsid()
        if ns is None:
            raise CommandError(Status.INVALID_NAMESPACE, f"nsid {nsid} is not active")
        data = namespace_descriptors(ns)
    elif cns == Cns.CS_NAMESPACE:
        need_valid_nsid()
        if csi != CSI_NVM:
            raise CommandError(Status.INVALID_FIELD, f"CSI {csi}")
        data = nvm_namespace_data(ns)
    elif cns == Cns.CS_CONTROLLER:
        if csi != CSI_NVM:
            raise CommandError(Status.INVALID_FIELD, f"CSI {csi}")
        data = nvm_controller_data(ctrl)
    elif cns == Cns.CS_INDEPENDENT_NAMESPACE:
        need_valid_nsid()
        data = independent_namespace_data(ns)
    elif cns == Cns.NAMESPACE_ATTACHED_CONTROLLER_LIST:
        need_valid_nsid()
        data = controller_list(ctrl) if ns is not None else bytes(IDENTIFY_SIZE)
    elif cns == Cns.CONTROLLER_LIST:
        data = controller_list(ctrl) if cntid <= ctrl.config.controller_id else bytes(IDENTIFY_SIZE)
    elif cns == Cns.IO_COMMAND_SET:
        data = command_set_vector(ctrl)
    else:
        raise CommandError(Status.INVALID_FIELD, f"CNS {cns:#x}")
    send_to_host(ctrl.memory, dw, data)
    return 0
