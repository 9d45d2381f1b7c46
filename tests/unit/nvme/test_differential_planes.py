"""The native data plane against the Python one, command for command.

Hypothesis builds random streams of I/O commands (every opcode, valid and invalid
namespaces and LBAs, FUA, fused and SGL flags; fused Compare and Write pairs, some
that match the storage), their data pointers (PRPs and PRP
lists that are valid, misaligned, unmapped, chained into themselves; SGLs of random
descriptors: data blocks, bit buckets, segments, loops) and memory layouts (holes
punched in guest memory, memory reachable only by copies), with doorbells rung past
the end of a queue and memory unmapped between batches. The same stream goes to two
controllers, one per data plane, each on its own copy of the same storage. After
every batch both must have posted the same completions (CID, status, SQ head, SQ ID,
phase, Dword 0), and hold the same guest memory, the same storage, the same error log
and events, and the same counters.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import PAGE, Completion, Host
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvme_mdev.backends.file import FileBackend
from nvme_mdev.nvme.namespace import Namespace
from nvme_mdev.nvme.spec import DOORBELL_BASE, IoOpcode, LogPage

#: (nsid, blocks, block size, read-only)
NAMESPACES = ((1, 128, 512, False), (2, 64, 4096, False), (3, 64, 512, True))
#: data pages the streams point into (after the queues); the last SCRATCH hold the
#: commands' PRP lists and SGL segments, and are never unmapped
DATA_PAGES = 48
SCRATCH = 8
QUEUE_ENTRIES = 64
OPCODES = [
    *[IoOpcode.READ] * 4,
    *[IoOpcode.WRITE] * 4,
    IoOpcode.FLUSH,
    IoOpcode.WRITE_ZEROES,
    IoOpcode.DATASET_MANAGEMENT,
    IoOpcode.COMPARE,
    IoOpcode.VERIFY,
    IoOpcode.COPY,
    0x04,  # Write Uncorrectable: refused
    0x7F,
]
FUA = 1 << 30
FUSE_FIRST, FUSE_SECOND = 0x1 << 8, 0x2 << 8


@dataclass
class Rig:
    """One controller with its queue pair and data pages, ready for I/O."""

    host: Host
    images: list[Path]
    data: int  # address of the first data page

    def page(self, i: int) -> int:
        return self.data + (i % DATA_PAGES) * PAGE


def make_rig(directory: Path, plane: str, images: list[Path], shadow: bool) -> Rig:
    namespaces = []
    copies = []
    for (nsid, _blocks, bs, ro), image in zip(NAMESPACES, images, strict=True):
        copy = directory / f"{plane}-{image.name}"
        shutil.copyfile(image, copy)
        copies.append(copy)
        namespaces.append(Namespace(nsid, FileBackend(str(copy), readonly=ro), bs, ro))
    host = Host(namespaces, engine="sync", plane=plane)
    host.enable()
    if shadow:
        pages = host.alloc(PAGE), host.alloc(PAGE)
        c = host.admin_cmd([0x7C, 0, 0, 0, 0, 0, pages[0], 0, pages[1], 0])
        assert c.status == 0
    q = host.create_io_queue_pair(1, entries=QUEUE_ENTRIES)
    if shadow:
        q.use_shadow_doorbells(*pages)
    data = host.alloc(DATA_PAGES * PAGE)
    pattern = bytes((i * 37 + 11) & 0xFF for i in range(PAGE))
    for i in range(DATA_PAGES):
        host.memory.write(data + i * PAGE, pattern[i:] + pattern[:i])
    return Rig(host, copies, data)


# --- what the streams are made of ------------------------------------------------------

u64s = st.integers(0, (1 << 64) - 1)


@st.composite
def addresses(draw: st.DrawFn) -> tuple[str, int]:
    """A guest address: a data page (at an offset, maybe misaligned), or anything."""
    kind = draw(st.sampled_from(["page"] * 6 + ["offset", "offset", "odd", "wild"]))
    page = draw(st.integers(0, DATA_PAGES - 1))
    if kind == "page":
        return kind, page * PAGE
    if kind == "offset":
        return kind, page * PAGE + draw(st.integers(0, PAGE // 4 - 1)) * 4
    if kind == "odd":
        return kind, page * PAGE + draw(st.integers(0, PAGE - 1))
    return kind, draw(u64s)


@st.composite
def prp_lists(draw: st.DrawFn) -> list[tuple[str, int]]:
    """PRP list entries (written into a data page): pages, bad entries, or a chain."""
    return draw(st.lists(addresses(), min_size=1, max_size=12))


@st.composite
def sgl_descriptors(draw: st.DrawFn) -> list[tuple[tuple[str, int], int, int]]:
    """(address, length, identifier) descriptors of one SGL segment: data blocks (of
    sizes that add up to common transfers), bit buckets, and now and then anything."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["data"] * 6 + ["bucket"] * 2 + ["segment", "any"]))
        length = draw(st.sampled_from([512, 1024, 2048, 4096, 3584, 16]))
        if kind == "data":
            out.append((draw(addresses()), length, 0x00))
        elif kind == "bucket":
            out.append((("wild", 0), length, 0x10))
        elif kind == "segment":
            out.append((draw(addresses()), 16 * draw(st.integers(0, 3)), 0x30))
        else:
            ident = draw(st.sampled_from([0x20, 0x40, 0x01, 0xF0, 0x11]))
            out.append((draw(addresses()), draw(st.integers(0, 9000)), ident))
    return out


