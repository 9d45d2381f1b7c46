#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the whole test suite:
# lint and types (Python and the native crate), the crate's own tests (with its fuzz
# corpus replayed), unit and conformance tests against both data planes, and the
# end-to-end tests with a real QEMU and Linux guest (prepared once by
# tools/guest/prepare.sh, then cached).
# Pass pytest arguments to narrow it, e.g. scripts/test.sh -m 'not e2e'.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
(
    cd native
    # rustfmt and clippy come with rustup's default profile; a minimal one lacks them.
    cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1 ||
        rustup component add rustfmt clippy
    # The crate's tests link libpython: the one the package is built for.
    export PYO3_PYTHON="$PWD/../.venv/bin/python"
    cargo fmt --check
    cargo clippy --release --all-targets --locked -- -D warnings
    cargo test --release --locked
)
if [ "$(id -u)" = 0 ]; then
    tools/guest/prepare.sh
fi
exec .venv/bin/python -m pytest "$@"
