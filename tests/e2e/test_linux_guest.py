"""A real Linux guest (Debian's kernel, under QEMU 11 with TCG) uses the device as
its disk: nvme-cli, a partition table and ext4, fio with verification."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "guest"))

from live_guest import run_guest  # noqa: E402

import guestvm  # noqa: E402
from nvme_mdev.control import call  # noqa: E402

pytestmark = pytest.mark.e2e


class Device:
    def __init__(self, tmp: Path, *paths: str, extra: tuple[str, ...] = ()) -> None:
        self.socket = tmp / "nvme.sock"
        self.log_path = tmp / "serve.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvme_mdev.cli", "serve", "--socket", str(self.socket),
             *extra, *paths],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(500):
            if self.socket.exists() or self.proc.poll() is not None:
                break
            time.sleep(0.02)
        assert self.socket.exists(), self.log()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._log.close()
        return code


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for name in ("ns1.img", "ns2.img"):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(128 << 20)
        paths.append(path)
    return paths


@pytest.fixture(params=["native", "python"])
def device(request: pytest.FixtureRequest, tmp_path: Path, images: list[Path]) -> Iterator[Device]:
    """The device on both images, with each data plane."""
    dev = Device(tmp_path, *map(str, images), extra=("--data-plane", request.param))
    yield dev
    dev.stop()


def boot(script: str, device: Device, timeout: float = 900) -> guestvm.GuestResult:
    try:
        return run_guest(script, sockets=[str(device.socket)], timeout=timeout)
    finally:
        print(device.log())


def test_linux_guest_uses_the_device(device: Device, images: list[Path]) -> None:
    script = (ROOT / "tests" / "e2e" / "guest_check.sh").read_text()
    result = boot(script, device)
    assert result.status == 0, "guest check failed (output above)"
    assert "GUEST-CHECK: PASS" in result.output
    # Linux took the shadow doorbells we offer (OACS bit 8), so the I/O thread can park.
    assert "shadow doorbells enabled" in device.log()
    stats = call(f"{device.socket}.ctl", "stats")
    commands = sum(q["commands"] for q in stats["queues"])
    print(f"{commands} I/O commands, {stats['doorbell_traps']} trapped doorbell writes")
    # Most submissions were polled from the shadow doorbells, not trapped.
    assert stats["doorbell_traps"] < commands
    # The device outlives its client and serves the next one.
    assert device.proc.poll() is None
    second = boot("nvme list && nvme smart-log /dev/nvme0", device)
    assert second.status == 0
    assert device.stop() == 0
    # What the guest wrote is in the images: a GPT on one namespace, fio's data on the other.
    assert any(img.read_bytes()[512:520] == b"EFI PART" for img in images)
    assert all(os.stat(img).st_blocks > 0 for img in images)


def test_guest_killed_mid_write_loses_no_acknowledged_data(tmp_path: Path) -> None:
    """QEMU dies while the guest writes: what the guest saw completed (and flushed)
    is on the image, the device resets and serves the next guest."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    dev = Device(tmp_path, str(image))
    try:
        script = (
            "set -e; for _ in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done\n"
            "printf 'acknowledged-%s\\n' $(seq 1000) > /tmp/marker\n"
            "dd if=/tmp/marker of=/dev/nvme0n1 bs=4096 seek=10 conv=fsync,sync oflag=direct\n"
            "echo MARKER-WRITTEN\n"
            "while :; do dd if=/dev/urandom of=/dev/nvme0n1 bs=64k seek=100 count=200"
            " oflag=direct 2>/dev/null; done\n"
        )
        # The guest never finishes its endless write: the host kills QEMU first.
        result = run_guest(script, sockets=[str(dev.socket)], timeout=45)
        assert "MARKER-WRITTEN" in result.output, dev.log()
        assert result.status == -1  # killed, not exited
        data = image.read_bytes()[10 * 4096 :]
        assert data.startswith(b"acknowledged-1\nacknowledged-2\n")
        assert b"acknowledged-1000\n" in data[:20480]
        assert dev.proc.poll() is None, "the device must survive its client's death"
        again = run_guest(
            "for _ in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done; nvme list",
            sockets=[str(dev.socket)],
            timeout=300,
        )
        assert again.status == 0, again.output
        assert "nvme-mdev" in again.output
    finally:
        assert dev.stop() == 0


