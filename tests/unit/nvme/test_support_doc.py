"""docs/support.md against the code: every admin and I/O opcode, Identify CNS, log
page and feature the specification's enums name is probed on a real controller, and
must be 'refused' in nvme/support.py exactly when the controller refuses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Host, NamespaceFactory, rw

from nvme_mdev.nvme import support
from nvme_mdev.nvme.spec import AdminOpcode, Cns, FeatureId, IoOpcode, LogPage, Status

DOC = Path(__file__).resolve().parents[3] / "docs" / "support.md"


@pytest.fixture
def host(file_ns: NamespaceFactory) -> Host:
    h = Host([file_ns()])
    h.enable()
    h.create_io_queue_pair(1)
    return h


def refused(table: support.Table, code: int) -> bool:
    return table[code][0] == "refused"


def test_the_document_is_generated_from_the_table() -> None:
    assert DOC.read_text() == support.render(), (
        "docs/support.md is stale: python -m nvme_mdev.nvme.support > docs/support.md"
    )


@pytest.mark.parametrize(
    ("enum", "table"),
    [
        (AdminOpcode, support.ADMIN),
        (IoOpcode, support.IO),
        (Cns, support.IDENTIFY),
        (LogPage, support.LOG_PAGES),
        (FeatureId, support.FEATURES),
    ],
)
def test_every_entry_the_spec_names_is_listed(enum: type, table: support.Table) -> None:
    assert set(table) == {int(m) for m in enum}  # type: ignore[attr-defined]
    for level, note in table.values():
        assert level in ("full", "partial", "refused")
        assert note or level == "full", "partial and refused entries say why"


@pytest.mark.parametrize("opcode", list(AdminOpcode), ids=lambda o: o.name)
def test_admin_opcode(host: Host, opcode: AdminOpcode) -> None:
    host.admin.submit([opcode])  # every field zero: wrong for most, but not an unknown opcode
    host.ctrl.process_admin()
    done = host.admin.reap()
    if opcode == AdminOpcode.ASYNC_EVENT_REQUEST:
        assert done == [] and not refused(support.ADMIN, opcode)  # held until an event
        return
    (c,) = done
    assert (c.sc == Status.INVALID_OPCODE) == refused(support.ADMIN, opcode), hex(c.status)


@pytest.mark.parametrize("opcode", list(IoOpcode), ids=lambda o: o.name)
def test_io_opcode(host: Host, opcode: IoOpcode) -> None:
    buf = host.buffer(4096)
    host.memory.write(buf, bytes(4096))
    c = host.io_cmd(1, rw(opcode, 1, buf, 0, 1))
    assert (c.sc == Status.INVALID_OPCODE) == refused(support.IO, opcode), hex(c.status)


@pytest.mark.parametrize("cns", list(Cns), ids=lambda c: c.name)
def test_identify_cns(host: Host, cns: Cns) -> None:
    c, _ = host.identify(cns, nsid=1)
    assert (c.sc == Status.INVALID_FIELD) == refused(support.IDENTIFY, cns), hex(c.status)


@pytest.mark.parametrize("lid", list(LogPage), ids=lambda lid: lid.name)
def test_log_page(host: Host, lid: LogPage) -> None:
    c, _ = host.get_log(lid, 64, nsid=0)
    assert (c.sc == Status.INVALID_LOG_PAGE) == refused(support.LOG_PAGES, lid), hex(c.status)


@pytest.mark.parametrize("fid", list(FeatureId), ids=lambda f: f.name)
def test_feature(host: Host, fid: FeatureId) -> None:
    c = host.get_feature(fid)
    assert (c.sc == Status.INVALID_FIELD) == refused(support.FEATURES, fid), hex(c.status)
