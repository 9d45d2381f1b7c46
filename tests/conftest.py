"""Fixtures shared by the test directories (the integration and e2e tests).

`ceph_cluster`: a real one-node Ceph cluster (tests/ceph_cluster.py), one monitor and
one OSD under a scratch directory, shared by every test of the session that asks for
it, whichever directory it is in (it takes some 10 s to start). Tests that use it are
skipped where Ceph is not installed (Debian: apt-get install ceph-mon ceph-osd
ceph-common).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.append(str(_TESTS))

import pytest  # noqa: E402

from ceph_cluster import CephCluster  # noqa: E402


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A started one-node Ceph cluster with an RBD pool (`CephCluster.pool`); stopped
    at the end of the session. A test that stops its OSD must start it again."""
    missing = CephCluster.missing()
    if missing:
        pytest.skip(
            f"Ceph is not installed (no {', '.join(missing)}; "
            "Debian: apt-get install ceph-mon ceph-osd ceph-common)"
        )
    with CephCluster(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster
