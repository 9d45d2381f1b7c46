"""Submission and completion queues (NVMe Base 3.3), with shadow doorbells.

Queues are physically contiguous (CAP.CQR = 1). A queue's memory is resolved
to a zero-copy view once; where guest memory is only reachable by messages the
queue falls back to copying one entry at a time.

Mapped doorbells (`serve --mmap-doorbells`): the doorbell registers themselves
live in a page the client maps into the guest, so they never trap and are polled.

Shadow doorbells (Doorbell Buffer Config, Base 5.9): the guest writes its SQ
tails and CQ heads into a page of its own memory and rings the real doorbell
only when our EventIdx says so (Linux's nvme_dbbuf_need_event rule:
ring iff (u16)(new - event_idx - 1) < (u16)(new - old)).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Protocol

from ..dataplane.fence import full_fence
from ..guest_memory import DmaError, GuestMemory, words32
from ..statistics import QueueStats
from .spec import CQE_SIZE, SQE_SIZE

if TYPE_CHECKING:
    from ..handover.journal import Journal

_U32 = struct.Struct("<I")
# CQE DW0, DW1, DW2 (SQHD | SQID << 16); DW3 is CID | phase << 16 | status << 17
_DW0_11 = struct.Struct("<III")


class _GuestSlots:
    """A fixed guest range, reached through a cached zero-copy view when there is one.

    release() drops the view (the transport is about to unmap memory); the next access
    looks the range up again, and copies through the GuestMemory if that fails.
    Words the guest polls or writes while we poll go through load32/store32, never
    through struct.pack_into (see words32)."""

    __slots__ = ("_memory", "_stale", "_view", "_words", "base", "length")

    def __init__(self, memory: GuestMemory, base: int, length: int) -> None:
        self._memory = memory
        self.base = base
        self.length = length
        self._view: memoryview | None = memory.view(base, length, True)  # DmaError if unmapped
        self._words = words32(self._view) if self._view is not None else None
        self._stale = False

    def release(self) -> None:
        if self._words is not None:
            self._words.release()
            self._words = None
        if self._view is not None:
            self._view.release()
            self._view = None
        self._stale = True

    def view(self) -> memoryview | None:
        if self._stale:
            self._stale = False
            try:
                self._view = self._memory.view(self.base, self.length, True)
            except DmaError:
                self._view = None  # reads/writes will report it
            self._words = words32(self._view) if self._view is not None else None
        return self._view

    def read(self, offset: int, length: int) -> bytes | memoryview:
        view = self._view if not self._stale else self.view()
        if view is not None:
            return view[offset : offset + length]
        return self._memory.read(self.base + offset, length)

    def load32(self, index: int) -> int:
        """The `index`th 32-bit word, loaded whole."""
        if self._stale:
            self.view()
        words = self._words
        if words is not None:
            return int(words[index])
        return int(_U32.unpack(self._memory.read(self.base + 4 * index, 4))[0])

    def store32(self, index: int, value: int) -> None:
        """Store the `index`th 32-bit word in one store."""
        if self._stale:
            self.view()
        words = self._words
        if words is not None:
            words[index] = value
        else:
            self._memory.write(self.base + 4 * index, _U32.pack(value))


class QueueMemory(_GuestSlots):
    """`entries` fixed-size slots at a guest address."""

    __slots__ = ("entries", "entry_size")

    def __init__(self, memory: GuestMemory, base: int, entries: int, entry_size: int) -> None:
        super().__init__(memory, base, entries * entry_size)
        self.entries = entries
        self.entry_size = entry_size

    def read_entry(self, index: int) -> bytes | memoryview:
        return self.read(index * self.entry_size, self.entry_size)

    def write_cqe(self, index: int, dw0: int, dw1: int, dw2: int, dw3: int) -> None:
        if self._stale:
            self.view()
        words = self._words
        if words is not None:
            i = index * (CQE_SIZE // 4)
            words[i] = dw0
            words[i + 1] = dw1
            words[i + 2] = dw2
            # DW3 carries the phase tag: stored last (x86 keeps store order), in one store.
            words[i + 3] = dw3
        else:
            off = self.base + index * CQE_SIZE
            self._memory.write(off, _DW0_11.pack(dw0, dw1, dw2))
            self._memory.write(off + 12, _U32.pack(dw3))


class Doorbell(Protocol):
    """Where a polled queue finds its doorbell value: a shadow doorbell in guest
    memory, or the doorbell register itself in a page mapped by the client."""

    def value(self) -> int: ...

    def set_value(self, value: int) -> None: ...

    def set_event_index(self, value: int) -> None: ...

    def release(self) -> None: ...


class MappedDoorbell:
    """A doorbell register in BAR0's mmap'd doorbell page: the guest's writes land
    in memory without a trap, and the I/O thread reads them by polling."""

    __slots__ = ("_index", "_words")

    def __init__(self, page_words: memoryview, offset: int) -> None:
        self._words = page_words
        self._index = offset // 4

    def value(self) -> int:
        return int(self._words[self._index])

    def set_value(self, value: int) -> None:
        self._words[self._index] = value

    def set_event_index(self, value: int) -> None:
        pass  # nothing traps, so there is nothing to ask for

    def release(self) -> None:
        pass  # our own memory, not the guest's


class ShadowDoorbell:
    """One queue's slots in the shadow doorbell and EventIdx buffers."""

    __slots__ = ("_eventidx", "_shadow")

    def __init__(self, memory: GuestMemory, shadow_addr: int, eventidx_addr: int) -> None:
        self._shadow = _GuestSlots(memory, shadow_addr, 4)
        self._eventidx = _GuestSlots(memory, eventidx_addr, 4)

    def value(self) -> int:
        return self._shadow.load32(0)

    def set_value(self, value: int) -> None:
        self._shadow.store32(0, value)

    def set_event_index(self, value: int) -> None:
        self._eventidx.store32(0, value & 0xFFFF)

    def release(self) -> None:
        self._shadow.release()
        self._eventidx.release()


