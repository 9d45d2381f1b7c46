"""Namespaces (NVMe Base 3.2.1): a range of logical blocks on a backend slice."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..backends.base import Backend
from .errors import CommandError
from .spec import Status

SUPPORTED_BLOCK_SIZES = (512, 4096)


@dataclass
class Namespace:
    nsid: int
    backend: Backend
    block_size: int = 512
    readonly: bool = False
    #: stable identity for the guest (udev's by-id links): derived from what it names
    uuid: bytes = field(default=b"")
    nguid: bytes = field(default=b"")
    eui64: bytes = field(default=b"")
    #: why the storage is gone (media_errors.GONE): every command fails at once
    failure: str | None = field(default=None, init=False)
    #: why the storage went read-only under a writable namespace (EROFS)
    host_read_only: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block size {self.block_size}: must be 512 or 4096")
        if self.backend.block_size > self.block_size:
            raise ValueError(
                f"{self.backend.description}: the storage needs {self.backend.block_size}-byte "
                f"blocks, larger than the namespace's {self.block_size}"
            )
        if self.backend.size < self.block_size:
            raise ValueError(f"{self.backend.description}: smaller than one block")
        self.readonly = self.readonly or self.backend.readonly
        #: the guest's I/O commands go to the host's NVMe namespace as they are
        #: (backends/passthrough.py), not through the backend's reads and writes
        self.passthrough = bool(getattr(self.backend, "passthrough", False))
        if self.passthrough and self.block_size != self.backend.block_size:
            raise ValueError(
                f"{self.backend.description}: passthrough keeps the host's "
                f"{self.backend.block_size}-byte blocks, not {self.block_size}"
            )
        self.lba_shift = self.block_size.bit_length() - 1
        self.blocks = self.backend.size >> self.lba_shift
        digest = hashlib.sha256(f"{self.backend.description}\0{self.nsid}".encode()).digest()
        if not self.uuid:
            # RFC 4122 variant, version 5-style bits, from the digest
            raw = bytearray(digest[:16])
            raw[6] = (raw[6] & 0x0F) | 0x50
            raw[8] = (raw[8] & 0x3F) | 0x80
            self.uuid = bytes(raw)
        if not self.nguid:
            self.nguid = digest[16:32]
        if not self.eui64:
            self.eui64 = digest[8:16]

    def resize(self, size: int) -> bool:
        """The storage now holds `size` bytes (a rescan): the namespace has as many whole
        blocks (a partial last block is left out). True if the block count changed."""
        blocks = size >> self.lba_shift
        changed = blocks != self.blocks
        self.backend.size = size
        self.blocks = blocks
        return changed

    def byte_range(self, slba: int, nlb: int) -> tuple[int, int]:
        """(offset, length) in the backend of `nlb` blocks from `slba`; LBA Out of Range if
        any of them lies past the end of the namespace."""
        if slba + nlb > self.blocks:
            raise CommandError(Status.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb} > {self.blocks}")
        return slba << self.lba_shift, nlb << self.lba_shift
