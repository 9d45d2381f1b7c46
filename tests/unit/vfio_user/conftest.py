"""Fixtures for the vfio-user transport tests: a FakeDevice served on a real
socket, and the project's client connected to it."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

_SRC = Path(__file__).resolve().parents[3] / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import pytest  # noqa: E402
from vfio_user_fakes import FakeDevice  # noqa: E402

from nvme_mdev.vfio_user.client import VfioUserClient  # noqa: E402
from nvme_mdev.vfio_user.server import VfioUserServer  # noqa: E402


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="vu-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def device() -> Iterator[FakeDevice]:
    dev = FakeDevice()
    yield dev
    dev.close()


@pytest.fixture
def server(sock_dir: Path, device: FakeDevice) -> Iterator[VfioUserServer]:
    srv = VfioUserServer(str(sock_dir / "s"), device)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server: VfioUserServer) -> Iterator[VfioUserClient]:
    c = VfioUserClient(server.socket_path, timeout=5)
    c.negotiate()
    yield c
    c.close()
