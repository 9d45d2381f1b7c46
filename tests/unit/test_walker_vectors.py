"""native/tests/walker_vectors.txt, which `cargo test` replays against the crate's PRP
and SGL walkers, is what the Python reference says today (tools/walker_vectors.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_vectors_are_the_reference_answers() -> None:
    made = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "walker_vectors.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    committed = (ROOT / "native" / "tests" / "walker_vectors.txt").read_text()
    assert made == committed, (
        "regenerate: python tools/walker_vectors.py > native/tests/walker_vectors.txt"
    )
    results = [line.rsplit(" ; ", 1)[1] for line in made.splitlines()]
    statuses = {r.split()[1] for r in results if r.startswith("err ")}
    # Every kind of answer is there: segments (bit buckets among them), and each status
    # the walkers give (Data Transfer Error, Invalid SGL Segment Descriptor, Invalid
    # Number of SGL Descriptors, Data SGL Length Invalid, SGL Descriptor Type Invalid,
    # PRP Offset Invalid, SGL Data Block Granularity Invalid).
    assert {"4", "d", "e", "f", "11", "13", "1e"} <= statuses
    assert any(" b+" in r for r in results)
    assert sum(r.startswith("ok ") for r in results) > len(results) // 4
