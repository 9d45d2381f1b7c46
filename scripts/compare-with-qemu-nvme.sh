#!/usr/bin/env bash
# Runs the same fio workloads in the same guest on nvme-mdev and on QEMU's own
# emulated NVMe (-device nvme), one after the other on identical 256 MiB images.
# Under TCG the guest is the bottleneck: read the ratio, not the absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
tools/guest/prepare.sh
work=$(mktemp -d)
trap 'kill -TERM $serve 2>/dev/null || true; rm -rf "$work"' EXIT
serve=
head -c 256M /dev/urandom >"$work/a.img"
cp "$work/a.img" "$work/b.img"
cat >"$work/fio.sh" <<'FIO'
set -e
for _ in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
run() { fio --name="$1" --filename=/dev/nvme0n1 --rw="$2" --bs=4k --size=256M --runtime=8 \
        --time_based --ioengine=libaio --direct=1 --iodepth="$3" --output-format=terse \
        --terse-version=3 | awk -F';' -v n="$1" '{ printf "%-14s read %8d IOPS %8.0f us   write %8d IOPS %8.0f us\n", n, $8, $40, $49, $81 }'; }
run randread-qd1 randread 1
run randread-qd32 randread 32
run randwrite-qd32 randwrite 32
FIO
.venv/bin/nvme-mdev serve --socket "$work/s.sock" "$work/a.img" >"$work/serve.log" 2>&1 &
serve=$!
for _ in $(seq 100); do [ -S "$work/s.sock" ] && break; sleep 0.05; done
echo "### nvme-mdev"
python3 tools/guest/guestvm.py run --socket "$work/s.sock" --script "$work/fio.sh" 2>&1 | grep IOPS
kill -TERM $serve
wait $serve || true
echo "### QEMU -device nvme"
python3 tools/guest/guestvm.py run --emulated-nvme "$work/b.img" --script "$work/fio.sh" 2>&1 | grep IOPS
