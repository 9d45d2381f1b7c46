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
# fio for `nvme-mdev bench` (native rows); without it the bench runs the device alone.
if ! command -v fio >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q fio >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && apt-get install -y -q fio >/dev/null; } ||
        echo "setup: could not install fio (nvme-mdev bench will run without native rows)" >&2
fi
