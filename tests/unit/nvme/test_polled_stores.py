"""Words another party polls are never seen half-written (guest_memory.words32).

A guest polls a CQE's phase dword; the device polls doorbells the guest (or our own
host library) stores. struct.pack_into zeroes its target before storing, so a poller
on another CPU could read a transient 0: for a CQE whose expected phase is 0, that is a
valid-looking completion of command ID 0 (Linux: "invalid id 0 completed on queue N")
and the real completion is then lost. Each test here stores two values alternately while
a second process polls the word with plain loads, and fails if it ever reads a third.

How long that takes depends on the machine and its load, so the race is bounded by
events, not by time: the storer goes on until the poller has seen the value change
CHANGES times (each change it sees is a load that fell between two stores), however
long a loaded machine needs for that. Only a poller that never gets that far (gone,
or never scheduled alongside the storer) fails, after NEVER_S.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from nvme_mdev.guest_memory import words32
from nvme_mdev.nvme.queues import MappedDoorbell, QueueMemory, ShadowDoorbell

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="a concurrent poller needs a second CPU"
)

PAGE = 4096
# control words at the end of the page
STOP, READY, SEEN = PAGE // 4 - 1, PAGE // 4 - 2, PAGE // 4 - 3
A, B = 0x0001_1234, 0x0000_4321  # CQE DW3 values: CID 0x1234 phase 1, CID 0x4321 phase 0
CHANGES = 20_000  # value changes the poller must see: proof that the two really overlapped
#: a guard for a poller that never sees them, not a speed requirement
NEVER_S = 600
#: stores between two looks at the poller's count
STORES_PER_LOOK = 2000

# Polls word argv[2] until STOP is set, publishing in SEEN how often the value changed;
# prints that and how many reads were neither A nor B.
POLLER = f"""
import mmap, os, sys
m = mmap.mmap(int(sys.argv[1]), {PAGE})
w = memoryview(m).cast("I")
i = int(sys.argv[2])
changes = bad = 0
last = w[i]
w[{READY}] = 1
while not w[{STOP}]:
    v = w[i]
    if v != last:
        changes += 1
        w[{SEEN}] = changes
        last = v
        if v != {A} and v != {B}:
            bad += 1
print(changes, bad)
"""


class _MmapMemory:
    """A GuestMemory over one shared page at guest address 0."""

    def __init__(self, view: memoryview) -> None:
        self.mv = view

    def view(self, addr: int, length: int, writable: bool) -> memoryview:
        return self.mv[addr : addr + length]

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.mv[addr : addr + length])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.mv[addr : addr + len(data)] = data


@pytest.fixture
def page() -> Iterator[tuple[int, memoryview]]:
    fd = os.memfd_create("polled-stores")
    os.ftruncate(fd, PAGE)
    m = mmap.mmap(fd, PAGE)
    view = memoryview(m)
    try:
        yield fd, view
    finally:
        view.release()
        m.close()
        os.close(fd)


def _race(fd: int, view: memoryview, word: int, store: Callable[[int], None]) -> tuple[int, int]:
    """Store A and B alternately into `word` while another process polls it. The
    storer (this thread) and the poller run on different CPUs, so that whenever the
    machine runs both, they overlap (sharing one CPU, the poller would see one change
    per context switch at most)."""
    words = words32(view)
    store(A)
    mine = os.sched_getaffinity(0)  # (of this thread: Linux pins threads one by one)
    storer_cpu, poller_cpu = sorted(mine)[:2]
    poller = subprocess.Popen(
        [sys.executable, "-c", POLLER, str(fd), str(word)],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        os.sched_setaffinity(poller.pid, {poller_cpu})
        os.sched_setaffinity(0, {storer_cpu})
        while not words[READY]:
            if poller.poll() is not None:
                pytest.fail("the poller exited early")
        started = time.monotonic()
        while words[SEEN] < CHANGES:
            if poller.poll() is not None:
                pytest.fail("the poller exited early")
            if time.monotonic() - started > NEVER_S:
                pytest.fail(f"the poller saw only {words[SEEN]} changes in {NEVER_S} s")
            for _ in range(STORES_PER_LOOK // 2):
                store(B)
                store(A)
        words[STOP] = 1
        out, _ = poller.communicate(timeout=60)
    finally:
        os.sched_setaffinity(0, mine)
        poller.kill()
        words.release()
    changes, bad = map(int, out.split())
    return changes, bad


def _assert_whole(changes: int, bad: int) -> None:
    # Without overlap the test proves nothing: the poller saw the word change CHANGES
    # times (the storer went on until it had), and read nothing but A and B meanwhile.
    assert changes >= CHANGES, f"poller saw only {changes} changes: no overlap"
    assert bad == 0, f"poller read {bad} values that were never stored"


def test_a_completion_entry_phase_dword_is_stored_whole(page: tuple[int, memoryview]) -> None:
    fd, view = page
    cq = QueueMemory(_MmapMemory(view), 0, 16, 16)
    slot = 5
    try:
        _assert_whole(*_race(fd, view, slot * 4 + 3, lambda dw3: cq.write_cqe(slot, 1, 2, 3, dw3)))
    finally:
        cq.release()


def test_a_shadow_doorbell_is_stored_whole(page: tuple[int, memoryview]) -> None:
    fd, view = page
    doorbell = ShadowDoorbell(_MmapMemory(view), 64, 128)
    try:
        _assert_whole(*_race(fd, view, 16, doorbell.set_value))
    finally:
        doorbell.release()


def test_a_mapped_doorbell_is_stored_whole(page: tuple[int, memoryview]) -> None:
    fd, view = page
    words = words32(view)
    try:
        _assert_whole(*_race(fd, view, 6, MappedDoorbell(words, 24).set_value))
    finally:
        words.release()
