"""Fused Compare and Write (Base 3.4.2 Fused Operations; NVM Command Set Compare and
Write): the pair as one unit, on both data planes, on a temp-file namespace: a match
writes, a mismatch writes nothing (Compare Failure, then Command Aborted due to Failed
Fused Command), a half alone is Missing Fused Command, a pair split across doorbells or
wrapping at the end of the SQ still pairs, ACWU is reported and enforced, and writes in
flight on io_uring never interleave with a pair."""

from __future__ import annotations

import random

import pytest
from harness import Completion, Host, NamespaceFactory, rw, u16, with_dnr

from nvme_mdev.nvme.identity import ControllerConfig
from nvme_mdev.nvme.spec import Cns, IoOpcode, Status

READ, WRITE, COMPARE = IoOpcode.READ, IoOpcode.WRITE, IoOpcode.COMPARE
FIRST, SECOND = 0x1 << 8, 0x2 << 8
IMAGE = random.Random(5).randbytes(1 << 20)
COMPARE_FAILED = with_dnr(Status.COMPARE_FAILURE)
FUSED_FAILED = with_dnr(Status.ABORT_FUSE_FAILED)
MISSING = with_dnr(Status.ABORT_FUSE_MISSING)
INVALID = with_dnr(Status.INVALID_FIELD)


def setup(file_ns: NamespaceFactory, entries: int = 64, **config: int) -> Host:
    h = Host([file_ns(fill=IMAGE)], config=ControllerConfig(**config))
    h.enable()
    h.create_io_queue_pair(1, entries=entries)
    return h


@pytest.fixture
def h(file_ns: NamespaceFactory) -> Host:
    return setup(file_ns)


def buffer_with(h: Host, data: bytes) -> tuple[int, int]:
    buf = h.alloc(len(data))
    h.memory.write(buf, data)
    return h.prps(buf, len(data))


