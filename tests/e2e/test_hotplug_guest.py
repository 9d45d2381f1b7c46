"""Namespaces attached and detached while a Linux guest runs: the guest boots with one
namespace of a daemon's controller, the namespace added through the control socket
appears in it (the asynchronous event makes Linux rescan), takes I/O, and disappears
again when it is removed. No reset, no reboot."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "guest"))

import guestvm  # noqa: E402

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-m", "nvme_mdev.cli"]

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


def wait_for(marker: str, console: Path, guest: threading.Thread, limit: float = 600) -> None:
    """Until the guest prints `marker` (or gives up: the assertion says which)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and guest.is_alive():
        if console.exists() and marker in console.read_text(errors="replace"):
            return
        time.sleep(0.2)
    text = console.read_text(errors="replace") if console.exists() else ""
    assert marker in text, f"the guest never printed {marker}:\n{text}"


def test_namespace_hot_add_and_remove_in_a_linux_guest(tmp_path: Path) -> None:
    images = []
    for name in ("ns1.img", "ns2.img"):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(64 << 20)
        images.append(path)
    control = tmp_path / "control.sock"
    sock = tmp_path / "vm.sock"
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen(
            [*CLI, "daemon", "--control", str(control)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(500):
            if control.exists() or daemon.poll() is not None:
                break
            time.sleep(0.02)

        def cli(*args: str) -> str:
            result = subprocess.run(
                [*CLI, *args, "--control", str(control)], capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, result.stderr + log_path.read_text()
            return result.stdout

        cli("controller", "create", "vm", "--socket", str(sock), "--ns", str(images[0]))
        console = tmp_path / "console.log"
        results: list[guestvm.GuestResult] = []
        guest = threading.Thread(
            target=lambda: results.append(
                guestvm.run_guest(GUEST_SCRIPT, sockets=[str(sock)], timeout=600, log_path=console)
            )
        )
        guest.start()
        try:
            wait_for("HOTPLUG-READY", console, guest)
            print(cli("ns", "add", "vm", str(images[1])))
            wait_for("HOTPLUG-WRITTEN", console, guest)
            print(cli("ns", "remove", "vm", "2"))
        finally:
            guest.join(660)
        (result,) = results
        print(result.output)
        print(log_path.read_text())
        assert result.status == 0, "guest script failed (output above)"
        assert "HOTPLUG-PASS" in result.output
        digest = next(
            line.split()[0] for line in result.output.splitlines() if line.endswith("/tmp/x")
        )
        assert hashlib.sha256(images[1].read_bytes()[: 1 << 20]).hexdigest() == digest
        # The device is still serving (the guest saw no reset: dmesg was checked above).
        assert daemon.poll() is None
        listing = cli("list")
        assert "nsid 1" in listing and "nsid 2" not in listing
    finally:
        if daemon.poll() is None:
            daemon.terminate()
        assert daemon.wait(30) == 0
