#!/usr/bin/env bash
# Runs the same fio workloads in the same guest on nvme-mdev (its default settings:
# the native data plane; then the Python data plane) and on QEMU's own emulated NVMe
# (-device nvme, cache=none, aio=io_uring), one after the other on identical images
# in IMAGE_DIR (default /dev/shm: a tmpfs image, as a new user might try first).
# Under TCG the guest is the bottleneck: read the ratio, not the absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
tools/guest/prepare.sh
work=$(mktemp -d)
images=$(mktemp -d "${IMAGE_DIR:-/dev/shm}/nvme-mdev-compare.XXXXXX")
trap 'kill -TERM $serve 2>/dev/null || true; rm -rf "$work" "$images"' EXIT
serve=
head -c 256M /dev/urandom >"$images/a.img"
cp "$images/a.img" "$images/b.img"
cat >"$work/fio.sh" <<'FIO'
set -e
for _ in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
run() { fio --name="$1" --filename=/dev/nvme0n1 --rw="$2" --bs="$3" --size=256M --runtime=8 \
        --time_based --ioengine=libaio --direct=1 --iodepth="$4" --output-format=terse \
        --terse-version=3 | awk -F';' -v n="$1" '{ printf "%-16s read %8d IOPS %8.0f us   write %8d IOPS %8.0f us\n", n, $8, $40, $49, $81 }'; }
run randread-4k-qd1 randread 4k 1
run randread-4k-qd32 randread 4k 32
run randwrite-4k-qd32 randwrite 4k 32
run read-128k-qd8 read 128k 8
FIO
for plane in native python; do
    .venv/bin/nvme-mdev serve --socket "$work/s.sock" --data-plane $plane "$images/a.img" \
        >"$work/serve.log" 2>&1 &
    serve=$!
    for _ in $(seq 100); do [ -S "$work/s.sock" ] && break; sleep 0.05; done
    echo "### nvme-mdev, $plane data plane"
    python3 tools/guest/guestvm.py run --socket "$work/s.sock" --script "$work/fio.sh" 2>&1 | grep IOPS
    kill -TERM $serve
    wait $serve || true
done
echo "### QEMU -device nvme"
python3 tools/guest/guestvm.py run --emulated-nvme "$images/b.img" --script "$work/fio.sh" 2>&1 | grep IOPS
