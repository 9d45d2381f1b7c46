"""NVMe Base 2.2, 5.1.13 Identify, for every CNS value (and NVM Command Set 1.2 for
the NVM-specific structures)."""

from __future__ import annotations

import struct

import pytest
from conformance_support import (
    BROADCAST,
    INACTIVE_NSID,
    LAYOUT,
    NAMESPACES,
    NS_RO,
    NamespaceLayout,
    assert_ok,
    assert_status,
)

from nvme_mdev.nvme.spec import Cns, Reg, Status
from nvme_mdev.nvme.support import IDENTIFY as IDENTIFY_SUPPORT
from nvme_mdev.nvme_host import Completion, NvmeHost, identify

#: CNS values an I/O controller shall support, written out from the specification (not
#: from the device's tables): NVMe Base 2.1, 5.1.13.1 Figure 310 'Identify - CNS Values',
#: O/M column M (00h's data structure is the NVM Command Set's: NVM Command Set 1.2,
#: 4.1.5.1). The others are optional, or mandatory only with a capability this controller
#: does not offer (the figure's notes: Namespace Management, Virtualization Enhancements,
#: Capacity Management).
MANDATORY = [
    Cns.NAMESPACE,  # 00h
    Cns.CONTROLLER,  # 01h
    Cns.ACTIVE_NAMESPACE_LIST,  # 02h
    Cns.NAMESPACE_ID_DESCRIPTORS,  # 03h
]
#: optional CNS values the device says it supports (docs/support.md), checked as well
OPTIONAL_SUPPORTED = sorted(
    c for c, (level, _) in IDENTIFY_SUPPORT.items() if level != "refused" and c not in MANDATORY
)
REFUSED = sorted(c for c, (level, _) in IDENTIFY_SUPPORT.items() if level == "refused")
#: CNS values that name a namespace: asked for nsid 1
PER_NAMESPACE = {Cns.NAMESPACE, Cns.NAMESPACE_ID_DESCRIPTORS, Cns.CS_NAMESPACE}
PER_NAMESPACE |= {Cns.CS_INDEPENDENT_NAMESPACE, Cns.NAMESPACE_ATTACHED_CONTROLLER_LIST}


def _identify(host: NvmeHost, cns: int, nsid: int = 0, **kw: int) -> tuple[Completion, bytes]:
    buf = host.alloc(4096)
    c = host.admin_command(identify(cns, buf, nsid, **kw))
    return c, host.ram.read(buf, 4096)


def _ids(data: bytes) -> list[int]:
    ids = list(struct.unpack("<1024I", data))
    return ids[: ids.index(0)] if 0 in ids else ids


@pytest.mark.parametrize("cns", MANDATORY, ids=lambda c: Cns(c).name.lower())
def test_5_1_13_every_mandatory_cns_returns_a_data_structure(host: NvmeHost, cns: int) -> None:
    """Each CNS value the specification makes mandatory for an I/O controller completes
    successfully."""
    c, _ = _identify(host, cns, 1 if cns in PER_NAMESPACE else 0)
    assert_ok(c)


@pytest.mark.parametrize("cns", OPTIONAL_SUPPORTED, ids=lambda c: Cns(c).name.lower())
def test_5_1_13_every_optional_cns_the_device_reports_returns_a_data_structure(
    host: NvmeHost, cns: int
) -> None:
    """Each optional CNS value the controller says it supports completes successfully."""
    c, _ = _identify(host, cns, 1 if cns in PER_NAMESPACE else 0)
    assert_ok(c)


@pytest.mark.parametrize("cns", REFUSED, ids=lambda c: Cns(c).name.lower())
def test_5_1_13_unsupported_cns_is_invalid_field(host: NvmeHost, cns: int) -> None:
    """A CNS value the controller does not support: Invalid Field in Command, DNR."""
    assert cns not in MANDATORY, "a mandatory CNS value cannot be refused"
    c, _ = _identify(host, cns, 1 if cns in PER_NAMESPACE else 0)
    assert_status(c, Status.INVALID_FIELD, dnr=True)


def test_5_1_13_reserved_cns_is_invalid_field(host: NvmeHost) -> None:
    """CNS values the specification reserves are Invalid Field in Command."""
    c, _ = _identify(host, 0x1F)
    assert_status(c, Status.INVALID_FIELD, dnr=True)


