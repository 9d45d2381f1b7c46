"""Fixtures of the conformance suite: a whole device (VirtualController) served on a
vfio-user socket in this process, and the project's host driver (nvme_mdev.nvme_host)
connected to it, as a guest would be.

One device per test module and I/O engine (every test runs against the synchronous
engine and against io_uring, where the kernel has it: the same controller must
answer the same way); its namespaces are temp files; one host per test. A
host that disconnects resets the controller, so every test starts from a controller
that a fresh host has just enabled (CC.EN 0 -> 1), with nothing left of the last
test but what is on the namespaces and the error log.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import pytest  # noqa: E402
from conformance_support import NAMESPACES, Device  # noqa: E402

from nvme_mdev.backends import uring  # noqa: E402
from nvme_mdev.config import NamespaceSpec  # noqa: E402
from nvme_mdev.dataplane import DATA_PLANES  # noqa: E402
from nvme_mdev.nvme_host import HostQueuePair, NvmeHost  # noqa: E402
from nvme_mdev.virtual_controller import VirtualController  # noqa: E402

#: guest RAM of each host: queues, PRP lists and data buffers are bump-allocated in it
GUEST_RAM = 16 << 20
#: the I/O engines every test runs against
ENGINES = ["sync"] if uring.unavailable() else ["sync", "uring"]
#: every test runs against each data plane with each engine
VARIANTS = [f"{plane}-{engine}" for plane in DATA_PLANES for engine in ENGINES]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.conformance)


def start_device(directory: Path, variant: str) -> Device:
    """A controller on fresh image files, one per entry of NAMESPACES; `variant` is
    'PLANE-ENGINE'."""
    plane, engine = variant.split("-")
    images: dict[int, Path] = {}
    namespaces = []
    for ns in NAMESPACES:
        path = directory / f"ns{ns.nsid}.img"
        with open(path, "wb") as f:
            f.truncate(ns.size)
        options = f",bs={ns.block_size}" + (",ro" if ns.readonly else "")
        namespaces.append(NamespaceSpec.parse(f"{path}{options}").open(ns.nsid))
        images[ns.nsid] = path
    vc = VirtualController(
        str(directory / "nvme.sock"),
        namespaces,
        poll_timeout=0.05,
        io_engine=engine,
        data_plane=plane,
    )
    vc.start()
    return Device(vc, images)


@pytest.fixture(scope="module", params=VARIANTS)
def device(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Device]:
    dev = start_device(tmp_path_factory.mktemp("conformance"), request.param)
    yield dev
    dev.controller.stop()


@pytest.fixture(params=VARIANTS)
def fresh_device(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Device]:
    """A device of the test's own, for tests that change what the controller holds
    (namespaces attached or detached)."""
    dev = start_device(tmp_path, request.param)
    yield dev
    dev.controller.stop()


def connect(dev: Device) -> NvmeHost:
    host = NvmeHost(dev.socket_path, ram_size=GUEST_RAM)
    try:
        host.enable()
    except BaseException:
        host.close()
        raise
    return host


@pytest.fixture
def host(device: Device) -> Iterator[NvmeHost]:
    """An enabled controller, admin queue of 32 entries, MSI-X vectors 0-3."""
    with connect(device) as h:
        yield h


@pytest.fixture
def io(host: NvmeHost) -> HostQueuePair:
    """I/O queue pair 1 (64 entries, vector 1)."""
    return host.create_queue_pair(1, entries=64, vector=1)


@pytest.fixture
def raw_host(device: Device) -> Iterator[NvmeHost]:
    """Connected (guest RAM mapped, MSI-X on) but the controller not enabled."""
    with NvmeHost(device.socket_path, ram_size=GUEST_RAM) as h:
        yield h