def command(
    h: Host, opcode: int, data: bytes, slba: int, fuse: int = 0, nsid: int = 1
) -> list[int]:
    prp1, prp2 = buffer_with(h, data)
    dw = rw(opcode, nsid, prp1, slba, len(data) // 512, prp2=prp2)
    dw[0] |= fuse
    return dw


def pair(h: Host, expected: bytes, new: bytes, slba: int) -> tuple[list[int], list[int]]:
    return command(h, COMPARE, expected, slba, FIRST), command(h, WRITE, new, slba, SECOND)


def read(h: Host, slba: int, length: int) -> bytes:
    buf = h.alloc(length)
    prp1, prp2 = h.prps(buf, length)
    assert h.io_cmd(1, rw(READ, 1, prp1, slba, length // 512, prp2=prp2)).status == 0
    return h.memory.read(buf, length)


def run(h: Host, *commands: list[int]) -> list[Completion]:
    """Submit `commands` with one doorbell; their completions in CID order."""
    q = h.io[1]
    cids = [q.submit(dw, ring=False) for dw in commands]
    q.ring_sq()
    h.run_io()
    done = q.reap()
    assert sorted(c.cid for c in done) == sorted(cids), done
    return sorted(done, key=lambda c: cids.index(c.cid))


def statuses(done: list[Completion]) -> list[int]:
    return [c.status for c in done]


def test_a_match_writes_and_both_succeed(h: Host) -> None:
    new = random.Random(1).randbytes(4096)
    done = run(h, *pair(h, IMAGE[8 * 512 : 8 * 512 + 4096], new, 8))
    assert statuses(done) == [0, 0]
    assert read(h, 8, 4096) == new
    assert read(h, 0, 8 * 512) == IMAGE[: 8 * 512]  # nothing else moved


def test_a_mismatch_writes_nothing(h: Host) -> None:
    expected = bytearray(IMAGE[:1024])
    expected[700] ^= 1  # one bit off
    errors = h.ctrl.error_log.count
    done = run(h, *pair(h, bytes(expected), bytes(1024), 0))
    assert statuses(done) == [COMPARE_FAILED, FUSED_FAILED]
    assert read(h, 0, 1024) == IMAGE[:1024]
    assert h.ctrl.error_log.count == errors + 2  # both, as any failed command


def test_the_first_without_its_second_is_aborted_and_the_next_runs(h: Host) -> None:
    first = command(h, COMPARE, IMAGE[:512], 0, FIRST)
    plain = command(h, WRITE, b"\x11" * 512, 0)
    assert statuses(run(h, first, plain)) == [MISSING, 0]
    assert read(h, 0, 512) == b"\x11" * 512  # the next command ran as usual


def test_the_second_alone_is_missing_its_first(h: Host) -> None:
    second = command(h, WRITE, b"\x22" * 512, 0, SECOND)
    assert statuses(run(h, second)) == [MISSING]
    assert read(h, 0, 512) == IMAGE[:512]


def test_a_first_followed_by_another_first(h: Host) -> None:
    """The first is aborted; the second first pairs with what follows it."""
    stale = command(h, COMPARE, IMAGE[:512], 0, FIRST)
    done = run(h, stale, *pair(h, IMAGE[:512], b"\x33" * 512, 0))
    assert statuses(done) == [MISSING, 0, 0]
    assert read(h, 0, 512) == b"\x33" * 512


@pytest.mark.parametrize(
    "what",
    ["range", "length", "namespace", "second opcode", "reserved fuse", "first opcode"],
)
def test_pairs_that_are_no_compare_and_write_are_invalid(h: Host, what: str) -> None:
    first, second = pair(h, IMAGE[:1024], bytes(1024), 0)
    expected = [INVALID, INVALID]
    if what == "range":
        second[10] = 1
    elif what == "length":
        second[12] = 0  # one block, the Compare two
    elif what == "namespace":
        second[1] = 2
    elif what == "second opcode":
        second[0] = (second[0] & ~0xFF) | READ
    elif what == "reserved fuse":
        first[0] |= 0x3 << 8
        expected = [INVALID, MISSING]  # 11b is refused alone; the Write has no first then
    else:
        first[0] = (first[0] & ~0xFF) | WRITE
        expected = [INVALID, MISSING]  # no fused operation starts with a Write
    assert statuses(run(h, first, second)) == expected
    assert read(h, 0, 1024) == IMAGE[:1024]


def test_a_failed_write_leaves_the_compare_successful(file_ns: NamespaceFactory) -> None:
    h = Host([file_ns(fill=IMAGE, readonly=True)])
    h.enable()
    h.create_io_queue_pair(1)
    done = run(h, *pair(h, IMAGE[:512], bytes(512), 0))
    assert statuses(done) == [0, with_dnr(Status.NAMESPACE_WRITE_PROTECTED)]


def test_a_pair_split_across_two_doorbells(h: Host) -> None:
    """The guest rings for the first alone: it waits, unfetched, for its second."""
    q = h.io[1]
    first, second = pair(h, IMAGE[:512], b"\x44" * 512, 0)
    q.submit(first)
    for _ in range(3):
        h.run_io()
    assert q.peek() == []
    assert h.sq(1).head == 0  # still in the queue
    q.submit(second)
    h.run_io()
    assert statuses(q.reap()) == [0, 0]
    assert read(h, 0, 512) == b"\x44" * 512


def test_a_pair_that_wraps_at_the_end_of_the_sq(file_ns: NamespaceFactory) -> None:
    h = setup(file_ns, entries=4)
    for _ in range(3):  # the first lands in the last slot, its second in slot 0
        assert h.io_cmd(1, command(h, READ, bytes(512), 0)).status == 0
    done = run(h, *pair(h, IMAGE[:512], b"\x55" * 512, 0))
    assert statuses(done) == [0, 0]
    assert read(h, 0, 512) == b"\x55" * 512


def test_acwu_is_reported_and_enforced(file_ns: NamespaceFactory) -> None:
    """MDTS 8 KiB: ACWU two blocks (of 4 KiB, the largest format), 0's based 1."""
    h = setup(file_ns, mdts=1)
    _, d = h.identify(Cns.CONTROLLER)
    assert u16(d, 522) & 1  # FUSES: Compare and Write
    assert u16(d, 532) == 1  # ACWU
    done = run(h, *pair(h, IMAGE[:1536], bytes(1536), 0))
    assert statuses(done) == [INVALID, INVALID]
    assert read(h, 0, 1536) == IMAGE[:1536]
    assert statuses(run(h, *pair(h, IMAGE[:1024], bytes(1024), 0))) == [0, 0]


def test_writes_in_flight_never_interleave_with_a_pair(
    file_ns: NamespaceFactory, io_engine: str
) -> None:
    """Writes of B to a 64 KiB range are in flight (io_uring) when a pair that expects
    B and writes C arrives, and more writes of B follow it: whatever the order, the
    range ends all B or all C (never torn between a write and the pair), and a failed
    Compare means the pair wrote nothing."""
    h = Host([file_ns(fill=IMAGE)], engine=io_engine)
    h.enable()
    h.create_io_queue_pair(1, entries=64)
    length = 64 * 1024
    for round_ in range(4):
        b = bytes([round_ * 2 + 1]) * length
        c = bytes([round_ * 2 + 2]) * length
        writes = [command(h, WRITE, b, 0) for _ in range(16)]
        later = [command(h, WRITE, b, 0) for _ in range(8)]
        done = run(h, *writes, *pair(h, b, c, 0), *later)
        compared, written = done[16].status, done[17].status
        assert all(x.status == 0 for x in done[:16] + done[18:])
        final = read(h, 0, length)
        assert final in (b, c), "a write interleaved with the pair"
        if compared:
            assert (compared, written, final) == (COMPARE_FAILED, FUSED_FAILED, b)
        else:
            assert written == 0