class CompletionQueue:
    __slots__ = (
        "head",
        "interrupts_enabled",
        "journal",
        "memory",
        "phase",
        "qid",
        "reserved",
        "shadow",
        "size",
        "sq_ids",
        "tail",
        "unsignalled",
        "vector",
    )

    def __init__(
        self,
        memory: GuestMemory,
        qid: int,
        base: int,
        size: int,
        vector: int,
        interrupts_enabled: bool,
    ) -> None:
        self.qid = qid
        self.size = size
        self.vector = vector
        self.interrupts_enabled = interrupts_enabled
        self.memory = QueueMemory(memory, base, size, CQE_SIZE)
        self.head = 0
        self.tail = 0
        self.phase = 1
        self.shadow: Doorbell | None = None
        #: where a successor finds this queue after a crash (handover/journal.py)
        self.journal: Journal | None = None
        self.sq_ids: set[int] = set()
        #: completions posted since the last interrupt (for interrupt coalescing)
        self.unsignalled = 0
        #: slots promised to commands in flight in an I/O engine: never given to others,
        #: so that their completions always find room
        self.reserved = 0

    def refresh_head(self) -> None:
        """Take the head from the shadow doorbell, if the guest uses one."""
        if self.shadow is not None:
            head = self.shadow.value()
            if head < self.size:
                self.head = head

    def is_full(self) -> bool:
        """No room for one more completion beside those posted and those reserved."""
        limit = self.size - 1 - self.reserved
        if (self.tail - self.head) % self.size < limit:
            return False
        self.refresh_head()
        return (self.tail - self.head) % self.size >= limit

    def has_unconsumed(self) -> bool:
        return self.head != self.tail

    def post(self, dw0: int, dw1: int, sq_head: int, sq_id: int, cid: int, status: int) -> None:
        """Write one completion; the caller has checked is_full()."""
        self.memory.write_cqe(
            self.tail, dw0, dw1, sq_head | (sq_id << 16), cid | (self.phase << 16) | (status << 17)
        )
        self.tail += 1
        if self.tail == self.size:
            self.tail = 0
            self.phase ^= 1
        if self.journal is not None:
            self.journal.posted(sq_id, cid, self.qid, self.tail, self.phase)

    def set_head(self, head: int) -> bool:
        """A CQ head doorbell write; False if the value is invalid (Base 3.3.1.2)."""
        if head >= self.size or not self._between_head_and_tail(head):
            return False
        self.head = head
        return True

    def _between_head_and_tail(self, value: int) -> bool:
        # The new head may advance over posted entries only, never past the tail.
        consumed = (value - self.head) % self.size
        posted = (self.tail - self.head) % self.size
        return consumed <= posted


