"""`nvme-mdev bench`: the device measured against native I/O on one machine, in one run.

For each workload (4 KiB random read and write at QD1 and QD32, 128 KiB sequential
read) and each backend (a page-cache file, and a null namespace with no storage):

- native: fio on the host, straight on the backing file, with io_uring and psync
  (on the null backend, fio's null ioengine: fio alone, doing no I/O);
- nvme-mdev/ENGINE: the device as `nvme-mdev serve --io-engine ENGINE` in its own
  process, driven by the project's own NVMe host driver (`nvme_host`) in this
  process as the guest: shared memfd guest RAM, its own I/O queue, batched
  submission, shadow doorbells, MSI-X eventfds. One device per I/O engine (sync,
  and uring where the kernel has io_uring), side by side; the null namespace has
  no storage to queue I/O to, so it is measured once.

With `--rbd POOL/IMAGE`, a Ceph RBD image (backend rbd), on one image in one run:

- fio-rbd: fio's rbd ioengine (librbd in fio's process), straight on the image, with
  librbd's cache off as the device has it;
- nvme-mdev: the device serving the image as `rbd:POOL/IMAGE`, driven as above. The
  device keeps the image's exclusive lock while it runs, which fio's writes would need:
  each device cell has a device of its own, started for it and stopped after it.

The image's first --size bytes are written once (by fio) before the cells: a never
written RBD object reads as zeroes without touching the disk.

The device runs as a separate process, never in this one: in-process it would
share the client's GIL, and its CPU time could not be told apart from the client's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .backends import uring
from .backends.rbd import DEFAULT_CLIENT_ID, RbdImage
from .config import ConfigError, parse_size
from .nvme_host import PAGE, HostQueuePair, NvmeHost, NvmeHostError
from .vfio_user.client import ClientError

#: the namespaces' logical block size here: a 4 KiB I/O is one block, as fio's bs=4k
BLOCK = 4096
#: what the device writes: a block found on the file with this content came through it
WRITE_PATTERN = b"nvme-mdev bench\n" * (BLOCK // 16)

FIO_URING = "fio-io_uring"
FIO_PSYNC = "fio-psync"
FIO_NULL = "fio-null"
FIO_RBD = "fio-rbd"
DEVICE = "nvme-mdev"
#: the backends measured by default; rbd is measured on an image `--rbd` names
BACKENDS = ("file", "null")
RBD = "rbd"
#: each backend's native rows; the first is the reference, which the others' ratios are to
NATIVES = {"file": (FIO_URING, FIO_PSYNC), "null": (FIO_NULL,), RBD: (FIO_RBD,)}
REFERENCES = {backend: targets[0] for backend, targets in NATIVES.items()}
#: what fio writes to an RBD image (--buffer_pattern), as WRITE_PATTERN is the device's
FIO_WRITE_PATTERN = b"fio: rbd engine\n" * (BLOCK // 16)
#: the block size of fio's fill of an RBD image (one RBD object, by default)
RBD_FILL_BLOCK = 4 << 20

QUICK_SECONDS = 0.25
QUICK_SIZE = 16 << 20
QUICK_POLL_TIMEOUT_MS = 50
#: a client using under this share of one core is not what limits a row
CLIENT_BOUND = 0.9

_SQE = struct.Struct("<IIQQQQQIIII")  # DW0, NSID, DW2-3, MPTR, PRP1, PRP2, SLBA, DW12-15
_SLBA_OFFSET = 40
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_READ, _WRITE, _GET_LOG_PAGE, _SMART_LOG = 0x02, 0x01, 0x02, 0x02


class BenchError(Exception):
    """The benchmark cannot go on; the message says why, on one line."""


@dataclass(frozen=True)
class RbdTarget:
    """The RBD image of the rbd rows and how to reach its cluster, as an `rbd:`
    namespace spec says it: a ceph.conf (None: librados' search: $CEPH_CONF,
    /etc/ceph/ceph.conf, ...), a client id, a keyring (None: the conf's)."""

    image: RbdImage
    conf: Path | None = None
    client_id: str = DEFAULT_CLIENT_ID
    keyring: Path | None = None

    def spec(self) -> str:
        """The device's namespace spec: the whole image, 4 KiB blocks."""
        options = [f"bs={BLOCK}"]
        if self.conf is not None:
            options.append(f"conf={self.conf.resolve()}")
        options.append(f"id={self.client_id}")
        if self.keyring is not None:
            options.append(f"keyring={self.keyring.resolve()}")
        return ",".join([f"rbd:{self.image}", *options])

    def fio_args(self) -> list[str]:
        return [
            "--ioengine=rbd",
            f"--pool={self.image.pool}",
            f"--rbdname={self.image.image}",
            f"--clientname={self.client_id.removeprefix('client.')}",
        ]

    def fio_env(self) -> dict[str, str]:
        """fio's environment: its rbd engine reads the conf librados finds ($CEPH_CONF
        first) and takes a keyring from $CEPH_KEYRING; $CEPH_ARGS turns librbd's cache
        off, as the device does (with it on, a write is acknowledged before it reaches
        the OSD)."""
        env = dict(os.environ)
        if self.conf is not None:
            env["CEPH_CONF"] = str(self.conf.resolve())
        if self.keyring is not None:
            env["CEPH_KEYRING"] = str(self.keyring.resolve())
        env["CEPH_ARGS"] = f"{env.get('CEPH_ARGS', '')} --rbd_cache=false".strip()
        return env


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio's --rw
    block_size: int
    depth: int

    @property
    def writes(self) -> bool:
        return self.rw == "randwrite"


WORKLOADS = (
    Workload("randread-4k-qd1", "randread", 4096, 1),
    Workload("randread-4k-qd32", "randread", 4096, 32),
    Workload("randwrite-4k-qd1", "randwrite", 4096, 1),
    Workload("randwrite-4k-qd32", "randwrite", 4096, 32),
    Workload("seqread-128k-qd32", "read", 128 << 10, 32),
)


@dataclass
class Result:
    workload: str
    backend: str
    target: str
    ios: int = 0
    seconds: float = 0.0
    iops: float = 0.0
    mean_us: float = 0.0
    p99_us: float = 0.0
    #: CPU µs per I/O of the device (nvme-mdev: the serve process; fio: kernel time)
    device_cpu_us: float | None = None
    #: CPU µs per I/O of the client (nvme-mdev: this process; fio: fio's user time)
    client_cpu_us: float | None = None
    #: shares of one core over the cell
    device_util: float | None = None
    client_util: float | None = None
    #: IOPS over the reference's (fio-io_uring on the file, fio-null on null)
    ratio: float | None = None
    #: mean latency minus the reference's, µs
    added_mean_us: float | None = None
    #: Read/Write commands the device counted (SMART) during the cell
    device_commands: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.ios > 0


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    fio: str | None
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    seconds: float = 5.0
    size: int = 256 << 20
    file: Path | None = None
    directory: Path = Path("/var/tmp")
    fio: str = "fio"
    workloads: tuple[Workload, ...] = WORKLOADS
    backends: tuple[str, ...] = BACKENDS
    shadow_doorbells: bool = True
    poll_completions: bool = False
    poll_timeout_ms: int = 500
    seed: int = 1
    #: the device's I/O engines, one device (serve process) each
    engines: tuple[str, ...] = ("sync", "uring")
    #: drop the host's page cache before every cell: file rows then measure the storage
    cold: bool = False
    #: the image of the rbd backend (`--rbd`)
    rbd: RbdTarget | None = None


# --- CPU time -------------------------------------------------------------------------


def process_cpu_ns(pid: int) -> int:
    """On-CPU time of every live thread of `pid`, in ns (schedstat: exact, unlike
    utime/stime, which are sampled at the scheduler tick)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        except OSError:  # no schedstat in this kernel: tick-sampled utime + stime
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])
            return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    return total


# --- native: fio ---------------------------------------------------------------------


class Fio:
    """fio, run once per cell; its CPU comes from its rusage, less its start-up."""

    def __init__(self, path: str, workdir: Path, rbd: RbdTarget | None = None) -> None:
        """`rbd`: the image of the fio-rbd cells."""
        self.path = path
        self.workdir = workdir
        self.rbd = rbd
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        self.version = version.stdout.strip() or "fio"
        self._startup: dict[tuple[str, int, str], tuple[float, float]] = {}

    @classmethod
    def find(cls, name: str, workdir: Path, rbd: RbdTarget | None = None) -> Fio | None:
        path = shutil.which(name)
        return cls(path, workdir, rbd) if path else None

    def fill_rbd(self, size: int) -> None:
        """Write the RBD image's first `size` bytes once, whole objects at a time."""
        if self.rbd is None:
            raise BenchError("no --rbd image")
        check = subprocess.run(
            [self.path, "--enghelp=rbd"], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise BenchError(f"{self.path} has no rbd ioengine (a fio built without librbd)")
        out = self.workdir / "fill.json"
        args = [self.path, "--name=fill", "--rw=write", f"--bs={RBD_FILL_BLOCK}"]
        args += [f"--size={size}", "--iodepth=8", *self.rbd.fio_args()]
        args += ["--output-format=json", f"--output={out}"]
        _, _, error = self._spawn(args, 600, FIO_RBD)
        if error:
            raise BenchError(
                f"filling rbd:{self.rbd.image} with fio: {error} "
                f"(an image of at least --size, {size} bytes, reachable with these options?)"
            )

    def _args(
        self, w: Workload, target: str, filename: str, size: int, runtime_ms: int, out: Path
    ) -> list[str]:
        args = [
            self.path,
            "--name=bench",
            f"--rw={w.rw}",
            f"--bs={w.block_size}",
            f"--size={size}",
            "--time_based",
            f"--runtime={runtime_ms}ms",
            "--norandommap",
            "--randrepeat=0",
            "--invalidate=0",  # keep the page cache: that is the backend measured
            "--thread",
            "--group_reporting",
            "--lat_percentiles=1",
            "--percentile_list=99",
            "--output-format=json",
            f"--output={out}",
        ]
        if target == FIO_NULL:
            return [*args, "--ioengine=null", f"--iodepth={w.depth}"]
        if target == FIO_RBD:
            assert self.rbd is not None
            args += [*self.rbd.fio_args(), f"--iodepth={w.depth}"]
            if w.writes:  # found on the image, it came through fio
                args.append(f"--buffer_pattern=0x{FIO_WRITE_PATTERN[:16].hex()}")
            return args
        if target == FIO_URING:
            return [*args, "--ioengine=io_uring", f"--iodepth={w.depth}", f"--filename={filename}"]
        # psync has no queue: depth N is N threads, each with one I/O in flight.
        return [
            *args,
            "--ioengine=psync",
            "--iodepth=1",
            f"--numjobs={w.depth}",
            f"--filename={filename}",
        ]

    def _spawn(self, args: list[str], timeout: float, target: str) -> tuple[float, float, str]:
        """Run fio; (user s, system s, error text or "")."""
        env, cwd = None, None
        if target == FIO_RBD and self.rbd is not None:
            # in the work directory: asked for more than the image has, fio lays out a
            # file of the job's name in its current directory
            env, cwd = self.rbd.fio_env(), self.workdir
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            proc = subprocess.run(
                args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
            )
        except subprocess.TimeoutExpired:
            return 0.0, 0.0, f"fio ran past {timeout:.0f} s"
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        error = ""
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            error = lines[-1] if lines else f"fio exited {proc.returncode}"
        return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, error

    def run(
        self, w: Workload, backend: str, target: str, filename: str, size: int, seconds: float
    ) -> Result:
        out = self.workdir / "fio.json"
        result = Result(w.name, backend, target)
        key = (target, w.depth, backend)
        if key not in self._startup:
            # What fio costs with no time to run: start-up, file open, thread creation.
            args = self._args(w, target, filename, size, 1, out)
            user, system, _ = self._spawn(args, 60, target)
            self._startup[key] = (user, system)
        runtime_ms = max(1, round(seconds * 1000))
        user, system, error = self._spawn(
            self._args(w, target, filename, size, runtime_ms, out), seconds + 120, target
        )
        if error:
            result.error = error
            return result
        try:
            text = out.read_text()
            job = json.loads(text[text.index("{") :])["jobs"][0]  # notes may come first
            stats = job["write" if w.writes else "read"]
            lat = stats["lat_ns"]
            result.ios = int(stats["total_ios"])
            result.seconds = float(stats["runtime"]) / 1000
            result.iops = float(stats["iops"])
            result.mean_us = float(lat["mean"]) / 1000
            result.p99_us = float(lat.get("percentile", {}).get("99.000000", 0)) / 1000
        except (OSError, ValueError, KeyError, IndexError) as exc:
            result.error = f"fio output: {exc}"
            return result
        if result.ios:
            base_user, base_system = self._startup[key]
            user, system = max(0.0, user - base_user), max(0.0, system - base_system)
            result.device_cpu_us = system * 1e6 / result.ios
            result.client_cpu_us = user * 1e6 / result.ios
            if result.seconds:
                result.device_util = system / result.seconds
                result.client_util = user / result.seconds
        return result


# --- the device and its guest ------------------------------------------------------------


class LoggedProcess:
    """A child process (`proc`) whose output goes to a temporary file (`_log`)."""

    proc: subprocess.Popen[Any]
    _log: TextIO

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self) -> str:
        self._log.seek(0)
        lines = self._log.read().strip().splitlines()
        return lines[-1] if lines else f"exit status {self.proc.returncode}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: finish, flush, exit 0
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class DeviceProcess(LoggedProcess):
    """`nvme-mdev serve` in its own process (own interpreter, own GIL, own CPU time)."""

    def __init__(
        self,
        socket_path: Path,
        specs: Sequence[str],
        poll_timeout_ms: int,
        engine: str = "auto",
        extra: Sequence[str] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        """`extra`: more `serve` options; `preexec_fn`: run in the child before exec."""
        self.socket_path = socket_path
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as we do)
        args = [sys.executable, "-m", "nvme_mdev.cli", "serve", "--socket", str(socket_path)]
        args += ["--log-level", "warning", "--poll-timeout-ms", str(poll_timeout_ms)]
        args += ["--io-engine", engine, *extra, *specs]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=preexec_fn,
        )
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = self.log_tail()
                self.stop()
                raise BenchError(f"nvme-mdev serve did not start: {why}")
            time.sleep(0.02)

    def cpu_ns(self) -> int:
        return process_cpu_ns(self.proc.pid)


