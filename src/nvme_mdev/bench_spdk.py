"""`nvme-mdev bench --spdk DIR`: the device measured with the field's own client.

SPDK's initiator, `spdk_nvme_perf` over vfio-user (its VFIOUSER transport: the device's
doorbell page mapped, completions polled), drives in one run, on the same storage:

- nvme-mdev with the native data plane (`serve --data-plane native`);
- nvme-mdev with the Python data plane (`serve --data-plane python`);
- SPDK's own vfio-user target, `nvmf_tgt` with its VFIOUSER transport;

on a file in /dev/shm (an AIO bdev for SPDK) and on a null namespace (a null bdev).
Each target gets CPU 0 (nvme-mdev's I/O thread, and its whole process; SPDK's reactor)
and the client CPU 1, as in SPDK's own vfio-user benchmarks. For every cell: IOPS,
mean and p99 latency (the client's), the target's CPU per I/O, and the ratio to SPDK's
target on the same storage.

This only runs what the user already has: DIR is an SPDK build with vfio-user
(`./configure --with-vfio-user`; build/bin/spdk_nvme_perf, build/bin/nvmf_tgt,
scripts/rpc.py). SPDK needs 2 MiB hugepages mounted at /dev/hugepages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .bench import WORKLOADS as BENCH_WORKLOADS
from .bench import (
    BenchError,
    DeviceProcess,
    LoggedProcess,
    Workload,
    drop_page_cache,
    process_cpu_ns,
)
from .config import ConfigError, parse_size
from .daemon import subsystem_nqn

#: `nvme-mdev bench`'s own default --workloads (then --spdk takes its own set)
DEFAULT_BENCH_WORKLOADS = ",".join(w.name for w in BENCH_WORKLOADS)
#: the target's CPU and the client's
TARGET_CPU, CLIENT_CPU = 0, 1
NQN_SPDK = "nqn.2019-07.io.spdk:cnode{}"
TARGETS = ("native", "python", "spdk")
BACKENDS = ("file", "null")
#: hugepages each side takes (MiB): perf's -s, nvmf_tgt's -s
CLIENT_MEMORY_MB, TARGET_MEMORY_MB = 256, 512
HUGEPAGES = Path("/dev/hugepages")


WORKLOADS = (
    Workload("randread-4k-qd1", "randread", 4096, 1),
    Workload("randread-4k-qd32", "randread", 4096, 32),
    Workload("randwrite-4k-qd32", "randwrite", 4096, 32),
    Workload("seqread-128k-qd8", "read", 128 << 10, 8),
)


@dataclass
class Cell:
    workload: str
    backend: str
    target: str
    iops: float = 0.0
    mean_us: float = 0.0
    p99_us: float = 0.0
    #: the target's CPU time per I/O (its whole process), µs
    target_cpu_us: float | None = None
    #: IOPS over SPDK's target's on the same storage and workload
    ratio: float | None = None
    error: str | None = None


@dataclass
class SpdkReport:
    machine: dict[str, Any]
    settings: dict[str, Any]
    cells: list[Cell] = field(default_factory=list)


@dataclass(frozen=True)
class Spdk:
    """The parts of an SPDK build the benchmark runs."""

    perf: Path
    target: Path
    rpc: Path

    @classmethod
    def find(cls, root: Path) -> Spdk:
        spdk = cls(
            root / "build/bin/spdk_nvme_perf", root / "build/bin/nvmf_tgt", root / "scripts/rpc.py"
        )
        missing = [str(p) for p in (spdk.perf, spdk.target, spdk.rpc) if not p.exists()]
        if missing:
            raise ConfigError(
                f"--spdk {root}: no {', '.join(missing)} (an SPDK build with "
                "./configure --with-vfio-user; make)"
            )
        return spdk


def check_hugepages(needed_mb: int) -> None:
    """SPDK's processes need hugetlbfs at /dev/hugepages with enough free 2 MiB pages."""
    mounts = Path("/proc/mounts").read_text()
    if not any(f" {HUGEPAGES} hugetlbfs " in line for line in mounts.splitlines()):
        raise ConfigError(
            f"SPDK needs 2 MiB hugepages mounted at {HUGEPAGES}: mount -t hugetlbfs nodev "
            f"{HUGEPAGES} && echo 1024 > /proc/sys/vm/nr_hugepages"
        )
    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    free = int(meminfo.get("HugePages_Free", "0").split()[0])
    if free * 2 < needed_mb:
        raise ConfigError(
            f"SPDK needs {needed_mb} MiB of free 2 MiB hugepages, {free * 2} MiB are: "
            "echo 1024 > /proc/sys/vm/nr_hugepages"
        )


