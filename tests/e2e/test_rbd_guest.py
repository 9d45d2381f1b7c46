"""A Linux guest's disk on Ceph: `nvme-mdev daemon` serves an RBD image of the one-node
cluster (tests/ceph_cluster.py) as namespace 1, with each data plane (both hand RBD
commands to the Python backend for now, but the queues are the plane's own), and the
guest makes ext4 on /dev/nvme0n1, writes files to it, syncs, unmounts and powers off.
Then the host reads the image back from the cluster with `rbd export` and checks it
without mounting it: `e2fsck -fn` finds the filesystem clean, and `debugfs` reads every
file back, byte for byte what the guest wrote."""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from live_guest import Daemon, run_guest

if TYPE_CHECKING:
    from ceph_cluster import CephCluster

pytestmark = pytest.mark.e2e

MIB = 1 << 20
IMAGE_SIZE = "256M"
#: a few MiB of (seeded) random data that the guest copies from the host onto its disk
BLOB_SIZE = 3 * MIB + 4321
SMALL_TEXT = "written by a Linux guest onto an RBD image through nvme-mdev\n"

GUEST_SCRIPT = r"""
set -euo pipefail
for _ in $(seq 600); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
[ -b /dev/nvme0n1 ]
nvme list
echo "RBD-GUEST-SECTORS $(cat /sys/block/nvme0n1/size)"
mkfs.ext4 -q -F -L rbdguest /dev/nvme0n1
mkdir -p /tmp/disk
mount -t ext4 /dev/nvme0n1 /tmp/disk
mkdir /tmp/disk/data
cp /mnt/payload/blob.bin /tmp/disk/data/blob.bin
printf '%s' "$SMALL_TEXT" > /tmp/disk/data/small.txt
seq 1 100000 > /tmp/disk/data/sequence.txt
sync
sha256sum /tmp/disk/data/*
umount /tmp/disk
# read back from the disk itself after the unmount, not from the page cache
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/nvme0n1 /tmp/disk
sha256sum /tmp/disk/data/* | sed 's/^/RBD-GUEST-REREAD /'
umount /tmp/disk
if dmesg | grep -iE 'nvme.*(timeout|abort|reset)|EXT4-fs (error|warning)'; then exit 1; fi
echo RBD-GUEST-PASS
"""


def sequence_text() -> bytes:
    """What `seq 1 100000` prints."""
    return "".join(f"{i}\n" for i in range(1, 100001)).encode()


@pytest.mark.parametrize("plane", ["native", "python"])
def test_a_linux_guest_writes_an_ext4_filesystem_to_an_rbd_image(
    ceph_cluster: CephCluster, tmp_path: Path, plane: str
) -> None:
    # the cluster lives for the whole session: an image of its own per data plane
    image = f"{ceph_cluster.pool}/guestdisk-{plane}"
    ceph_cluster.run("rbd", "create", "--size", IMAGE_SIZE, image)
    spec = ",".join(
        [
            f"rbd:{image}",
            f"conf={ceph_cluster.conf_path}",
            f"id={ceph_cluster.client_id}",
            f"keyring={ceph_cluster.keyring_path}",
        ]
    )
    payload = tmp_path / "payload"
    payload.mkdir()
    blob = random.Random(20240612).randbytes(BLOB_SIZE)
    (payload / "blob.bin").write_bytes(blob)
    expected = {
        "/data/blob.bin": blob,
        "/data/small.txt": SMALL_TEXT.encode(),
        "/data/sequence.txt": sequence_text(),
    }

    sock = tmp_path / "vm.sock"
    with Daemon(tmp_path) as daemon:
        daemon.cli(
            "controller", "create", "vm", "--socket", str(sock), "--ns", spec,
            "--data-plane", plane,
        )  # fmt: skip
        listing = daemon.cli("list")
        print(listing)
        assert f"{plane} data plane" in listing
        assert f"on rbd:{image} " in listing
        try:
            result = run_guest(
                GUEST_SCRIPT,
                sockets=[str(sock)],
                env={"SMALL_TEXT": SMALL_TEXT},
                shares={"payload": payload},
                timeout=900,
            )
        finally:
            print(daemon.log_path.read_text())
        assert result.status == 0, "guest script failed (output above)"
        assert "RBD-GUEST-PASS" in result.output
        assert not result.timed_out
        assert result.qemu_returncode == 0, "the guest did not power off cleanly"
        assert f"RBD-GUEST-SECTORS {256 * MIB // 512}" in result.output
        # What the guest read back after a remount is what it wrote.
        for path, data in expected.items():
            digest = hashlib.sha256(data).hexdigest()
            name = path.rsplit("/", 1)[1]
            assert re.search(rf"^{digest}  /tmp/disk/data/{name}$", result.output, re.M), path
            assert re.search(
                rf"^RBD-GUEST-REREAD {digest}  /tmp/disk/data/{name}$", result.output, re.M
            ), path
        # The guest's sync reached the cluster: the image as the cluster has it, while
        # the daemon still holds it open (and its exclusive lock).
        assert daemon.proc.poll() is None
        exported = tmp_path / "exported.img"
        ceph_cluster.run("rbd", "export", image, str(exported), timeout=300)
    # Stopping the daemon (exit 0, asserted by Daemon) gave the image's lock back.
    assert ceph_cluster.run_json("rbd", "lock", "ls", image) == []

    assert exported.stat().st_size == 256 * MIB
    fsck = subprocess.run(
        ["e2fsck", "-fn", str(exported)], capture_output=True, text=True, timeout=300
    )
    print(fsck.stdout, fsck.stderr)
    assert fsck.returncode == 0, "e2fsck found the guest's filesystem damaged"
    label = subprocess.run(
        ["e2label", str(exported)], capture_output=True, text=True, check=True, timeout=60
    )
    assert label.stdout.strip() == "rbdguest"
    for path, data in expected.items():
        cat = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(exported)],
            capture_output=True,
            check=True,
            timeout=300,
        )
        assert len(cat.stdout) == len(data), (path, cat.stderr.decode(errors="replace"))
        assert cat.stdout == data, path
