#!/usr/bin/env python3
"""Boot a Linux guest under QEMU (TCG) with NVMe devices and run a script in it.

The guest is the Debian trixie tree that prepare.sh builds: QEMU and the kernel
come from it, and the guest mounts it read-only over virtio-9p as its root, so
nvme-cli, fio and mkfs run from there. A small initramfs (busybox and the kernel
modules the guest needs, built here and cached) mounts it, runs the script in a
chroot of it, prints the script's exit status on the console and powers off.

Library (tests put tools/guest on sys.path, then `import guestvm`):
    vm = GuestVM(sockets=[path], emulated_nvme_images=[], memory_mb=1024, smp=2,
                 shares={"project": repo})   # read-only at /mnt/project in the guest
    result = vm.run(script, timeout=900, env={"NAME": "value"})
    result.status, result.output   # the script's exit status (-1: none), the console
    run_guest(script, sockets=[path], ...) is the same in one call.
CLI:
    guestvm.py run [--socket PATH]... [--emulated-nvme IMAGE]... [--script FILE | --command CODE]
                   [--memory 1G] [--smp 2] [--timeout S] [--env NAME=VALUE]...
                   [--share TAG=DIR]... [--kernel-args ARGS] [--no-shared-memory]
                   [--log FILE] [--quiet]
                   [--extra-qemu-arg=ARG]... [-- EXTRA-QEMU-ARGS...]
    guestvm.py info     # the prepared tree: QEMU version, vfio-user-pci, kernel
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
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

GUEST_DIR = Path(os.environ.get("NVME_MDEV_GUEST_DIR", "/var/cache/nvme-mdev/guest"))
STAMP = ".nvme-mdev-ready"
EXIT_MARKER = re.compile(r"^GUESTVM-EXIT=(\d+)\s*$", re.MULTILINE)
START_MARKER = "GUESTVM-START"
TIMEOUT_STATUS = 124  # the CLI's exit status when the guest ran out of time
SHARE_TAG = re.compile(r"[A-Za-z0-9_-]{1,31}")
# Modules the guest needs; their dependencies come from modules.dep (nvme-auth,
# nvme-core; netfs, 9pnet; jbd2, mbcache, crc16). virtio and virtio_pci are built in.
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "nvme", "ext4")
OPTIONAL_MODULES = ("crc32c_generic", "crc32c_intel", "libcrc32c")

# The guest's /init. Kernel messages below the console's loglevel (warnings, info)
# that mention nvme are copied to the console from /dev/kmsg, so that a failing
# device can be debugged from the console alone.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
awk '/^[0-9]+,/ && tolower($0) ~ /nvme/ {
    split(substr($0, 1, index($0, ";") - 1), h, ",")
    if (h[1] % 8 >= 4) {
        printf "[%12.6f] %s\n", h[3] / 1e6, substr($0, index($0, ";") + 1); fflush()
    }
}' /dev/kmsg &
for m in $(cat /modules.order); do
    insmod "/lib/modules/$m" || echo "guestvm: insmod $m failed"
done
mkdir -p /newroot /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose root /newroot \
    || echo "guestvm: cannot mount the root tree"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 host /host \
    || echo "guestvm: cannot mount the host directory"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm
mount -t tmpfs tmp /newroot/tmp
mount -t tmpfs run /newroot/run
mount --bind /host /newroot/mnt
for tag in $(cat /host/shares 2>/dev/null); do
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 "$tag" "/newroot/mnt/$tag" \
        || echo "guestvm: cannot mount the shared directory $tag"
done
echo "GUESTVM-START $(cut -d' ' -f1 /proc/uptime)"
chroot /newroot /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp TERM=dumb \
    LANG=C.UTF-8 /bin/bash -c 'set -a; . /mnt/env.sh; set +a; exec /bin/bash /mnt/script.sh' \
    </dev/null
echo "GUESTVM-EXIT=$?"
sync
poweroff -f
"""


class GuestNotPrepared(Exception):
    """The guest tree is missing or incomplete: run tools/guest/prepare.sh."""


@dataclass(frozen=True)
class GuestResult:
    status: int  # the script's exit status; -1 if the guest never reported one
    output: str  # the serial console (kernel, init and script) and QEMU's own messages
    seconds: float  # from starting QEMU until it exited
    boot_seconds: float | None = None  # from starting QEMU until the script started
    timed_out: bool = False  # QEMU was killed when the timeout ran out
    qemu_returncode: int | None = None  # QEMU's own exit status (negative: killed by signal)

    @property
    def ok(self) -> bool:
        return self.status == 0


def is_prepared(root: Path = GUEST_DIR) -> bool:
    """True if prepare.sh finished building the tree at `root`."""
    return (root / STAMP).exists() and any((root / "boot").glob("vmlinuz-*"))


