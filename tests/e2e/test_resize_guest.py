"""A backing file resized while a Linux guest runs: after `nvme-mdev ns rescan` the
guest's disk changes size (/sys/block/nvme0n1/size), through the Namespace Attribute
Changed event alone: no controller reset. It grows, the guest writes the new last
block, then it shrinks."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from live_guest import CLI, BackgroundGuest, Daemon

pytestmark = pytest.mark.e2e

MIB = 1 << 20

# Sizes in 512-byte sectors, as /sys/block says: 64 MiB, 96 MiB, 48 MiB.
GUEST_SCRIPT = r"""
set -euo pipefail
for _ in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
[ -b /dev/nvme0n1 ]
size() { cat /sys/block/nvme0n1/size; }
wait_size() { for _ in $(seq 1200); do [ "$(size)" = "$1" ] && break; sleep 0.1; done; }
echo "RESIZE-READY $(size)"
[ "$(size)" = 131072 ]
wait_size 196608
echo "RESIZE-GROWN $(size)"
[ "$(size)" = 196608 ]
nvme id-ns /dev/nvme0n1 | grep -E '^(nsze|ncap)'
head -c 512 /dev/urandom > /tmp/b
dd if=/tmp/b of=/dev/nvme0n1 bs=512 seek=196607 oflag=direct status=none
dd if=/dev/nvme0n1 of=/tmp/c bs=512 skip=196607 count=1 iflag=direct status=none
cmp /tmp/b /tmp/c
sha256sum /tmp/b
echo RESIZE-WRITTEN
wait_size 98304
echo "RESIZE-SHRUNK $(size)"
[ "$(size)" = 98304 ]
dd if=/dev/nvme0n1 of=/dev/null bs=64k count=16 iflag=direct status=none
dmesg | grep -iE 'nvme0n1|capacity change' || true
if dmesg | grep -iE 'nvme.*(timeout|abort|reset)'; then exit 1; fi
echo RESIZE-PASS
"""


def test_a_resized_image_is_seen_by_a_linux_guest(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MIB)
    sock = tmp_path / "vm.sock"
    with Daemon(tmp_path) as daemon:
        daemon.cli("controller", "create", "vm", "--socket", str(sock), "--ns", str(disk))
        guest = BackgroundGuest(GUEST_SCRIPT, [sock], tmp_path / "console.log")
        try:
            guest.wait_for("RESIZE-READY")
            os.truncate(disk, 96 * MIB)
            grown = daemon.cli("ns", "rescan")
            print(grown)
            assert "vm nsid 1: 64 MiB -> 96 MiB (131072 -> 196608 blocks), guest told" in grown
            guest.wait_for("RESIZE-WRITTEN")
            # What the guest wrote in the grown part reached the file.
            digest = next(
                line.split()[0]
                for line in guest.console.read_text(errors="replace").splitlines()
                if line.endswith("/tmp/b")
            )
            with open(disk, "rb") as f:
                f.seek(96 * MIB - 512)
                assert hashlib.sha256(f.read(512)).hexdigest() == digest
            os.truncate(disk, 48 * MIB)
            print(daemon.cli("ns", "rescan", "vm"))
        finally:
            guest.join()
        result = guest.result()
        assert result.status == 0, "guest script failed (output above)"
        assert "RESIZE-PASS" in result.output
        assert re.search(r"^nsze\s*:\s*0x30000\s*$", result.output, re.MULTILINE)  # nvme-cli
        assert daemon.proc.poll() is None


# The guest reads until its disk fails, then checks that every later command fails at
# once (Namespace Not Ready with Do Not Retry: no retries, no timeout, no reset).
FAILING_SCRIPT = r"""
set -uo pipefail
for _ in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
[ -b /dev/nvme0n1 ] || exit 1
echo FAIL-READY
for _ in $(seq 1200); do
    dd if=/dev/nvme0n1 of=/dev/null bs=4k count=1 iflag=direct status=none 2>/tmp/err || break
    sleep 0.1
done
echo "FAIL-SEEN $(cat /tmp/err)"
start=$(date +%s%N)
for i in 1 2 3 4 5; do
    dd if=/dev/nvme0n1 of=/dev/null bs=4k count=1 skip=$i iflag=direct status=none && exit 1
    dd if=/dev/zero of=/dev/nvme0n1 bs=4k count=1 seek=$i oflag=direct status=none && exit 1
done
end=$(date +%s%N)
echo "FAIL-FAST-MS $(( (end - start) / 1000000 ))"
dmesg | grep -iE 'nvme|I/O error' | tail -n 8
nvme smart-log /dev/nvme0 | grep -iE '^(critical_warning|media_errors|num_err_log_entries)'
if dmesg | grep -iE 'nvme.*(timeout|abort|reset)'; then exit 1; fi
echo FAIL-PASS
"""


#: What Linux logs, as it should, about the commands the failed disk refuses: the nvme
#: driver's line per failed command ("nvme0n1: Read(0x2) @ LBA 1, 8 blocks, Namespace
#: Not Ready (sct 0x0 / sc 0x82) DNR", or "I/O Cmd(0x2) ... I/O Error" from a kernel
#: built without CONFIG_NVME_VERBOSE_ERRORS) and the block layer's ("critical target
#: error, dev nvme0n1, sector 8 ...", "Buffer I/O error on dev nvme0n1, ...").
FAILING_DISK_WARNINGS = [
    r"nvme\d+n\d+: \w[\w/ ]*\(0x[0-9a-f]+\) @ LBA \d+, \d+ blocks, .*\(sct 0x0 / sc 0x82\)",
    r"\berror, dev nvme\d+n\d+, sector",
    r"Buffer I/O error on dev nvme\d+n\d+",
]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None, reason="loop devices need root"
)
def test_a_disk_that_goes_away_fails_fast_in_a_linux_guest(tmp_path: Path) -> None:
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(64 * MIB)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    sock = tmp_path / "vm.sock"
    log_path = tmp_path / "serve.log"
    try:
        with open(log_path, "w") as log:
            serve = subprocess.Popen(
                [*CLI, "serve", "--socket", str(sock), loop], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            for _ in range(500):
                if Path(f"{sock}.ctl").exists() or serve.poll() is not None:
                    break
                time.sleep(0.02)
            guest = BackgroundGuest(
                FAILING_SCRIPT,
                [sock],
                tmp_path / "console.log",
                expected_kernel_warnings=FAILING_DISK_WARNINGS,
            )
            try:
                guest.wait_for("FAIL-READY")
                # As a deleted disk does: capacity 0 (del_gendisk sets it so).
                os.truncate(backing, 0)
                subprocess.run(["losetup", "-c", loop], check=True)
            finally:
                guest.join()
            result = guest.result()
            print(log_path.read_text())
            assert result.status == 0, "guest script failed (output above)"
            assert "FAIL-PASS" in result.output
            fast = re.search(r"FAIL-FAST-MS (\d+)", result.output)
            assert fast is not None and int(fast[1]) < 10_000  # ten commands, no retries
            assert re.search(r"^critical_warning\s*:\s*0x4\s*$", result.output, re.MULTILINE)
            assert serve.poll() is None
            listing = subprocess.run(
                [*CLI, "list", "--control", f"{sock}.ctl"], capture_output=True, text=True
            )
            assert "FAILED: " in listing.stdout
        finally:
            serve.terminate()
            assert serve.wait(30) == 0
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
