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
WRITES are `offset:bytes` into guest RAM (BASE, 2 MiB, zero elsewhere); RESULT
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
from nvme_mdev.nvme.sgl import BIT_BUCKET, MAX_DESCRIPTORS, sgl_segments

BASE = 0x10_0000
PAGE = 4096
PAGES = 512  # 2 MiB: room for a segment longer than the descriptor budget
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
    """A PRP1/PRP2 pair over a PRP list that is mostly right: its entries page aligned,
    chained to another list page when it reaches a page's last slot (a list placed
    near the end of a page chains early), with one thing wrong now and then."""
    ram = Ram()
    length = _length(rng)
    prp1 = _address(rng, rng.choice([PAGE, 512, 4]))
    if rng.random() < 0.4:  # a list a few slots before its page ends
        list_addr = BASE + rng.randrange(0, SIZE, PAGE) + PAGE - 8 * rng.randrange(1, 5)
    else:
        list_addr = _address(rng, rng.choice([PAGE, 8, 8, 4]))
    addr, pages = list_addr, length // PAGE + 2
    while pages > 0 and BASE <= addr < BASE + SIZE:
        if (addr + 8) % PAGE == 0 and pages > 1:  # the last slot: chain to the next list
            addr_next = BASE + rng.randrange(0, SIZE, PAGE) + rng.choice([0, 0, 0, 0, 8])
            ram.put(addr, struct.pack("<Q", addr_next))
            addr = addr_next
            continue
        entry = _address(rng, PAGE) if rng.random() < 0.95 else _address(rng, 8)
        ram.put(addr, struct.pack("<Q", entry))
        addr, pages = addr + 8, pages - 1
    prp2 = list_addr if rng.random() < 0.85 else _address(rng, PAGE)
    return f"P {prp1:x} {prp2:x} {length:x}", ram


def _pack(addr: int, dlen: int, ident: int) -> bytes:
    return struct.pack("<QIxxxB", addr % (1 << 64), dlen % (1 << 32), ident)


def _spot(rng: random.Random, count: int) -> int:
    """Room for `count` descriptors in RAM, 16-byte aligned."""
    return BASE + rng.randrange(0, SIZE - 16 * count, 16)


def sgl_case(rng: random.Random) -> tuple[str, Ram]:
    """SGL Entry 1 and the segments it leads to: a valid list of data blocks (and bit
    buckets) for the transfer, spread over segments of 1 to 600 descriptors (so longer
    than a read chunk of 256), then one thing made wrong more often than not."""
    ram = Ram()
    length = _length(rng)
    to_guest, dword = rng.random() < 0.5, rng.random() < 0.3
    # The data: blocks that add up to the length, a bucket now and then.
    blocks: list[tuple[int, int, int]] = []
    left = length + rng.choice([0, 0, 0, 512])  # a list may describe more than needed
    while left > 0:
        n = min(left, rng.choice([4, 512, PAGE, 3 * PAGE, rng.randrange(1, 2 * PAGE)]))
        if rng.random() < 0.1:
            blocks.append((0, n, 0x10))
            left -= n if to_guest else 0
        else:
            blocks.append((BASE + rng.randrange(0, SIZE, rng.choice([4, 512, PAGE])), n, 0x00))
            left -= n
        if len(blocks) > 900:
            break
    # Segments: each but the last ends with a Segment descriptor to the next one.
    groups: list[list[tuple[int, int, int]]] = []
    while blocks:
        k = rng.choice([1, 2, 3, 5, 300, 600]) if rng.random() < 0.9 else len(blocks)
        groups.append(blocks[:k])
        blocks = blocks[k:]
    corruption = rng.random()
    descs: list[list[tuple[int, int, int]]] = [list(g) for g in groups]
    spots = [_spot(rng, len(g) + 1) for g in descs]
    for i in range(len(descs) - 1):
        last = i == len(descs) - 2
        descs[i].append((spots[i + 1], 16 * len(descs[i + 1]), 0x30 if last else 0x20))
    if descs and corruption < 0.6:
        g = rng.randrange(len(descs))
        d = rng.randrange(len(descs[g]))
        a, n, ident = descs[g][d]
        kind = rng.randrange(11)
        if kind == 0:
            ident = rng.choice([0x01, 0x0A, 0x40, 0x50, 0xF0, 0x21, 0x31, 0x11])
        elif kind == 1:
            a |= rng.choice([1, 2, 3])  # misaligned: a data block under dword granularity
        elif kind == 2:
            n = rng.choice([0, 8, 17, 0xFFFF_FFF0, 0xFFFF_FFFF])
        elif kind == 3:
            a = (1 << 64) - rng.choice([16, PAGE, 1])
        elif kind == 4:  # unmapped: a segment read there fails
            if g < len(descs) - 1:
                d = len(descs[g]) - 1
                a, n, ident = descs[g][d]
            a = rng.choice([0, BASE - PAGE, BASE + SIZE - 16, 1 << 40])
        elif kind == 5 and len(descs[g]) > 1:  # a segment descriptor mid-segment
            descs[g][rng.randrange(len(descs[g]) - 1)] = (spots[g], 16, 0x20)
        elif kind == 6:  # a loop: back to the first segment
            descs[g][-1] = (spots[0], 16 * len(descs[0]), rng.choice([0x20, 0x30]))
        elif kind == 7:  # a Last Segment descriptor inside the last segment
            descs[-1][-1] = (spots[0], 16, 0x30)
        elif kind == 8:  # endless zero-length data blocks: past the descriptor budget
            zeros = BASE + SIZE - 16 * (MAX_DESCRIPTORS + 4096)
            a, n, ident = zeros, 16 * (MAX_DESCRIPTORS + 4096) - 16, 0x20
        elif kind == 9:
            n = max(0, n - rng.choice([1, 512]))  # the list falls short
        else:
            ident = rng.choice([0x20, 0x30])  # a data block turned into a segment
        descs[g][d] = (a, n, ident) if kind not in (5, 6, 7) else descs[g][d]
    for spot, group in zip(spots[1:], descs[1:], strict=True):
        ram.put(spot, b"".join(_pack(*x) for x in group))
    # SGL Entry 1: the first segment's only descriptor, or a pointer to the segment.
    if descs and len(descs[0]) == 1:
        addr, dlen, ident = descs[0][0]
    elif descs:
        ram.put(spots[0], b"".join(_pack(*x) for x in descs[0]))
        addr, dlen, ident = spots[0], 16 * len(descs[0]), rng.choice([0x20, 0x30])
    else:
        addr, dlen, ident = _address(rng, 4), 0, 0x00
    addr, dlen = addr % (1 << 64), dlen % (1 << 32)
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


