"""The I/O journal: where every queue stands and which commands are in flight, kept up
to date by the queues themselves in shared memory that outlives the process (a memfd
the supervisor holds), so that a successor can go on after a crash.

Layout (native/src/journal.rs writes the same):

    0          magic "NVMJ", version 1, queue count (max qid + 1), u32 each
    12         the last vfio-user request answered: its id + 1 (0: none), u32
    16         the id of our next vfio-user request (DMA_READ/DMA_WRITE), u32
    64 + 16*q  queue q: SQ head, CQ tail | phase << 31, SQ tail rung + 1 (0: none), u32 each
    BITMAPS    queue q's SQ: 65536 bits, one per CID, set while that command is in flight

The order of stores makes a crash at any point recoverable:

- fetch: set the CID's bit, then store the new head. A bit set for the command still
  at the stored head means it was not fetched (recover() clears it).
- post: write the completion entry, clear the bit, then store the tail and phase. A
  completion written past the stored tail is found by scanning the CQ for entries of
  the current phase (recover() takes them as completed).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Final

MAGIC: Final = 0x4A4D564E  # "NVMJ"
VERSION: Final = 1
_POSITIONS: Final = 64
_CIDS: Final = 1 << 16
_BITMAP_BYTES: Final = _CIDS // 8
_PHASE: Final = 1 << 31


def _bitmaps_offset(queues: int) -> int:
    return (_POSITIONS + 16 * queues + 4095) // 4096 * 4096


def journal_size(queues: int) -> int:
    return _bitmaps_offset(queues) + queues * _BITMAP_BYTES


@dataclass(frozen=True)
class QueueRecord:
    qid: int
    sq_head: int
    cq_tail: int
    cq_phase: int
    in_flight: tuple[int, ...]
    #: the last SQ tail doorbell that trapped, if any
    sq_rung: int | None = None


class Journal:
    """One controller's journal over `fd` (a memfd of journal_size(queues) bytes)."""

    def __init__(self, fd: int, queues: int, fresh: bool) -> None:
        self.fd = fd
        self.queues = queues
        size = journal_size(queues)
        if fresh:
            os.ftruncate(fd, size)
        elif os.fstat(fd).st_size != size:
            raise ValueError(f"journal of {os.fstat(fd).st_size} bytes, {size} expected")
        self._map = mmap.mmap(fd, size)
        self.buffer = memoryview(self._map)
        self._words = self.buffer[: _bitmaps_offset(queues)].cast("I")
        self._bits = self.buffer[_bitmaps_offset(queues) :].cast("Q")
        if fresh:
            struct.pack_into("<III", self.buffer, 0, MAGIC, VERSION, queues)
        elif struct.unpack_from("<III", self.buffer, 0) != (MAGIC, VERSION, queues):
            raise ValueError("not a journal of this layout")

    @classmethod
    def create(cls, queues: int) -> Journal:
        return cls(os.memfd_create("nvme-mdev-journal", os.MFD_CLOEXEC), queues, fresh=True)

    # --- the queues' side (hot path of the Python plane, and the admin queue) ---------

    def fetched(self, qid: int, head: int, cid: int) -> None:
        word = qid * (_CIDS // 64) + (cid >> 6)
        self._bits[word] |= 1 << (cid & 63)
        self._words[(_POSITIONS >> 2) + 4 * qid] = head

    def answered(self, msg_id: int) -> None:
        """The vfio-user request `msg_id` is answered (vfio_user/server.py's Session)."""
        self._words[3] = msg_id + 1

    def last_answered(self) -> int | None:
        return self._words[3] - 1 if self._words[3] else None

    def requested(self, next_id: int) -> None:
        """One of our vfio-user requests went out: the next one will have `next_id`."""
        self._words[4] = next_id

    def next_request_id(self) -> int:
        return self._words[4] & 0xFFFF

    def rung(self, qid: int, tail: int) -> None:
        """A trapped SQ tail doorbell (its value is lost with the process otherwise)."""
        self._words[(_POSITIONS >> 2) + 4 * qid + 2] = tail + 1

    def posted(self, sqid: int, cid: int, cqid: int, tail: int, phase: int) -> None:
        word = sqid * (_CIDS // 64) + (cid >> 6)
        self._bits[word] &= ~(1 << (cid & 63)) & 0xFFFFFFFFFFFFFFFF
        self._words[(_POSITIONS >> 2) + 4 * cqid + 1] = tail | (_PHASE if phase else 0)

    def reset_sq(self, qid: int) -> None:
        """SQ `qid` created: head 0, nothing in flight."""
        base = qid * (_CIDS // 64)
        self._bits[base : base + _CIDS // 64] = memoryview(bytes(_BITMAP_BYTES)).cast("Q")
        self._words[(_POSITIONS >> 2) + 4 * qid] = 0
        self._words[(_POSITIONS >> 2) + 4 * qid + 2] = 0

    def reset_cq(self, qid: int) -> None:
        """CQ `qid` created: tail 0, phase 1."""
        self._words[(_POSITIONS >> 2) + 4 * qid + 1] = _PHASE

    def set_position(
        self, qid: int, sq_head: int | None, cq_tail_phase: tuple[int, int] | None
    ) -> None:
        """A restored queue's position (nothing in flight: recovery completed it all)."""
        if sq_head is not None:
            self._words[(_POSITIONS >> 2) + 4 * qid] = sq_head
        if cq_tail_phase is not None:
            tail, phase = cq_tail_phase
            self._words[(_POSITIONS >> 2) + 4 * qid + 1] = tail | (_PHASE if phase else 0)

    # --- recovery ---------------------------------------------------------------------

    def record(self, qid: int) -> QueueRecord:
        sq_head = self._words[(_POSITIONS >> 2) + 4 * qid]
        tail_phase = self._words[(_POSITIONS >> 2) + 4 * qid + 1]
        rung = self._words[(_POSITIONS >> 2) + 4 * qid + 2]
        base = qid * (_CIDS // 64)
        cids = []
        for i in range(_CIDS // 64):
            word = self._bits[base + i]
            while word:
                low = word & -word
                cids.append(i * 64 + low.bit_length() - 1)
                word ^= low
        return QueueRecord(
            qid,
            sq_head,
            tail_phase & ~_PHASE,
            int(bool(tail_phase & _PHASE)),
            tuple(cids),
            rung - 1 if rung else None,
        )

    def clear(self, qid: int, cid: int) -> None:
        word = qid * (_CIDS // 64) + (cid >> 6)
        self._bits[word] &= ~(1 << (cid & 63)) & 0xFFFFFFFFFFFFFFFF

    def close(self) -> None:
        self._words.release()
        self._bits.release()
        self.buffer.release()
        self._map.close()
