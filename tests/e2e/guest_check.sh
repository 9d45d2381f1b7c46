#!/bin/bash
# Runs inside the guest (tools/guest/guestvm.py): what a user does with a new NVMe
# disk. Expects one controller, /dev/nvme0, with two namespaces of at least 64 MiB:
# namespace 1 gets a partition table and ext4, namespace 2 verified random I/O from fio.
# Prints every step; the last line is "GUEST-CHECK: PASS" only if all of it passed.
#
# Environment (optional):
#   EXPECT_MODEL    the model number the controller must report (default: nvme-mdev's;
#                   empty: any, e.g. for QEMU's own emulated NVMe as a baseline)
#   MIN_IO_QUEUES   I/O queues the driver must have created (default: 2)
#   REQUIRE_DBBUF   1 (default): shadow doorbells (OACS bit 8) offered and taken
set -Eeuo pipefail
EXPECT_MODEL=${EXPECT_MODEL-nvme-mdev virtual NVMe controller}
MIN_IO_QUEUES=${MIN_IO_QUEUES:-2}
REQUIRE_DBBUF=${REQUIRE_DBBUF:-1}
ctrl=/dev/nvme0
cd /tmp # fio keeps its verify state in the working directory
start=$SECONDS

step() { printf '\n=== [%3d s] %s\n' $((SECONDS - start)) "$*"; }
nvme_dmesg() {
    echo "--- kernel messages about nvme (last 40)"
    dmesg | grep -i nvme | tail -40 || true
}
fail() {
    trap - ERR
    echo "GUEST-CHECK: FAIL: $*"
    nvme_dmesg
    exit 1
}
trap 'fail "line $LINENO: \"$BASH_COMMAND\" exited $?"' ERR
# Linux recovers from a lost or bogus completion (timeout, abort, controller reset)
# and the I/O may still succeed: the kernel log tells.
no_kernel_errors() {
    local errors
    errors=$(dmesg | grep -Ei 'nvme.*(timeout|abort|reset|invalid id|error|fail)' || true)
    [ -z "$errors" ] || fail "NVMe errors in the kernel log:"$'\n'"$errors"
}

step "waiting for /dev/nvme0n1 and /dev/nvme0n2 (60 s at most)"
deadline=$((SECONDS + 60))
until [ -b /dev/nvme0n1 ] && [ -b /dev/nvme0n2 ]; do
    if [ $SECONDS -ge $deadline ]; then
        ls -l /dev/nvme* 2>&1 || true
        fail "/dev/nvme0n1 and /dev/nvme0n2 did not appear"
    fi
    sleep 0.2
done
# Linux scans namespaces in parallel: nvme0n1 is not always NSID 1. Go by NSID.
for dev in /dev/nvme0n1 /dev/nvme0n2; do
    nsid=$(cat /sys/block/${dev#/dev/}/nsid)
    echo "$dev is namespace $nsid"
    case $nsid in 1) ns1=$dev ;; 2) ns2=$dev ;; esac
done
[ -n "${ns1:-}" ] && [ -n "${ns2:-}" ] || fail "expected namespaces 1 and 2"

step "nvme list"
nvme list

step "nvme id-ctrl $ctrl"
nvme id-ctrl $ctrl | tee /tmp/id-ctrl
field() { awk -v f="$1" '$1 == f && $2 == ":" { sub(/^[^:]*: ?/, ""); print; exit }' "$2"; }
model=$(field mn /tmp/id-ctrl | sed 's/ *$//')
oacs=$(field oacs /tmp/id-ctrl)
vwc=$(field vwc /tmp/id-ctrl)
echo "model '$model', oacs $oacs, vwc $vwc"
if [ -n "$EXPECT_MODEL" ] && [ "$model" != "$EXPECT_MODEL" ]; then
    fail "model '$model', expected '$EXPECT_MODEL'"
fi

step "nvme id-ns $ns1"
nvme id-ns $ns1 | tee /tmp/id-ns
nsze=$(field nsze /tmp/id-ns)
lbads=$(sed -nE 's/.*lbads:([0-9]+).*\(in use\).*/\1/p' /tmp/id-ns)
echo "nsze $nsze blocks of $((1 << lbads)) bytes;" \
    "the kernel sees $(blockdev --getsize64 $ns1) bytes in $(blockdev --getss $ns1)-byte sectors"
[ "$((1 << lbads))" = "$(blockdev --getss $ns1)" ] || fail "LBA size disagrees with the kernel's"
[ "$((nsze << lbads))" = "$(blockdev --getsize64 $ns1)" ] || fail "size disagrees with the kernel's"

step "nvme smart-log $ctrl"
nvme smart-log $ctrl

step "nvme get-feature: the mandatory features must succeed"
mandatory=(0x01 0x02 0x04 0x05 0x07 0x08 0x09 0x0a 0x0b)
# Volatile Write Cache is answered only when a cache is present (vwc bit 0)
if [ $((vwc & 1)) = 1 ]; then mandatory+=(0x06); fi
failed=()
for fid in "${mandatory[@]}"; do
    args=(-f "$fid" -H)
    [ "$fid" = 0x09 ] && args+=(--cdw11=1) # interrupt vector 1: the first I/O queue's
    echo "--- feature $fid"
    if [ "$fid" = 0x05 ]; then
        # Error Recovery is namespace specific for some controllers (QEMU's), not for
        # others: either form may be refused, one must work.
        nvme get-feature $ctrl "${args[@]}" 2>&1 ||
            nvme get-feature $ctrl "${args[@]}" -n 1 2>&1 || failed+=("$fid")
    else
        nvme get-feature $ctrl "${args[@]}" 2>&1 || failed+=("$fid")
    fi
