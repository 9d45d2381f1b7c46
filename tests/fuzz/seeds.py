"""Seed inputs for the fuzz targets: well-formed examples of what each one decodes,
so that the fuzzer starts from inputs that get past the first checks.

    .venv/bin/python tests/fuzz/seeds.py DIR    # writes DIR/<target>/seed-NNN

The corpus in tests/fuzz/corpus/ grew from these (see README.md).
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import fuzzing  # noqa: F401  (the import path)

from nvme_mdev.vfio_user import protocol as p

PAGE = 4096
QEMU_VERSION = (
    b"\x00\x00\x00\x00"
    b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    b'"pgsize": 4096}, "write_multiple": true}}\x00'
)
EVENTFD_TRIGGER = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER

#: (command, payload, fds) of what QEMU sends, one of each kind
REQUESTS: list[tuple[int, bytes, int]] = [
    (p.Command.VERSION, QEMU_VERSION, 0),
    (p.Command.DMA_MAP, p.DmaMap(3, 0, 0x10000, 0x1000).encode(), 0),
    (p.Command.DMA_MAP, p.DmaMap(3 | p.DMA_MAP_FLAG_MMAP, 0, 0x20000, 0x2000).encode(), 1),
    (p.Command.DMA_UNMAP, p.DmaUnmap(0, 0x10000, 0x1000).encode(), 0),
    (p.Command.DMA_UNMAP, p.DmaUnmap(p.DMA_UNMAP_FLAG_ALL, 0, 0).encode(), 0),
    (p.Command.DEVICE_GET_INFO, p.DeviceInfo().encode(), 0),
    (p.Command.DEVICE_GET_REGION_INFO, p.RegionInfoRequest(0).encode(), 0),
    (p.Command.DEVICE_GET_REGION_INFO, p.RegionInfoRequest(0, 80).encode(), 0),
    (p.Command.DEVICE_GET_REGION_INFO, p.RegionInfoRequest(7).encode(), 0),
    (p.Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(2).encode(), 0),
    (p.Command.DEVICE_SET_IRQS, p.IrqSet(EVENTFD_TRIGGER, 2, 0, 2).encode(), 2),
    (p.Command.DEVICE_SET_IRQS, p.IrqSet(EVENTFD_TRIGGER, 0, 0, 1).encode(), 0),
    (
        p.Command.DEVICE_SET_IRQS,
        p.IrqSet(p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_MASK, 2, 1, 2, b"\1\0").encode(),
        0,
    ),
    (p.Command.DEVICE_SET_IRQS, p.IrqSet(p.IRQ_SET_DATA_NONE | 0x20, 2, 0, 0).encode(), 0),
    (p.Command.REGION_READ, p.RegionAccess(7, 0, 4).encode(), 0),
    (p.Command.REGION_READ, p.RegionAccess(0, 0x1C, 4).encode(), 0),
    (p.Command.REGION_WRITE, p.RegionAccess(0, 0x1000, 4, b"\1\0\0\0").encode(), 0),
    (p.Command.REGION_WRITE, p.RegionAccess(7, 4, 2, b"\6\4").encode(), 0),
    (
        p.Command.REGION_WRITE_MULTI,
        p.WriteMulti(
            (p.RegionAccess(0, 0x1000, 4, b"\1\0\0\0"), p.RegionAccess(0, 0x1008, 4, b"\2\0\0\0"))
        ).encode(),
        0,
    ),
    (p.Command.DEVICE_RESET, b"", 0),
]


def message(command: int, payload: bytes, msg_id: int = 1, flags: int = 0) -> bytes:
    return p.HEADER.pack(msg_id, command, p.HEADER_SIZE + len(payload), flags, 0) + payload


def vfio_user() -> Iterator[bytes]:
    for command, payload, fds in REQUESTS:
        yield bytes([0, fds]) + message(command, payload)
    replies = [
        (p.Command.VERSION, p.Version(0, 0, p.Capabilities(16, 1 << 20, 4096)).encode()),
        (p.Command.DEVICE_GET_INFO, p.DeviceInfo(3, 9, 5).encode()),
        (
            p.Command.DEVICE_GET_REGION_INFO,
            p.RegionInfo.build(80, 0, 7, 0x4000, 0, [(0x1000, 0x1000)])[1],
        ),
        (p.Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(2, 1, 20).encode()),
        (p.Command.REGION_READ, p.RegionAccess(7, 0, 4, b"\x36\x1b\x10\x00").encode()),
        (p.Command.REGION_WRITE, p.RegionAccess(0, 0x14, 4).encode()),
        (p.Command.DMA_WRITE, p.DmaAccess(0x1000, 4, b"abcd").encode()),
    ]
    for command, payload in replies:
        yield bytes([1, 4]) + message(command, payload, flags=p.TYPE_REPLY)
    yield bytes([2, 4]) + message(p.Command.DMA_WRITE, b"", flags=p.TYPE_REPLY)
    yield bytes([2, 4]) + message(p.Command.DMA_READ, p.DmaAccess(0, 4, b"wxyz").encode())
    yield (
        bytes([3, 0])
        + struct.pack("<IIIQQB", 80, 0, 7, 0x4000, 0, 1)
        + bytes(8)
        + (PAGE.to_bytes(8, "little"))
    )


def vfio_user_framing() -> Iterator[bytes]:
    stream = b"".join(message(c, payload, i) for i, (c, payload, _) in enumerate(REQUESTS))
    yield struct.pack("<HH", 4096, len(stream)) + b"\0" + stream
    parts = [message(c, payload, i) for i, (c, payload, _) in enumerate(REQUESTS[:6])]
    out = struct.pack("<H", 4096)
    for i, part in enumerate(parts):
        out += struct.pack("<HB", len(part), (i % 3) | (0x80 if i == 4 else 0)) + part
    yield out
    one = message(p.Command.REGION_WRITE, p.RegionAccess(0, 0x1000, 4, b"\1\0\0\0").encode())
    yield (
        struct.pack("<HHB", 64, 10, 1) + one[:10] + struct.pack("<HB", len(one) - 10, 0) + one[10:]
    )


def vfio_user_server() -> Iterator[bytes]:
    def entry(command: int, payload: bytes, fds: int = 0, flags: int = 0, msg_id: int = 1) -> bytes:
        if command == p.Command.DEVICE_SET_IRQS:
            fds |= 4  # eventfds
        return struct.pack("<HHIIBH", msg_id, command, flags, 0, fds, len(payload)) + payload

    yield b"\0" + entry(p.Command.VERSION, QEMU_VERSION)
    yield b"\1" + b"".join(
        entry(c, payload, fds, 0, i) for i, (c, payload, fds) in enumerate(REQUESTS)
    )
    for command, payload, fds in REQUESTS[1:]:
        yield b"\1" + entry(command, payload, fds)
    yield b"\1" + entry(p.Command.REGION_WRITE, REQUESTS[16][1], 0, p.FLAG_NO_REPLY)


def prp() -> Iterator[bytes]:
    def case(prp1: int, prp2: int, length: int, at: int = 0, image: bytes = b"") -> bytes:
        return struct.pack("<QQIH", prp1, prp2, length, at) + image

    yield case(0x1000, 0, 512)
    yield case(0x1200, 0x2000, 4096)
    yield case(0x1000, 0x3000, 3 * PAGE, 0x3000, struct.pack("<2Q", 0x5000, 0x6000))
    chain = struct.pack("<Q", 0x7000) + struct.pack("<3Q", 0x8000, 0x9000, 0xA000)
    yield case(0x1000, 0x4FF8, 4 * PAGE, 0x4FF8, chain[:8])
    yield case(0x1000, 0x6FF0, 4 * PAGE, 0x6FF0, struct.pack("<2Q", 0x2000, 0x8000) + chain[8:])
    yield case(0x1002, 0, 8)
    yield case(0x1000, 0x2000, 8192 | 0x40000000)


def sgl() -> Iterator[bytes]:
    def case(
        addr: int, length: int, ident: int, total: int, at: int = 0, image: bytes = b""
    ) -> bytes:
        entry = struct.pack("<QI3xB", addr, length, ident)
        return entry + struct.pack("<IH", total, at) + image

    def descriptor(addr: int, length: int, ident: int) -> bytes:
        return struct.pack("<QI3xB", addr, length, ident)

    yield case(0x2000, 4096, 0x00, 4096)
    yield case(
        0x1000, 32, 0x30, 0x80000000 | 8192, 0x1000,
        descriptor(0x4000, 4096, 0) + descriptor(0x6000, 4096, 0x10),
    )  # fmt: skip
    yield case(
        0x1000, 32, 0x20, 8192, 0x1000,
        descriptor(0x4000, 4096, 0) + descriptor(0x1800, 16, 0x30)
        + bytes(0x7E0) + descriptor(0x9000, 4096, 0),
    )  # fmt: skip
    yield case(0x2001, 4096, 0x00, 0x40000000 | 4096)
    # a segment that points to itself: a loop
    yield case(0x1000, 16, 0x20, 512, 0x1000, descriptor(0x1000, 16, 0x20))
    # one that points to itself and takes a byte each time: the descriptor budget
    # (guest memory is zeros: Data Blocks of 0 bytes)
    yield case(
        0, 0x10000, 0x20, 100, 0xFFE0, descriptor(0x100, 1, 0) + descriptor(0, 0x10000, 0x20)
    )
    yield case(0x2000, 4096, 0x00, 0x10000000 | 0x80000000 | 4096)


def nvme_controller() -> Iterator[bytes]:
    def sqe(*dwords: int) -> bytes:
        return struct.pack("<16I", *dwords, *[0] * (16 - len(dwords)))

    image = bytes(range(256))
    head = struct.pack("<H", len(image)) + image
    identify = b"\2" + sqe(0x06, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)
    write = b"\3" + sqe(0x01, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7)
    read = b"\3" + sqe(0x02, 1, 0, 0, 0, 0, 0x2000, 0, 0, 0, 0, 0, 7)
    sgl_read = b"\3" + sqe(0x4002, 2, 0, 0, 0, 0, 0x3000, 0, 4096, 0, 1, 0, 0)
    log = b"\2" + sqe(0x02, 0xFFFFFFFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x007F0002)
    features = b"\0" + sqe(0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07, 0x00030003)
    create = b"\2" + sqe(0x05, 0, 0, 0, 0, 0, 0x4000, 0, 0, 0, 0x00070002, 0x00020003)
    delete = b"\0" + sqe(0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)
    aer = b"\0" + sqe(0x0C)
    yield head + identify + b"\2" + sqe(0x06, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    yield head + write + read + sgl_read
    yield head + log + features + aer + delete + write
    yield head + create + b"\2" + sqe(0x01, 0, 0, 0, 0, 0, 0x5000, 0, 0, 0, 0x00070002, 0x00020001)
    yield head + b"\3" + sqe(0x08, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15) + b"\3" + sqe(0x09, 1)


def control() -> Iterator[bytes]:
    def request(method: str, params: object, rid: object = 1) -> bytes:
        doc = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        return b"\0" + json.dumps(doc).encode()

    yield request("list", {})
    yield request("stats", {"controller": "vm1"})
    yield request("prometheus", {}, "x")
    yield request("iothread", {"cpus": [0, 1], "poll_timeout_ms": 5})
    yield request("namespace_rescan", {})
    yield request("namespace_add", {"controller": "vm1", "spec": "disk.img,ro", "nsid": 2})
    yield request("namespace_remove", {"controller": "vm1", "nsid": 2})
    yield request("controller_delete", {"name": "vm1"})
    yield request("nope", [])
    yield b"\0" + b'{"jsonrpc": "2.0", "method": "list"}'
    yield b"\0" + b"not json"
    controller = {
        "name": "vm1",
        "socket": "/run/vm1.sock",
        "queue_depth": 256,
        "iothread_cpu": "0-3,5",
        "namespaces": ["null:1G", {"spec": "disk.img,bs=4096", "nsid": 3, "size": "1G"}],
    }
    methods = [
        "controller_create",
        "controller_delete",
        "iothread",
        "list",
        "namespace_add",
        "namespace_remove",
        "namespace_rescan",
        "prometheus",
        "stats",
    ]  # sorted, as fuzz_control.METHODS
    method_bit = methods.index("controller_create")
    yield bytes([1 | method_bit << 1]) + json.dumps(controller).encode()


def namespace_spec() -> Iterator[bytes]:
    for text in (
        "disk.img",
        "/dev/sdb2,ro",
        "big.img,bs=4096",
        "null:1G",
        "disk.img,offset=1G,size=2G",
        "nvme0:n1p3",
        "/dev/sdb3,force,direct=on",
        "/dev/ng0n1",
        "nvme0:n1,passthrough",
    ):
        yield b"\0" + text.encode()
    for text in ("512M", "4GiB", "1073741824", "1T"):
        yield b"\1" + text.encode()
    for text in ("3", "2,5", "0-3"):
        yield b"\2" + text.encode()


SEEDS = {
    "vfio_user": vfio_user,
    "vfio_user_framing": vfio_user_framing,
    "vfio_user_server": vfio_user_server,
    "prp": prp,
    "sgl": sgl,
    "nvme_controller": nvme_controller,
    "control": control,
    "namespace_spec": namespace_spec,
}


def main() -> None:
    out = Path(sys.argv[1])
    for target, make in SEEDS.items():
        directory = out / target
        directory.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(make()):
            (directory / f"seed-{i:03d}").write_bytes(data)


if __name__ == "__main__":
    main()