def edge_cases() -> list[tuple[str, Ram]]:
    """SGLs at the edges random ones rarely reach."""
    cases = []
    # Exactly the descriptor budget (65535 empty data blocks, then the data), and one more.
    for extra in (0, 1):
        ram = Ram()
        count = MAX_DESCRIPTORS + extra
        ram.put(BASE + 16 * (count - 1), _pack(BASE, 512, 0x00))
        cases.append((f"S {BASE:x} {16 * count:x} 30 200 0 0", ram))
    # A short segment that ends where RAM does (a walker reading past it would fail).
    ram = Ram()
    end = BASE + SIZE - 32
    ram.put(end, _pack(BASE, 256, 0x00) + _pack(BASE + PAGE, 256, 0x00))
    cases.append((f"S {end:x} 20 30 200 1 0", ram))
    # A segment longer than a read chunk (256 descriptors) that ends where RAM does.
    ram = Ram()
    count = 300
    long = BASE + SIZE - 16 * count
    ram.put(long, b"".join(_pack(BASE + 16 * i, 16, 0x00) for i in range(count)))
    cases.append((f"S {long:x} {16 * count:x} 30 {16 * count:x} 1 0", ram))
    # Segments at the top of the address space: ending at 2^64, past it, and one whose
    # address times its length (not plus) would pass 2^64.
    for addr, dlen in (((1 << 64) - 16, 16), ((1 << 64) - 16, 32), (1 << 40, 0x200_0000)):
        cases.append((f"S {addr:x} {dlen:x} 30 200 1 0", Ram()))
    # Dword granularity: data blocks whose address and length are misaligned alike, or
    # together make 3; as SGL Entry 1 and inside a segment.
    for addr, dlen in ((BASE + 1, 1), (1, 2), (BASE + 2, 6)):
        cases.append((f"S {addr:x} {dlen:x} 0 {dlen:x} 1 1", Ram()))
        ram = Ram()
        ram.put(BASE, _pack(addr, dlen, 0x00))
        cases.append((f"S {BASE:x} 10 30 {dlen:x} 1 1", ram))
    return cases


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
    for line, ram in edge_cases():
        writes = " ".join(f"{offset:x}:{data.hex()}" for offset, data in ram.writes)
        lines.append(f"{line} ; {writes} ; {outcome(line, ram)}")
    return "\n".join(lines + media_cases()) + "\n"


if __name__ == "__main__":
    sys.stdout.write(vectors())
