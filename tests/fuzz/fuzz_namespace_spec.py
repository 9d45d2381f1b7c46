#!/usr/bin/env python3
"""Fuzz target `namespace_spec`: the parsers of what users write in config.py:
namespace specs (NamespaceSpec.parse), sizes (parse_size) and CPU lists
(parse_cpu_list), as they come from a command line, a TOML file or the control
socket.

Input: a mode byte (bits 0-1: which parser; bit 2: bs=4096 by default; bit 3:
read-only by default), then the text (UTF-8; undecodable bytes as a command line's
surrogate escapes).

Invariants: each parser returns a value or raises ConfigError, with a message of one
line, nothing else; a spec reads back from its text() as itself; a size is a byte
count that size_text() writes so that it reads back the same; a CPU list is a
non-empty set of CPU numbers within the bound config.py sets.
"""

from __future__ import annotations

import dataclasses
import sys

import fuzzing

with fuzzing.instrumented(__name__):
    from nvme_mdev import config
    from nvme_mdev.config import ConfigError, NamespaceSpec

_MAX_CPU = getattr(config, "MAX_CPU", 8191)
_MAX_BYTES = getattr(config, "MAX_BYTES", (1 << 63) - 1)


def _spec(text: str, block_size: int, readonly: bool) -> None:
    spec = NamespaceSpec.parse(text, block_size=block_size, readonly=readonly)
    assert spec.path and "," not in spec.path, spec
    assert spec.block_size in (512, 4096), spec
    assert spec.readonly or not readonly, spec
    written = spec.text()
    again = NamespaceSpec.parse(written)
    if spec.passthrough:  # the host's LBA format: bs is not part of the text
        again = dataclasses.replace(again, block_size=spec.block_size)
    assert again == spec, f"{text!r} -> {spec} -> {written!r} -> {again}"
    assert again.text() == written


def _size(text: str) -> None:
    n = config.parse_size(text)
    assert 0 <= n <= _MAX_BYTES, n
    assert config.parse_size(config.size_text(n)) == n, (n, config.size_text(n))


def _cpus(text: str) -> None:
    cpus = config.parse_cpu_list(text)
    assert cpus and all(0 <= c <= _MAX_CPU for c in cpus), sorted(cpus)[:4]


def fuzz(data: bytes) -> None:
    if not data:
        return
    mode = data[0]
    text = data[1:].decode("utf-8", "surrogateescape")
    try:
        if mode & 3 == 0 or mode & 3 == 3:
            _spec(text, 4096 if mode & 4 else 512, bool(mode & 8))
        elif mode & 3 == 1:
            _size(text)
        else:
            _cpus(text)
    except ConfigError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)


if __name__ == "__main__":
    fuzzing.main(fuzz)
    sys.exit(0)