@st.composite
def commands(draw: st.DrawFn) -> dict[str, object]:
    return {
        "opcode": draw(st.sampled_from(OPCODES)),
        "nsid": draw(st.sampled_from([1] * 6 + [2] * 3 + [3, 0, 9, 0xFFFFFFFF, 300])),
        "slba": draw(
            st.sampled_from([0, 1, 7, 30, 48, 56, 63, 100, 127, 140, 1 << 40, (1 << 64) - 1])
            if draw(st.integers(0, 3)) == 0
            else st.integers(0, 48)
        ),
        "nlb": draw(st.integers(0, 15) if draw(st.integers(0, 3)) else st.integers(0, 255)),
        "flags": draw(
            st.sampled_from([0] * 8 + [1 << 14, 1 << 15, 3 << 14, 1 << 8, 2 << 8, 3 << 8])
        ),
        # a fused Compare and Write of the command's range instead (its data pointer
        # for both halves; "match": the Compare's buffer holds what the storage holds)
        "fused": draw(st.sampled_from([None] * 6 + ["pair", "match"])),
        "fua": draw(st.booleans()),
        "deac": draw(st.booleans()),
        "pointer": draw(st.sampled_from(["prp1", "prp1", "prp2", "list", "list", "sgl", "sgl"])),
        "prp1": draw(addresses()),
        "prp2": draw(addresses()),
        "list": draw(prp_lists()),
        "sgl": draw(sgl_descriptors()),
        "entry1": draw(st.sampled_from(["last", "last", "last", "segment", "first"])),
        "dw10": draw(st.integers(0, (1 << 32) - 1)),
        "dw11": draw(st.integers(0, (1 << 32) - 1)),
    }


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    batches = draw(
        st.lists(
            st.tuples(
                st.lists(commands(), min_size=1, max_size=6),
                st.sampled_from(["none", "none", "hole", "copies", "bad doorbell"]),
                st.integers(0, DATA_PAGES - SCRATCH - 1),
            ),
            min_size=1,
            max_size=5,
        )
    )
    return {"shadow": draw(st.booleans()), "batches": batches}


def resolve(rig: Rig, address: tuple[str, int]) -> int:
    kind, value = address
    return value if kind == "wild" else rig.data + value


def build(rig: Rig, cmd: dict[str, object], scratch: int) -> list[list[int]]:
    """The command's dwords (two commands for a fused pair); lists and segments go into
    the scratch data page."""
    dw = build_one(rig, cmd, scratch)
    if cmd["fused"] is None:
        return [dw]
    first, second = list(dw), list(dw)
    first[0] = (dw[0] & ~0x3FF) | IoOpcode.COMPARE | FUSE_FIRST
    second[0] = (dw[0] & ~0x3FF) | IoOpcode.WRITE | FUSE_SECOND
    known = {
        nsid: (bs, image) for (nsid, _b, bs, _ro), image in zip(NAMESPACES, rig.images, strict=True)
    }
    nsid, slba, nlb = dw[1], dw[10] | (dw[11] << 32), (dw[12] & 0xFFFF) + 1
    if cmd["fused"] == "match" and nsid in known and known[nsid][0] * nlb <= PAGE:
        bs, image = known[nsid]
        data = image.read_bytes()[slba * bs : (slba + nlb) * bs]
        rig.host.memory.write(scratch, data)
        first[0] &= ~(3 << 14)  # PRP1 alone: the scratch page
        first[6:10] = [scratch & 0xFFFFFFFF, scratch >> 32, 0, 0]
    return [first, second]