done
[ ${#failed[@]} = 0 ] || fail "mandatory features failed: ${failed[*]}"

step "nvme get-feature: optional features (an error status is a valid answer)"
# the feature identifiers nvme-cli 2.13 has names for, less those above
for fid in 0x03 0x06 0x0c 0x0d 0x0e 0x0f 0x10 0x11 0x12 0x13 0x14 0x15 0x16 0x17 0x18 \
    0x19 0x1a 0x1b 0x1d 0x1e 0x1f 0x20 0x21 0x7d 0x7e 0x7f 0x80 0x81 0x82 0x83 0x84; do
    [[ " ${mandatory[*]} " == *" $fid "* ]] && continue
    case $fid in 0x03 | 0x82 | 0x83 | 0x84) args=(-n 1) ;; *) args=() ;; esac
    if out=$(nvme get-feature $ctrl -f $fid "${args[@]}" 2>&1); then
        echo "feature $fid: ${out%%$'\n'*}"
    else
        # e.g. "NVMe status: Invalid Field in Command: <explanation>(0x4002)"
        msg=$(sed -nE '1s/.*NVMe status: ([^:]*):.*\((0x[0-9a-f]+)\)$/\1 (\2)/p' <<<"$out")
        echo "feature $fid: refused: ${msg:-${out%%$'\n'*}}"
    fi
done

step "I/O queues and shadow doorbells"
queues=$(dmesg | sed -nE 's/.*nvme nvme0: ([0-9]+)\/([0-9]+)\/([0-9]+) default\/read\/poll queues.*/\1/p' |
    tail -1)
hctx=$(find /sys/block/${ns2#/dev/}/mq -mindepth 1 -maxdepth 1 | wc -l)
echo "the driver created ${queues:-?} I/O queues (blk-mq hardware contexts: $hctx) for $(nproc) CPUs"
[ "${queues:-0}" -ge "$MIN_IO_QUEUES" ] || fail "expected at least $MIN_IO_QUEUES I/O queues"
if [ $((oacs & 0x100)) != 0 ]; then
    # Linux sets the Doorbell Buffer Config at probe whenever OACS bit 8 is offered,
    # and warns "unable to set dbbuf" if the controller refuses it.
    if dmesg | grep -q 'unable to set dbbuf'; then
        echo "shadow doorbells: offered, but the controller refused the buffers"
        [ "$REQUIRE_DBBUF" != 1 ] || fail "Doorbell Buffer Config failed"
    else
        echo "shadow doorbells: offered (OACS bit 8) and in use"
    fi
else
    echo "shadow doorbells: not offered (OACS bit 8 clear)"
    [ "$REQUIRE_DBBUF" != 1 ] || fail "Doorbell Buffer Config (OACS bit 8) not offered"
fi

step "partition table, ext4, write, remount, verify, fsck on $ns1"
printf 'label: gpt\n,,L\n' | sfdisk --quiet $ns1
part=${ns1}p1
for _ in $(seq 100); do [ -b $part ] && break; sleep 0.1; done
lsblk $ns1
mkfs.ext4 -q -F $part
mkdir -p /tmp/fs
mount $part /tmp/fs
for i in 1 2 3 4 5; do
    head -c 4M /dev/urandom >/tmp/fs/file$i
done
(cd /tmp/fs && md5sum file* | tee /tmp/sums)
umount /tmp/fs
echo 3 >/proc/sys/vm/drop_caches
mount $part /tmp/fs
(cd /tmp/fs && md5sum -c /tmp/sums)
df -h /tmp/fs
umount /tmp/fs
fsck.ext4 -f -n $part
no_kernel_errors

step "fio: random read/write with crc32c verification on raw $ns2, 2 jobs on 2 CPUs"
# each I/O queue has an interrupt vector of its own: nvme0q1, nvme0q2, ...
irqs() {
    awk 'NR == 1 { cpus = NF; next }
        $NF ~ /^nvme0q[1-9]/ { n = 0; for (i = 2; i <= cpus + 1; i++) n += $i; print $NF, n }' \
        /proc/interrupts
}
irqs >/tmp/irqs.before
cpus=$(nproc)
fio --name=verify --filename=$ns2 --rw=randrw --bs=4k --size=32M --offset_increment=32M \
    --numjobs=2 --cpus_allowed=0-$((cpus - 1)) --cpus_allowed_policy=split \
    --iodepth=16 --ioengine=libaio --direct=1 --eta=never \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting
irqs >/tmp/irqs.after
no_kernel_errors
awk 'NR == FNR { before[$1] = $2; next }
    { d = $2 - before[$1]; printf "%s: %d interrupts during fio\n", $1, d; if (d > 0) n++ }
    END { print "I/O queues that carried fio'"'"'s I/O:", n + 0 }' /tmp/irqs.before /tmp/irqs.after |
    tee /tmp/irqs
used=$(awk 'END { print $NF }' /tmp/irqs)
if [ "$cpus" -ge 2 ] && [ "$hctx" -ge 2 ] && [ "$used" -lt 2 ]; then
    fail "fio's 2 jobs on 2 CPUs used only $used I/O queue(s)"
fi

step "nvme smart-log $ctrl after the I/O"
nvme smart-log $ctrl | grep -Ei 'critical_warning|data units|host_(read|write)_commands'

step "kernel messages about nvme"
dmesg | grep -i nvme

echo
echo "guest check: all steps passed in $((SECONDS - start)) s"
echo "GUEST-CHECK: PASS"
