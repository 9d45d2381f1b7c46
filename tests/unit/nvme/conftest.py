"""Fixtures for the NVMe controller model tests (see harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

_SRC = Path(__file__).resolve().parents[3] / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import harness  # noqa: E402
import pytest  # noqa: E402
from harness import Host, NamespaceFactory, make_file  # noqa: E402

from nvme_mdev.backends.file import FileBackend  # noqa: E402
from nvme_mdev.dataplane import DATA_PLANES  # noqa: E402
from nvme_mdev.nvme.namespace import Namespace  # noqa: E402


@pytest.fixture
def file_ns(tmp_path: Path) -> Iterator[NamespaceFactory]:
    """Make a namespace on a fresh temp file: file_ns(nsid=1, size=1 MiB, block_size=512)."""
    backends: list[FileBackend] = []

    def make(
        nsid: int = 1,
        size: int = 1 << 20,
        block_size: int = 512,
        readonly: bool = False,
        fill: bytes | None = None,
    ) -> Namespace:
        path = make_file(tmp_path / f"ns{nsid}-{len(backends)}.img", size, fill)
        backend = FileBackend(str(path), readonly=readonly)
        backends.append(backend)
        return Namespace(nsid, backend, block_size=block_size, readonly=readonly)

    yield make
    for b in backends:
        b.close()


@pytest.fixture(autouse=True)
def _close_engines() -> Iterator[None]:
    yield
    while harness.ENGINES:
        harness.ENGINES.pop().close()
    while harness.INTERRUPTS:
        harness.INTERRUPTS.pop().close()


@pytest.fixture(autouse=True, params=DATA_PLANES)
def data_plane(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs once per data plane: Hosts made in it get that one."""
    monkeypatch.setattr(harness, "PLANE", request.param)
    return str(request.param)


@pytest.fixture(params=["sync", "uring"])
def io_engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per I/O engine: Hosts made in it get that engine."""
    monkeypatch.setattr(harness, "ENGINE", request.param)
    return str(request.param)


@pytest.fixture
def host(file_ns: NamespaceFactory) -> Host:
    """An enabled controller with one 1 MiB, 512-byte-block namespace (nsid 1)."""
    h = Host([file_ns()])
    h.enable()
    return h
