#!/usr/bin/env bash
# Prepares (once) the private Debian trixie tree that the end-to-end tests and the
# demo boot: QEMU >= 10.1 from trixie-backports (with vfio-user-pci), a Linux kernel,
# busybox, nvme-cli, fio, filesystem tools and python3. The host system is left alone
# apart from installing debootstrap; QEMU runs later through the tree's own loader.
#
#   tools/guest/prepare.sh            # as root; a second run returns at once
#   tools/guest/prepare.sh --rebuild  # start again from an empty tree
#
# NVME_MDEV_GUEST_DIR      where the tree goes (default /var/cache/nvme-mdev/guest)
# NVME_MDEV_DEBIAN_MIRROR  Debian mirror URL (default: the one this host's apt uses)
#
# The stamp file records what the tree was built from: when the package lists
# below change, the next run installs the difference into the existing tree.
set -euo pipefail

dir=${NVME_MDEV_GUEST_DIR:-/var/cache/nvme-mdev/guest}
dir=${dir%/}
backports_packages=(qemu-system-x86)
# python3: the passthrough test runs the device and its client inside the guest
packages=(linux-image-amd64 busybox-static kmod nvme-cli fio e2fsprogs util-linux fdisk python3)
recipe="trixie minbase; trixie-backports: ${backports_packages[*]}; trixie: ${packages[*]}"
stamp="$dir/.nvme-mdev-ready"

rebuild=0
case "${1:-}" in
    "") ;;
    --rebuild) rebuild=1 ;;
    *) echo "usage: $0 [--rebuild]" >&2; exit 2 ;;
esac
if [ "$rebuild" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ]; then
    exit 0
fi

say() { echo "prepare.sh: $*"; }
die() { echo "prepare.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported"

# One preparation at a time; whoever waited finds the work done.
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
if [ "$rebuild" = 0 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ]; then
    exit 0
fi

# The Debian mirror this host already uses; no mirror is named in this repository.
host_mirror() {
    local f=/etc/apt/sources.list.d/debian.sources
    if [ -f "$f" ]; then
        # deb822: the first stanza of type deb that is not a security suite.
        awk '
            function flush() {
                if (!found && uri != "" && types ~ /(^| )deb( |$)/ && suites !~ /security/) {
                    print uri; found = 1; exit
                }
                uri = types = suites = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^URIs:/ { uri = $2 }
            /^Types:/ { types = $0; sub(/^Types:[ \t]*/, "", types) }
            /^Suites:/ { suites = $0 }
            END { flush() }
        ' "$f"
    fi
    if [ -f /etc/apt/sources.list ]; then
        # one-line form, with or without [options]
        sed -nE '/security/d; s/^deb[ \t]+(\[[^]]*\][ \t]+)?([^ \t]+).*/\2/p' /etc/apt/sources.list
    fi
}
mirror=${NVME_MDEV_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    mirror=$(host_mirror | grep -E '^(https?|ftp|file):' | head -1 || true)
fi
mirror=${mirror%/}
[ -n "$mirror" ] || die "no Debian mirror in this host's apt sources; set NVME_MDEV_DEBIAN_MIRROR"

start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap on the host"
    # apt-get update only when the host's package lists are too old to install it
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null 2>&1 || {
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
    }
fi

# --- chroot helpers: /proc and /dev are mounted for apt and always unmounted ---
tree=""
mounted=()
unmount_all() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" 2>/dev/null || true
    done
    mounted=()
}
mounts_under() { awk -v p="$1/" 'index($2 "/", p) == 1 { print $2 }' /proc/mounts; }
mount_chroot() {
    # apt and dpkg need /proc; debootstrap already made the device nodes in /dev
    mount -t proc proc "$tree/proc"
    mounted+=("$tree/proc")
}
in_tree() {
    # INITRD=No: the kernel's postinst makes no initrd (guestvm.py builds its own)
    chroot "$tree" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive INITRD=No "$@"
}
install_packages() {
    local apt=(apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends)
    in_tree "${apt[@]}" -t trixie-backports "${backports_packages[@]}" &&
        in_tree "${apt[@]}" "${packages[@]}" &&
        in_tree apt-get clean
}
qemu_check() {
    local qemu=("$1/lib64/ld-linux-x86-64.so.2"
        --library-path "$1/usr/lib/x86_64-linux-gnu:$1/lib/x86_64-linux-gnu"
        "$1/usr/bin/qemu-system-x86_64" -L "$1/usr/share/qemu")
    local version
    version=$("${qemu[@]}" --version | sed -nE '1s/.*version ([0-9]+\.[0-9]+).*/\1/p')
    [ -n "$version" ] || die "cannot run the tree's QEMU"
    printf '%s\n10.1\n' "$version" | sort -V -C -r || die "QEMU $version < 10.1 in $1"
    local devices
    devices=$(QEMU_MODULE_DIR="$1/usr/lib/x86_64-linux-gnu/qemu" "${qemu[@]}" -device help)
    grep -q '"vfio-user-pci"' <<<"$devices" || die "QEMU $version in $1 has no vfio-user-pci"
    say "QEMU $version with vfio-user-pci"
}

tmp="$dir.tmp"
log="$dir.log"
failed() {
    local rc=$?
    unmount_all
    if [ "$rc" != 0 ]; then
        [ -f "$log" ] && tail -25 "$log" >&2
        # never remove a tree that still has something mounted inside it
        if [ -d "$tmp" ] && [ -z "$(mounts_under "$tmp")" ]; then
            rm -rf "$tmp"
        fi
        echo "prepare.sh: failed (full log: $log)" >&2
    fi
    exit "$rc"
}
trap failed EXIT
trap 'exit 130' INT TERM

if [ "$rebuild" = 0 ] && [ -f "$stamp" ]; then
    # A tree built from an older recipe: install what it lacks.
    say "updating $dir to: $recipe"
    tree=$dir
    mount_chroot
    echo "deb $mirror trixie-backports main" >"$tree/etc/apt/sources.list.d/backports.list"
    install_packages >"$log" 2>&1 || {
        in_tree apt-get update -q >>"$log" 2>&1
        install_packages >>"$log" 2>&1
    }
    unmount_all
    qemu_check "$tree"
    echo "$recipe" >"$stamp"
    rm -f "$log"
    say "guest tree updated in $dir ($((SECONDS - start)) s)"
    exit 0
fi

[ -z "$(mounts_under "$tmp")" ] || die "$tmp has mounts inside it; unmount them first"
rm -rf "$tmp"
: >"$log"
say "debootstrap trixie (minbase) from $mirror into $tmp"
debootstrap --variant=minbase trixie "$tmp" "$mirror" >>"$log" 2>&1
tree=$tmp
echo "deb $mirror trixie-backports main" >"$tree/etc/apt/sources.list.d/backports.list"
mount_chroot
say "installing ${backports_packages[*]} (trixie-backports) and ${packages[*]}"
in_tree apt-get update -q >>"$log" 2>&1
install_packages >>"$log" 2>&1
unmount_all
qemu_check "$tmp"
echo "$recipe" >"$tmp/.nvme-mdev-ready"

[ -z "$(mounts_under "$dir")" ] || die "$dir has mounts inside it; unmount them first"
rm -rf "$dir"
mv "$tmp" "$dir"
rm -f "$log"
say "guest tree ready in $dir ($((SECONDS - start)) s)"
