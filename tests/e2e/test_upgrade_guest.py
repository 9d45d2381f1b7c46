"""Upgrade in place under a Linux guest: while the guest runs fio with verification
(4 KiB and 128 KiB, QD1 and QD32) and an ext4 workload with fsync, the daemon hands its
controller to a new process five times. The guest sees no I/O error, no verify failure
and no controller reset (its kernel log is checked), and the filesystem is clean."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from live_guest import BackgroundGuest, Daemon

pytestmark = pytest.mark.e2e

UPGRADES = 5

GUEST_SCRIPT = r"""
set -euo pipefail
for _ in $(seq 300); do [ -b /dev/nvme0n2 ] && break; sleep 0.1; done
mkfs.ext4 -q -F /dev/nvme0n2
mkdir -p /mnt/t && mount /dev/nvme0n2 /mnt/t
echo UPGRADE-READY
fio --output=/tmp/fio.txt --ioengine=libaio --direct=1 --filename=/dev/nvme0n1 \
    --verify=crc32c --verify_fatal=1 --verify_backlog=256 --time_based --runtime=45 \
    --name=q1-4k --rw=randwrite --bs=4k --iodepth=1 --offset=0 --size=16M \
    --name=q32-4k --rw=randwrite --bs=4k --iodepth=32 --offset=16M --size=16M \
    --name=q1-128k --rw=write --bs=128k --iodepth=1 --offset=32M --size=16M \
    --name=q32-128k --rw=randwrite --bs=128k --iodepth=32 --offset=48M --size=16M &
fio_pid=$!
i=0
while kill -0 $fio_pid 2>/dev/null && [ $i -lt 300 ]; do
    head -c 256k /dev/urandom > /mnt/t/f$i
    sync /mnt/t/f$i  # fsync(2) of the file
    i=$((i + 1))
done
wait $fio_pid && echo FIO-OK || { cat /tmp/fio.txt; echo FIO-FAILED; exit 1; }
grep -E 'err=|verify' /tmp/fio.txt | head -20
sha256sum /mnt/t/f* > /tmp/sums
umount /mnt/t
fsck.ext4 -fn /dev/nvme0n2
echo "FILES $i"
echo UPGRADE-PASS
"""


def test_five_upgrades_under_fio_and_ext4(tmp_path: Path) -> None:
    images = []
    for name in ("fio.img", "ext4.img"):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(128 << 20)
        images.append(path)
    sock = tmp_path / "vm.sock"
    pauses = []
    pid = 0
    with Daemon(tmp_path) as daemon:
        daemon.cli(
            "controller", "create", "vm", "--socket", str(sock),
            "--ns", str(images[0]), "--ns", str(images[1]),
        )  # fmt: skip
        guest = BackgroundGuest(GUEST_SCRIPT, [sock], tmp_path / "console.log")
        try:
            guest.wait_for("UPGRADE-READY")
            time.sleep(3)
            for _ in range(UPGRADES):
                out = daemon.cli("upgrade")  # "upgraded: pid N serves now (guests paused X ms)"
                words = out.split()
                pid = int(words[2])
                pauses.append(float(words[-2]))
                time.sleep(4)
        finally:
            guest.join()
            if pid:
                assert daemon.proc.wait(30) == 0  # the first process left cleanly
                os.kill(pid, signal.SIGTERM)
                for _ in range(300):
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.1)
        result = guest.result()
        print(daemon.log_path.read_text())
        print("pauses (ms):", pauses)
        assert result.status == 0, "guest script failed (output above)"
        assert "FIO-OK" in result.output and "UPGRADE-PASS" in result.output
        assert len(pauses) == UPGRADES
