#!/usr/bin/env python3
"""Boot a Linux guest under QEMU (TCG) with NVMe devices and run a script in it.

The guest is the Debian trixie tree that prepare.sh builds: QEMU and the kernel
come from it, and the guest mounts it read-only over virtio-9p as its root, so
nvme-cli, fio and mkfs run from there. A small initramfs (busybox and the kernel
modules the guest needs) mounts it, runs the script, prints its exit status on the
console and powers off.

Library: run_guest(script, sockets=[...]) -> GuestResult(status, output).
CLI:     guestvm.py run --socket PATH [--script FILE | --command CODE]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

GUEST_DIR = Path(os.environ.get("NVME_MDEV_GUEST_DIR", "/var/cache/nvme-mdev/guest"))
EXIT_MARKER = re.compile(r"GUESTVM-EXIT=(\d+)")
# Modules the guest needs, with their dependencies resolved from modules.dep.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "nvme", "ext4")
OPTIONAL_MODULES = ("crc32c_generic", "crc32c_intel", "libcrc32c")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
    insmod "/lib/modules/$m" 2>/dev/null || echo "guestvm: insmod $m failed"
done
mkdir -p /newroot /host
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$opts,ro" root /newroot || echo "guestvm: no root"
mount -t 9p -o "$opts" host /host || echo "guestvm: no host dir"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm
mount -t tmpfs tmp /newroot/tmp
mount -t tmpfs run /newroot/run
mount --bind /host /newroot/mnt
chroot /newroot /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp TERM=dumb \
    /bin/bash /mnt/script.sh
echo "GUESTVM-EXIT=$?"
sync
poweroff -f
"""


class GuestNotPrepared(Exception):
    pass


@dataclass(frozen=True)
class GuestResult:
    status: int  # the script's exit status; -1 if the guest never reported one
    output: str
    seconds: float


