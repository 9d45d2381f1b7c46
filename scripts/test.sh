#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the whole test suite:
# lint, types, unit and conformance tests, and the end-to-end test with a real
# QEMU and Linux guest (prepared once by tools/guest/prepare.sh, then cached).
# Pass pytest arguments to narrow it, e.g. scripts/test.sh -m 'not e2e'.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
if [ "$(id -u)" = 0 ]; then
    tools/guest/prepare.sh
fi
exec .venv/bin/python -m pytest "$@"
