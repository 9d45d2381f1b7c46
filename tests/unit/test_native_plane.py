"""The native data plane's own tables, held to the Python ones they copy: the NVMe
status each host errno completes a command with (nvme/media_errors.py), and which
statuses get Do Not Retry (nvme/spec.py)."""

from __future__ import annotations

import errno

import pytest

from nvme_mdev import _native
from nvme_mdev.backends.file import EndOfStorage
from nvme_mdev.nvme import media_errors
from nvme_mdev.nvme.spec import Status, with_dnr


class Store:
    """A backend as media_errors.classify asks it: a block device or not, and what it
    says when asked its size."""

    def __init__(self, block_device: bool, size: int, probe: int | None, network: bool) -> None:
        self.is_block_device = block_device
        self.network = network
        self._size, self._probe = size, probe

    def store_size(self) -> int:
        if self._probe is not None:
            raise OSError(self._probe, "probe")
        return self._size


@pytest.mark.parametrize(
    ("block_device", "network"), [(False, False), (True, False), (False, True)]
)
@pytest.mark.parametrize("writing", [False, True])
@pytest.mark.parametrize(
    ("size", "probe"), [(1 << 20, None), (0, None), (0, errno.ENXIO), (0, errno.EIO)]
)
def test_every_errno_maps_as_in_python(
    block_device: bool, network: bool, writing: bool, size: int, probe: int | None
) -> None:
    """... for files, block devices and network stores (an RBD image)."""
    store = Store(block_device, size, probe, network)
    for code in [*range(1, 134), 512]:
        for past_end in (False, True):
            exc = EndOfStorage(0) if past_end else OSError(code, "x")
            if past_end and code != errno.EIO:
                continue  # a short read of nothing is EIO, always
            f = media_errors.classify(exc, writing, store)  # type: ignore[arg-type]
            native = _native.classify_host_error(
                code, writing, past_end, block_device, size, probe, network
            )
            python = (f.status, f.dnr, f.media, f.gone, f.read_only)
            assert native == python, (errno.errorcode.get(code, code), past_end)


def test_do_not_retry_as_in_python() -> None:
    for status in Status:
        assert _native.status_with_dnr(status) == with_dnr(status), status.name