def test_5_1_13_identify_controller_fields(host: NvmeHost) -> None:
    """Identify Controller: ASCII SN/MN/FR, VER equal to the VS property, SQES/CQES
    covering 64/16 bytes, NN, and the ONCS/OACS bits of what the controller runs."""
    c, data = _identify(host, Cns.CONTROLLER)
    assert_ok(c)
    for start, end in ((4, 24), (24, 64), (64, 72)):
        assert data[start:end].isascii() and data[start:end].strip()
    assert struct.unpack_from("<I", data, 80)[0] == host.reg32(Reg.VS)
    assert data[512] == 0x66 and data[513] == 0x44  # SQES, CQES: required = max = 64/16
    nn = struct.unpack_from("<I", data, 516)[0]
    assert nn >= max(LAYOUT)
    oncs = struct.unpack_from("<H", data, 520)[0]
    assert oncs & 0b1101 == 0b1101  # Compare, Dataset Management, Write Zeroes
    assert oncs & 0b10 == 0  # no Write Uncorrectable
    oacs = struct.unpack_from("<H", data, 256)[0]
    assert oacs & (1 << 8)  # Doorbell Buffer Config
    assert oacs & 0b1010 == 0  # no Format NVM, no Namespace Management


@pytest.mark.parametrize("ns", NAMESPACES, ids=lambda n: f"nsid{n.nsid}")
def test_5_1_13_identify_namespace_reports_size_format_and_write_protection(
    host: NvmeHost, ns: NamespaceLayout
) -> None:
    """Identify Namespace: NSZE/NCAP in blocks, LBA Format 0's LBADS, and NSATTR bit 0
    for a write-protected namespace."""
    layout = LAYOUT[ns.nsid]
    c, data = _identify(host, Cns.NAMESPACE, layout.nsid)
    assert_ok(c)
    nsze, ncap = struct.unpack_from("<QQ", data, 0)
    assert nsze == ncap == layout.blocks
    flbas = data[26] & 0xF
    lbads = data[128 + 4 * flbas + 2]
    assert 1 << lbads == layout.block_size
    assert data[99] & 1 == int(layout.readonly)


def test_5_1_13_identify_namespace_of_an_inactive_nsid_is_zero_filled(host: NvmeHost) -> None:
    """A valid NSID with no active namespace: a zero-filled data structure."""
    c, data = _identify(host, Cns.NAMESPACE, INACTIVE_NSID)
    assert_ok(c)
    assert data == bytes(4096)


@pytest.mark.parametrize("nsid", [0, BROADCAST, 0xFFFF_FFF0], ids=["zero", "broadcast", "above_nn"])
def test_5_1_13_identify_namespace_with_an_invalid_nsid_is_invalid_namespace(
    host: NvmeHost, nsid: int
) -> None:
    """NSID 0h, above NN, or FFFFFFFFh without Namespace Management: Invalid Namespace
    or Format."""
    c, _ = _identify(host, Cns.NAMESPACE, nsid)
    assert_status(c, Status.INVALID_NAMESPACE, dnr=True)


def test_5_1_13_active_namespace_list_is_ascending_and_starts_after_nsid(host: NvmeHost) -> None:
    """CNS 02h: active NSIDs greater than CDW1.NSID, in increasing order, zero filled."""
    _, data = _identify(host, Cns.ACTIVE_NAMESPACE_LIST, 0)
    assert _ids(data) == sorted(LAYOUT)
    _, data = _identify(host, Cns.ACTIVE_NAMESPACE_LIST, 1)
    assert _ids(data) == sorted(LAYOUT)[1:]


@pytest.mark.parametrize("nsid", [0xFFFFFFFE, BROADCAST])
def test_5_1_13_active_namespace_list_from_fffffffe_or_ffffffff_is_invalid_namespace(
    host: NvmeHost, nsid: int
) -> None:
    """CNS 02h with NSID FFFFFFFEh or FFFFFFFFh: Invalid Namespace or Format."""
    c, _ = _identify(host, Cns.ACTIVE_NAMESPACE_LIST, nsid)
    assert_status(c, Status.INVALID_NAMESPACE, dnr=True)


