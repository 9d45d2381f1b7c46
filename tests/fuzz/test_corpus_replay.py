"""The fuzz corpus (tests/fuzz/corpus/TARGET/*: what atheris found worth keeping),
replayed through the same targets as an ordinary test, without atheris: what once
passed keeps passing (as native/tests/fuzz_corpus.rs does for the Rust targets)."""

from __future__ import annotations

import importlib

import fuzzing
import pytest

TARGETS = (
    "vfio_user",
    "vfio_user_framing",
    "vfio_user_server",
    "prp",
    "sgl",
    "nvme_controller",
    "control",
    "namespace_spec",
)


def test_every_target_has_a_corpus() -> None:
    on_disk = {d.name for d in fuzzing.CORPUS.iterdir() if d.is_dir()}
    assert on_disk == set(TARGETS)
    found = {p.stem.removeprefix("fuzz_") for p in fuzzing.HERE.glob("fuzz_*.py")}
    assert found == set(TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replay(target: str) -> None:
    run = importlib.import_module(f"fuzz_{target}").fuzz
    inputs = sorted((fuzzing.CORPUS / target).iterdir())
    assert inputs, f"{target}: an empty corpus"
    for path in inputs:
        try:
            run(path.read_bytes())
        except Exception as exc:
            raise AssertionError(f"{target}: {path.name}: {exc!r}") from exc