class SubmissionQueue:
    __slots__ = (
        "cq",
        "fused_wait",
        "head",
        "journal",
        "memory",
        "priority",
        "qid",
        "shadow",
        "size",
        "stats",
        "tail",
    )

    def __init__(
        self,
        memory: GuestMemory,
        qid: int,
        base: int,
        size: int,
        cq: CompletionQueue,
        priority: int = 0,
        stats: QueueStats | None = None,
    ) -> None:
        self.qid = qid
        self.size = size
        self.cq = cq
        self.priority = priority
        self.memory = QueueMemory(memory, base, size, SQE_SIZE)
        self.head = 0
        self.tail = 0
        self.shadow: Doorbell | None = None
        self.stats = stats if stats is not None else QueueStats(qid)
        #: where a successor finds this queue after a crash (handover/journal.py)
        self.journal: Journal | None = None
        #: the tail at which the head entry, the first of a fused operation, waits for
        #: its second (-1: none): the data plane leaves it in the queue until then
        self.fused_wait = -1

    def refresh_tail(self) -> None:
        """Take the tail from the shadow doorbell, if the guest uses one."""
        if self.shadow is not None:
            tail = self.shadow.value()
            if tail < self.size:
                self.tail = tail

    def set_tail(self, tail: int) -> bool:
        """An SQ tail doorbell write; False if the value is invalid (Base 3.3.1.1)."""
        if tail >= self.size:
            return False
        self.tail = tail
        return True

    def is_empty(self) -> bool:
        return self.head == self.tail

    def pending(self) -> int:
        return (self.tail - self.head) % self.size

    def fetch(self) -> bytes | memoryview:
        """The entry at the head, consuming it."""
        entry = self.memory.read_entry(self.head)
        self.head += 1
        if self.head == self.size:
            self.head = 0
        if self.journal is not None:
            self.journal.fetched(self.qid, self.head, int.from_bytes(entry[2:4], "little"))
        return entry

    def enable_notification(self) -> bool:
        """Ask the guest to ring the real doorbell on its next submission (before the
        poller parks). True if commands are waiting: submitted before the guest could
        see the request, they would ring nothing, so the poller must not park.

        The order is firecracker's try_enable_notification: store EventIdx, a full
        fence, then load the tail again. The guest does the mirror image (store the
        tail, fence, load EventIdx), so at least one side sees the other's store."""
        if self.shadow is None:
            return self.has_work()
        self.shadow.set_event_index(self.tail)  # the next new tail rings
        full_fence()
        self.refresh_tail()
        return self.has_work()

    def has_work(self) -> bool:
        """Entries wait that the data plane can take: not only the first of a fused
        operation whose second has not come (`fused_wait`)."""
        return self.head != self.tail and self.tail != self.fused_wait

    def suppress_notification(self) -> None:
        """A polling thread sees new entries by itself: EventIdx one behind the tail
        lets the guest skip the doorbell."""
        if self.shadow is not None:
            self.shadow.set_event_index(self.tail - 1)


def release_views(queues: list[SubmissionQueue | CompletionQueue]) -> None:
    for q in queues:
        q.memory.release()
        if q.shadow is not None:
            q.shadow.release()


__all__ = [
    "CompletionQueue",
    "DmaError",
    "Doorbell",
    "MappedDoorbell",
    "QueueMemory",
    "ShadowDoorbell",
    "SubmissionQueue",
    "release_views",
]
