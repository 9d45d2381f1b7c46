#!/bin/bash
# Runs inside the guest (tools/guest/guestvm.py): what a user does with a new NVMe
# disk. Expects one controller with two namespaces. Ends with "GUEST-CHECK: PASS".
set -euo pipefail
cd /tmp  # fio keeps its verify state in the working directory

step() { echo; echo "=== $*"; }

step "waiting for /dev/nvme0n1 and /dev/nvme0n2"
for _ in $(seq 600); do
    [ -b /dev/nvme0n1 ] && [ -b /dev/nvme0n2 ] && break
    sleep 0.1
done
[ -b /dev/nvme0n1 ] && [ -b /dev/nvme0n2 ]

step "nvme list"
nvme list

step "nvme id-ctrl"
nvme id-ctrl /dev/nvme0 | tee /tmp/id-ctrl
grep -q '^mn *: nvme-mdev virtual NVMe controller' /tmp/id-ctrl
grep -qi '^oacs *: 0x100' /tmp/id-ctrl   # Doorbell Buffer Config offered

step "nvme id-ns"
nvme id-ns /dev/nvme0n1 | tee /tmp/id-ns
grep -q 'lbads:9' /tmp/id-ns

step "nvme smart-log"
nvme smart-log /dev/nvme0

step "nvme get-feature: every mandatory feature must answer"
for fid in 0x01 0x02 0x04 0x05 0x06 0x07 0x08 0x0a 0x0b; do
    nvme get-feature /dev/nvme0 -f "$fid" -H
done
nvme get-feature /dev/nvme0 -f 0x09 --cdw11=1 -H
step "nvme get-feature: optional features (errors allowed)"
for fid in 0x03 0x0c 0x0d 0x0e 0x0f 0x10 0x11 0x12 0x13 0x16 0x17 0x19 0x80 0x81 0x82 0x83 0x84; do
    nvme get-feature /dev/nvme0 -f "$fid" 2>&1 || true
done

step "I/O queues the driver created"
queues=$(dmesg | grep -o 'nvme nvme0: [0-9]*/[0-9]*/[0-9]* default/read/poll queues' | tail -1)
echo "$queues"
default=$(echo "$queues" | sed -E 's/.*: ([0-9]+)\/.*/\1/')
[ "${default:-0}" -ge 2 ] || { echo "expected at least 2 I/O queues, got '${default:-none}'"; exit 1; }

step "partition, mkfs.ext4, mount, write, read back, fsck on nvme0n1"
echo 'label: gpt
,,L' | sfdisk --quiet /dev/nvme0n1
for _ in $(seq 100); do [ -b /dev/nvme0n1p1 ] && break; sleep 0.1; done
lsblk /dev/nvme0n1
mkfs.ext4 -q -F /dev/nvme0n1p1
mkdir -p /tmp/fs
mount /dev/nvme0n1p1 /tmp/fs
for i in 1 2 3 4; do
    head -c 4M /dev/urandom >"/tmp/fs/file$i"
done
(cd /tmp/fs && sha256sum file* >/tmp/sums)
umount /tmp/fs
echo 3 >/proc/sys/vm/drop_caches
mount /dev/nvme0n1p1 /tmp/fs
(cd /tmp/fs && sha256sum -c /tmp/sums)
umount /tmp/fs
fsck.ext4 -f -n /dev/nvme0n1p1

step "fio random read/write with crc32c verification on raw nvme0n2 (2 jobs)"
fio --name=verify --filename=/dev/nvme0n2 --rw=randrw --bs=4k --size=8M \
    --offset_increment=8M --numjobs=2 --iodepth=8 --ioengine=libaio --direct=1 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting

step "kernel messages"
dmesg | grep -i nvme

echo
echo "GUEST-CHECK: PASS"