def _kernel(root: Path) -> tuple[Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels or not (root / ".nvme-mdev-ready").exists():
        raise GuestNotPrepared(f"{root}: no prepared guest; run tools/guest/prepare.sh as root")
    kernel = kernels[-1]
    version = kernel.name.removeprefix("vmlinuz-")
    return kernel, root / "lib" / "modules" / version


def _module_order(moddir: Path) -> list[str]:
    """Module paths (relative to moddir) in load order: dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[name] = path
    builtin = {
        Path(line).name.split(".ko")[0].replace("-", "_")
        for line in (moddir / "modules.builtin").read_text().splitlines()
    }
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in MODULES + OPTIONAL_MODULES:
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin and name in MODULES:
            raise GuestNotPrepared(f"kernel module {name} not found in {moddir}")
    return order


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio 'newc' archive of (name, mode, data) entries."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
        out.write(header + encoded)
        out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


def build_initramfs(root: Path, cache: Path) -> Path:
    """The initramfs for this tree, rebuilt when the kernel or the init script change."""
    _, moddir = _kernel(root)
    order = _module_order(moddir)
    key = hashlib.sha256(json.dumps([str(moddir), order, INIT]).encode()).hexdigest()[:16]
    target = cache / f"initramfs-{key}.cpio.gz"
    if target.exists():
        return target
    dirs = ["bin", "dev", "proc", "sys", "lib", "lib/modules", "newroot", "host"]
    entries: list[tuple[str, int, bytes]] = [(d, 0o040755, b"") for d in dirs]
    entries.append(("bin/busybox", 0o100755, (root / "usr/bin/busybox").read_bytes()))
    entries.append(("init", 0o100755, INIT.encode()))
    names = []
    for rel in order:
        raw = (moddir / rel).read_bytes()
        if rel.endswith(".xz"):
            raw = lzma.decompress(raw)
        elif rel.endswith(".zst"):
            raise GuestNotPrepared(f"{rel}: zstd-compressed modules are not supported")
        name = Path(rel).name.split(".ko")[0] + ".ko"
        entries.append((f"lib/modules/{name}", 0o100644, raw))
        names.append(name)
    entries.append(("modules.order", 0o100644, "\n".join(names).encode() + b"\n"))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(_cpio(entries), compresslevel=1))
    tmp.rename(target)
    return target


def qemu_command(
    root: Path,
    initramfs: Path,
    host_dir: Path,
    sockets: list[str],
    emulated_nvme_images: list[str],
    memory_mb: int,
    smp: int,
    extra_args: list[str],
    kernel_args: str = "",
    shared_memory: bool = True,
) -> tuple[list[str], dict[str, str]]:
    kernel, _ = _kernel(root)
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    cmd = [
        f"{root}/lib64/ld-linux-x86-64.so.2", "--library-path", libs,
        f"{root}/usr/bin/qemu-system-x86_64",
        "-L", f"{root}/usr/share/qemu", "-L", f"{root}/usr/share/seabios",
        "-machine", "q35,memory-backend=mem", "-accel", "tcg", "-cpu", "max",
        "-smp", str(smp), "-m", f"{memory_mb}M",
        # Shared RAM reaches the device as an fd to mmap; anonymous RAM has no fd, so
        # the device must go through DMA_READ/DMA_WRITE messages.
        "-object",
        f"memory-backend-{'memfd' if shared_memory else 'ram'},id=mem,size={memory_mb}M"
        + (",share=on" if shared_memory else ""),
        "-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none",
        "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initramfs),
        "-append", f"console=ttyS0 panic=-1 loglevel=4 rdinit=/init {kernel_args}".strip(),
        "-virtfs", f"local,path={root},mount_tag=root,security_model=none,readonly=on",
        "-virtfs", f"local,path={host_dir},mount_tag=host,security_model=none",
    ]  # fmt: skip
    for path in sockets:
        device = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": path}}
        cmd += ["-device", json.dumps(device, separators=(",", ":"))]
    if emulated_nvme_images:
        cmd += ["-device", "nvme,serial=emulated0,id=nvme0"]
        for nsid, image in enumerate(emulated_nvme_images, start=1):
            cmd += ["-drive", f"file={image},if=none,format=raw,id=ns{nsid},cache=none"]
            cmd += ["-device", f"nvme-ns,drive=ns{nsid},nsid={nsid},bus=nvme0"]
    cmd += extra_args
    env = dict(os.environ, QEMU_MODULE_DIR=f"{root}/usr/lib/x86_64-linux-gnu/qemu")
    return cmd, env


def run_guest(
    script: str,
    sockets: list[str] | None = None,
    emulated_nvme_images: list[str] | None = None,
    memory_mb: int = 1024,
    smp: int = 2,
    timeout: float = 900,
    extra_args: list[str] | None = None,
    echo: bool = False,
    root: Path = GUEST_DIR,
    kernel_args: str = "",
    shared_memory: bool = True,
) -> GuestResult:
    """Boot the guest, run `script` (bash) in it, and return its status and the console."""
    initramfs = build_initramfs(root, root.parent / "initramfs")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="guestvm-") as tmp:
        host_dir = Path(tmp)
        (host_dir / "script.sh").write_text(script)
        cmd, env = qemu_command(
            root, initramfs, host_dir, sockets or [], emulated_nvme_images or [],
            memory_mb, smp, extra_args or [], kernel_args, shared_memory,
        )  # fmt: skip
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        lines: list[str] = []
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").replace("\r", "")
                lines.append(line)
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = "".join(lines)
    found = EXIT_MARKER.findall(output)
    status = int(found[-1]) if found else -1
    return GuestResult(status, output, time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="boot the guest and run a script in it")
    run.add_argument("--socket", action="append", default=[], help="vfio-user socket")
    run.add_argument("--emulated-nvme", action="append", default=[], metavar="IMAGE",
                     help="a namespace on QEMU's own NVMe device (for comparison)")
    source = run.add_mutually_exclusive_group()
    source.add_argument("--script", type=Path, help="bash script to run in the guest")
    source.add_argument("--command", help="bash code to run in the guest")
    run.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB")
    run.add_argument("--smp", type=int, default=2)
    run.add_argument("--timeout", type=float, default=900)
    run.add_argument("--kernel-args", default="", help="extra kernel command line")
    run.add_argument("--no-shared-memory", action="store_true",
                     help="private guest RAM: the device must use DMA_READ/DMA_WRITE messages")
    args = parser.parse_args(argv)
    script = args.script.read_text() if args.script else (args.command or "nvme list")
    try:
        result = run_guest(
            script, args.socket, args.emulated_nvme, args.memory, args.smp, args.timeout,
            echo=True, kernel_args=args.kernel_args, shared_memory=not args.no_shared_memory,
        )  # fmt: skip
    except GuestNotPrepared as exc:
        print(f"guestvm: {exc}", file=sys.stderr)
        return 2
    print(f"guestvm: script exited {result.status} after {result.seconds:.1f} s", file=sys.stderr)
    return result.status if result.status >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())

