#!/usr/bin/env python3
"""Fuzz target `nvme_controller`: whole admin and I/O commands, as a guest writes
them into its submission queues, through the controller model and the Python data
plane, with the unit tests' fake host (tests/unit/nvme/harness.py): fake guest
memory, recorded interrupts, a 1 MiB file namespace (nsid 1, 512-byte blocks) and a
null one (nsid 2, 4 KiB blocks). One fresh controller per input, enabled, with I/O
queue pair 1.

Input: a guest-memory image (u16 length, then the bytes, put at the start of a data
area), then commands: [flags byte, 64-byte SQE]. Flags bit 0: the I/O queue (else
the admin queue); bit 1: relocate the data pointer's two addresses into the data
area (PRP1/PRP2 or SGL Entry 1 then name guest memory, as a real driver's would).

Invariants: the controller never raises out of its command processing; every
command but an Asynchronous Event Request gets exactly one completion, with its
CID and queue, on the queue it came from; completions carry a known Status Code
Type; completions never outnumber submissions (AERs included); the controller
stays ready unless it declared a fatal status (then the input ends).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import fuzzing

with fuzzing.instrumented(__name__):
    import harness
    from harness import Host, make_file

    from nvme_mdev.backends.file import FileBackend, NullBackend
    from nvme_mdev.nvme.namespace import Namespace
    from nvme_mdev.nvme.spec import SQE, AdminOpcode, IoOpcode, Reg

MEMORY_SIZE = 2 << 20
DATA_AREA = 1 << 20  # the data area: the upper half of guest memory
MAX_COMMANDS = 16
_CSTS_RDY, _CSTS_CFS = 1, 2
_SCTS = frozenset({0, 1, 2, 3})

_DIR = Path(tempfile.mkdtemp(prefix="fuzz-nvme-"))
_IMAGE = make_file(_DIR / "ns1.img", 1 << 20)
_BACKEND = FileBackend(str(_IMAGE))


def _host() -> Host:
    namespaces = [
        Namespace(1, _BACKEND, block_size=512),
        Namespace(2, NullBackend(1 << 30), block_size=4096),
    ]
    host = Host(namespaces, memory_size=MEMORY_SIZE, plane="python", engine="sync")
    host.enable()
    host.create_io_queue_pair(1, entries=8)
    return host


def _close(host: Host) -> None:
    host.ctrl.reset()
    while harness.ENGINES:
        harness.ENGINES.pop().close()
    while harness.INTERRUPTS:
        harness.INTERRUPTS.pop().close()


#: admin commands after which I/O queue 1 may not be where the fake host put it (or
#: its doorbells shadowed): its I/O commands then stop (the model's queue tests cover it)
_QUEUE_CHANGES = frozenset(
    {
        AdminOpcode.CREATE_IO_SQ,
        AdminOpcode.CREATE_IO_CQ,
        AdminOpcode.DELETE_IO_SQ,
        AdminOpcode.DELETE_IO_CQ,
        AdminOpcode.DOORBELL_BUFFER_CONFIG,
    }
)


class State:
    def __init__(self) -> None:
        #: CIDs of the AERs waiting for an event
        self.aers: set[int] = set()
        #: I/O queue pair 1 is still the fake host's
        self.io = True
        #: the CID of a Compare with FUSE 01b that waits in the SQ for the next command
        #: (its second, or the one that shows it missing)
        self.fused_first: int | None = None


def _is_fused_first(dwords: list[int]) -> bool:
    return dwords[0] & 0xFF == IoOpcode.COMPARE and (dwords[0] >> 8) & 0x3 == 0x1


def _run(host: Host, io: bool, dwords: list[int], state: State) -> bool:
    """One command; False when the controller went fatal."""
    aers = state.aers
    queue = host.io[1] if io else host.admin
    if io and not state.io:
        return True
    cid = queue.submit(dwords)
    if io:
        host.run_io()
    else:
        host.ctrl.process_admin()
        host.run_io()  # an admin command (Abort, Delete SQ) may complete I/O
    if host.read_reg(Reg.CSTS) & _CSTS_CFS:
        return False
    assert host.read_reg(Reg.CSTS) & _CSTS_RDY, "controller no longer ready"
    done = queue.reap()
    other = host.admin.reap() if io else []
    mine = [c for c in done if c.cid == cid]
    waiting = state.fused_first if io else None
    if waiting is not None:
        # the next command pairs with it or shows it missing; an Abort may end it earlier
        ended = [c for c in done if c.cid == waiting]
        assert len(ended) <= 1, (waiting, done)
        if ended:
            state.fused_first = None
    is_aer = not io and dwords[0] & 0xFF == AdminOpcode.ASYNC_EVENT_REQUEST
    if is_aer and not mine:
        aers.add(cid)
    elif io and not mine and _is_fused_first(dwords):
        assert state.fused_first is None, (state.fused_first, done)
        state.fused_first = cid
    else:
        assert len(mine) == 1, (hex(dwords[0]), done)
        if not io and dwords[0] & 0xFF in _QUEUE_CHANGES and mine[0].status == 0:
            state.io = False
    for c in done + other:
        assert (c.status >> 8) & 0x7 in _SCTS, c
        assert c.sq_id == (1 if io and c in done else 0), c
        if c in done and c.cid == waiting:
            continue
        if c.cid != cid or c in other:
            # only an AER completes on its own
            assert c.sq_id == 0 and c.cid in aers, (c, aers)
            aers.discard(c.cid)
    return True


def fuzz(data: bytes) -> None:
    # A fatal status is an outcome the target checks, not news: keep stderr quiet.
    with fuzzing.logs_to("nvme_mdev", logging.CRITICAL):
        _fuzz(data)


def _fuzz(data: bytes) -> None:
    source = fuzzing.Input(data)
    host = _host()
    try:
        image = source.take(source.u16())
        base = host.memory.base + DATA_AREA
        host.memory.write(base, image[: MEMORY_SIZE - DATA_AREA])
        state = State()
        for _ in range(MAX_COMMANDS):
            if not source.remaining():
                break
            flags = source.u8()
            raw = source.take(64).ljust(64, b"\0")
            dwords = list(SQE.unpack(raw))
            if flags & 2:
                for lo in (6, 8):
                    addr = base + ((dwords[lo] | dwords[lo + 1] << 32) % DATA_AREA)
                    dwords[lo], dwords[lo + 1] = addr & 0xFFFFFFFF, addr >> 32
            if not _run(host, bool(flags & 1), dwords, state):
                break
    finally:
        _close(host)


if __name__ == "__main__":
    fuzzing.main(fuzz)
    shutil.rmtree(_DIR, ignore_errors=True)
    sys.exit(0)