def _clean_hugepages() -> None:
    """Files a killed SPDK process left in /dev/hugepages hold their pages for good."""
    for path in HUGEPAGES.glob("spdk_pid*"):
        match = re.match(r"spdk_pid(\d+)", path.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            path.unlink(missing_ok=True)


def _pinned(cpus: set[int]) -> Callable[[], None]:
    def pin() -> None:
        os.sched_setaffinity(0, cpus)

    return pin


class SpdkTarget(LoggedProcess):
    """SPDK's nvmf_tgt with its VFIOUSER transport: one subsystem, one listener
    directory, one namespace (an AIO bdev on the file, or a null bdev)."""

    def __init__(self, spdk: Spdk, directory: Path, backend: str, file: Path, size: int) -> None:
        self.spdk = spdk
        self.socket = directory / "spdk.sock"
        self.listener = directory / "spdk-vfu"
        self.listener.mkdir()
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as we do)
        self.proc = subprocess.Popen(
            [
                str(spdk.target),
                *("-m", hex(1 << TARGET_CPU), "-s", str(TARGET_MEMORY_MB)),
                *("-r", str(self.socket)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        try:
            self._wait_for_socket()
            self.nqn = NQN_SPDK.format(1)
            self.rpc("nvmf_create_transport", "-t", "VFIOUSER")
            if backend == "null":
                self.rpc("bdev_null_create", "ns0", str(size >> 20), "512")
            else:
                self.rpc("bdev_aio_create", str(file), "ns0", "512")
            self.rpc("nvmf_create_subsystem", self.nqn, "-a", "-s", "SPDK0001")
            self.rpc("nvmf_subsystem_add_ns", self.nqn, "ns0")
            self.rpc(
                "nvmf_subsystem_add_listener",
                self.nqn,
                "-t",
                "VFIOUSER",
                "-a",
                str(self.listener),
                "-s",
                "0",
            )
        except BaseException:
            self.stop()
            raise

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"nvmf_tgt did not start: {self.log_tail()}")
            time.sleep(0.05)

    def rpc(self, *args: str) -> None:
        done = subprocess.run(
            [sys.executable, str(self.spdk.rpc), "-s", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode:
            raise BenchError(f"SPDK rpc {args[0]}: {done.stderr.strip().splitlines()[-1:]}")


class MdevTarget:
    """`nvme-mdev serve` as SPDK's client wants it: the socket `cntrl` in a directory,
    the doorbell page mappable; the whole process on the target's CPU."""

    def __init__(
        self, plane: str, engine: str, directory: Path, backend: str, file: Path, size: int
    ) -> None:
        self.listener = directory / f"mdev-{plane}-{engine}"
        self.listener.mkdir()
        spec = f"null:{size}" if backend == "null" else str(file)
        self.device = DeviceProcess(
            self.listener / "cntrl",
            [spec],
            poll_timeout_ms=500,
            engine=engine,
            extra=["--mmap-doorbells", "--data-plane", plane, "--serial", "MDEVBENCH"],
            preexec_fn=_pinned({TARGET_CPU}),
        )
        self.nqn = subsystem_nqn("MDEVBENCH")

    @property
    def pid(self) -> int:
        return self.device.pid

    def stop(self) -> None:
        self.device.stop()


class DaemonTargets(LoggedProcess):
    """`nvme-mdev daemon` with `count` controllers on null namespaces."""

    def __init__(self, plane: str, directory: Path, count: int, pin: bool = False) -> None:
        """`pin`: controller i's I/O thread on CPU i."""
        self.control = directory / "control.sock"
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as we do)
        cli = [sys.executable, "-m", "nvme_mdev.cli"]
        self.proc = subprocess.Popen(
            [*cli, "daemon", "--control", str(self.control), "--log-level", "warning"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        self.listeners: list[Path] = []
        try:
            deadline = time.monotonic() + 30
            while not self.control.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("nvme-mdev daemon did not start")
                time.sleep(0.02)
            for i in range(count):
                listener = directory / f"c{i}"
                listener.mkdir()
                done = subprocess.run(
                    [
                        *cli,
                        *("controller", "create", f"c{i}", "--control", str(self.control)),
                        *("--socket", str(listener / "cntrl"), "--ns", "null:1G"),
                        *("--serial", f"SCALING{i}", "--mmap-doorbells", "--data-plane", plane),
                        *(("--iothread-cpu", str(i)) if pin else ()),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                if done.returncode:
                    raise BenchError(f"controller create: {done.stderr.strip()}")
                self.listeners.append(listener)
        except BaseException:
            self.stop()
            raise


def run_scaling(seconds: float, progress: Callable[[str], None]) -> list[str]:
    """Do controllers in one daemon serialize on each other? Two controllers with mapped
    doorbells (their I/O threads poll for good once a host has enabled them), each
    thread pinned to a CPU of its own, nothing else running: how many CPUs' worth the
    two threads run together. Threads that never wait for each other run at once
    (close to 2); threads that take turns at one lock, the GIL, cannot (close to 1).
    (With idle CPUs to spare, the first serve N times what one does; this machine has
    none to spare beside the clients that would drive them.)"""
    from .control import call
    from .nvme_host import NvmeHost

    lines = [
        "| data plane | controllers | CPU of each I/O thread | CPUs at once |",
        "| --- | ---: | --- | ---: |",
    ]
    for plane in ("native", "python"):
        with tempfile.TemporaryDirectory(prefix="nvme-mdev-scaling-") as tmp:
            daemon = DaemonTargets(plane, Path(tmp), 2, pin=True)
            hosts = [NvmeHost(str(listener / "cntrl")) for listener in daemon.listeners]
            try:
                for host in hosts:
                    host.enable()
                tids = [
                    int(call(str(daemon.control), "iothread", {"controller": f"c{i}"})["tid"])
                    for i in range(len(hosts))
                ]
                before = [_thread_cpu_ns(daemon.pid, tid) for tid in tids]
                start = time.monotonic_ns()
                time.sleep(seconds)
                wall = time.monotonic_ns() - start
                used = [
                    _thread_cpu_ns(daemon.pid, t) - b for t, b in zip(tids, before, strict=True)
                ]
            finally:
                for host in hosts:
                    host.close()
                daemon.stop()
        shares = [u / wall for u in used]
        each = " / ".join(f"{x:.2f}" for x in shares)
        line = f"| {plane} | {len(shares)} | {each} | {sum(shares):.2f} |"
        progress(line)
        lines.append(line)
    return lines


def _thread_cpu_ns(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


_TOTAL = re.compile(r"^Total\s*:\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", re.M)
_P99 = re.compile(r"^\s*99\.00000%\s*:\s*([\d.]+)us", re.M)


def run_perf(
    spdk: Spdk, listener: Path, nqn: str, w: Workload, seconds: float, target_pid: int
) -> Cell:
    """One spdk_nvme_perf run; the target's CPU time is read around it."""
    cell = Cell(w.name, "", "")
    args = [
        str(spdk.perf),
        "-r",
        f"trtype:VFIOUSER traddr:{listener} subnqn:{nqn}",
        "-q",
        str(w.depth),
        "-o",
        str(w.block_size),
        "-w",
        w.rw,
        "-t",
        str(max(1, round(seconds))),
        "-c",
        hex(1 << CLIENT_CPU),
        "-g",
        "-s",
        str(CLIENT_MEMORY_MB),
        "-L",
    ]
    cpu0 = process_cpu_ns(target_pid)
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        cell.error = "spdk_nvme_perf did not finish"
        return cell
    finally:
        _clean_hugepages()
    cpu = process_cpu_ns(target_pid) - cpu0
    total = _TOTAL.search(done.stdout)
    if done.returncode or total is None:
        tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
        cell.error = f"spdk_nvme_perf: exit {done.returncode}: {' '.join(tail)}"
        return cell
    cell.iops, cell.mean_us = float(total.group(1)), float(total.group(3))
    p99 = _P99.search(done.stdout)
    cell.p99_us = float(p99.group(1)) if p99 else 0.0
    ios = cell.iops * max(1, round(seconds))
    cell.target_cpu_us = cpu / 1000 / ios if ios else None
    return cell


def run(
    spdk: Spdk,
    seconds: float,
    size: int,
    targets: Sequence[str],
    backends: Sequence[str],
    workloads: Sequence[Workload],
    progress: Callable[[str], None],
    image_dir: Path = Path("/dev/shm"),
    cold: bool = False,
    engines: Sequence[str] = ("auto",),
) -> SpdkReport:
    check_hugepages(CLIENT_MEMORY_MB + TARGET_MEMORY_MB)
    _clean_hugepages()
    report = SpdkReport(
        machine={"cpus": os.cpu_count(), "kernel": os.uname().release},
        settings={
            "seconds": seconds,
            "size": size,
            "image_dir": str(image_dir),
            "cold": cold,
            "target_cpu": TARGET_CPU,
            "client_cpu": CLIENT_CPU,
        },
    )
    with tempfile.TemporaryDirectory(prefix="nvme-mdev-spdk-") as tmp:
        directory = Path(tmp)
        image = Path(tempfile.mkstemp(prefix="nvme-mdev-spdk-", suffix=".img", dir=image_dir)[1])
        try:
            # Written through once: reads then copy real pages, as a used disk image's would.
            with open(image, "wb") as f:
                chunk = os.urandom(1 << 20)
                for _ in range(size >> 20):
                    f.write(chunk)
            # nvme-mdev once per data plane and I/O engine ("native", or "native/sync"
            # when engines are named); SPDK's target once.
            runs = [
                (t if engines == ("auto",) else f"{t}/{e}", t, e)
                for t in targets
                for e in (("auto",) if t == "spdk" else engines)
            ]
            for backend in backends:
                for label, target, engine in runs:
                    where = directory / f"{backend}-{label.replace('/', '-')}"
                    where.mkdir()
                    served: SpdkTarget | MdevTarget
                    if target == "spdk":
                        served = SpdkTarget(spdk, where, backend, image, size)
                    else:
                        served = MdevTarget(target, engine, where, backend, image, size)
                    try:
                        for w in workloads:
                            if cold and backend == "file":
                                drop_page_cache()
                            cell = run_perf(
                                spdk, served.listener, served.nqn, w, seconds, served.pid
                            )
                            cell.backend, cell.target = backend, label
                            report.cells.append(cell)
                            progress(_line(cell))
                    finally:
                        served.stop()
        finally:
            image.unlink(missing_ok=True)
    for cell in report.cells:
        base = next(
            (
                c
                for c in report.cells
                if c.target == "spdk" and c.backend == cell.backend and c.workload == cell.workload
            ),
            None,
        )
        if base is not None and base.iops and cell.iops:
            cell.ratio = cell.iops / base.iops
    return report


def _line(c: Cell) -> str:
    if c.error:
        return f"{c.backend:5} {c.workload:18} {c.target:7} error: {c.error}"
    cpu = f"{c.target_cpu_us:.2f}" if c.target_cpu_us is not None else "-"
    return (
        f"{c.backend:5} {c.workload:18} {c.target:7} {c.iops:>11,.0f} IOPS  mean "
        f"{c.mean_us:7.2f} µs  p99 {c.p99_us:8.2f} µs  target CPU {cpu} µs/IO"
    )


def format_report(report: SpdkReport) -> str:
    head = (
        "| backend | workload | target | IOPS | mean µs | p99 µs | target CPU µs/IO "
        "| ratio to SPDK |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"
    )
    rows = [head]
    for c in report.cells:
        if c.error:
            rows.append(f"| {c.backend} | {c.workload} | {c.target} | error: {c.error} | | | | |")
            continue
        cpu = f"{c.target_cpu_us:.2f}" if c.target_cpu_us is not None else ""
        ratio = f"{c.ratio:.2f}" if c.ratio is not None else ""
        rows.append(
            f"| {c.backend} | {c.workload} | {c.target} | {c.iops:,.0f} | {c.mean_us:.2f} | "
            f"{c.p99_us:.2f} | {cpu} | {ratio} |"
        )
    return "\n".join(rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spdk",
        type=Path,
        metavar="DIR",
        help="measure with SPDK's spdk_nvme_perf over vfio-user against nvme-mdev (native "
        "and Python data planes) and SPDK's own nvmf_tgt, from the SPDK build in DIR",
    )
    parser.add_argument(
        "--spdk-image-dir",
        type=Path,
        default=Path("/dev/shm"),
        help="with --spdk: where the file goes (default %(default)s: in memory, as SPDK's own "
        "vfio-user numbers; a disk's filesystem with --cold measures the storage)",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="do controllers in one daemon serialize on each other? (two polling I/O "
        "threads, native then Python, on two CPUs: how much they run at once)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"with --spdk: which targets (default {','.join(TARGETS)})",
    )


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.rbd is not None:
        raise ConfigError("--rbd: not with --spdk or --scaling (nvme-mdev bench --rbd alone)")
    seconds = args.seconds if args.seconds is not None else 5.0
    if args.scaling:
        try:
            lines = run_scaling(seconds, lambda line: print(line, file=sys.stderr))
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            print(f"nvme-mdev bench: error: {exc}", file=sys.stderr)
            return 1
        print("\n".join(lines), file=out)
        return 0
    spdk = Spdk.find(args.spdk)
    targets = [t for t in args.targets.split(",") if t]
    if not targets or any(t not in TARGETS for t in targets):
        raise ConfigError(f"--targets {args.targets!r}: some of {', '.join(TARGETS)}")
    backend_names = args.backends or ",".join(BACKENDS)
    backends = [b for b in backend_names.split(",") if b]
    if not backends or any(b not in BACKENDS for b in backends):
        raise ConfigError(f"--backends {backend_names!r}: file, null or file,null")
    by_name = {w.name: w for w in WORKLOADS}
    given = args.workloads != DEFAULT_BENCH_WORKLOADS
    names = [n for n in args.workloads.split(",") if n] if given else list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"--workloads: unknown {unknown} (with --spdk: {', '.join(by_name)})")
    if len(os.sched_getaffinity(0)) < 2:
        raise ConfigError("--spdk needs two CPUs: one for the target, one for the client")
    size = parse_size(args.size) if args.size else 256 << 20
    if size % (1 << 20):
        raise ConfigError("--size: whole MiB with --spdk")
    try:
        report = run(
            spdk,
            seconds,
            size,
            targets,
            backends,
            [by_name[n] for n in names],
            lambda line: print(line, file=sys.stderr, flush=True),
            args.spdk_image_dir,
            args.cold,
            tuple(args.io_engines.split(",")) if args.io_engines else ("auto",),
        )
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        print(f"nvme-mdev bench: error: {exc}", file=sys.stderr)
        return 1
    if args.json == "-":
        print(json.dumps(asdict(report), indent=2), file=out)
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(format_report(report), file=out)
    return 0
