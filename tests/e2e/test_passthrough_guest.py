"""NVMe passthrough end to end, on a real NVMe namespace: QEMU's own emulated NVMe
controller (`-device nvme`) in a guest, whose /dev/ng0n1 an `nvme-mdev serve` in the
same guest passes through; the project's client (nvme_mdev.nvme_host), also in the
guest, drives it (passthrough_client.py), once per data plane and I/O engine: the
Python plane with io_uring (IORING_OP_URING_CMD) and sync (the NVMe ioctls); the native
plane, which hands passthrough commands to the Python side (ioctls). The guest runs
this checkout's src (and its native data plane, an abi3 build) with the tree's python3,
shared read-only over virtio-9p at /mnt/project."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "guest"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from live_guest import run_guest  # noqa: E402
from passthrough_client import MARK, MARK_LBA  # noqa: E402

import guestvm  # noqa: E402

pytestmark = pytest.mark.e2e

NO_PYTHON = 77

SCRIPT = r"""
set -u
command -v python3 >/dev/null || { echo "no python3 in the guest tree"; exit 77; }
export PYTHONPATH=/mnt/project/src PYTHONDONTWRITEBYTECODE=1
cd /tmp
for i in $(seq 100); do [ -c /dev/ng0n1 ] && break; sleep 0.1; done
ls -l /dev/ng0n1 /dev/nvme0n1 || exit 1
q=/sys/block/nvme0n1/queue
echo "host queue: $(cat $q/max_hw_sectors_kb) KiB, $(cat $q/max_segments) segments per command"
nvme_mdev="python3 -m nvme_mdev.cli"  # (not a function: $! must be python's pid)

# The host queue takes less than MDTS 7 (512 KiB) in one command: a clear refusal.
if $nvme_mdev serve --socket /tmp/refused.sock /dev/ng0n1 >/tmp/refused.log 2>&1; then
    echo "FAIL: served with an MDTS the host cannot take"; exit 1
fi
grep -q "give the controller mdts" /tmp/refused.log || { cat /tmp/refused.log; exit 1; }
echo "ok   MDTS beyond the host's queue refused: $(tail -1 /tmp/refused.log)"

for variant in python:uring python:sync native:uring; do
    plane=${variant%:*} engine=${variant#*:}
    sock=/tmp/pt-$plane-$engine.sock
    $nvme_mdev serve --socket $sock --data-plane $plane --io-engine $engine --mdts 5 \
        nvme0:n1,passthrough >/tmp/serve-$engine.log 2>&1 &
    pid=$!
    for i in $(seq 300); do [ -S $sock ] && break; sleep 0.1; done
    echo "--- $plane data plane, io engine $engine"
    python3 /mnt/project/tests/e2e/passthrough_client.py $sock /dev/nvme0n1
    status=$?
    if [ $variant = python:uring ]; then
        # The ring's completion head: the commands went as IORING_OP_URING_CMD (an ng
        # device has no reads or writes of its own for the ring to do instead).
        cq=$(awk '/^CqHead:/ { print $2 }' /proc/$pid/fdinfo/* 2>/dev/null | sort -n | tail -1)
        echo "io_uring completions: ${cq:-none}"
        [ "${cq:-0}" -gt 10 ] || { echo "FAIL: the commands did not go through the ring"; exit 1; }
    fi
    kill -TERM $pid; wait $pid; served=$?
    cat /tmp/serve-$engine.log
    [ $status = 0 ] || exit 1
    [ $served = 0 ] || { echo "FAIL: serve exited $served"; exit 1; }
done
if dmesg | grep -iE "nvme.*(timeout|abort|reset)"; then echo "FAIL: see the kernel log"; exit 1; fi
echo "PASSTHROUGH: PASS"
"""


def test_passthrough_in_a_guest_on_qemus_nvme(tmp_path: Path) -> None:
    if not guestvm.is_prepared():
        pytest.skip("no guest tree: run tools/guest/prepare.sh as root")
    image = tmp_path / "nvme.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    result = run_guest(SCRIPT, emulated_nvme_images=[image], shares={"project": ROOT}, timeout=600)
    if result.status == NO_PYTHON:
        pytest.skip("the guest tree has no python3: run tools/guest/prepare.sh to add it")
    assert result.ok, f"guest script exited {result.status}"
    assert "PASSTHROUGH: PASS" in result.output
    assert result.output.count("PASSTHROUGH-CLIENT: PASS") == 3
    # What the client wrote through the passthrough reached QEMU's image.
    with open(image, "rb") as f:
        f.seek(MARK_LBA * 512)  # QEMU's namespace: 512-byte blocks by default
        assert f.read(len(MARK)) == MARK
