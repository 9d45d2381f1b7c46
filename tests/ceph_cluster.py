"""The tests' one-node Ceph cluster, under the name they import it by (`from ceph_cluster
import CephCluster`): tools/ceph_cluster.py, the one implementation, which
`scripts/bench-rbd.sh` starts too. Loaded from its path: tools/ is no package, and its
module has this one's name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "tools" / "ceph_cluster.py"
_NAME = "tools_ceph_cluster"

if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    assert _spec is not None and _spec.loader is not None
    sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_NAME])
_module = sys.modules[_NAME]

PROGRAMS = _module.PROGRAMS
CephCluster = _module.CephCluster
CephClusterError = _module.CephClusterError

__all__ = ["PROGRAMS", "CephCluster", "CephClusterError"]