def test_5_1_13_namespace_identification_descriptors(host: NvmeHost) -> None:
    """CNS 03h: EUI64 (8 bytes), NGUID (16), UUID (16) and CSI (1) descriptors matching
    Identify Namespace's EUI64 and NGUID."""
    _, ns = _identify(host, Cns.NAMESPACE, 1)
    c, data = _identify(host, Cns.NAMESPACE_ID_DESCRIPTORS, 1)
    assert_ok(c)
    found: dict[int, bytes] = {}
    pos = 0
    while data[pos]:
        nidt, nidl = data[pos], data[pos + 1]
        found[nidt] = data[pos + 4 : pos + 4 + nidl]
        pos += 4 + nidl
    assert found[1] == ns[120:128] and found[2] == ns[104:120]
    assert len(found[3]) == 16 and found[4] == b"\x00"  # UUID; CSI: NVM


def test_5_1_13_namespace_identification_descriptors_of_an_inactive_nsid(host: NvmeHost) -> None:
    """CNS 03h for an NSID that is not active is refused."""
    c, _ = _identify(host, Cns.NAMESPACE_ID_DESCRIPTORS, INACTIVE_NSID)
    assert c.code in (Status.INVALID_NAMESPACE, Status.INVALID_FIELD) and c.dnr


@pytest.mark.parametrize("cns", [Cns.CS_NAMESPACE, Cns.CS_CONTROLLER])
def test_5_1_13_io_command_set_specific_structure_for_another_csi_is_invalid_field(
    host: NvmeHost, cns: int
) -> None:
    """CNS 05h/06h with a CSI the controller does not support: Invalid Field in Command."""
    c, _ = _identify(host, cns, 1 if cns == Cns.CS_NAMESPACE else 0, csi=2)
    assert_status(c, Status.INVALID_FIELD, dnr=True)


def test_5_1_13_cs_active_namespace_list_for_nvm_matches_the_active_list(host: NvmeHost) -> None:
    """CNS 07h with CSI 00h (NVM): the active namespaces of that command set."""
    _, nvm = _identify(host, Cns.CS_ACTIVE_NAMESPACE_LIST, 0, csi=0)
    assert _ids(nvm) == sorted(LAYOUT)


def test_5_1_13_cs_independent_namespace_reports_ready_and_write_protection(
    host: NvmeHost,
) -> None:
    """CNS 08h: NSTAT bit 0 (ready) for an active namespace; NSATTR bit 0 for one that
    is write protected."""
    _, data = _identify(host, Cns.CS_INDEPENDENT_NAMESPACE, NS_RO)
    assert data[14] & 1 and data[8] & 1
    _, data = _identify(host, Cns.CS_INDEPENDENT_NAMESPACE, 1)
    assert data[14] & 1 and data[8] & 1 == 0


def test_5_1_13_controller_lists_name_this_controller(host: NvmeHost) -> None:
    """CNS 12h (attached to a namespace) and 13h (in the subsystem, from CNTID on) list
    the controller's CNTLID; a namespace that is not attached lists none."""
    _, ctrl = _identify(host, Cns.CONTROLLER)
    cntlid = struct.unpack_from("<H", ctrl, 78)[0]
    _, attached = _identify(host, Cns.NAMESPACE_ATTACHED_CONTROLLER_LIST, 1)
    assert struct.unpack_from("<HH", attached, 0) == (1, cntlid)
    _, listed = _identify(host, Cns.CONTROLLER_LIST, cntid=cntlid)
    assert struct.unpack_from("<HH", listed, 0) == (1, cntlid)
    _, after = _identify(host, Cns.CONTROLLER_LIST, cntid=cntlid + 1)
    assert struct.unpack_from("<H", after, 0)[0] == 0
    _, none = _identify(host, Cns.NAMESPACE_ATTACHED_CONTROLLER_LIST, INACTIVE_NSID)
    assert struct.unpack_from("<H", none, 0)[0] == 0


def test_5_1_13_io_command_set_vector_reports_nvm(host: NvmeHost) -> None:
    """CNS 1Ch: I/O Command Set Combination 0 has bit 0 (NVM Command Set) set."""
    _, data = _identify(host, Cns.IO_COMMAND_SET)
    assert struct.unpack_from("<Q", data, 0)[0] & 1