@dataclass
class _Run:
    ios: int
    elapsed_ns: int
    latencies_ns: list[int]
    errors: int
    #: (device, client) CPU ns over the timed loop only, set-up excluded
    cpu_ns: tuple[int, int]


#: (device CPU ns, client CPU ns) now
CpuProbe = Callable[[], tuple[int, int]]


class GuestDriver:
    """The guest's side: one I/O queue pair with preallocated buffers, PRP lists and
    SQE templates, driven by a lean loop (one SQE copy and one SLBA store per command,
    one doorbell per batch, every posted CQE reaped per interrupt)."""

    QUEUE_ENTRIES = 256

    def __init__(
        self,
        socket_path: Path,
        max_depth: int,
        max_block: int,
        shadow_doorbells: bool,
        poll_completions: bool,
    ) -> None:
        if max_depth >= self.QUEUE_ENTRIES:
            raise BenchError(f"queue depth {max_depth}: at most {self.QUEUE_ENTRIES - 1}")
        ram = (8 << 20) + max_depth * (max_block + PAGE)
        self.host = NvmeHost(str(socket_path), ram_size=ram, msix_vectors=2)
        try:
            self.host.enable()
            if shadow_doorbells:
                self.host.enable_shadow_doorbells()
            self.queue: HostQueuePair = self.host.create_queue_pair(
                1, entries=self.QUEUE_ENTRIES, vector=1
            )
            self.buffers = [self.host.alloc(max_block) for _ in range(max_depth)]
            self.prp_lists = [self.host.alloc(PAGE) for _ in range(max_depth)]
            self._log_buffer = self.host.alloc(PAGE)
        except BaseException:
            self.host.close()
            raise
        self.poll_completions = poll_completions

    def close(self) -> None:
        self.host.close()

    def smart_commands(self) -> int:
        """Host Read + Write Commands from the device's SMART / Health log."""
        buf = self._log_buffer
        numdl = 512 // 4 - 1
        prp1 = [buf & 0xFFFFFFFF, buf >> 32]
        c = self.host.admin_command(
            [_GET_LOG_PAGE, 0xFFFFFFFF, 0, 0, 0, 0, *prp1, 0, 0, _SMART_LOG | (numdl << 16)]
        )
        if not c.ok:
            raise BenchError(f"Get Log Page (SMART): status {c.status:#x}")
        page = self.host.ram.read(buf, 512)
        return int.from_bytes(page[64:80], "little") + int.from_bytes(page[80:96], "little")

    def _templates(self, w: Workload, nsid: int) -> list[bytes]:
        """One SQE per slot with everything but the SLBA; the command ID is the slot."""
        ram = self.host.ram
        pages = w.block_size // PAGE
        nlb = w.block_size // BLOCK
        opcode = _WRITE if w.writes else _READ
        templates = []
        for slot in range(w.depth):
            buf = self.buffers[slot]
            if pages <= 1:
                prp2 = 0
            elif pages == 2:
                prp2 = buf + PAGE
            else:  # a PRP list of the buffer's other pages
                prp2 = self.prp_lists[slot]
                ram.write(
                    prp2, struct.pack(f"<{pages - 1}Q", *(buf + PAGE * i for i in range(1, pages)))
                )
            if w.writes:
                ram.write(buf, WRITE_PATTERN * (w.block_size // BLOCK))
            templates.append(
                _SQE.pack(opcode | (slot << 16), nsid, 0, 0, buf, prp2, 0, nlb - 1, 0, 0, 0)
            )
        return templates

    def run(
        self, w: Workload, nsid: int, blocks: int, seconds: float, seed: int, cpu: CpuProbe
    ) -> _Run:
        """Keep `w.depth` commands in flight for `seconds`, then drain."""
        q = self.queue
        ram = self.host.ram
        view = ram.view
        sq_off, cq_off = q.sq_addr - ram.base, q.cq_addr - ram.base
        entries = q.entries
        templates = self._templates(w, nsid)
        nlb = w.block_size // BLOCK
        span = max(1, blocks // nlb)
        count = 1 << 16
        mask = count - 1
        # LBAs drawn before the clock starts: the loop only indexes.
        if w.rw == "read":
            lbas = [(i % span) * nlb for i in range(count)]
        else:
            lbas = [i * nlb for i in random.Random(seed).choices(range(span), k=count)]
        pack_slba = _U64.pack_into
        unpack_u32 = _U32.unpack_from
        now = time.perf_counter_ns
        latencies: list[int] = []
        record = latencies.append
        submitted = [0] * w.depth
        fd = self.host.irq_fds[q.vector]
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        wait_irq = not self.poll_completions
        tail, head, phase = q.sq_tail, q.cq_head, q.phase << 16
        errors = 0
        k = 0
        done: list[int] = []

        cpu_before = cpu()
        start = now()
        for slot in range(w.depth):
            o = sq_off + tail * 64
            view[o : o + 64] = templates[slot]
            pack_slba(view, o + _SLBA_OFFSET, lbas[k & mask])
            k += 1
            tail = 0 if tail + 1 == entries else tail + 1
            submitted[slot] = start
        q.sq_tail = tail
        q.ring()
        deadline = start + int(seconds * 1e9)
        inflight = w.depth
        t = start
        idle_since = start
        spins = 0
        while inflight:
            if wait_irq:
                if not poller.poll(1000):
                    if now() - idle_since > 10_000_000_000:
                        raise BenchError(f"device stopped: {inflight} commands unanswered for 10 s")
                    continue
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(fd)  # acknowledge first: a later signal is kept
            while True:
                dw3 = unpack_u32(view, cq_off + head * 16 + 12)[0]
                if dw3 & 0x10000 != phase:
                    break
                done.append(dw3 & 0xFFFF)
                if dw3 >> 17:
                    errors += 1
                head += 1
                if head == entries:
                    head = 0
                    phase ^= 0x10000
            if not done:
                if not wait_irq:
                    spins += 1
                    if spins & 0xFFFF == 0 and now() - idle_since > 10_000_000_000:
                        raise BenchError(f"device stopped: {inflight} commands unanswered for 10 s")
                continue
            t = idle_since = now()
            q.cq_head, q.phase = head, phase >> 16
            q.ring_cq()
            if t < deadline:
                for slot in done:
                    record(t - submitted[slot])
                    o = sq_off + tail * 64
                    view[o : o + 64] = templates[slot]
                    pack_slba(view, o + _SLBA_OFFSET, lbas[k & mask])
                    k += 1
                    tail = 0 if tail + 1 == entries else tail + 1
                    submitted[slot] = t
                q.sq_tail = tail
                q.ring()
            else:
                for slot in done:
                    record(t - submitted[slot])
                inflight -= len(done)
            done.clear()
        cpu_after = cpu()
        cpu_ns = (cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1])
        return _Run(len(latencies), t - start, latencies, errors, cpu_ns)


def device_target(engine: str) -> str:
    """The device's row name with `engine`: nvme-mdev/sync, nvme-mdev/uring."""
    return f"{DEVICE}/{engine}"


def _device_cell(
    driver: GuestDriver,
    device: DeviceProcess,
    w: Workload,
    backend: str,
    nsid: int,
    blocks: int,
    seconds: float,
    seed: int,
    target: str,
) -> Result:
    result = Result(w.name, backend, target)
    commands_before = driver.smart_commands()
    me = os.getpid()
    run = driver.run(w, nsid, blocks, seconds, seed, lambda: (device.cpu_ns(), process_cpu_ns(me)))
    device_cpu, client_cpu = run.cpu_ns
    result.device_commands = driver.smart_commands() - commands_before
    result.ios = run.ios
    result.seconds = run.elapsed_ns / 1e9
    if run.ios and run.elapsed_ns:
        lat = sorted(run.latencies_ns)
        result.iops = run.ios / result.seconds
        result.mean_us = sum(lat) / len(lat) / 1000
        result.p99_us = lat[max(0, math.ceil(0.99 * len(lat)) - 1)] / 1000
        result.device_cpu_us = device_cpu / 1000 / run.ios
        result.client_cpu_us = client_cpu / 1000 / run.ios
        result.device_util = device_cpu / run.elapsed_ns
        result.client_util = client_cpu / run.elapsed_ns
    if run.errors:
        result.error = f"{run.errors} commands failed"
    return result


# --- the run ---------------------------------------------------------------------------

DROP_CACHES = "/proc/sys/vm/drop_caches"


def drop_page_cache() -> None:
    """Write back, then drop the clean page cache (root): what a cell reads next comes
    from the storage itself."""
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("1")


def _prepare_file(path: Path, size: int) -> None:
    """A fully written file (no holes: a hole reads as free zeroes) in the page cache."""
    if path.exists():
        raise BenchError(f"{path}: exists (the bench overwrites it: remove it or pick another)")
    chunk = random.Random(0).randbytes(1 << 20)
    try:
        with open(path, "wb") as f:
            left = size
            while left:
                left -= f.write(chunk[: min(left, len(chunk))])
            f.flush()
            os.fsync(f.fileno())  # no writeback of the fill during the cells
    except OSError as exc:
        path.unlink(missing_ok=True)  # ours: it did not exist
        raise BenchError(f"{path}: {exc.strerror}") from exc


def _machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_start": [round(x, 2) for x in os.getloadavg()],
    }


def _with_ratios(results: list[Result]) -> None:
    """Each row against its reference (REFERENCES): fio-io_uring on the file, fio-null
    on null, fio-rbd on the RBD image."""
    refs = {
        (r.workload, r.backend): r
        for r in results
        if r.ok and r.target == REFERENCES.get(r.backend)
    }
    for r in results:
        ref = refs.get((r.workload, r.backend))
        if ref is None or not r.ok or r is ref:
            continue
        r.ratio = r.iops / ref.iops
        r.added_mean_us = r.mean_us - ref.mean_us


def run_bench(opts: Options, progress: Callable[[str], None] | None = None) -> Report:
    say = progress or (lambda line: None)
    report = Report(
        machine=_machine(),
        settings={
            "seconds_per_cell": opts.seconds,
            "size": opts.size,
            "backends": list(opts.backends),
            "workloads": [w.name for w in opts.workloads],
            "doorbells": "shadow" if opts.shadow_doorbells else "mmio",
            "completions": "poll" if opts.poll_completions else "irq",
            "device_poll_timeout_ms": opts.poll_timeout_ms,
            "io_engines": list(opts.engines),
            "cold": opts.cold,
        },
        fio=None,
    )
    if opts.rbd is not None:
        report.settings["rbd"] = str(opts.rbd.image)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nvme-mdev-bench-")))
        fio = Fio.find(opts.fio, work, opts.rbd)
        if RBD in opts.backends:
            if fio is None or opts.rbd is None:
                raise BenchError(f"--rbd: needs fio ({opts.fio!r} not found), with its rbd engine")
            say(f"filling the first {opts.size >> 20} MiB of rbd:{opts.rbd.image} (fio)")
            fio.fill_rbd(opts.size)
        if fio is None:
            report.notes.append(
                f"fio: {opts.fio!r} not found: no native rows (install fio; "
                "scripts/setup.sh does so as root)"
            )
            say(report.notes[-1])
        else:
            report.fio = fio.version
        specs: list[str] = []
        nsids: dict[str, int] = {}
        path = ""
        if "file" in opts.backends:
            file_path = opts.file or opts.directory / f"nvme-mdev-bench-{os.getpid()}.img"
            _prepare_file(file_path, opts.size)
            if opts.file is None:
                stack.callback(file_path.unlink, missing_ok=True)
            path = str(file_path)
            report.settings["file"] = path
            specs.append(f"{path},bs={BLOCK}")
            nsids["file"] = len(specs)
        if "null" in opts.backends:
            specs.append(f"null:{opts.size},bs={BLOCK}")
            nsids["null"] = len(specs)
        max_depth = max(w.depth for w in opts.workloads)
        max_block = max(w.block_size for w in opts.workloads)

        def connect(device: DeviceProcess) -> GuestDriver:
            """The guest, on `device` (stopped if the guest cannot connect)."""
            try:
                return GuestDriver(
                    device.socket_path,
                    max_depth,
                    max_block,
                    opts.shadow_doorbells,
                    opts.poll_completions,
                )
            except (OSError, NvmeHostError) as exc:
                why = device.log_tail()
                device.stop()
                raise BenchError(f"connecting to the device: {exc} ({why})") from exc

        devices: dict[str, tuple[DeviceProcess, GuestDriver]] = {}
        # file and null: one device per engine, for every cell
        for i, engine in enumerate(opts.engines if specs else ()):
            engine_specs = specs
            if path and i:
                # Two processes may not write one file's bytes (storage.WriterLock): every
                # other engine gets a copy of its own, prepared the same way.
                copy = Path(path).with_name(f"{Path(path).stem}-{engine}.img")  # same fs
                _prepare_file(copy, opts.size)
                stack.callback(copy.unlink, missing_ok=True)
                engine_specs = [f"{copy},bs={BLOCK}" if spec.startswith(path) else spec
                                for spec in specs]  # fmt: skip
            device = DeviceProcess(
                work / f"{engine}.sock", engine_specs, opts.poll_timeout_ms, engine
            )
            stack.callback(device.stop)
            driver = connect(device)
            stack.callback(driver.close)
            devices[engine] = (device, driver)
        report.settings["device_pid"] = ",".join(str(d.pid) for d, _ in devices.values())
        blocks = opts.size // BLOCK
        for backend in opts.backends:
            # null: no storage, nothing any engine could queue: one device is enough; an
            # RBD image is not served through an I/O engine: one device, named so
            engines = opts.engines if backend == "file" else opts.engines[:1]
            targets = [DEVICE] if backend == RBD else list(map(device_target, engines))
            for w in opts.workloads:
                cells = [*NATIVES[backend]] if fio is not None else []
                for target in [*cells, *targets]:
                    if opts.cold and backend == "file":
                        drop_page_cache()
                    if target == DEVICE:  # rbd: a device for this cell alone
                        assert opts.rbd is not None
                        with contextlib.ExitStack() as cell:
                            sock, spec = work / f"rbd-{w.name}.sock", opts.rbd.spec()
                            device = DeviceProcess(sock, [spec], opts.poll_timeout_ms)
                            cell.callback(device.stop)  # and with it the image's exclusive lock
                            driver = connect(device)
                            cell.callback(driver.close)
                            result = _device_cell(
                                driver,
                                device,
                                w,
                                backend,
                                1,
                                blocks,
                                opts.seconds,
                                opts.seed,
                                target,
                            )
                    elif target.startswith(DEVICE):
                        device, driver = devices[target.partition("/")[2]]
                        result = _device_cell(
                            driver,
                            device,
                            w,
                            backend,
                            nsids[backend],
                            blocks,
                            opts.seconds,
                            opts.seed,
                            target,
                        )
                        # Let the I/O thread park before the next fio cell, so that its
                        # polling does not take a core from fio.
                        time.sleep(opts.poll_timeout_ms / 1000 + 0.05)
                    else:
                        assert fio is not None
                        result = fio.run(w, backend, target, path, opts.size, opts.seconds)
                    report.results.append(result)
                    say(_progress_line(result))
    report.machine["load_end"] = [round(x, 2) for x in os.getloadavg()]
    _with_ratios(report.results)
    report.notes += _engine_comparison(report.results, opts.engines)
    report.notes.append(_passthrough_note())
    mismatched = [
        r for r in report.results if r.target.startswith(DEVICE) and r.device_commands != r.ios
    ]
    if mismatched:
        report.notes.append(
            "device count differs from the client's: "
            + ", ".join(
                f"{r.workload}/{r.backend} {r.device_commands} vs {r.ios}" for r in mismatched
            )
        )
    return report


def _passthrough_note() -> str:
    """Why there is no NVMe passthrough row: it would write a host NVMe namespace."""
    found = sorted(p.name for p in Path("/dev").glob("ng*n*"))
    where = (
        f"this host has {', '.join(found)}, but the bench writes what it measures and picks "
        "no real namespace by itself"
        if found
        else "this host has no NVMe namespace (/dev/ngXnY)"
    )
    return (
        f"NVMe passthrough: no row ({where}); tests/e2e/test_passthrough_guest.py checks it "
        "on QEMU's emulated NVMe, whose speed under TCG says nothing"
    )


def _engine_comparison(results: list[Result], engines: Sequence[str]) -> list[str]:
    """One line per file workload: each engine's IOPS over the first engine's."""
    if len(engines) < 2:
        return []
    iops = {(r.workload, r.target): r.iops for r in results if r.ok and r.backend == "file"}
    first = device_target(engines[0])
    lines = []
    for workload in dict.fromkeys(r.workload for r in results):
        base = iops.get((workload, first))
        if not base:
            continue
        ratios = [
            f"{e} {iops[(workload, device_target(e))] / base:.2f}x"
            for e in engines[1:]
            if (workload, device_target(e)) in iops
        ]
        if ratios:
            lines.append(f"I/O engines, {workload}, file: {', '.join(ratios)} of {engines[0]}")
    return lines


def _progress_line(r: Result) -> str:
    if r.error:
        return f"{r.workload} {r.backend} {r.target}: error: {r.error}"
    return f"{r.workload} {r.backend} {r.target}: {r.iops:,.0f} IOPS, {r.mean_us:.1f} µs mean"


# --- output ---------------------------------------------------------------------------

COLUMNS = (
    "workload",
    "backend",
    "target",
    "IOPS",
    "mean µs",
    "p99 µs",
    "dev µs/IO",
    "dev %",
    "client µs/IO",
    "client %",
    "vs native",
    "+mean µs",
)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(report: Report) -> list[list[str]]:
    rows = []
    for r in report.results:
        if r.error:
            rows.append([r.workload, r.backend, r.target, f"error: {r.error}"])
            continue
        client = _num(r.client_cpu_us, ".2f")
        if (
            r.target.startswith(DEVICE)
            and r.client_util is not None
            and r.client_util >= CLIENT_BOUND
        ):
            client += "*"  # the Python guest, not the device, limits this row
        rows.append(
            [
                r.workload,
                r.backend,
                r.target,
                f"{r.iops:,.0f}",
                f"{r.mean_us:.1f}",
                f"{r.p99_us:.1f}",
                _num(r.device_cpu_us, ".2f"),
                _num(None if r.device_util is None else r.device_util * 100, ".0f"),
                client,
                _num(None if r.client_util is None else r.client_util * 100, ".0f"),
                "n/a" if r.ratio is None else f"{r.ratio:.2f}x",
                _num(r.added_mean_us, "+.1f"),
            ]
        )
    return rows


def format_report(report: Report) -> str:
    m, s = report.machine, report.settings
    backends = s.get("backends", BACKENDS)
    mib = s["size"] >> 20
    storage, devices = [], []
    if "file" in backends:
        cache = "page cache dropped before every cell" if s.get("cold") else "page cache"
        storage.append(f"{mib} MiB file ({cache})")
    if "null" in backends:
        storage.append("null namespace")
    if {"file", "null"} & set(backends):
        devices.append(
            f"nvme-mdev serve, I/O engines {', '.join(s.get('io_engines', []))}, "
            f"pid {s.get('device_pid', '?')}"
        )
    if RBD in backends:
        storage.append(f"RBD image {s.get('rbd')} (its first {mib} MiB, written first)")
        devices.append(f"nvme-mdev serve on rbd:{s.get('rbd')}, one per cell")
    head = [
        f"nvme-mdev bench: {s['seconds_per_cell']:g} s per cell, "
        f"{' and '.join(storage)}; {report.fio or 'no fio'}",
        f"machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}, Python {m['python']}; "
        f"load average {' '.join(map(str, m['load_start']))} at start, "
        f"{' '.join(map(str, m.get('load_end', [])))} at end",
        f"guest: nvme_host in this process, {s['doorbells']} doorbells, "
        f"{s['completions']} completions; device: {'; '.join(devices)}",
        "",
    ]
    rows = [list(COLUMNS), *table_rows(report)]
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            last = i == len(row) - 1
            if i < 3 or (last and cell.startswith("error")):
                cells.append(cell if last else cell.ljust(widths[i]))
            else:
                cells.append(cell.rjust(widths[i]))
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [
        "",
        "dev: nvme-mdev: CPU time of all threads of the serve process "
        "(/proc/PID/task/*/schedstat) over the cell, per I/O and as % of one core; "
        "busy polling included. fio: fio's system (kernel) time.",
        "client: nvme-mdev: CPU time of this Python process (the guest driver); "
        "fio: fio's user time (fio's rusage less that of a 1 ms run: its start-up).",
        f"*: the client used >= {CLIENT_BOUND:.0%} of a core: the Python guest limits the row.",
    ]
    references = {
        "file": "IOPS / fio-io_uring's on the same file and workload",
        "null": "null rows: / fio's null ioengine (fio alone, no I/O)",
        RBD: "rbd rows: / fio-rbd's (fio's rbd ioengine, librbd's cache off as the device "
        "has it) on the same image and workload",
    }
    notes.append(
        f"vs native: {'; '.join(references[b] for b in backends if b in references)}. "
        "+mean: mean latency over that reference's."
    )
    if "file" in backends:
        notes.append("fio-psync has no queue: depth N is N threads.")
    notes.append("Latency is submission to completion seen by the client.")
    if RBD in backends:
        notes.append(
            "fio-rbd: librbd runs in fio's process, so its CPU is fio's user time (client), "
            "as the device's librbd is in dev; the Ceph daemons' CPU is in neither."
        )
    notes += report.notes
    return "\n".join(head + lines + notes)


def report_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2)


