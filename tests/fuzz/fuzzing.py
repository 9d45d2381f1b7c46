"""What the fuzz targets share: the import path (the unit tests' fakes), atheris when a
target runs as a script, and the corpus replay's view of the targets.

A target module (fuzz_*.py) defines `fuzz(data: bytes) -> None`, which returns
quietly for every input and raises AssertionError when an invariant breaks (any
other exception escaping is a finding too). Run as a script it is an atheris
fuzzer (libFuzzer's flags, see README.md); imported (tests/fuzz/test_corpus_replay.py)
it is a plain function, no atheris needed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
CORPUS = HERE / "corpus"

for _path in (ROOT / "src", TESTS / "unit" / "vfio_user", TESTS / "unit" / "nvme"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@contextlib.contextmanager
def instrumented(module_name: str) -> Iterator[None]:
    """Imports inside this block get atheris's coverage instrumentation when the
    target runs as a script (`module_name` is then "__main__"); otherwise nothing."""
    if module_name != "__main__":
        yield
        return
    import atheris

    with atheris.instrument_imports(include=["nvme_mdev"]):
        yield


def main(target: Callable[[bytes], None]) -> None:
    """libFuzzer's main loop over `target` (command-line flags as libFuzzer's)."""
    import atheris

    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


class Input:
    """Consumes a fuzz input front to back; past its end every read gives zeros, so
    that any input is a valid one (libFuzzer mutates bytes, not structures)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        """The next `n` bytes (fewer at the end)."""
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def number(self, n: int) -> int:
        """The next `n` bytes as a little-endian number (0 past the end)."""
        return int.from_bytes(self.take(n), "little")

    def u8(self) -> int:
        return self.number(1)

    def u16(self) -> int:
        return self.number(2)

    def u32(self) -> int:
        return self.number(4)

    def u64(self) -> int:
        return self.number(8)

    def rest(self) -> bytes:
        return self.take(self.remaining())


@contextlib.contextmanager
def logs_to(name: str, level: int, handler: logging.Handler | None = None) -> Iterator[None]:
    """For the block: logger `name` at `level`, its records to `handler` only (or to
    nobody); as it was afterwards (the corpus replay shares its process with tests
    that read logs)."""
    logger = logging.getLogger(name)
    saved = logger.level, logger.propagate, list(logger.handlers)
    logger.setLevel(level)
    logger.propagate = False
    logger.handlers = [handler] if handler is not None else [logging.NullHandler()]
    try:
        yield
    finally:
        logger.level, logger.propagate, logger.handlers = saved
