"""Upgrades and crashes under a Linux guest: while the guest runs fio with verification
(4 KiB and 128 KiB, QD1 and QD32) and an ext4 workload with fsync, a supervised daemon
hands its controller to a new process five times, and its worker is killed with
SIGKILL three times. The guest sees no I/O error, no verify failure and no controller
reset (its kernel log is checked), the filesystem is clean, and every file whose fsync
returned reads back as it was written."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from live_guest import BackgroundGuest, Daemon

from nvme_mdev.control import ControlError, call

pytestmark = pytest.mark.e2e

#: what the test does to the worker, in order, 4 s apart
EVENTS = ("upgrade", "kill", "upgrade", "kill", "upgrade", "kill", "upgrade", "upgrade")

GUEST_SCRIPT = r"""
set -euo pipefail
for _ in $(seq 300); do [ -b /dev/nvme0n2 ] && break; sleep 0.1; done
mkfs.ext4 -q -F /dev/nvme0n2
mkdir -p /mnt/t && mount /dev/nvme0n2 /mnt/t
echo UPGRADE-READY
fio --output=/tmp/fio.txt --ioengine=libaio --direct=1 --filename=/dev/nvme0n1 \
    --verify=crc32c --verify_fatal=1 --verify_backlog=256 --time_based --runtime=60 \
    --name=q1-4k --rw=randwrite --bs=4k --iodepth=1 --offset=0 --size=16M \
    --name=q32-4k --rw=randwrite --bs=4k --iodepth=32 --offset=16M --size=16M \
    --name=q1-128k --rw=write --bs=128k --iodepth=1 --offset=32M --size=16M \
    --name=q32-128k --rw=randwrite --bs=128k --iodepth=32 --offset=48M --size=16M &
fio_pid=$!
# Each file's checksum is noted (in guest RAM) once its fsync has returned: those
# files must read back whole from the device at the end, whatever happened meanwhile.
: > /tmp/synced
i=0
while kill -0 $fio_pid 2>/dev/null && [ $i -lt 400 ]; do
    head -c 256k /dev/urandom > /mnt/t/f$i
    sync /mnt/t/f$i  # fsync(2) of the file
    sha256sum /mnt/t/f$i >> /tmp/synced
    i=$((i + 1))
done
wait $fio_pid && echo FIO-OK || { cat /tmp/fio.txt; echo FIO-FAILED; exit 1; }
grep -E 'err=|verify' /tmp/fio.txt | head -20
umount /mnt/t
fsck.ext4 -fn /dev/nvme0n2
mount /dev/nvme0n2 /mnt/t  # (read from the device, not the page cache)
sha256sum --quiet -c /tmp/synced && echo "SYNCED-INTACT $i"
umount /mnt/t
echo UPGRADE-PASS
"""


def io_commands(control: str) -> int | None:
    """The I/O commands the serving process has completed, or None while no process
    answers (a worker dead, its successor not yet serving)."""
    try:
        stats = call(control, "stats", {"controller": "vm"}, timeout=2)
    except ControlError:
        return None
    return sum(q["commands"] for q in stats["queues"] if q["qid"] != 0)


def kill_worker(control: str) -> float:
    """SIGKILL the supervised worker; the seconds from the kill until the process that
    took over completed a guest I/O command (polled: an upper bound by a few ms)."""
    worker = int(call(control, "list")["pid"])
    killed = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    first: int | None = None
    deadline = killed + 30
    while time.monotonic() < deadline:
        count = io_commands(control)
        if count is not None and int(call(control, "list")["pid"]) != worker:
            if first is None:
                first = count
            elif count > first:
                return time.monotonic() - killed
        time.sleep(0.005)
    raise AssertionError("no guest I/O completed within 30 s of the crash")


@pytest.mark.parametrize("plane", ["native", "python"])
def test_upgrades_and_crashes_under_fio_and_ext4(tmp_path: Path, plane: str) -> None:
    images = []
    for name in ("fio.img", "ext4.img"):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(128 << 20)
        images.append(path)
    sock = tmp_path / "vm.sock"
    pauses: list[float] = []
    crashes: list[float] = []
    with Daemon(tmp_path, "--supervised") as daemon:
        control = str(daemon.control)
        daemon.cli(
            "controller", "create", "vm", "--socket", str(sock),
            "--ns", str(images[0]), "--ns", str(images[1]), "--data-plane", plane,
        )  # fmt: skip
        guest = BackgroundGuest(GUEST_SCRIPT, [sock], tmp_path / "console.log")
        try:
            guest.wait_for("UPGRADE-READY")
            time.sleep(3)
            for event in EVENTS:
                if event == "upgrade":
                    # "upgraded: pid N serves now (guests paused X ms)"
                    pauses.append(float(daemon.cli("upgrade").split()[-2]))
                else:
                    crashes.append(kill_worker(control))
                time.sleep(4)
        finally:
            guest.join()
        result = guest.result()
        print(daemon.log_path.read_text())
        print("upgrade pauses (ms):", pauses)
        print("crash to the next completed I/O (ms):", [round(c * 1000) for c in crashes])
        assert result.status == 0, "guest script failed (output above)"
        assert "FIO-OK" in result.output and "UPGRADE-PASS" in result.output
        assert "SYNCED-INTACT" in result.output
        assert len(pauses) == EVENTS.count("upgrade") and len(crashes) == EVENTS.count("kill")
