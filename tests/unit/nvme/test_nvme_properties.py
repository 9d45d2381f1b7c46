"""Property tests: PRP walking against a reference model, and random submission queue
entries through the admin and I/O paths (the controller must answer every command
exactly once and never crash)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from harness import PAGE, UNMAPPED, FakeGuestMemory, Host, make_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvme_mdev.backends.file import FileBackend
from nvme_mdev.guest_memory import DmaError
from nvme_mdev.nvme.errors import CommandError
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.prp import prp_segments
from nvme_mdev.nvme.spec import AdminOpcode, FeatureId, Status

#: scale the example counts up for a long bug hunt: NVME_FUZZ_SCALE=50
SCALE = int(os.environ.get("NVME_FUZZ_SCALE", "1"))
BASE = 0x100000
MEM_PAGES = 16
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, (1 << 64) - 1)


# --- PRP walking ---------------------------------------------------------------------


def addresses(pages: int, base: int = BASE) -> st.SearchStrategy[int]:
    """Guest addresses that matter: page aligned in memory, with offsets (dword, qword
    or odd), just outside memory, unmapped, anything."""
    page = st.integers(0, pages - 1).map(lambda i: base + i * PAGE)
    return st.one_of(
        page,
        page,
        st.tuples(page, st.sampled_from([4, 8, 0x200, PAGE - 8, PAGE - 16])).map(sum),
        st.tuples(page, st.integers(1, PAGE - 1)).map(sum),
        st.sampled_from([0, base - PAGE, base + pages * PAGE, UNMAPPED]),
        U64,
    )


def reference_chunks(
    memory: FakeGuestMemory, prp1: int, prp2: int, length: int
) -> list[tuple[int, int]]:
    """A straightforward reading of the PRP rules: one entry at a time, page-sized chunks."""
    if prp1 & 3:
        raise CommandError(Status.PRP_OFFSET_INVALID)
    first = min(length, PAGE - prp1 % PAGE)
    chunks = [(prp1, first)]
    rest = length - first
    if rest == 0:
        return chunks
    if rest <= PAGE:
        if prp2 % PAGE:
            raise CommandError(Status.PRP_OFFSET_INVALID)
        return [*chunks, (prp2, rest)]
    if prp2 & 7:
        raise CommandError(Status.PRP_OFFSET_INVALID)
    ptr = prp2
    while rest:
        try:
            (entry,) = struct.unpack("<Q", memory.read(ptr, 8))
        except DmaError as exc:
            raise CommandError(Status.DATA_TRANSFER_ERROR) from exc
        if (ptr + 8) % PAGE == 0 and rest > PAGE:  # the last slot of a list page chains
            if entry % PAGE:
                raise CommandError(Status.PRP_OFFSET_INVALID)
            ptr = entry
            continue
        if entry % PAGE:
            raise CommandError(Status.PRP_OFFSET_INVALID)
        n = min(PAGE, rest)
        chunks.append((entry, n))
        rest -= n
        ptr += 8
    return chunks


def page_chunks(segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for addr, length in segments:
        while length:
            n = min(length, PAGE - addr % PAGE)
            out.append((addr, n))
            addr, length = addr + n, length - n
    return out


@settings(max_examples=200 * SCALE, deadline=None)
@given(
    prp1=addresses(MEM_PAGES),
    prp2=addresses(MEM_PAGES),
    length=st.one_of(
        st.integers(1, 3 * PAGE), st.integers(1, 40 * PAGE), st.integers(500 * PAGE, 1100 * PAGE)
    ),
    pool=st.lists(addresses(MEM_PAGES), min_size=1, max_size=24),
    stride=st.integers(1, 7),
)
def test_prp_segments_match_the_reference(
    prp1: int, prp2: int, length: int, pool: list[int], stride: int
) -> None:
    memory = FakeGuestMemory(MEM_PAGES * PAGE, BASE)
    entries = [pool[(i * stride) % len(pool)] for i in range(MEM_PAGES * PAGE // 8)]
    memory.write(BASE, struct.pack(f"<{len(entries)}Q", *entries))
    try:
        expected = reference_chunks(memory, prp1, prp2, length)
    except CommandError:
        expected = None
    try:
        segments = prp_segments(memory, prp1, prp2, length)
    except CommandError as err:
        assert err.status in (Status.PRP_OFFSET_INVALID, Status.DATA_TRANSFER_ERROR)
        assert expected is None, "the reference walked this PRP list"
        return
    assert expected is not None, "the reference refused this PRP list"
    assert sum(n for _, n in segments) == length
    assert segments[0][0] == prp1
    assert all(n > 0 for _, n in segments)
    assert all(addr % PAGE == 0 for addr, _ in segments[1:])
    assert page_chunks(segments) == expected


# --- random commands --------------------------------------------------------------------

FUZZ_PAGES = 16


def fuzz_host(tmp: Path, bounce: bool = False) -> tuple[Host, int, list[FileBackend]]:
    backends = [
        FileBackend(str(make_file(tmp / "a.img", 64 << 10))),
        FileBackend(str(make_file(tmp / "b.img", 64 << 10))),
    ]
    h = Host([Namespace(1, backends[0]), Namespace(2, backends[1], block_size=4096)])
    h.memory.zero_copy = not bounce
    h.enable()
    area = h.alloc(FUZZ_PAGES * PAGE)
    # A PRP list page whose entries point at the fuzz area (some with an offset).
    lst = area + (FUZZ_PAGES - 1) * PAGE
    h.memory.write(
        lst,
        struct.pack(
            "<512Q",
            *[area + (i % (FUZZ_PAGES - 1)) * PAGE + (8 if i % 37 == 5 else 0) for i in range(512)],
        ),
    )
    return h, area, backends


def pointers(area: int) -> st.SearchStrategy[int]:
    """PRP values aimed at the fuzz area (never at the queues), or at nothing."""
    page = st.integers(0, FUZZ_PAGES - 1).map(lambda i: area + i * PAGE)
    return st.one_of(
        st.just(0),
        page,
        st.tuples(page, st.sampled_from([2, 4, 8, 0x200, PAGE - 8])).map(sum),
        st.sampled_from([UNMAPPED, UNMAPPED + 3, (1 << 64) - PAGE]),
    )


def small_or_any(*small: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(small), st.integers(0, 64), U32)


@st.composite
def sqe(draw: st.DrawFn, opcodes: list[int], area: int) -> list[int]:
    opcode = draw(st.one_of(st.sampled_from(opcodes), st.integers(0, 255)))
    flags = draw(st.sampled_from([0, 0, 0, 0, 1, 2, 0x40, 0x80, 0xC3]))
    nsid = draw(small_or_any(0, 1, 2, 3, 0xFFFFFFFF, 0xFFFFFFFE))
    prp1 = draw(pointers(area))
    prp2 = draw(pointers(area))
    dw10 = draw(small_or_any(0, 1, 2, 5, 6, 0x10001, 0x000F0001, 0x003F0002, 0xFFFF0001))
    dw11 = draw(small_or_any(0, 1, 3, 0x10003, 0x00010001, 1 << 16, 0xFFFF))
    dw12 = draw(small_or_any(0, 7, 15, 1 << 30, 1 << 25, 0xFFFF))
    rest = draw(st.lists(small_or_any(0), min_size=3, max_size=3))
    return [
        opcode | (flags << 8),
        nsid,
        0,
        0,
        0,
        0,
        prp1 & 0xFFFFFFFF,
        prp1 >> 32,
        prp2 & 0xFFFFFFFF,
        prp2 >> 32,
        dw10,
        dw11,
        dw12,
        *rest,
    ]


ADMIN_OPCODES = [int(op) for op in AdminOpcode] + [0x7F]
IO_OPCODES = [0x00, 0x01, 0x02, 0x08, 0x09, 0x04, 0x05]


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=50 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), bounce=st.booleans())
def test_random_admin_commands_complete_once(
    fuzz_dir: Path, data: st.DataObject, bounce: bool
) -> None:
    h, area, backends = fuzz_host(fuzz_dir, bounce)
    try:
        commands = data.draw(st.lists(sqe(ADMIN_OPCODES, area), min_size=1, max_size=24))
        cids = [h.admin.submit(dw, ring=False) for dw in commands]
        h.admin.ring_sq()
        assert h.ctrl.process_admin() == len(commands)
        done = h.admin.reap()
        h.run_io()  # queues the commands may have created must not break it
        aers = {cid for cid, dw in zip(cids, commands, strict=True) if dw[0] & 0xFF == 0x0C}
        others = [cid for cid in cids if cid not in aers]
        assert [c.cid for c in done if c.cid not in aers] == others
        assert len([c for c in done if c.cid in aers]) <= len(aers)
        for c in done:
            assert c.sq_id == 0
        assert not h.ctrl.registers.fatal
        # Still serviceable.
        c, ident = h.identify(1)
        assert c.status == 0 and ident[24:33] == b"nvme-mdev"
    finally:
        for b in backends:
            b.close()


@settings(max_examples=50 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), bounce=st.booleans())
def test_random_io_commands_complete_once(
    fuzz_dir: Path, data: st.DataObject, bounce: bool
) -> None:
    h, area, backends = fuzz_host(fuzz_dir, bounce)
    try:
        q = h.create_io_queue_pair(1, entries=64)
        commands = data.draw(st.lists(sqe(IO_OPCODES, area), min_size=1, max_size=40))
        cids = [q.submit(dw, ring=False) for dw in commands]
        q.ring_sq()
        assert h.set_feature(FeatureId.ARBITRATION, 7).status == 0  # no burst limit
        assert h.run_io() == len(commands)
        done = q.reap()
        assert [c.cid for c in done] == cids
        assert all(c.sq_id == 1 for c in done)
        assert [c.sq_head for c in done] == [(i + 1) % 64 for i in range(len(cids))]
        assert not h.ctrl.registers.fatal
        assert h.interrupts.signalled[-1] == 1
    finally:
        for b in backends:
            b.close()
