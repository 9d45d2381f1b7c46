"""Test vectors for the native crate's PRP and SGL walkers and its media-error table,
made by the reference.

The Python modules (nvme/prp.py, nvme/sgl.py, nvme/media_errors.py) are the reference
the crate's (native/src/prp.rs, sgl.rs, media_errors.rs) are held to. The differential
tests compare the two through Python; these vectors let `cargo test` do it alone
(native/tests/walker_vectors.rs), so a mutation tester on the crate sees a broken check
fail.
tests/unit/test_walker_vectors.py keeps the committed file equal to what the
reference says today.

    python tools/walker_vectors.py > native/tests/walker_vectors.txt

One case per line, numbers in hex:
    P prp1 prp2 length ; WRITES ; RESULT
    S addr dlen ident length to_guest dword ; WRITES ; RESULT
    M errno writing past_end block_device store_size probe_errno ; ; FAILURE
WRITES are `offset:bytes` into guest RAM (BASE, 16 pages, zero elsewhere); RESULT
is `ok` and the segments (`addr+len`, or `b+len` for a bit bucket) or `err STATUS`.
A store's size probe fails with probe_errno unless it is 0; FAILURE is `fail STATUS`
and the flags DNR, media, gone, read only as 0/1.
"""

from __future__ import annotations

import errno
import random
import struct
import sys

from nvme_mdev.backends.file import EndOfStorage
from nvme_mdev.guest_memory import DmaError
from nvme_mdev.nvme import media_errors
from nvme_mdev.nvme.errors import CommandError
from nvme_mdev.nvme.prp import prp_segments
from nvme_mdev.nvme.sgl import BIT_BUCKET, sgl_segments

BASE = 0x10_0000
PAGE = 4096
PAGES = 16
SIZE = PAGES * PAGE
SEED = 20261203
CASES = 900


class Ram:
    """Guest RAM at [BASE, BASE + SIZE); anything else is unmapped."""

    def __init__(self) -> None:
        self.ram = bytearray(SIZE)
        self.writes: list[tuple[int, bytes]] = []

    def put(self, addr: int, data: bytes) -> None:
        offset = addr - BASE
        if offset >= 0 and offset + len(data) <= SIZE:
            self.ram[offset : offset + len(data)] = data
            self.writes.append((offset, data))

    def read(self, addr: int, length: int) -> bytes:
        if addr < BASE or addr + length > BASE + SIZE:
            raise DmaError(f"{addr:#x}+{length:#x} is not mapped")
        return bytes(self.ram[addr - BASE : addr - BASE + length])


def _address(rng: random.Random, align: int) -> int:
    """Mostly inside RAM at `align`; sometimes misaligned, outside, or near 2^64."""
    roll = rng.random()
    if roll < 0.75:
        return BASE + rng.randrange(0, SIZE, align)
    if roll < 0.85:
        return BASE + rng.randrange(SIZE)
    if roll < 0.95:
        return rng.choice([0, BASE - PAGE, BASE + SIZE, 1 << 40])
    return (1 << 64) - rng.choice([PAGE, 16, 1])


def _length(rng: random.Random) -> int:
    if rng.random() < 0.5:
        return rng.choice([0, 1, 4, 511, 512, PAGE - 4, PAGE, PAGE + 512, 2 * PAGE, 9 * PAGE])
    return rng.randrange(1, 12 * PAGE)


def prp_case(rng: random.Random) -> tuple[str, Ram]:
    ram = Ram()
    length = _length(rng)
    prp1 = _address(rng, rng.choice([PAGE, 512, 4]))
    list_addr = _address(rng, rng.choice([PAGE, 8, 8, 4]))
    # A PRP list (which may run onto the next page, chaining) of mostly valid entries.
    addr = list_addr
    for _ in range(rng.randrange(0, 24)):
        entry = _address(rng, PAGE) if rng.random() < 0.9 else _address(rng, 8)
        if rng.random() < 0.1:  # jump: where the walker reads a chain pointer
            addr = BASE + rng.randrange(PAGE - 16, SIZE, PAGE) + rng.choice([0, 8])
        ram.put(addr, struct.pack("<Q", entry))
        addr += 8
    prp2 = list_addr if rng.random() < 0.8 else _address(rng, PAGE)
    return f"P {prp1:x} {prp2:x} {length:x}", ram


