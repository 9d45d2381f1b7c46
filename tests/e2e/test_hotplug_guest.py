"""Namespaces attached and detached while a Linux guest runs: the guest boots with one
namespace of a daemon's controller, the namespace added through the control socket
appears in it (the asynchronous event makes Linux rescan), takes I/O, and disappears
again when it is removed. No reset, no reboot."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from live_guest import BackgroundGuest, Daemon

pytestmark = pytest.mark.e2e

# The guest finds namespace 2 by its NSID (Linux numbers disks in its own order).
GUEST_SCRIPT = r"""
set -euo pipefail
ns2() { for d in /sys/block/nvme0n*; do
    [ "$(cat "$d/nsid" 2>/dev/null)" = 2 ] && echo "/dev/${d##*/}"; done; true; }
for _ in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
[ -b /dev/nvme0n1 ]
nvme list
[ -z "$(ns2)" ]
echo HOTPLUG-READY
for _ in $(seq 1200); do [ -n "$(ns2)" ] && break; sleep 0.1; done
dev=$(ns2)
[ -n "$dev" ] && [ -b "$dev" ]
echo "HOTPLUG-ADDED $dev"
nvme list
nvme id-ns "$dev" | grep -E '^nsze'
head -c 1M /dev/urandom > /tmp/x
dd if=/tmp/x of="$dev" bs=64k oflag=direct status=none
dd if="$dev" of=/tmp/y bs=64k count=16 iflag=direct status=none
cmp /tmp/x /tmp/y
sha256sum /tmp/x
echo HOTPLUG-WRITTEN
for _ in $(seq 1200); do [ -z "$(ns2)" ] && break; sleep 0.1; done
[ -z "$(ns2)" ] && [ ! -b "$dev" ]
echo "HOTPLUG-REMOVED $dev"
nvme list
dd if=/dev/nvme0n1 of=/dev/null bs=64k count=16 iflag=direct status=none
if dmesg | grep -iE 'nvme.*(timeout|abort|reset)'; then exit 1; fi
echo HOTPLUG-PASS
"""


def test_namespace_hot_add_and_remove_in_a_linux_guest(tmp_path: Path) -> None:
    images = []
    for name in ("ns1.img", "ns2.img"):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(64 << 20)
        images.append(path)
    sock = tmp_path / "vm.sock"
    with Daemon(tmp_path) as daemon:
        daemon.cli("controller", "create", "vm", "--socket", str(sock), "--ns", str(images[0]))
        guest = BackgroundGuest(GUEST_SCRIPT, [sock], tmp_path / "console.log")
        try:
            guest.wait_for("HOTPLUG-READY")
            print(daemon.cli("ns", "add", "vm", str(images[1])))
            guest.wait_for("HOTPLUG-WRITTEN")
            print(daemon.cli("ns", "remove", "vm", "2"))
        finally:
            guest.join()
        result = guest.result()
        print(daemon.log_path.read_text())
        assert result.status == 0, "guest script failed (output above)"
        assert "HOTPLUG-PASS" in result.output
        digest = next(
            line.split()[0] for line in result.output.splitlines() if line.endswith("/tmp/x")
        )
        assert hashlib.sha256(images[1].read_bytes()[: 1 << 20]).hexdigest() == digest
        # The device is still serving (the guest saw no reset: dmesg was checked above).
        assert daemon.proc.poll() is None
        listing = daemon.cli("list")
        assert "nsid 1" in listing and "nsid 2" not in listing
