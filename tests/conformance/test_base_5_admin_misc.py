"""NVMe Base 2.2, 5.1.14 Keep Alive, and the admin commands the controller refuses
(5.1.10 Format NVM, 5.1.20 Namespace Attachment, 5.1.21 Namespace Management, ...):
Invalid Command Opcode, as docs/support.md says; 4.1.1 Command Dword 0 rules."""

from __future__ import annotations

import pytest
from conformance_support import assert_ok, assert_status

from nvme_mdev.nvme.spec import AdminOpcode, Status
from nvme_mdev.nvme.support import ADMIN as ADMIN_SUPPORT
from nvme_mdev.nvme_host import NvmeHost, identify, keep_alive

REFUSED = sorted(op for op, (level, _) in ADMIN_SUPPORT.items() if level == "refused")


def test_5_1_14_keep_alive_completes_successfully(host: NvmeHost) -> None:
    """Keep Alive is accepted (the controller has no keep-alive timer: KAS 0)."""
    assert_ok(host.admin_command(keep_alive()))
    assert int.from_bytes(host.identify(1)[320:322], "little") == 0  # KAS


@pytest.mark.parametrize("opcode", REFUSED, ids=lambda o: AdminOpcode(o).name.lower())
def test_5_1_refused_admin_commands_are_invalid_command_opcode(host: NvmeHost, opcode: int) -> None:
    """Format NVM, Namespace Attachment/Management, Firmware, Sanitize, Security, ...:
    Invalid Command Opcode with DNR (their OACS bits are clear)."""
    assert host.admin is not None
    c = host.admin.command([opcode, 1])
    assert_status(c, Status.INVALID_OPCODE, dnr=True)


def test_5_1_reserved_admin_opcode_is_invalid_command_opcode(host: NvmeHost) -> None:
    """An opcode no specification defines: Invalid Command Opcode."""
    assert host.admin is not None
    assert_status(host.admin.command([0x03]), Status.INVALID_OPCODE, dnr=True)


@pytest.mark.parametrize(
    "flags", [1 << 8, 2 << 8, 1 << 14], ids=["fuse_first", "fuse_second", "sgl"]
)
def test_4_1_1_admin_command_with_fuse_or_sgl_is_invalid_field(host: NvmeHost, flags: int) -> None:
    """Admin commands are not fused and use PRPs (PSDT 00b): otherwise Invalid Field in
    Command."""
    assert host.admin is not None
    dw = identify(1, host.alloc(4096))
    dw[0] |= flags
    assert_status(host.admin.command(dw), Status.INVALID_FIELD, dnr=True)