def test_deep_queue_completions_are_never_misread(tmp_path: Path) -> None:
    """One vCPU, 32 random reads in flight: every completion the guest takes is one the
    device posted. (A completion's phase dword written in two steps once let Linux read
    "command ID 0" about once a second here, lose the real one and reset after 30 s.)"""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.write(os.urandom(64 << 20))
    dev = Device(tmp_path, str(image))
    try:
        script = (
            "set -euo pipefail\n"
            "for _ in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done\n"
            "fio --name=deep --filename=/dev/nvme0n1 --rw=randread --bs=4k --iodepth=32"
            " --ioengine=libaio --direct=1 --runtime=15 --time_based --eta=never"
            " --output-format=terse --terse-version=3 | awk -F';' '{ print \"FIO\", $6, $8 }'\n"
            "dmesg | grep -Ei 'nvme.*(timeout|abort|reset|invalid id|genctr|error)' || true\n"
            "echo DEEP-DONE\n"
        )
        result = run_guest(script, sockets=[str(dev.socket)], smp=1, timeout=300)
        assert result.status == 0, dev.log()
        assert "DEEP-DONE" in result.output
        fio = next(line.split() for line in result.output.splitlines() if line.startswith("FIO"))
        assert int(fio[1]) > 0 and int(fio[2]) > 0, fio  # KiB read, IOPS
        kernel = [line for line in result.output.splitlines() if "nvme nvme0:" in line]
        assert not [line for line in kernel if "invalid id" in line or "timeout" in line], kernel
    finally:
        assert dev.stop() == 0


SMALL_CHECK = """
set -euo pipefail
for _ in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
[ -b /dev/nvme0n1 ]
nvme list
grep -i nvme /proc/interrupts
head -c 4M /dev/urandom > /tmp/x
dd if=/tmp/x of=/dev/nvme0n1 oflag=direct bs=64k seek=7 status=none
dd if=/dev/nvme0n1 of=/tmp/y iflag=direct bs=64k skip=7 count=64 status=none
cmp /tmp/x /tmp/y
dd if=/dev/nvme0n1 of=/dev/null iflag=direct bs=4k count=3000 status=none
sha256sum /tmp/x
echo SMALL-CHECK-PASS
"""


@pytest.mark.parametrize(
    ("kernel_args", "shared_memory", "interrupts", "serve_args"),
    [
        # No MSI in the guest: the level-triggered INTx pin.
        ("pci=nomsi", True, "IO-APIC", ()),
        # Private guest RAM has no fd: every DMA is a DMA_READ/DMA_WRITE message.
        ("", False, "PCI-MSIX", ()),
        # QEMU maps the doorbell page into the guest: no doorbell write ever traps.
        ("", True, "PCI-MSIX", ("--mmap-doorbells",)),
        # The main test runs the default engine (io_uring where the kernel has it).
        ("", True, "PCI-MSIX", ("--io-engine", "sync")),
    ],
    ids=["intx", "dma-messages", "mapped-doorbells", "sync-engine"],
)
def test_guest_variants(
    tmp_path: Path,
    kernel_args: str,
    shared_memory: bool,
    interrupts: str,
    serve_args: tuple[str, ...],
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    dev = Device(tmp_path, str(image), extra=serve_args)
    try:
        result = run_guest(
            SMALL_CHECK,
            sockets=[str(dev.socket)],
            timeout=300,
            kernel_args=kernel_args,
            shared_memory=shared_memory,
        )
        assert result.status == 0, dev.log()
        assert "SMALL-CHECK-PASS" in result.output
        assert interrupts in result.output
        digest = next(
            line.split()[0] for line in result.output.splitlines() if line.endswith("/tmp/x")
        )
        on_disk = image.read_bytes()[7 * 65536 : 7 * 65536 + (4 << 20)]
        assert hashlib.sha256(on_disk).hexdigest() == digest
        stats = call(f"{dev.socket}.ctl", "stats")
        print("device statistics:", stats)
        commands = sum(q["commands"] for q in stats["queues"])
        assert commands > 3000
        if "--mmap-doorbells" in serve_args:
            # Linux rang every doorbell as a store to the mapped page. The firmware's
            # NVMe probe before it runs with INTx, and QEMU unmaps the BAR while an
            # INTx is pending: those few hundred doorbells trapped. Trapping ones
            # would be at least two per command.
            assert stats["doorbell_traps"] < commands / 4
    finally:
        assert dev.stop() == 0
