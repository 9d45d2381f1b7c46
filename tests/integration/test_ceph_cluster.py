"""The one-node Ceph cluster of tests/ceph_cluster.py, for real: RBD images are
created, written and read back through librbd (the rbd command), and I/O stalls while
the only OSD is down and resumes when it is back."""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ceph_cluster import CephCluster

MiB = 1 << 20
#: how long an export must still be waiting while the OSD is down
STALL_S = 4.0


def _diff_v1(size: int, writes: list[tuple[int, bytes]]) -> bytes:
    """An ``rbd import-diff`` stream (format "rbd diff v1") that writes `writes`,
    (offset, data) pairs, to an image of `size` bytes."""
    out = [b"rbd diff v1\n", b"s" + struct.pack("<Q", size)]
    for offset, data in writes:
        out.append(b"w" + struct.pack("<QQ", offset, len(data)) + data)
    out.append(b"e")
    return b"".join(out)


def test_create_image(ceph_cluster: CephCluster) -> None:
    spec = f"{ceph_cluster.pool}/created"
    ceph_cluster.run("rbd", "create", "--size", "64M", spec)

    info = ceph_cluster.run_json("rbd", "info", spec)
    assert info["size"] == 64 * MiB
    assert "exclusive-lock" in info["features"]
    assert spec.split("/")[1] in ceph_cluster.run("rbd", "ls", ceph_cluster.pool).split()


def test_import_then_export_gives_back_the_bytes(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    # more than one 4 MiB object, and not a whole number of sectors
    data = random.Random(1).randbytes(5 * MiB + 12345)
    src, back = tmp_path / "src", tmp_path / "back"
    src.write_bytes(data)
    spec = f"{ceph_cluster.pool}/imported"

    ceph_cluster.run("rbd", "import", str(src), spec)
    ceph_cluster.run("rbd", "export", spec, str(back))

    assert ceph_cluster.run_json("rbd", "info", spec)["size"] == len(data)
    assert back.read_bytes() == data


def test_writes_into_an_image_read_back(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    size = 64 * MiB
    spec = f"{ceph_cluster.pool}/written"
    ceph_cluster.run("rbd", "create", "--size", "64M", spec)
    rng = random.Random(2)
    writes = [
        (0, rng.randbytes(4096)),
        (4 * MiB - 1000, rng.randbytes(3000)),  # across two objects
        (60 * MiB + 512, rng.randbytes(64 * 1024)),
        (size - 4096, rng.randbytes(4096)),
    ]
    expected = bytearray(size)
    for offset, data in writes:
        expected[offset : offset + len(data)] = data
    diff = tmp_path / "diff"
    diff.write_bytes(_diff_v1(size, writes))

    ceph_cluster.run("rbd", "import-diff", str(diff), spec)
    ceph_cluster.run("rbd", "export", spec, str(tmp_path / "back"))

    assert (tmp_path / "back").read_bytes() == expected


def test_io_waits_while_the_osd_is_down(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    data = random.Random(3).randbytes(MiB)
    (tmp_path / "src").write_bytes(data)
    spec = f"{ceph_cluster.pool}/outage"
    ceph_cluster.run("rbd", "import", str(tmp_path / "src"), spec)

    ceph_cluster.stop_osd()
    try:
        export = subprocess.Popen(
            ceph_cluster.cli("rbd", "export", spec, str(tmp_path / "during")),
            env=ceph_cluster.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                export.wait(timeout=STALL_S)
        finally:
            export.kill()
            export.communicate()
    finally:
        if not ceph_cluster.osd_running:
            ceph_cluster.start_osd()

    ceph_cluster.run("rbd", "export", spec, str(tmp_path / "after"), timeout=30)
    assert (tmp_path / "after").read_bytes() == data
