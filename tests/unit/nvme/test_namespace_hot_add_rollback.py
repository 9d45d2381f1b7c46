"""A hot add that fails half way (Controller.attach_namespace): the namespace must not
stay half added. The controller's table, the data plane's own (the native plane keeps
one in Rust) and what the host is told all stay as they were, and the same NSID can
be added afterwards."""

from __future__ import annotations

import errno
import struct

import pytest
from harness import PAGE, Host, NamespaceFactory, events, listen, rw, with_dnr

from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import Cns, IoOpcode, LogPage, Status

NS_ATTRIBUTE_CHANGED = 0x2 | (0x00 << 8) | (LogPage.CHANGED_NAMESPACE_LIST << 16)


def active_list(h: Host) -> list[int]:
    c, data = h.identify(Cns.ACTIVE_NAMESPACE_LIST)
    assert c.status == 0
    return [i for i in struct.unpack("<1024I", data) if i]


def changed_list(h: Host) -> list[int]:
    c, data = h.get_log(LogPage.CHANGED_NAMESPACE_LIST, 4096, rae=True)
    assert c.status == 0
    return [i for i in struct.unpack("<1024I", data) if i]


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOMEM, "out of memory"), ValueError("refused"), RuntimeError("a bug")],
    ids=["oserror", "valueerror", "bug"],
)
def test_a_failed_hot_add_leaves_no_half_added_namespace(
    host: Host, file_ns: NamespaceFactory, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    q = host.create_io_queue_pair(1)
    buf = host.buffer(PAGE)
    cid = listen(host)
    ns = file_ns(nsid=3)
    attach = host.ctrl.data.attach_namespace

    def attach_then_fail(namespace: Namespace) -> None:
        attach(namespace)  # the data plane took it (and the controller's table) ...
        raise failure  # ... and then something failed

    with monkeypatch.context() as m:
        m.setattr(host.ctrl.data, "attach_namespace", attach_then_fail)
        with pytest.raises(type(failure)):
            host.ctrl.attach_namespace(ns)
    # Nothing changed, for the controller, the data plane or the host.
    assert sorted(host.ctrl.namespaces) == [1]
    assert 3 not in host.ctrl.data.namespaces  # type: ignore[attr-defined]
    assert active_list(host) == [1]
    assert events(host) == []
    assert changed_list(host) == []
    c = host.io_cmd(1, rw(IoOpcode.READ, 3, buf, 0, 1))
    assert c.status == with_dnr(Status.INVALID_FIELD)  # an inactive NSID
    # The same NSID can be added: once, and told once.
    host.ctrl.attach_namespace(ns)
    assert events(host) == [(cid, NS_ATTRIBUTE_CHANGED)]
    assert active_list(host) == [1, 3]
    assert host.io_cmd(1, rw(IoOpcode.READ, 3, buf, 0, 1)).status == 0
    assert q.qid == 1
