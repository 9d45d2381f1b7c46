#!/usr/bin/env bash
# The main job on a built-in default: set up (once), start nvme-mdev on a sparse
# 1 GiB image, boot a Linux guest with the device, and show what the guest sees.
# Needs root on a fresh Debian 12 machine (for the cached guest tree).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
tools/guest/prepare.sh

work=${NVME_MDEV_DEMO_DIR:-/var/tmp/nvme-mdev-demo}
mkdir -p "$work"
image="$work/disk.img"
[ -f "$image" ] || truncate -s 1G "$image"
sock="$work/nvme.sock"

.venv/bin/nvme-mdev serve --socket "$sock" "$image" >"$work/serve.log" 2>&1 &
serve=$!
trap 'kill -TERM $serve 2>/dev/null; wait $serve 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done

echo "nvme-mdev serves $image on $sock; booting a Linux guest on it (TCG, ~10 s)..."
python3 tools/guest/guestvm.py run --socket "$sock" --command '
set -e
for _ in $(seq 300); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
echo "--- what the guest sees"
nvme list
lspci -nn 2>/dev/null | grep -i "non-volatile" || grep -l 0x010802 /sys/bus/pci/devices/*/class
nvme id-ctrl /dev/nvme0 | grep -E "^(vid|sn|mn|fr|mdts|oacs|oncs|vwc) "
echo "--- a filesystem on it"
blkid /dev/nvme0n1 >/dev/null 2>&1 || mkfs.ext4 -q /dev/nvme0n1
mkdir -p /tmp/disk && mount /dev/nvme0n1 /tmp/disk
date >> /tmp/disk/boots.log
echo "boots recorded on this disk: $(wc -l < /tmp/disk/boots.log)"
df -h /tmp/disk
umount /tmp/disk
echo "--- 4 KiB random reads, QD1, 3 s"
fio --name=demo --filename=/dev/nvme0n1 --rw=randread --bs=4k --size=64M --runtime=3 \
    --time_based --ioengine=libaio --direct=1 --iodepth=1 | grep -E "IOPS|clat \("
'
echo "--- the device's log"
cat "$work/serve.log"