def _kernel(root: Path) -> tuple[Path, Path]:
    """The tree's kernel and its module directory."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels or not (root / STAMP).exists():
        raise GuestNotPrepared(f"{root}: no prepared guest; run tools/guest/prepare.sh as root")
    kernel = kernels[-1]
    return kernel, root / "lib" / "modules" / kernel.name.removeprefix("vmlinuz-")


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def _module_order(moddir: Path) -> list[str]:
    """The paths (relative to moddir) of the modules to load, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[_module_name(path)] = path
    builtin = {_module_name(line) for line in (moddir / "modules.builtin").read_text().split()}
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
        elif name in MODULES and name not in builtin:
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


def _initramfs_cache(root: Path) -> Path:
    """Inside the tree (so a rebuilt tree drops it), or per user if the tree is read-only."""
    if os.access(root, os.W_OK):
        return root / ".nvme-mdev-initramfs"
    return Path.home() / ".cache" / "nvme-mdev" / "initramfs"


def build_initramfs(root: Path = GUEST_DIR, cache: Path | None = None) -> Path:
    """The initramfs for this tree, cached; rebuilt when its inputs change."""
    kernel, moddir = _kernel(root)
    order = _module_order(moddir)
    busybox = root / "usr/bin/busybox"
    inputs = [kernel, busybox, *(moddir / rel for rel in order)]
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in inputs]
    key = hashlib.sha256(json.dumps([stats, order, INIT]).encode()).hexdigest()[:16]
    cache = cache or _initramfs_cache(root)
    target = cache / f"initramfs-{key}.cpio.gz"
    if target.exists():
        return target
    dirs = ["bin", "dev", "proc", "sys", "lib", "lib/modules", "newroot", "host"]
    entries: list[tuple[str, int, bytes]] = [(d, 0o040755, b"") for d in dirs]
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
    entries.append(("init", 0o100755, INIT.encode()))
    names = []
    for rel in order:
        raw = (moddir / rel).read_bytes()
        if rel.endswith(".xz"):
            raw = lzma.decompress(raw)  # busybox insmod takes plain .ko files only
        elif rel.endswith((".zst", ".gz")):
            raise GuestNotPrepared(f"{rel}: only xz-compressed or plain modules are supported")
        name = Path(rel).name.split(".ko")[0] + ".ko"
        entries.append((f"lib/modules/{name}", 0o100644, raw))
        names.append(name)
    entries.append(("modules.order", 0o100644, "\n".join(names).encode() + b"\n"))
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob("initramfs-*.cpio.gz"):
        old.unlink(missing_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(gzip.compress(_cpio(entries), compresslevel=1))
    tmp.rename(target)
    return target


def qemu_base_command(root: Path = GUEST_DIR) -> tuple[list[str], dict[str, str]]:
    """The tree's QEMU, run through the tree's own loader and libraries, and its env."""
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    cmd = [
        f"{root}/lib64/ld-linux-x86-64.so.2", "--library-path", libs,
        f"{root}/usr/bin/qemu-system-x86_64",
        "-L", f"{root}/usr/share/qemu", "-L", f"{root}/usr/share/seabios",
    ]  # fmt: skip
    env = dict(os.environ, QEMU_MODULE_DIR=f"{root}/usr/lib/x86_64-linux-gnu/qemu")
    return cmd, env


def qemu_info(root: Path = GUEST_DIR) -> dict[str, str | bool]:
    """What the tree's QEMU is: its version and whether it has vfio-user-pci."""
    _kernel(root)
    cmd, env = qemu_base_command(root)
    version = subprocess.run(
        [*cmd, "--version"], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    devices = subprocess.run(
        [*cmd, "-device", "help"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return {"version": version, "vfio-user-pci": '"vfio-user-pci"' in devices}


@dataclass
class GuestVM:
    """A guest with NVMe controllers: vfio-user sockets and/or QEMU's own NVMe device."""

    sockets: Sequence[str | os.PathLike[str]] = ()
    # namespaces 1, 2, ... of one QEMU-emulated controller (raw images), for comparison
    emulated_nvme_images: Sequence[str | os.PathLike[str]] = ()
    memory_mb: int = 1024
    smp: int = 2
    extra_args: Sequence[str] = ()  # appended to QEMU's command line
    kernel_args: str = ""  # appended to the kernel's command line
    # shared (memfd) guest RAM: the device maps it; without it the device must use
    # DMA_READ/DMA_WRITE messages
    shared_memory: bool = True
    root: Path = field(default_factory=lambda: GUEST_DIR)
    # host directories the guest sees read-only at /mnt/TAG (virtio-9p), e.g. this
    # project, to run its own code in the guest with the tree's python3
    shares: Mapping[str, str | os.PathLike[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tag in self.shares:
            if not SHARE_TAG.fullmatch(tag) or tag in ("root", "host"):
                raise ValueError(f"share tag {tag!r}: letters, digits, _ and - (not root, host)")

    def command(self, initramfs: Path, host_dir: Path) -> tuple[list[str], dict[str, str]]:
        """QEMU's command line and environment; host_dir is the guest's /mnt."""
        kernel, _ = _kernel(self.root)
        cmd, env = qemu_base_command(self.root)
        mem = f"{self.memory_mb}M"
        # Shared RAM reaches the device as an fd to mmap; anonymous RAM has no fd, so the
        # device must go through DMA_READ/DMA_WRITE messages. (A memfd with share=off is
        # wrong for this: QEMU still passes the fd, but the guest's writes stay private.)
        backend = "memfd,share=on" if self.shared_memory else "ram"
        cmd += [
            "-machine", "q35,memory-backend=mem", "-accel", "tcg", "-cpu", "max",
            "-smp", str(self.smp), "-m", mem,
            "-object", f"memory-backend-{backend},id=mem,size={mem}",
            "-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initramfs),
            "-append",
            f"console=ttyS0 panic=-1 loglevel=4 rdinit=/init {self.kernel_args}".strip(),
            "-virtfs", f"local,path={self.root},mount_tag=root,security_model=none,readonly=on",
            "-virtfs", f"local,path={host_dir},mount_tag=host,security_model=none",
        ]  # fmt: skip
        for tag, path in self.shares.items():
            cmd += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none,readonly=on"]
        for path in self.sockets:
            device = {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(path)}}
            cmd += ["-device", json.dumps(device, separators=(",", ":"))]
        if self.emulated_nvme_images:
            cmd += ["-device", "nvme,serial=emulated0,id=nvme0"]
            for nsid, image in enumerate(self.emulated_nvme_images, start=1):
                # QEMU's fastest host I/O: O_DIRECT, io_uring (the peer's best settings)
                drive = f"file={image},if=none,format=raw,id=ns{nsid},cache=none,aio=io_uring"
                cmd += ["-drive", drive]
                cmd += ["-device", f"nvme-ns,drive=ns{nsid},nsid={nsid},bus=nvme0"]
        cmd += self.extra_args
        return cmd, env

    def run(
        self,
        script: str,
        *,
        timeout: float = 900,
        env: Mapping[str, str] | None = None,
        echo: bool = False,
        log_path: str | os.PathLike[str] | None = None,
    ) -> GuestResult:
        """Boot, run `script` with bash in the guest (as root, cwd /, environment `env`,
        the tree's tools on PATH, /tmp a tmpfs), and return its status and the console.
        QEMU is killed after `timeout` seconds (status -1, timed_out). The console is
        also echoed to stdout (`echo`) and written to `log_path` as it arrives."""
        initramfs = build_initramfs(self.root)
        with tempfile.TemporaryDirectory(prefix="guestvm-") as tmp:
            host_dir = Path(tmp)
            (host_dir / "script.sh").write_text(script)
            exports = "".join(f"{k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
            (host_dir / "env.sh").write_text(exports)
            for tag in self.shares:
                (host_dir / tag).mkdir()  # the mount point, in the guest's /mnt
            (host_dir / "shares").write_text("".join(f"{tag}\n" for tag in self.shares))
            cmd, qemu_env = self.command(initramfs, host_dir)
            if log_path is None:
                return _run_qemu(cmd, qemu_env, timeout, echo, None)
            with open(log_path, "w", buffering=1) as log:
                return _run_qemu(cmd, qemu_env, timeout, echo, log)


def _run_qemu(
    cmd: list[str], env: dict[str, str], timeout: float, echo: bool, log: TextIO | None
) -> GuestResult:
    start = time.monotonic()
    boot_seconds: float | None = None
    killed = threading.Event()
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "")
            if boot_seconds is None and line.startswith(START_MARKER):
                boot_seconds = time.monotonic() - start
            lines.append(line)
            if log is not None:
                log.write(line)
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
    return GuestResult(
        status, output, time.monotonic() - start, boot_seconds, killed.is_set(), proc.returncode
    )


def run_guest(
    script: str,
    sockets: Sequence[str | os.PathLike[str]] | None = None,
    emulated_nvme_images: Sequence[str | os.PathLike[str]] | None = None,
    memory_mb: int = 1024,
    smp: int = 2,
    timeout: float = 900,
    extra_args: Sequence[str] | None = None,
    echo: bool = False,
    root: Path = GUEST_DIR,
    kernel_args: str = "",
    shared_memory: bool = True,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    shares: Mapping[str, str | os.PathLike[str]] | None = None,
) -> GuestResult:
    """Boot the guest, run `script` (bash) in it, and return its status and the console."""
    vm = GuestVM(
        sockets=sockets or (), emulated_nvme_images=emulated_nvme_images or (),
        memory_mb=memory_mb, smp=smp, extra_args=extra_args or (), kernel_args=kernel_args,
        shared_memory=shared_memory, root=root, shares=shares or {},
    )  # fmt: skip
    return vm.run(script, timeout=timeout, env=env, echo=echo, log_path=log_path)


def _mebibytes(text: str) -> int:
    """'1G', '512M', '512' (MiB) -> MiB."""
    match = re.fullmatch(r"(\d+)([MG]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 512M)")
    return int(match[1]) * (1024 if match[2].upper() == "G" else 1)


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise argparse.ArgumentTypeError(f"not NAME=VALUE: {text!r}")
    return name, value


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in args_in:
        cut = args_in.index("--")
        args_in, extra = args_in[:cut], args_in[cut + 1 :]
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Exit status: the script's; 124 if the guest timed out; 2 if no guest tree.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="boot the guest and run a script in it",
        description="Boot the guest and run a bash script in it; arguments after -- go to QEMU.",
    )
    run.add_argument("--socket", action="append", default=[], help="a vfio-user socket")
    run.add_argument(
        "--emulated-nvme", action="append", default=[], metavar="IMAGE",
        help="a namespace (1, 2, ... in order) on QEMU's own NVMe controller",
    )  # fmt: skip
    source = run.add_mutually_exclusive_group()
    source.add_argument("--script", type=Path, help="bash script to run in the guest")
    source.add_argument("--command", dest="code", help="bash code to run in the guest")
    run.add_argument("--memory", type=_mebibytes, default=1024, help="guest RAM (1G, 512M)")
    run.add_argument("--smp", type=int, default=2, help="guest CPUs")
    run.add_argument("--timeout", type=float, default=900, help="seconds before QEMU is killed")
    run.add_argument(
        "--env", type=_env_pair, action="append", default=[], metavar="NAME=VALUE",
        help="environment variable for the script",
    )  # fmt: skip
    run.add_argument(
        "--share", type=_env_pair, action="append", default=[], metavar="TAG=DIR",
        help="a host directory the guest sees read-only at /mnt/TAG",
    )  # fmt: skip
    run.add_argument("--kernel-args", default="", help="extra kernel command line")
    run.add_argument(
        "--extra-qemu-arg", action="append", default=[], metavar="ARG",
        help="one more QEMU argument (write --extra-qemu-arg=-foo for one starting with -)",
    )  # fmt: skip
    run.add_argument(
        "--no-shared-memory", action="store_true",
        help="private guest RAM: the device must use DMA_READ/DMA_WRITE messages",
    )  # fmt: skip
    run.add_argument("--log", type=Path, help="also write the console to this file")
    run.add_argument("--quiet", action="store_true", help="do not echo the console")
    commands.add_parser("info", help="show the prepared tree's QEMU and kernel")
    args = parser.parse_args(args_in)
    try:
        if args.command == "info":
            kernel, _ = _kernel(GUEST_DIR)
            info = qemu_info(GUEST_DIR)
            print(f"tree:          {GUEST_DIR}")
            print(f"qemu:          {info['version']}")
            print(f"vfio-user-pci: {'yes' if info['vfio-user-pci'] else 'NO'}")
            print(f"kernel:        {kernel.name}")
            print(f"initramfs:     {build_initramfs(GUEST_DIR)}")
            return 0 if info["vfio-user-pci"] else 1
        script = args.script.read_text() if args.script else (args.code or "nvme list")
        vm = GuestVM(
            sockets=args.socket, emulated_nvme_images=args.emulated_nvme,
            memory_mb=args.memory, smp=args.smp, extra_args=[*args.extra_qemu_arg, *extra],
            kernel_args=args.kernel_args, shared_memory=not args.no_shared_memory,
            shares=dict(args.share),
        )  # fmt: skip
        result = vm.run(
            script, timeout=args.timeout, env=dict(args.env), echo=not args.quiet,
            log_path=args.log,
        )  # fmt: skip
    except GuestNotPrepared as exc:
        print(f"guestvm: {exc}", file=sys.stderr)
        return 2
    boot = f"{result.boot_seconds:.1f} s" if result.boot_seconds is not None else "-"
    if result.timed_out and result.status < 0:
        print(f"guestvm: timed out after {result.seconds:.1f} s", file=sys.stderr)
        return TIMEOUT_STATUS
    if result.status < 0:
        print(
            f"guestvm: the guest reported no exit status (QEMU exited {result.qemu_returncode})",
            file=sys.stderr,
        )
        return 1
    print(
        f"guestvm: script exited {result.status} (boot {boot}, total {result.seconds:.1f} s)",
        file=sys.stderr,
    )
    return result.status


if __name__ == "__main__":
    sys.exit(main())
