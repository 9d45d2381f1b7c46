#!/usr/bin/env bash
# Prepares (once) the private Debian trixie tree that the end-to-end tests and the
# demo boot: QEMU >= 10.1 from trixie-backports (with vfio-user-pci), a Linux kernel,
# busybox, nvme-cli, fio and filesystem tools. Needs root; leaves the host untouched
# apart from installing debootstrap. Idempotent: a second run returns at once.
set -euo pipefail

dir=${NVME_MDEV_GUEST_DIR:-/var/cache/nvme-mdev/guest}
stamp="$dir/.nvme-mdev-ready"
[ -f "$stamp" ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "prepare.sh: must run as root (debootstrap, chroot)" >&2
    exit 1
fi

# The Debian mirror this host already uses (no mirror is named here).
mirror=${NVME_MDEV_DEBIAN_MIRROR:-}
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '/^deb / && $2 !~ /security/ { print $2; exit }' /etc/apt/sources.list)
fi
if [ -z "$mirror" ]; then
    echo "prepare.sh: no Debian mirror in the host's apt sources; set NVME_MDEV_DEBIAN_MIRROR" >&2
    exit 1
fi

start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
if ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq debootstrap >/dev/null
fi

tmp="$dir.tmp"
cleanup() {
    for m in proc sys dev/pts dev; do
        mountpoint -q "$tmp/$m" 2>/dev/null && umount -l "$tmp/$m" || true
    done
}
trap cleanup EXIT
cleanup
rm -rf "$tmp"
mkdir -p "$(dirname "$dir")"

echo "prepare.sh: debootstrap trixie from $mirror"
debootstrap --variant=minbase trixie "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
    tail -20 "$tmp.log" >&2
    exit 1
}
echo "deb $mirror trixie-backports main" >"$tmp/etc/apt/sources.list.d/backports.list"
mount -t proc proc "$tmp/proc"
mount --bind /dev "$tmp/dev"
in_tree() { chroot "$tmp" env DEBIAN_FRONTEND=noninteractive "$@"; }
in_tree apt-get update -qq
in_tree apt-get install -y -qq --no-install-recommends -t trixie-backports qemu-system-x86 >/dev/null
in_tree apt-get install -y -qq --no-install-recommends \
    linux-image-amd64 busybox-static nvme-cli fio e2fsprogs util-linux fdisk kmod >/dev/null
in_tree apt-get clean
cleanup
trap - EXIT

qemu_version=$("$tmp/lib64/ld-linux-x86-64.so.2" \
    --library-path "$tmp/usr/lib/x86_64-linux-gnu:$tmp/lib/x86_64-linux-gnu" \
    "$tmp/usr/bin/qemu-system-x86_64" --version | head -1)
echo "prepare.sh: $qemu_version"
rm -rf "$dir"
mv "$tmp" "$dir"
rm -f "$tmp.log"
touch "$stamp"
echo "prepare.sh: guest tree ready in $dir ($((SECONDS - start)) s)"
