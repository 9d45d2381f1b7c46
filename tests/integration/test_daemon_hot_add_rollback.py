"""`ns add` on a running daemon's controller that fails half way (the controller or its
data plane refuses or breaks after the storage was opened and claimed): the daemon
keeps nothing of it. No namespace half added (in the daemon's table, the controller's
or the data plane's), no descriptor left open on the storage, no claim or writer lock
left on its bytes, and nothing told to the guest; the same namespace can be added
afterwards. The daemon runs in this process (no guest is needed to see this)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvme_mdev.config import ConfigError, NamespaceSpec
from nvme_mdev.daemon import ControllerSettings, Daemon, NamespaceRequest
from nvme_mdev.dataplane import DATA_PLANES
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.storage import HostStorage

MIB = 1 << 20


def image(path: Path, size: int = MIB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def fds_on(path: Path) -> int:
    """Descriptors of this process open on `path`."""
    real = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == real
    return count


def host_storage(tmp: Path) -> HostStorage:
    # An empty sysfs and mount table: nothing of the host uses the test's files.
    return HostStorage(sysfs=tmp / "nosys", dev="/dev", mountinfo=str(tmp / "none"))


@pytest.fixture(params=DATA_PLANES)
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    d = Daemon(host_storage(tmp_path))
    settings = ControllerSettings.from_params(
        {
            "name": "vm1",
            "socket": str(tmp_path / "vm1.sock"),
            "data_plane": request.param,
            "io_engine": "sync",
            "namespaces": [str(image(tmp_path / "a.img"))],
        }
    )
    d.create_controller(settings)
    yield d, tmp_path
    d.stop()


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOMEM, "out of memory"), ValueError("refused"), RuntimeError("a bug")],
    ids=["oserror", "valueerror", "bug"],
)
def test_a_hot_add_that_fails_half_way_holds_nothing(
    daemon: tuple[Daemon, Path], monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    d, tmp = daemon
    managed = d.controllers["vm1"]
    ctrl = managed.device.controller
    second = image(tmp / "b.img")
    request = NamespaceRequest.from_params(str(second), "test")
    attach = ctrl.data.attach_namespace

    def attach_then_fail(ns: Namespace) -> None:
        attach(ns)  # the data plane took it (and the controller's table) ...
        raise failure  # ... and then something failed

    with monkeypatch.context() as m:
        m.setattr(ctrl.data, "attach_namespace", attach_then_fail)
        refused = ConfigError if isinstance(failure, ValueError) else type(failure)
        with pytest.raises(refused):
            d.add_namespace("vm1", request)

    assert sorted(managed.namespaces) == [1]
    assert sorted(ctrl.namespaces) == [1]
    assert not ctrl.changed_namespaces and not ctrl.events.pending  # the guest is told nothing
    assert fds_on(second) == 0  # its backend was closed
    assert [owner for owner, _, _ in d.storage.uses()] == ["controller vm1 nsid 1"]
    # No writer lock left on its bytes: another process may write them now.
    ns, lease = host_storage(tmp).open(NamespaceSpec.parse(str(second)), 1, "another")
    ns.backend.close()
    lease.release()
    # And it can be added after all.
    assert d.add_namespace("vm1", request)["nsid"] == 2
    assert sorted(ctrl.namespaces) == [1, 2] and sorted(managed.namespaces) == [1, 2]
    assert ctrl.changed_namespaces == {2}
