"""Namespace specifications as users write them, checked before anything opens.

A spec is a path with optional comma-separated options:
    disk.img              a regular file (a disk image)
    /dev/sdb2,ro          a block device or partition, read-only
    big.img,bs=4096       4 KiB logical blocks
    null:1G               no storage (benchmarks): reads leave the buffer, writes vanish
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .backends.base import Backend
from .backends.file import BackendError, FileBackend, NullBackend
from .nvme.namespace import SUPPORTED_BLOCK_SIZES, Namespace


class ConfigError(Exception):
    """A configuration mistake; the message says what to fix, on one line."""


_SIZE = re.compile(r"^(\d+)([KMGT]?)i?B?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if not match:
        raise ConfigError(f"{text!r}: not a size (examples: 512M, 4G, 1073741824)")
    number, unit = match.groups()
    return int(number) << (10 * "KMGT".find(unit.upper()) + 10 if unit else 0)


@dataclass(frozen=True)
class NamespaceSpec:
    path: str
    readonly: bool = False
    block_size: int = 512

    @classmethod
    def parse(cls, text: str, block_size: int = 512, readonly: bool = False) -> NamespaceSpec:
        path, *options = text.split(",")
        if not path:
            raise ConfigError(f"{text!r}: empty path")
        for option in options:
            key, _, value = option.partition("=")
            if key == "ro" and not value:
                readonly = True
            elif key == "bs" and value.isdigit():
                block_size = int(value)
            else:
                raise ConfigError(f"{text!r}: unknown option {option!r} (known: ro, bs=512|4096)")
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ConfigError(f"{text!r}: block size {block_size}; use 512 or 4096")
        return cls(path, readonly, block_size)

    def open(self, nsid: int) -> Namespace:
        backend: Backend
        if self.path.startswith("null:"):
            backend = NullBackend(parse_size(self.path[5:]))
        else:
            try:
                backend = FileBackend(self.path, readonly=self.readonly)
            except BackendError as exc:
                raise ConfigError(str(exc)) from exc
        try:
            return Namespace(nsid, backend, self.block_size, self.readonly)
        except ValueError as exc:
            backend.close()
            raise ConfigError(f"{self.path}: {exc}") from exc