def build_one(rig: Rig, cmd: dict[str, object], scratch: int) -> list[int]:
    mem = rig.host.memory
    dw = [0] * 16
    dw[0] = int(cmd["opcode"]) | int(cmd["flags"])  # type: ignore[call-overload]
    dw[1] = int(cmd["nsid"])  # type: ignore[call-overload]
    slba, nlb = int(cmd["slba"]), int(cmd["nlb"])  # type: ignore[call-overload]
    dw[10], dw[11] = slba & 0xFFFFFFFF, slba >> 32
    dw[12] = (nlb & 0xFFFF) | (FUA if cmd["fua"] else 0) | ((1 << 25) if cmd["deac"] else 0)
    if cmd["opcode"] in (IoOpcode.DATASET_MANAGEMENT, IoOpcode.COPY):
        dw[10] = int(cmd["dw10"]) & 0xFF  # type: ignore[call-overload]  # a few ranges
        dw[11] = int(cmd["dw11"])  # type: ignore[call-overload]
        if cmd["opcode"] == IoOpcode.COPY:
            dw[12] = int(cmd["dw10"]) & 0x3  # type: ignore[call-overload]
    prp1 = resolve(rig, cmd["prp1"])  # type: ignore[arg-type]
    prp2 = resolve(rig, cmd["prp2"])  # type: ignore[arg-type]
    pointer = cmd["pointer"]
    if pointer == "prp1":
        prp2 = 0
    elif pointer == "list":
        entries = [resolve(rig, a) for a in cmd["list"]]  # type: ignore[attr-defined]
        entries.append(scratch)  # a chain back to itself, if the walk gets that far
        mem.write(scratch, struct.pack(f"<{len(entries)}Q", *entries))
        prp2 = scratch
    elif pointer == "sgl":
        descriptors = cmd["sgl"]  # type: ignore[assignment]
        raw = b"".join(
            struct.pack("<QI3xB", resolve(rig, a) & ((1 << 64) - 1), n & 0xFFFFFFFF, ident)
            for a, n, ident in descriptors  # type: ignore[attr-defined]
        )
        mem.write(scratch, raw)
        first_addr, first_len, first_ident = descriptors[0]  # type: ignore[index]
        entry1 = cmd["entry1"]
        if entry1 != "first":  # SGL Entry 1 is a (Last) Segment of them all
            first_addr, first_len = ("page", scratch - rig.data), len(raw)
            first_ident = 0x30 if entry1 == "last" else 0x20
        dw[0] |= 1 << 14
        prp1 = resolve(rig, first_addr) & ((1 << 64) - 1)
        prp2 = (first_len & 0xFFFFFFFF) | (first_ident << 56)
    dw[6], dw[7] = prp1 & 0xFFFFFFFF, (prp1 >> 32) & 0xFFFFFFFF
    dw[8], dw[9] = prp2 & 0xFFFFFFFF, (prp2 >> 32) & 0xFFFFFFFF
    return dw


def observe(rig: Rig) -> tuple[list[Completion], bytes, list[bytes], tuple[object, ...]]:
    h = rig.host
    done = h.io[1].reap()
    # Completions carry no host address; statistics keep no time.
    snap = h.ctrl.statistics()
    counts = [
        (q["qid"], q["commands"], q["errors"], sorted(q["by_opcode"].items()))  # type: ignore[index]
        for q in snap["queues"]  # type: ignore[attr-defined]
    ]
    c = h.ctrl.counters
    state = (
        counts,
        (c.host_read_commands, c.host_write_commands, c.bytes_read, c.bytes_written),
        (c.media_errors, c.host_errors),
        list(h.ctrl.events.pending),
        h.ctrl.error_log.count,
        h.ctrl.registers.fatal,
        [(q.qid, q.is_cq, q.head, q.tail) for q in h.ctrl.data.queues()],
    )
    return done, bytes(h.memory.ram), [p.read_bytes() for p in rig.images], state


@pytest.mark.parametrize("data_plane", ["-"], indirect=False)
@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_both_planes_answer_every_stream_alike(
    tmp_path_factory: pytest.TempPathFactory, data_plane: str, scenario: dict[str, object]
) -> None:
    directory = tmp_path_factory.mktemp("diff")
    images = []
    for nsid, blocks, bs, _ro in NAMESPACES:
        image = directory / f"ns{nsid}.img"
        image.write_bytes(bytes((i * 7 + nsid) & 0xFF for i in range(256)) * (blocks * bs // 256))
        images.append(image)
    rigs = [
        make_rig(directory, plane, images, bool(scenario["shadow"]))
        for plane in ("python", "native")
    ]
    try:
        for batch, event, page in scenario["batches"]:  # type: ignore[attr-defined]
            for rig in rigs:
                mem = rig.host.memory
                if event == "hole":
                    mem.unmap(rig.page(page), PAGE)
                elif event == "copies":
                    mem.zero_copy = not mem.zero_copy
                q = rig.host.io[1]
                for i, cmd in enumerate(batch):
                    scratch = rig.page(DATA_PAGES - 1 - i)
                    for dw in build(rig, cmd, scratch):
                        q.submit(dw, ring=False)
                q.ring_sq()
                if event == "bad doorbell":
                    rig.host.ctrl.mmio_write(DOORBELL_BASE + 8, 4, QUEUE_ENTRIES + page)
                rig.host.run_io()
                rig.host.ctrl.process_admin()
            python, native = (observe(rig) for rig in rigs)
            assert native[0] == python[0], "completions differ"
            assert native[3] == python[3], "state differs"
            assert native[2] == python[2], "storage differs"
            assert native[1] == python[1], "guest memory differs"
        logs = [rig.host.get_log(LogPage.ERROR_INFORMATION, 64 * 64)[1] for rig in rigs]
        assert logs[0] == logs[1], "error logs differ"
    finally:
        for rig in rigs:
            for ns in rig.host.ctrl.namespaces.values():
                ns.backend.close()
