"""NVMe Base 2.2, 5.1.2 Asynchronous Event Request, with the Namespace Attribute
Changed notice, the Changed Namespace List log page and RAE (5.1.12), and the
Asynchronous Event Configuration feature (5.1.25)."""

from __future__ import annotations

import struct
from pathlib import Path

from conformance_support import INACTIVE_NSID, Device, assert_ok, assert_status, settle

from nvme_mdev.config import NamespaceSpec
from nvme_mdev.nvme.spec import AER_TYPE_NOTICE, FeatureId, LogPage, Status
from nvme_mdev.nvme_host import NvmeHost, async_event_request

NOTICE_NAMESPACE_ATTRIBUTE_CHANGED = 0x00
NOTICE_ENABLE = 1 << 8


def _changed(host: NvmeHost, rae: bool) -> list[int]:
    c, data = host.get_log_page(LogPage.CHANGED_NAMESPACE_LIST, 4096, rae=rae)
    assert_ok(c)
    ids = list(struct.unpack("<1024I", data))
    return ids[: ids.index(0)] if 0 in ids else ids


def _attach(device: Device, tmp_path: Path) -> None:
    image = tmp_path / "extra.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    device.controller.add_namespace(NamespaceSpec.parse(str(image)).open(INACTIVE_NSID))


def test_5_1_2_more_requests_than_aerl_is_limit_exceeded(host: NvmeHost) -> None:
    """Beyond AERL + 1 outstanding requests: Asynchronous Event Request Limit Exceeded;
    the others stay outstanding."""
    assert host.admin is not None
    limit = host.identify(1)[259] + 1
    for _ in range(limit):
        host.admin.submit(async_event_request())
    c = host.admin.command(async_event_request())
    assert_status(c, Status.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED)
    settle()
    assert host.admin.reap() == []


def test_5_1_2_namespace_attribute_notice_and_changed_namespace_list(
    fresh_device: Device, tmp_path: Path
) -> None:
    """A namespace attached while Namespace Attribute Notices are enabled: the AER
    completes with a Notice, information 00h, log page 04h; the Changed Namespace List
    names it; a read with RAE keeps it, a read without RAE clears it."""
    with NvmeHost(fresh_device.socket_path, ram_size=8 << 20) as host:
        host.enable()
        assert host.admin is not None
        assert_ok(host.set_features(FeatureId.ASYNC_EVENT_CONFIG, NOTICE_ENABLE))
        cid = host.admin.submit(async_event_request())
        _attach(fresh_device, tmp_path)
        (c,) = host.admin.wait(1)
        assert c.cid == cid and c.ok
        assert (c.dw0 & 0x7, (c.dw0 >> 8) & 0xFF, (c.dw0 >> 16) & 0xFF) == (
            AER_TYPE_NOTICE,
            NOTICE_NAMESPACE_ATTRIBUTE_CHANGED,
            LogPage.CHANGED_NAMESPACE_LIST,
        )
        assert _changed(host, rae=True) == [INACTIVE_NSID]
        assert _changed(host, rae=False) == [INACTIVE_NSID]
        assert _changed(host, rae=False) == []


def test_5_1_2_notices_not_enabled_by_async_event_configuration_are_not_sent(
    fresh_device: Device, tmp_path: Path
) -> None:
    """With the notice's bit clear in Asynchronous Event Configuration, no AER
    completes for it."""
    with NvmeHost(fresh_device.socket_path, ram_size=8 << 20) as host:
        host.enable()
        assert host.admin is not None
        assert_ok(host.set_features(FeatureId.ASYNC_EVENT_CONFIG, 0))
        host.admin.submit(async_event_request())
        _attach(fresh_device, tmp_path)
        settle(0.1)
        assert host.admin.reap() == []
