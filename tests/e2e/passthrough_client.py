"""Run inside the passthrough test's guest (test_passthrough_guest.py): drive an
`nvme-mdev serve` of /dev/ng0n1 (QEMU's emulated NVMe namespace, passed through)
with the project's own NVMe client, and check what it does against the same
namespace read and written through the guest's /dev/nvme0n1.

    passthrough_client.py SOCKET BLOCK-DEVICE
Prints one line per check and ends with PASSTHROUGH-CLIENT: PASS (exit 0)."""

from __future__ import annotations

import mmap
import os
import struct
import sys

from nvme_mdev import nvme_host as nh
from nvme_mdev.nvme.spec import IoOpcode

DNR = 1 << 14
LBA_OUT_OF_RANGE = 0x080
INVALID_OPCODE = 0x001
COMPARE_FAILURE = 0x285
#: what the host test looks for in the image file afterwards
MARK_LBA = 4096
MARK = b"nvme-mdev passthrough was here\n"


def check(what: str, ok: bool, detail: object = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what} {detail}", flush=True)
    if not ok:
        raise SystemExit(1)


def direct_io(path: str, offset: int, length: int, data: bytes | None = None) -> bytes:
    """Read (or write `data`) through the block device, bypassing its page cache."""
    buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, (os.O_RDWR if data is not None else os.O_RDONLY) | os.O_DIRECT)
    try:
        if data is not None:
            buf[:] = data
            os.pwritev(fd, [buf], offset)
            return data
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def main() -> int:
    socket, block = sys.argv[1], sys.argv[2]
    with nh.NvmeHost(socket) as host:
        host.enable()
        q = host.create_queue_pair(1)
        ns = host.identify(0, 1)
        nsze = struct.unpack_from("<Q", ns)[0]
        flbas = ns[26] & 0xF
        lbads = ns[128 + 4 * flbas + 2]
        bs = 1 << lbads
        with open(f"/sys/block/{os.path.basename(block)}/size") as f:
            host_bytes = int(f.read()) * 512
        check("size and LBA format are the host namespace's", nsze * bs == host_bytes,
              f"{nsze} x {bs} B")  # fmt: skip

        def run(dwords: list[int]) -> nh.Completion:
            return q.command(dwords, timeout=60)

        # Write 64 KiB (a PRP list), read it back, and through the block device.
        length, slba = 64 << 10, 1000
        nlb = length // bs
        buf = host.alloc(length)
        data = os.urandom(length)
        host.ram.write(buf, data)
        prp1, prp2 = host.prps(buf, length)
        c = run(nh.nvm_command(IoOpcode.WRITE, 1, slba, nlb, prp1, prp2))
        check("write 64 KiB", c.ok, hex(c.status))
        out = host.alloc(length)
        prp1, prp2 = host.prps(out, length)
        c = run(nh.nvm_command(IoOpcode.READ, 1, slba, nlb, prp1, prp2))
        check("read it back", c.ok and host.ram.read(out, length) == data, hex(c.status))
        check("the host's block device has it", direct_io(block, slba * bs, length) == data)

        # The other way: written through the block device, read through the device.
        other = os.urandom(8192)
        direct_io(block, 3000 * bs, 8192, other)
        c = run(nh.nvm_command(IoOpcode.READ, 1, 3000, 8192 // bs, *host.prps(out, 8192)))
        check("read what the host wrote", c.ok and host.ram.read(out, 8192) == other)

        # FUA write, and a mark the host test finds in the image file.
        mark = MARK.ljust(bs, b"\0")
        host.ram.write(buf, mark)
        c = run(nh.nvm_command(IoOpcode.WRITE, 1, MARK_LBA, 1, buf, fua=True))
        check("FUA write", c.ok, hex(c.status))
        check("flush", run(nh.flush(1)).ok)

        # Refused here, before the host: out of range, an opcode not passed through.
        c = run(nh.nvm_command(IoOpcode.READ, 1, nsze, 1, out))
        check("read past the end: LBA Out of Range, DNR", c.status == DNR | LBA_OUT_OF_RANGE,
              hex(c.status))  # fmt: skip
        c = run([0x7E, 1])
        check("opcode 7Eh: Invalid Command Opcode, DNR", c.status == DNR | INVALID_OPCODE,
              hex(c.status))  # fmt: skip

        # Answered by the host's controller, and its status reaches us as it is.
        host.ram.write(out, data[:bs])
        c = run(nh.nvm_command(IoOpcode.COMPARE, 1, slba, 1, out))
        check("compare, same data", c.ok, hex(c.status))
        host.ram.write(out, bytes(bs))
        c = run(nh.nvm_command(IoOpcode.COMPARE, 1, slba, 1, out))
        check("compare, other data: the host's Compare Failure",
              c.status & 0x7FF == COMPARE_FAILURE, hex(c.status))  # fmt: skip
        c = run(nh.nvm_command(IoOpcode.VERIFY, 1, slba, nlb))
        check("verify", c.ok, hex(c.status))
        c = run(nh.write_zeroes(1, slba, 8))
        zeroes = c.ok and direct_io(block, slba * bs, 8 * bs) == bytes(8 * bs)
        check("write zeroes", zeroes, hex(c.status))
        ranges = host.alloc(4096)
        host.ram.write(ranges, nh.dsm_range(2000, 64))
        c = run(nh.dataset_management(1, ranges, 1, deallocate=True))
        check("dataset management, deallocate", c.ok, hex(c.status))

        # Copy: 8 blocks from slba + 8 to 5000, if the host's controller copies.
        host.ram.write(ranges, nh.copy_range(slba + 8, 8))
        c = run(nh.copy(1, 5000, ranges, 1))
        if c.status & 0x7FF == INVALID_OPCODE:
            print("skip copy: the host's controller has no Copy", flush=True)
        else:
            copied = direct_io(block, 5000 * bs, 8 * bs) == data[8 * bs : 16 * bs]
            check("copy", c.ok and copied, hex(c.status))

        # An SGL data pointer becomes iovecs too.
        sgl = nh.with_sgl(nh.nvm_command(IoOpcode.READ, 1, slba + 8, 8),
                          nh.sgl_descriptor(nh.SGL_DATA_BLOCK, out, 8 * bs))  # fmt: skip
        c = run(sgl)
        check("read with an SGL", c.ok and host.ram.read(out, 8 * bs) == data[8 * bs : 16 * bs],
              hex(c.status))  # fmt: skip
    print("PASSTHROUGH-CLIENT: PASS", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