# --- command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per cell (default 5; --quick: 0.25)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run: 0.25 s per cell, 16 MiB, device parks after 50 ms",
    )
    parser.add_argument(
        "--size",
        default=None,
        help="size of the file and the null namespace, and how much of --rbd's image the "
        "cells span (default 256M)",
    )
    parser.add_argument(
        "--file",
        type=Path,
        default=None,
        help="page-cache file to create and keep (must not exist; default: a temporary one)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the temporary file goes (default %(default)s: a real filesystem, not tmpfs)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(w.name for w in WORKLOADS),
        help="comma-separated (default: all: %(default)s)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="some of file, null, rbd (default: file,null; with --rbd: rbd)",
    )
    parser.add_argument(
        "--rbd",
        default=None,
        metavar="POOL/IMAGE",
        help="measure this Ceph RBD image too: the device serving it as a namespace against "
        "fio's rbd ioengine on it (an existing image of at least --size; the bench "
        "overwrites its first --size bytes)",
    )
    parser.add_argument(
        "--rbd-conf",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --rbd: the cluster's ceph.conf (default: librados' search, as conf= of "
        "an rbd: namespace)",
    )
    parser.add_argument(
        "--rbd-id",
        default=DEFAULT_CLIENT_ID,
        metavar="CLIENT",
        help="with --rbd: the client id (default %(default)s)",
    )
    parser.add_argument(
        "--rbd-keyring",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --rbd: the client's keyring (default: the conf's)",
    )
    parser.add_argument("--fio", default="fio", help="fio binary (default: fio on PATH)")
    parser.add_argument(
        "--doorbells",
        choices=("shadow", "mmio"),
        default="shadow",
        help="guest doorbells: shadow (Doorbell Buffer Config, as Linux) or mmio (all trap)",
    )
    parser.add_argument(
        "--completions",
        choices=("irq", "poll"),
        default="irq",
        help="guest waits on the MSI-X eventfd (irq) or spins on its completion queue",
    )
    parser.add_argument(
        "--poll-timeout-ms", type=int, default=None, help="the device's (default 500; --quick: 50)"
    )
    parser.add_argument(
        "--io-engines",
        default=None,
        help="the device's I/O engines, one device each (default: sync,uring; "
        "sync alone where the kernel has no io_uring)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the host's page cache before every file cell (root): the rows then "
        "measure the storage, not memory; give a --size larger than a cell reads",
    )
    parser.add_argument("--seed", type=int, default=1, help="random LBAs' seed")
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the results as JSON to PATH (-: JSON on stdout instead of the table)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )


