"""After a crash: a successor goes on from the last checkpoint of a controller's state
(taken at every admin change) and its journal (kept by the queues at every command),
and completes every command that was in flight with Command Interrupted, Do Not Retry
clear: the host retries it. It never runs such a command again on its own: the host
may have reused its buffers by the time it would.

The queues' positions in the checkpoint are stale; the journal's are not (journal.py
says why its order of stores makes any crash point recoverable):

- a CQ's tail is the journal's, moved past completions written after it (entries of
  the current phase);
- an SQ's head is the journal's; a command whose bit is set but which still sits at
  that head was never fetched, and is fetched as usual;
- every other command in flight gets its completion now.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from ..guest_memory import GuestMemory
from ..nvme.spec import AdminOpcode, Status
from .journal import Journal

log = logging.getLogger(__name__)

_CQE = struct.Struct("<IIII")


def recover(state: dict[str, Any], journal: Journal, memory: GuestMemory, aer_limit: int) -> int:
    """Bring a controller's checkpointed `state` (VirtualController.handover_state's
    "controller" part) up to its journal, in place, posting Command Interrupted for the
    commands in flight; returns how many."""
    regs = state["registers"]
    cqs: dict[int, tuple[int, int]] = {}  # qid: (base, entries)
    sqs: dict[int, tuple[int, int, int]] = {}  # qid: (base, entries, cqid)
    admin = state["admin_queues"]
    if admin is not None:
        cqs[0] = (regs["acq"], ((regs["aqa"] >> 16) & 0xFFF) + 1)
        sqs[0] = (regs["asq"], (regs["aqa"] & 0xFFF) + 1, 0)
    for qid, base, size, _vector, _ien in state["io_queues"]["cqs"]:
        cqs[qid] = (base, size)
    for qid, base, size, cqid, _priority in state["io_queues"]["sqs"]:
        sqs[qid] = (base, size, cqid)
    waiting_events = set(state["events"]["outstanding"])  # AERs wait by design

    tails: dict[int, list[int]] = {}
    for cqid, (base, size) in cqs.items():
        record = journal.record(cqid)
        tail, phase = record.cq_tail % size, record.cq_phase
        for _ in range(size):  # completions written after the journal's tail
            _dw0, _dw1, dw2, dw3 = _CQE.unpack(memory.read(base + 16 * tail, 16))
            if (dw3 >> 16) & 1 != phase:
                break
            journal.clear(dw2 >> 16, dw3 & 0xFFFF)
            tail, phase = (tail + 1, phase) if tail + 1 < size else (0, phase ^ 1)
        tails[cqid] = [tail, phase]

    interrupted = 0
    heads: dict[int, int] = {}
    rung: dict[int, int] = {}
    for sqid, (base, size, cqid) in sqs.items():
        record = journal.record(sqid)
        head = record.sq_head % size
        heads[sqid] = head
        if record.sq_rung is not None and record.sq_rung < size:
            rung[sqid] = record.sq_rung
        at_head = int.from_bytes(memory.read(base + 64 * head + 2, 2), "little")
        if sqid == 0:
            # An Asynchronous Event Request fetched after the last checkpoint waits on:
            # completing it would leave the host with fewer (Linux does not send
            # another after a failed one).
            for slot in range(size):
                entry = memory.read(base + 64 * slot, 4)
                cid = int.from_bytes(entry[2:4], "little")
                if (
                    entry[0] == AdminOpcode.ASYNC_EVENT_REQUEST
                    and cid in record.in_flight
                    and cid not in waiting_events
                    and len(state["events"]["outstanding"]) < aer_limit
                ):
                    state["events"]["outstanding"].append(cid)
                    waiting_events.add(cid)
        for cid in record.in_flight:
            if sqid == 0 and cid in waiting_events:
                continue
            journal.clear(sqid, cid)
            if cid == at_head:
                continue  # its bit was set, its head not stored: never fetched
            base_cq, size_cq = cqs[cqid]
            tail, phase = tails[cqid]
            status = int(Status.COMMAND_INTERRUPTED)
            memory.write(
                base_cq + 16 * tail,
                _CQE.pack(0, 0, head | (sqid << 16), cid | (phase << 16) | (status << 17)),
            )
            tails[cqid] = [tail + 1, phase] if tail + 1 < size_cq else [0, phase ^ 1]
            interrupted += 1
            log.info("sq %d cid %d: in flight at the crash: Command Interrupted", sqid, cid)

    for p in state["positions"]:
        if p["is_cq"] and p["qid"] in tails:
            p["tail"], p["phase"] = tails[p["qid"]]
        elif not p["is_cq"] and p["qid"] in heads:
            # The last trapped doorbell's tail; else (shadow or mapped doorbells, read at
            # once) the head.
            p["head"], p["tail"] = heads[p["qid"]], rung.get(p["qid"], heads[p["qid"]])
    if admin is not None:
        admin["sq"][0], admin["sq"][1] = heads[0], rung.get(0, heads[0])
        admin["cq"][1], admin["cq"][2] = tails[0]
    return interrupted