def _descriptor(rng: random.Random, segments: list[int]) -> bytes:
    roll = rng.random()
    if roll < 0.55:  # a data block
        addr, dlen, ident = _address(rng, rng.choice([1, 4])), rng.randrange(0, 3 * PAGE), 0x00
    elif roll < 0.65:
        addr, dlen, ident = 0, rng.randrange(0, 2 * PAGE), 0x10  # a bit bucket
    elif roll < 0.9:  # a segment or last segment, mostly to one of ours
        addr = rng.choice(segments) if rng.random() < 0.85 else _address(rng, rng.choice([8, 4]))
        dlen = 16 * rng.randrange(1, 6) if rng.random() < 0.9 else rng.randrange(0, 96)
        ident = rng.choice([0x20, 0x30])
    else:  # reserved types and sub types
        addr, dlen = _address(rng, 16), rng.randrange(0, PAGE)
        ident = rng.choice([0x40, 0x50, 0xF0, 0x01, 0x0A, 0x21, 0x31])
    if rng.random() < 0.03:
        dlen = 0xFFFF_FFFF
    return struct.pack("<QIxxxB", addr, dlen, ident)


def sgl_case(rng: random.Random) -> tuple[str, Ram]:
    ram = Ram()
    length = _length(rng)
    segments = [BASE + rng.randrange(0, SIZE - 256, 16) for _ in range(rng.randrange(1, 5))]
    for seg in segments:
        ram.put(seg, b"".join(_descriptor(rng, segments) for _ in range(rng.randrange(1, 6))))
    addr, dlen, ident = struct.unpack("<QIxxxB", _descriptor(rng, segments))
    to_guest, dword = rng.random() < 0.5, rng.random() < 0.3
    return f"S {addr:x} {dlen:x} {ident:x} {length:x} {int(to_guest)} {int(dword)}", ram


def outcome(line: str, ram: Ram) -> str:
    fields = line.split()
    try:
        if fields[0] == "P":
            prp1, prp2, length = (int(x, 16) for x in fields[1:4])
            segments = prp_segments(ram, prp1, prp2, length)  # type: ignore[arg-type]
        else:
            addr, dlen, ident, length = (int(x, 16) for x in fields[1:5])
            to_guest, dword = fields[5] == "1", fields[6] == "1"
            dw = (0, 0, 0, 0, 0, 0, addr & 0xFFFF_FFFF, addr >> 32, dlen, ident << 24)
            segments = sgl_segments(ram, dw, length, to_guest, dword)  # type: ignore[arg-type]
    except CommandError as exc:
        return f"err {int(exc.status):x}"
    return " ".join(
        ["ok"] + [f"b+{n:x}" if a == BIT_BUCKET else f"{a:x}+{n:x}" for a, n in segments]
    )


class Store:
    """A backend as media_errors.classify asks it about its size."""

    def __init__(self, block_device: bool, size: int, probe: int) -> None:
        self.is_block_device = block_device
        self._size, self._probe = size, probe

    def store_size(self) -> int:
        if self._probe:
            raise OSError(self._probe, "probe")
        return self._size


#: every errno the table names, and some it does not
ERRNOS = [
    *(errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES),
    *(errno.EPERM, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.EBUSY, errno.ENODEV),
    *(errno.ENXIO, errno.ESTALE, errno.ENOTCONN, errno.ESHUTDOWN, errno.EBADF),
    *(errno.EINVAL, errno.EFAULT, errno.ENOMEM, 512),
]


def media_cases() -> list[str]:
    lines = []
    for code in ERRNOS:
        for writing in (False, True):
            for past_end in (False, True) if code == errno.EIO else (False,):
                for block_device in (False, True):
                    for size, probe in ((1 << 20, 0), (0, 0), (0, errno.ENXIO), (0, errno.EIO)):
                        exc = EndOfStorage(0) if past_end else OSError(code, "x")
                        store = Store(block_device, size, probe)
                        f = media_errors.classify(exc, writing, store)  # type: ignore[arg-type]
                        flags = (f.dnr, f.media, f.gone, f.read_only)
                        lines.append(
                            f"M {code:x} {int(writing)} {int(past_end)} {int(block_device)} "
                            f"{size:x} {probe:x} ;  ; fail {int(f.status):x} "
                            + " ".join(str(int(x)) for x in flags)
                        )
    return lines


def vectors() -> str:
    rng = random.Random(SEED)
    lines = []
    for i in range(CASES):
        line, ram = (prp_case if i % 3 == 0 else sgl_case)(rng)
        writes = " ".join(f"{offset:x}:{data.hex()}" for offset, data in ram.writes)
        lines.append(f"{line} ; {writes} ; {outcome(line, ram)}")
    return "\n".join(lines + media_cases()) + "\n"


if __name__ == "__main__":
    sys.stdout.write(vectors())
