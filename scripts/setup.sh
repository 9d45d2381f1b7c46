#!/usr/bin/env bash
# Creates .venv with nvme-mdev and its development tools (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found: the native data plane (native/) needs a Rust toolchain (rustup)" >&2
    exit 1
fi
stamp=.venv/.installed
# Installed again (and the crate rebuilt) when the package's definition or the crate changed.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] ||
    [ -n "$(find native/src native/Cargo.toml native/Cargo.lock -newer "$stamp" 2>/dev/null | head -1)" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
# Debian packages, as root: fio for `nvme-mdev bench` (native rows; without it the bench
# runs the device alone); fuse3 (libfuse3, fusermount3) for the crash-consistency tests
# (tests/integration/test_durability.py mounts a FUSE filesystem; without it they skip);
# librbd1 for rbd: namespaces (Ceph RBD images), and ceph-mon, ceph-osd, ceph-common for
# the tests and scripts/bench-rbd.sh, which run a one-node Ceph cluster
# (tools/ceph_cluster.py; without them the tests skip).
missing=()
command -v fio >/dev/null 2>&1 || missing+=(fio)
command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
dpkg -s librbd1 >/dev/null 2>&1 || missing+=(librbd1)
command -v ceph-mon >/dev/null 2>&1 || missing+=(ceph-mon)
command -v ceph-osd >/dev/null 2>&1 || missing+=(ceph-osd)
command -v rbd >/dev/null 2>&1 || missing+=(ceph-common)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } ||
        echo "setup: could not install ${missing[*]} (bench without native rows," \
            "crash-consistency and Ceph tests skipped, no rbd: namespaces)" >&2
fi
