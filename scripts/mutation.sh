#!/usr/bin/env bash
# Mutation testing, not part of CI (it takes an hour or more on two cores): breaks the
# code one small change at a time and reports each change no test noticed.
#   Python: mutmut over the modules in pyproject.toml's [tool.mutmut] (the ones whose
#           mistakes lose or misplace data), against the unit and durability tests.
#   Rust:   cargo-mutants over the crate's parsers of guest input and its error table
#           (prp.rs, sgl.rs, media_errors.rs; more with -f), against `cargo test`.
# scripts/mutation.sh [python|rust] [extra cargo-mutants arguments]
# Results: mutants/ (`.venv/bin/mutmut results`), native/mutants.out/.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-python}"
shift || true
scripts/setup.sh
case "$which" in
python)
    .venv/bin/python -m pip install -q -e '.[mutation]'
    rm -rf mutants
    .venv/bin/mutmut run --max-children "$(nproc)"
    .venv/bin/mutmut results
    ;;
rust)
    cargo mutants --version >/dev/null 2>&1 || cargo install --locked cargo-mutants@27.1.0
    cd native
    PYO3_PYTHON="$PWD/../.venv/bin/python" cargo mutants -j 1 --timeout 120 \
        -f src/prp.rs -f src/sgl.rs -f src/media_errors.rs "$@"
    ;;
*)
    echo "usage: $0 [python|rust]" >&2
    exit 2
    ;;
esac