def options_from_args(args: argparse.Namespace) -> Options:
    by_name = {w.name: w for w in WORKLOADS}
    names = [n for n in args.workloads.split(",") if n]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise ConfigError(f"--workloads: unknown {unknown} (known: {', '.join(by_name)})")
    rbd = None
    if args.rbd is not None:
        try:
            image = RbdImage.parse(args.rbd)
        except ValueError as exc:
            raise ConfigError(f"--rbd {args.rbd!r}: {exc}") from None
        if image.snapshot is not None:
            raise ConfigError(f"--rbd {args.rbd!r}: a snapshot is read-only; the bench writes")
        rbd = RbdTarget(image, args.rbd_conf, args.rbd_id, args.rbd_keyring)
    given = args.backends or (RBD if rbd else ",".join(BACKENDS))
    backends = [b for b in given.split(",") if b]
    known = (*BACKENDS, RBD)
    if not backends or any(b not in known for b in backends):
        raise ConfigError(f"--backends {given!r}: some of {', '.join(known)}")
    if RBD in backends and rbd is None:
        raise ConfigError("--backends rbd: give the image, --rbd POOL/IMAGE")
    seconds = args.seconds if args.seconds is not None else QUICK_SECONDS if args.quick else 5.0
    if not seconds > 0:
        raise ConfigError("--seconds: must be more than 0")
    size = parse_size(args.size) if args.size else QUICK_SIZE if args.quick else 256 << 20
    biggest = max(by_name[n].block_size for n in names)
    if size < biggest or size % BLOCK:
        raise ConfigError(f"--size: a multiple of {BLOCK} bytes, at least {biggest}")
    poll_ms = args.poll_timeout_ms
    if poll_ms is None:
        poll_ms = QUICK_POLL_TIMEOUT_MS if args.quick else 500
    if poll_ms < 0:
        raise ConfigError("--poll-timeout-ms: must be 0 or more")
    if args.cold and not os.access(DROP_CACHES, os.W_OK):
        raise ConfigError(f"--cold: needs root (it writes {DROP_CACHES} before every cell)")
    if args.io_engines is None:
        engines = ["sync"] if uring.unavailable() else ["sync", "uring"]
    else:
        engines = list(dict.fromkeys(e for e in args.io_engines.split(",") if e))
        if not engines or any(e not in ("sync", "uring") for e in engines):
            raise ConfigError(f"--io-engines {args.io_engines!r}: sync, uring or sync,uring")
    return Options(
        seconds=seconds,
        size=size,
        file=args.file,
        directory=args.dir,
        fio=args.fio,
        workloads=tuple(by_name[n] for n in names),
        backends=tuple(b for b in known if b in backends),
        shadow_doorbells=args.doorbells == "shadow",
        poll_completions=args.completions == "poll",
        poll_timeout_ms=poll_ms,
        seed=args.seed,
        engines=tuple(engines),
        cold=args.cold,
        rbd=rbd,
    )


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    opts = options_from_args(args)
    try:
        report = run_bench(opts, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (BenchError, NvmeHostError, ClientError, OSError) as exc:
        print(f"nvme-mdev bench: error: {exc}", file=sys.stderr)
        return 1
    if args.json == "-":
        print(report_json(report), file=out)
        return 0
    if args.json:
        Path(args.json).write_text(report_json(report) + "\n")
    print(format_report(report), file=out)
    return 0


__all__ = [
    "FIO_WRITE_PATTERN",
    "WORKLOADS",
    "WRITE_PATTERN",
    "BenchError",
    "Options",
    "RbdTarget",
    "Report",
    "Result",
    "Workload",
    "add_arguments",
    "device_target",
    "format_report",
    "main",
    "run_bench",
]
