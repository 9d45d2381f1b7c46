#!/usr/bin/env python3
"""A soak test (not part of CI): one `nvme-mdev daemon` under a Linux guest's verified
I/O and a host side that never lets up, for a given time; then a verdict.

    scripts/soak.sh --minutes 30            # or: .venv/bin/python tools/soak.py ...
    scripts/soak.sh --minutes 3 --sample-seconds 5
    scripts/soak.sh --minutes 10 --no-guest # the host side only (no guest tree needed)

What runs, all at once, against one daemon:
- controller "guest" (an image-file namespace): a Linux guest (tools/guest, TCG) runs
  fio with crc32c verification on it for the whole time (4 KiB random writes at QD32
  and 128 KiB sequential writes at QD8, time-based, every block read back and checked
  as it goes: verify_backlog), in rounds of --fio-round-seconds; it runs
  `nvme ns-rescan` every 2 s and reports namespace 2 appearing and going; at the end
  it prints its kernel log (warnings and worse, and any NVMe timeout/abort/reset);
- on the guest's controller, namespace 2 (another image) added and removed in a loop
  through the CLI (`nvme-mdev ns add|remove`), with `list` checking each step;
- `list` and `stats` queries in a loop (over the control socket, and every fifth one
  through the CLI); the guest's I/O command count comes from `stats`;
- reconnect storms on controllers storm0 (native data plane) and storm1 (Python data
  plane): the project's vfio-user client connects, negotiates, maps memory, enables,
  does verified I/O and disconnects abruptly (or at any step before), over and over;
- hostile clients on controllers hostile (native) and hostile-py (Python), each attack
  followed by a check that the daemon lives, answers `list`, and that a fresh client
  on the attacked controller enables and reads back what it writes: truncated DMA
  memory, a pipe as interrupt fd, a full blocking eventfd, too many DMA maps, shadow
  doorbells unmapped under the I/O thread, malformed messages, random messages,
  unusable framing, half a header then nothing, and control-socket garbage (deeply
  nested JSON, over-long lines carrying a smuggled request, binary noise, bad params,
  half lines, bursts of connections);
- the daemon's RSS (VmRSS less RssShmem: the guest RAM it shares with QEMU grows in
  VmRSS as the device touches more of it), open fds and threads sampled every
  --sample-seconds and printed as a table as the run goes.

The verdict (exit status 0 only if both hold):
- no errors: fio errors or verify failures, guest kernel warnings about NVMe, the
  daemon dying or failing to stop cleanly, host-side operations that should have
  succeeded and did not (or attacks the daemon did not refuse as it should), I/O error
  completions on the guest's queues, the guest's I/O stalling, unexpected tracebacks
  in the daemon's log;
- flat resources: after a warm-up (the first 20% of the run, at least 60 s), the
  largest RSS of the last quarter of the samples is within max(--rss-margin-mib,
  --rss-margin-pct %) of the largest of the first quarter; the fewest fds and threads
  of the last quarter (their floor: connections come and go) within --fd-margin /
  --thread-margin of the first quarter's; and once everything stopped (the guest gone, every
  client disconnected, namespace 2 removed) fds and threads are back to the baseline
  taken after each controller served its first client.

Exit status: 0 pass, 1 fail, 2 could not start (no guest tree, bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent / "guest"))

import guestvm
from nvme_mdev.control import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    MAX_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    ControlError,
    call,
)
from nvme_mdev.nvme.spec import CSTS_CFS, PAGE_SIZE
from nvme_mdev.nvme_host import NvmeHost, read_write
from nvme_mdev.vfio_user import protocol as p
from nvme_mdev.vfio_user.client import ClientError, GuestRam, VfioUserClient

T = TypeVar("T")
CLI = [sys.executable, "-m", "nvme_mdev.cli"]
MIB = 1 << 20
BLOCK = 512
NEIGHBOUR_MIB = 16
HOST_RAM = 8 * MIB  # each host-side client's "guest RAM"
VS_2_0 = 0x20000  # what the VS register of a live controller reads (NVMe 2.0)
DOORBELL_BUFFER_CONFIG = 0x7C
STALL_SECONDS = 90.0  # no guest I/O for this long while fio runs: the device hangs
FATAL_WAIT = 15.0  # for CSTS.CFS after an attack that must make its controller fatal

# What makes a kernel message one about an NVMe controller (after its timestamp), as
# in tests/e2e/live_guest.py; messages naming an NVMe function's PCI address are added.
#: what Linux says when its scan of namespace 2 meets the host removing it: Identify
#: (Namespace Identification Descriptors) of an NSID no longer active fails, as the spec
#: has it (Invalid Namespace or Format, DNR), and the kernel warns and drops the namespace.
#: An outcome of the hot remove the soak does, counted apart from errors.
SCAN_MET_REMOVAL = re.compile(
    r"nvme nvme\d+: Identify Descriptors failed \(nsid=2, status=0x400b\)"
)
ABOUT_NVME = [
    r"\bnvme nvme\d+:",
    r"^(\[[^\]]*\]\s*)?nvme\d+(c\d+)?n\d+:",
    r"^(\[[^\]]*\]\s*)?nvme(_core)?:",
    r"\bdev nvme\d",
]

# Runs in the guest (bash, root, the tree's tools on PATH). Environment: SOAK_END_EPOCH
# (when fio must be done, host time; the guest's clock comes from the host's),
# SOAK_SECONDS (the most fio may take: used if the guest's clock disagrees), FIO_ROUND.
# Every line for the host starts with SOAK-.
GUEST_SCRIPT = r"""
set -u
cd /tmp
say() { echo "SOAK-$*"; }
find_ns() {
    local d
    for d in /sys/block/nvme0n*; do
        [ "$(cat "$d/nsid" 2>/dev/null)" = "$1" ] && { echo "/dev/${d##*/}"; return; }
    done
    true
}
dmesg --follow --color=never --level=emerg,alert,crit,err,warn >/tmp/kwarn 2>&1 &
kfollow=$!
ns1=
for _ in $(seq 600); do
    ns1=$(find_ns 1)
    [ -n "$ns1" ] && [ -b "$ns1" ] && break
    sleep 0.1
done
if [ -z "$ns1" ]; then
    say "GUEST-FATAL namespace 1 did not appear"
    ls -l /dev/nvme* 2>&1
    exit 3
fi
size=$(blockdev --getsize64 "$ns1")
half=$((size / 2 / 1048576 * 1048576))
(
    present=0
    while [ ! -e /tmp/soak-stop ]; do
        nvme ns-rescan /dev/nvme0 >/dev/null 2>&1 || say "RESCAN-FAILED"
        now=0
        [ -n "$(find_ns 2)" ] && now=1
        if [ "$now" != "$present" ]; then
            say "NS2 $now"
            present=$now
        fi
        sleep 2
    done
) &
watcher=$!
now=$(date +%s)
secs=$((SOAK_END_EPOCH - now))
[ "$secs" -le "$SOAK_SECONDS" ] || secs=$SOAK_SECONDS
[ "$secs" -ge 30 ] || secs=30
say "GUEST-READY $ns1 $size epoch=$now fio=${secs}s"
end=$((SECONDS + secs))
round=0
while :; do
    left=$((end - SECONDS))
    [ "$left" -ge 10 ] || break
    run=$((left < FIO_ROUND ? left : FIO_ROUND))
    round=$((round + 1))
    say "FIO-START $round $run"
    fio --output-format=json --output=/tmp/fio.json --eta=never \
        --filename="$ns1" --ioengine=libaio --direct=1 --time_based --runtime="$run" \
        --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --name=rand4k-qd32 --rw=randwrite --bs=4k --iodepth=32 \
        --offset=0 --size="$half" --verify_backlog=4096 \
        --name=seq128k-qd8 --rw=write --bs=128k --iodepth=8 \
        --offset="$half" --size="$half" --verify_backlog=128 \
        >/tmp/fio.out 2>&1
    rc=$?
    say "FIO-ROUND $round rc=$rc"
    python3 - "$round" <<'PY'
import json, sys
r = sys.argv[1]
try:
    text = open("/tmp/fio.json").read()
    jobs = json.loads(text[text.index("{"):])["jobs"]
except Exception as exc:
    print(f"SOAK-FIO-JOB {r} unreadable error=-1 writes=0 reads=0 ({type(exc).__name__})")
    sys.exit(0)
for j in jobs:
    w, rd = j["write"], j["read"]
    print(f"SOAK-FIO-JOB {r} {j['jobname']} error={j['error']} writes={w['total_ios']}"
          f" reads={rd['total_ios']} wiops={w['iops']:.0f} riops={rd['iops']:.0f}")
PY
    grep -vE '^[^ ]+: \(g=[0-9]+\): rw=|^Starting [0-9]+ (process|thread)|^fio-[0-9.]+$' \
        /tmp/fio.out | head -40 | sed "s/^/SOAK-FIO-OUT $round /"
done
touch /tmp/soak-stop
wait "$watcher"
sleep 1
kill "$kfollow" 2>/dev/null
functions=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/class" 2>/dev/null)" = 0x010802 ] && functions="$functions ${d##*/}"
done
say "KLOG-DEVICES:$functions"
sed 's/^/SOAK-KLOG: /' /tmp/kwarn
dmesg --color=never | grep -iE 'nvme.*(timeout|abort|reset)' | sed 's/^/SOAK-KNVME: /'
say "KLOG-END"
exit 0
"""


class Unexpected(Exception):
    """The daemon did something else than it should have."""


# --- bookkeeping -------------------------------------------------------------------


class Errors:
    """Every error of the run, by category, printed as it happens (the first few)."""

    PRINT_PER_CATEGORY = 20

    def __init__(self, out: Output) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.items: list[tuple[float, str, str]] = []

    def add(self, category: str, message: str) -> None:
        with self.lock:
            self.items.append((time.monotonic(), category, message))
            n = sum(1 for _, c, _ in self.items if c == category)
        if n <= self.PRINT_PER_CATEGORY:
            self.out.say(f"ERROR [{category}] {message}")
        elif n == self.PRINT_PER_CATEGORY + 1:
            self.out.say(f"ERROR [{category}] ... (more of these are counted, not printed)")

    def by_category(self) -> Counter[str]:
        with self.lock:
            return Counter(c for _, c, _ in self.items)

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


class Output:
    def __init__(self, start: float) -> None:
        self.start = start
        self.lock = threading.Lock()

    def say(self, text: str) -> None:
        with self.lock:
            print(f"[{time.monotonic() - self.start:7.1f}s] {text}", flush=True)

    def raw(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.c: Counter[str] = Counter()
        self.values: dict[str, int] = {}

    def inc(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.c[key] += n

    def set(self, key: str, value: int) -> None:
        with self.lock:
            self.values[key] = value

    def get(self, key: str) -> int:
        with self.lock:
            return self.values.get(key, self.c.get(key, 0))

    def prefixed(self, prefix: str) -> dict[str, int]:
        with self.lock:
            return {k[len(prefix) :]: v for k, v in sorted(self.c.items()) if k.startswith(prefix)}


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the start
    rss_kib: int
    fds: int
    threads: int


def read_proc(pid: int) -> Sample | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    # Guest RAM is shared memory the client maps for DMA: every page of it the device
    # has touched counts in VmRSS (as RssShmem) and grows with what the guest uses, not
    # with anything the daemon holds. The daemon's own memory is the rest.
    rss = int(fields.get("VmRSS", "0 kB").split()[0])
    shared = int(fields.get("RssShmem", "0 kB").split()[0])
    return Sample(0.0, rss - shared, fds, int(fields.get("Threads", "0")))


# --- the daemon ----------------------------------------------------------------------


@dataclass
class Controller:
    name: str
    socket: str
    image: Path
    blocks: int
    args: list[str] = field(default_factory=list)


#: connect() on the control socket when its listen backlog (2) is full: the client
#: (nvme_mdev.control.call, and so the CLI, connects with a timeout, i.e. non-blocking)
#: gets EAGAIN instead of waiting. Retried and counted, not an error of the run.
EAGAIN = "Resource temporarily unavailable"
EAGAIN_TRIES = 20


class Daemon:
    def __init__(self, work: Path) -> None:
        self.control = str(work / "control.sock")
        self.log_path = work / "daemon.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*CLI, "daemon", "--control", self.control],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.control):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        for attempt in range(EAGAIN_TRIES):
            try:
                return call(self.control, method, params, timeout=30)
            except ControlError as exc:
                if EAGAIN not in str(exc) or attempt == EAGAIN_TRIES - 1:
                    raise
                REFUSALS.inc("control-eagain")
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        for _ in range(EAGAIN_TRIES - 1):
            result = subprocess.run(
                [*CLI, *args, "--control", self.control],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if result.returncode == 0 or EAGAIN not in result.stderr:
                return result
            REFUSALS.inc("control-eagain")
            time.sleep(0.1)
        return result

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM; its exit status (None if it had to be killed after 60 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self._log.close()
        return code


# --- host-side clients ----------------------------------------------------------------

#: connections the server closed unserved (see refused()), retried
REFUSALS = Counts()


def negotiated(path: str, timeout: float = 10.0) -> VfioUserClient:
    """A vfio-user client that has negotiated (closed again if that fails)."""
    client = VfioUserClient(path, timeout=timeout)
    try:
        client.negotiate()
    except BaseException:
        client.close()
        raise
    return client


def refused(exc: BaseException) -> bool:
    """The server closed a new connection unserved: by design when one client is
    served and another already waits (a closed one it has not picked up yet)."""
    if isinstance(exc, ClientError):
        return exc.errno == errno.ECONNRESET
    return isinstance(exc, (BrokenPipeError, ConnectionResetError))


def connect(factory: Callable[[], T], tries: int = 5) -> T:
    """factory() (a new client that negotiates), again if the server refused it."""
    for attempt in range(tries):
        try:
            return factory()
        except Exception as exc:
            if attempt == tries - 1 or not refused(exc):
                raise
            REFUSALS.inc("refused")
            time.sleep(0.5)
    raise AssertionError("unreachable")


class Host:
    """The project's NVMe host driver on a controller, with one I/O queue and a buffer."""

    def __init__(self, path: str, blocks: int) -> None:
        self.blocks = blocks
        self.nvme = connect(lambda: NvmeHost(path, ram_size=HOST_RAM))
        self.buf = 0

    def close(self) -> None:
        self.nvme.close()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def io_queue(self) -> None:
        if 1 not in self.nvme.io:
            self.nvme.create_queue_pair(1, entries=64)
        if not self.buf:
            self.buf = self.nvme.alloc(64 * 1024)

    def write_read(self, lba: int, data: bytes) -> None:
        """Write `data` at `lba` of namespace 1, read it back, compare."""
        self.io_queue()
        q = self.nvme.io[1]
        nlb = len(data) // BLOCK
        self.nvme.ram.write(self.buf, data)
        done = q.command(read_write(0x01, 1, self.buf, lba, nlb))
        if not done.ok:
            raise Unexpected(f"write of LBA {lba}: status {done.status:#x}")
        self.nvme.ram.write(self.buf, bytes(len(data)))
        done = q.command(read_write(0x02, 1, self.buf, lba, nlb))
        if not done.ok:
            raise Unexpected(f"read of LBA {lba}: status {done.status:#x}")
        if self.nvme.ram.read(self.buf, len(data)) != data:
            raise Unexpected(f"LBA {lba}: read back other bytes than were written")

    def check(self, rng: random.Random, count: int = 2) -> None:
        for _ in range(count):
            lba = rng.randrange(0, self.blocks - 8)
            self.write_read(lba, rng.randbytes(4096))


# Reconnect storms: each variant connects and leaves abruptly at a different step.
STORM_VARIANTS = (
    "connect-close",  # the socket only
    "negotiate-close",  # VERSION, DEVICE_GET_INFO
    "map-close",  # + DMA_MAP of its RAM and MSI-X eventfds
    "enable-close",  # + CC.EN=1 and the admin queue
    "io-close",  # + an I/O queue and verified writes/reads
    "inflight-close",  # + 32 commands submitted, gone before they complete
    "shadow-io-close",  # + shadow doorbells (Doorbell Buffer Config), verified I/O
    "clean-shutdown",  # verified I/O, then a normal shutdown notification
    "handover",  # a second client waits while the first is served, then takes over
)


def storm_cycle(ctl: Controller, variant: str, rng: random.Random) -> None:
    if variant == "connect-close":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(ctl.socket)
        return
    if variant == "negotiate-close":
        with connect(lambda: negotiated(ctl.socket)) as c:
            c.device_info()
        return
    if variant == "handover":
        first = Host(ctl.socket, ctl.blocks)
        try:
            first.nvme.enable()  # being served: the next one waits its turn
            second = VfioUserClient(ctl.socket, timeout=20)
        finally:
            first.close()
        with second:
            second.negotiate()  # served once the first has gone
            if (vs := second.read32(0, 0x08)) != VS_2_0:
                raise Unexpected(f"VS reads {vs:#x} after a handover")
        return
    with Host(ctl.socket, ctl.blocks) as h:
        if variant == "map-close":
            return
        h.nvme.enable()
        if variant == "enable-close":
            return
        if variant == "shadow-io-close":
            h.nvme.enable_shadow_doorbells()
        h.io_queue()
        if variant == "inflight-close":
            q = h.nvme.io[1]
            buf = h.nvme.alloc(32 * 4096)
            for i in range(32):
                opcode = 0x01 if i % 2 else 0x02
                lba = rng.randrange(0, ctl.blocks - 8)
                q.submit(read_write(opcode, 1, buf + i * 4096, lba, 8), ring=False)
            q.ring()
            return  # and gone, with the commands in flight
        h.check(rng, 4)
        if variant == "clean-shutdown":
            h.nvme.shutdown()


# --- hostile clients (tests/integration/test_hostile_clients.py and friends) ----------


def attack_truncated_memory(ctl: Controller, rng: random.Random) -> None:
    """Shrink the memfd mapped with DMA_MAP, then ring: the device's next access to
    the queue would be past the end of the file (SIGBUS). Its controller goes fatal."""
    with Host(ctl.socket, ctl.blocks) as h:
        h.nvme.enable()
        q = h.nvme.create_queue_pair(1)
        buf = h.nvme.alloc(4096)
        q.submit(read_write(0x02, 1, buf, 0, 8), ring=False)
        os.ftruncate(h.nvme.ram.fd, 0)  # from here on we must not touch that RAM
        h.nvme.write_doorbell(1, q.sq_tail)
        h.nvme.wait_csts(CSTS_CFS, CSTS_CFS, timeout=FATAL_WAIT)


def attack_pipe_irq(ctl: Controller, rng: random.Random) -> None:
    """SET_IRQS with a pipe instead of an eventfd: refused with EINVAL."""
    with Host(ctl.socket, ctl.blocks) as h:
        h.nvme.enable()
        read_end, write_end = os.pipe()
        try:
            h.nvme.client.set_irqs(2, p.IRQ_SET_ACTION_TRIGGER, 0, 1, fds=[write_end])
        except ClientError as exc:
            if exc.errno != errno.EINVAL:
                raise Unexpected(f"a pipe as interrupt fd: errno {exc.errno}") from exc
        else:
            raise Unexpected("a pipe was accepted as an interrupt fd")
        finally:
            os.close(read_end)
            os.close(write_end)
        h.check(rng)


def attack_full_eventfd(ctl: Controller, rng: random.Random) -> None:
    """A blocking eventfd at its maximum count as the I/O queue's interrupt: each
    completion's interrupt would block a careless writer."""
    with Host(ctl.socket, ctl.blocks) as h:
        h.nvme.enable()
        full = os.eventfd(0)
        os.eventfd_write(full, 0xFFFF_FFFF_FFFF_FFFE)
        try:
            h.nvme.client.set_irqs(2, p.IRQ_SET_ACTION_TRIGGER, 1, 1, fds=[full])
            h.check(rng, 4)
            h.nvme.disable()  # CC.EN=0 must be answered
        finally:
            os.close(full)


def attack_too_many_dma_maps(ctl: Controller, rng: random.Random) -> None:
    """DMA_MAP (fd-less) until the advertised max_dma_maps, then one more: ENOSPC."""
    with connect(lambda: negotiated(ctl.socket, 30)) as c:
        limit = c.server_caps.effective_max_dma_maps
        base = 1 << 40
        for i in range(limit):
            c.add_message_region(base + i * PAGE_SIZE, PAGE_SIZE)
        try:
            c.add_message_region(base + limit * PAGE_SIZE, PAGE_SIZE)
        except ClientError as exc:
            if exc.errno != errno.ENOSPC:
                raise Unexpected(f"DMA_MAP {limit + 1}: errno {exc.errno}") from exc
        else:
            raise Unexpected(f"DMA_MAP beyond max_dma_maps ({limit}) was accepted")


def attack_shadow_unmap(ctl: Controller, rng: random.Random) -> None:
    """Shadow doorbells in memory of their own, unmapped while the I/O thread uses
    them: the controller goes fatal; after a reset it serves again."""
    shadow = GuestRam(2 * PAGE_SIZE, base=0x8000_0000)
    with contextlib.closing(shadow), Host(ctl.socket, ctl.blocks) as h:
        h.nvme.enable()
        h.nvme.client.dma_map(shadow)
        pages = [shadow.base, 0, shadow.base + PAGE_SIZE, 0]
        if not h.nvme.admin_command([DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, *pages]).ok:
            raise Unexpected("Doorbell Buffer Config refused")
        q = h.nvme.create_queue_pair(1)
        buf = h.nvme.alloc(4096)
        q.submit(read_write(0x02, 1, buf, 0, 8), ring=False)
        shadow.words[2] = q.sq_tail  # SQ 1's shadow tail
        h.nvme.write_doorbell(1, q.sq_tail)
        (done,) = q.wait(1)
        if not done.ok:
            raise Unexpected(f"read through shadow doorbells: status {done.status:#x}")
        h.nvme.client.dma_unmap(shadow.base, shadow.size)
        h.nvme.wait_csts(CSTS_CFS, CSTS_CFS, timeout=FATAL_WAIT)
        h.nvme.disable()
        h.nvme.enable()
        h.check(rng)


MALFORMED: list[tuple[int, bytes, int]] = [
    (99, b"", errno.ENOTSUP),  # unknown command
    (p.Command.REGION_READ, b"\0" * 4, errno.EINVAL),  # truncated payload
    (p.Command.REGION_READ, p.REGION_RW.pack(1 << 20, 0, 4), errno.EINVAL),  # past BAR0
    (p.Command.REGION_WRITE, p.REGION_RW.pack(0, 0, 8) + b"1", errno.EINVAL),  # short data
    (p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0xFF, 2, 0, 1), errno.EINVAL),
    (p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, 0x24, 2, 60, 10), errno.EINVAL),
    (p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 0, 0x5000, 0x1000), errno.ENOENT),
    (p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 1, 0, 0x1000), errno.ENOTSUP),
    (p.Command.VERSION, p.VERSION.pack(0, 0) + b"{nope", errno.EINVAL),
]


def attack_malformed_messages(ctl: Controller, rng: random.Random) -> None:
    """Well-framed messages with bad contents: each gets its error reply."""
    with connect(lambda: negotiated(ctl.socket)) as c:
        for command, payload, expected in MALFORMED:
            try:
                c.request(command, payload)
            except ClientError as exc:
                if exc.errno != expected:
                    raise Unexpected(
                        f"command {command}: errno {exc.errno}, expected {expected}"
                    ) from exc
            else:
                raise Unexpected(f"malformed command {command} {payload[:16]!r} succeeded")
        if (vs := c.read32(0, 0x08)) != VS_2_0:
            raise Unexpected(f"VS reads {vs:#x} after malformed messages")


def attack_random_messages(ctl: Controller, rng: random.Random) -> None:
    """Random commands with random payloads (no fds): each must get a reply, or the
    connection is dropped; no reply at all is a fault."""
    with connect(lambda: negotiated(ctl.socket, 15)) as c:
        for _ in range(40):
            command = rng.choice([*range(1, 16), 99, 0xFFFF])
            payload = rng.randbytes(rng.choice([0, 4, 8, 16, 24, 32, 64, 200]))
            try:
                c.request(command, payload)
            except ClientError:
                if not c.connected:
                    return
            except TimeoutError as exc:
                raise Unexpected(f"no reply to random command {command}: {exc}") from exc


def attack_unusable_framing(ctl: Controller, rng: random.Random) -> None:
    """A DMA_MAP with one fd too many (EINVAL), then a header that claims 4 bytes:
    the server drops the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(ctl.socket)
        r, w = os.pipe()
        try:
            fds = r.to_bytes(4, "little") + w.to_bytes(4, "little")
            sock.sendmsg(
                [p.encode(1, p.Command.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0, 4096))],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
            )
        finally:
            os.close(r)
            os.close(w)
        reply = sock.recv(4096)
        if len(reply) < p.HEADER_SIZE or p.Header.decode(reply).error != errno.EINVAL:
            raise Unexpected(f"DMA_MAP with two fds: reply {reply[:16].hex()}")
        sock.sendall(p.HEADER.pack(2, 1, 4, 0, 0))
        if sock.recv(16) != b"":
            raise Unexpected("a header claiming 4 bytes did not drop the client")


def attack_half_header(ctl: Controller, rng: random.Random) -> None:
    """Half a header, then nothing for a while (the daemon must keep serving
    everyone else meanwhile); then half a message, then gone."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(ctl.socket)
        sock.sendall(p.HEADER.pack(1, p.Command.VERSION, 100, 0, 0)[:8])
        time.sleep(2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(ctl.socket)
        sock.sendall(p.HEADER.pack(1, p.Command.VERSION, 100, 0, 0) + b'{"capabilities"')
        time.sleep(1)


ATTACKS: dict[str, Callable[[Controller, random.Random], None]] = {
    "truncated-memory": attack_truncated_memory,
    "pipe-irq": attack_pipe_irq,
    "full-eventfd": attack_full_eventfd,
    "too-many-dma-maps": attack_too_many_dma_maps,
    "shadow-unmap": attack_shadow_unmap,
    "malformed": attack_malformed_messages,
    "random-messages": attack_random_messages,
    "unusable-framing": attack_unusable_framing,
    "half-header": attack_half_header,
}
#: attacks that cost seconds of CPU: once every this many rounds
EXPENSIVE = {"too-many-dma-maps": 4}


def rpc(rid: Any, method: str, params: dict[str, Any] | None = None) -> bytes:
    request = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}
    return json.dumps(request).encode()


class Line:
    """A raw control-socket connection."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)  # blocking: waits for room in the listen backlog
        self.sock.settimeout(30)
        self.rfile = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        line = self.rfile.readline()
        if not line:
            raise Unexpected("the control server closed the connection without a reply")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def control_garbage(control: str, work: Path, rng: random.Random) -> None:
    """What a careless or hostile control client sends; every line gets its error
    reply and the same connection keeps working; nothing smuggled runs."""
    line = Line(control)
    try:
        for opener in (b"[", b'{"a":'):
            line.send(opener * 100_000 + b"\n")
            reply = line.reply()
            if reply.get("error", {}).get("code") != PARSE_ERROR:
                raise Unexpected(f"deeply nested JSON: {str(reply)[:200]}")
        evil = str(work / "evil.sock")
        smuggled = rpc("smuggled", "controller_create", {"name": "evil", "socket": evil})
        line.send(b"x" * (MAX_REQUEST + 1) + smuggled + b"\n" + rpc(2, "list") + b"\n")
        reply = line.reply()
        if reply.get("error", {}).get("code") != INVALID_REQUEST:
            raise Unexpected(f"over-long line: {str(reply)[:200]}")
        reply = line.reply()
        if reply.get("id") != 2 or "result" not in reply:
            raise Unexpected(f"the request after an over-long line: {str(reply)[:200]}")
        if os.path.exists(evil):
            raise Unexpected("a request smuggled past the line limit ran")
        noise = bytes(b for b in rng.randbytes(512) if b not in b'\n{["')
        cases: list[tuple[bytes, set[int]]] = [
            (noise, {PARSE_ERROR}),
            (b"[1, 2, 3]", {INVALID_REQUEST}),
            (b'{"jsonrpc": "1.0", "id": 1, "method": "list"}', {INVALID_REQUEST}),
            (rpc(3, "no_such_method"), {METHOD_NOT_FOUND}),
            (rpc(4, "namespace_add", {"controller": 7, "spec": ["x"]}), set()),
            (rpc(5, "namespace_remove", {"controller": "storm0", "nsid": "one"}), set()),
            (rpc(6, "stats", {"controller": "no-such-controller"}), set()),
            (rpc(7, "controller_delete", {"name": {"nested": 1}}), set()),
            (b'{"jsonrpc": "2.0", "id": 8, "method": "list", "params": [1]}', set()),
        ]
        for data, codes in cases:
            line.send(data + b"\n")
            reply = line.reply()
            code = reply.get("error", {}).get("code")
            if code is None or code == INTERNAL_ERROR or (codes and code not in codes):
                raise Unexpected(f"control line {data[:60]!r}: {str(reply)[:200]}")
        line.send(rpc(9, "list") + b"\n")
        if line.reply().get("id") != 9:
            raise Unexpected("the connection stopped working after garbage")
    finally:
        line.close()
    half = Line(control)
    half.send(b'{"jsonrpc": "2.0", "id": 1, "meth')
    burst = [Line(control) for _ in range(16)]
    for conn in burst:
        conn.close()
    half.close()


# --- the soak -------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.monotonic()
        self.duration = args.minutes * 60.0
        self.deadline = self.start + self.duration
        self.out = Output(self.start)
        self.errors = Errors(self.out)
        self.counts = Counts()
        self.stop = threading.Event()
        self.fatal = threading.Event()
        self.rng_seed = args.seed if args.seed is not None else random.randrange(1 << 32)
        self.samples: list[Sample] = []
        self.baseline: Sample | None = None
        self.quiesced: Sample | None = None
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="nvme-mdev-soak-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.console = self.work / "guest-console.log"
        self.guest_result: guestvm.GuestResult | None = None
        self.guest_thread: threading.Thread | None = None
        self.ns2_attached = False
        self.ns2_lock = threading.Lock()
        self.daemon: Daemon | None = None
        self.controllers: dict[str, Controller] = {}
        self.daemon_exit: int | None = None
        self.interrupted = False
        # what the end of the run found (finish())
        self.daemon_log_levels: Counter[str] = Counter()
        self.daemon_log_messages: Counter[str] = Counter()
        self.daemon_tracebacks = 0
        self.fio_rounds = self.fio_writes = self.fio_reads = 0
        self.fio_jobs: list[tuple[str, ...]] = []
        self.ns2_seen = self.rescan_failures = 0
        self.guest_ready_line = ""

    # -- helpers

    def rng(self, name: str) -> random.Random:
        return random.Random(f"{self.rng_seed}-{name}")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def sleep(self, seconds: float) -> bool:
        """False once the soak is stopping."""
        return not self.stop.wait(seconds)

    def image(self, name: str, mib: int) -> Path:
        path = self.work / name
        with open(path, "wb") as f:
            f.truncate(mib * MIB)
        return path

    def check_daemon(self) -> bool:
        assert self.daemon is not None
        if self.daemon.alive():
            return True
        if not self.fatal.is_set():
            self.fatal.set()
            code = self.daemon.proc.returncode
            self.errors.add(
                "daemon",
                f"the daemon died (status {code}); its log ends:\n{self.daemon.log_tail()}",
            )
            self.stop.set()
            kill_my_qemu()
        return False

    def failed(self, category: str, message: str) -> None:
        """A host-side failure, unless it is only the daemon's death (reported once)."""
        if self.check_daemon():
            self.errors.add(category, message)

    # -- set-up

    def setup(self) -> None:
        a = self.args
        self.out.say(f"work directory {self.work}; seed {self.rng_seed}")
        self.daemon = Daemon(self.work)
        self.out.say(f"daemon pid {self.daemon.pid}, control socket {self.daemon.control}")
        self.guest_image = self.image("guest-ns1.img", a.image_mib)
        self.ns2_image = self.image("guest-ns2.img", 64)
        planned = [
            ("guest", a.image_mib, self.guest_image, ["--data-plane", a.data_plane]),
            ("storm0", NEIGHBOUR_MIB, None, ["--data-plane", "native"]),
            ("storm1", NEIGHBOUR_MIB, None, ["--data-plane", "python"]),
            ("hostile", NEIGHBOUR_MIB, None, ["--poll-timeout-ms", "50"]),
            (
                "hostile-py",
                NEIGHBOUR_MIB,
                None,
                ["--poll-timeout-ms", "50", "--data-plane", "python"],
            ),
        ]
        for name, mib, image, extra in planned:
            img = image or self.image(f"{name}.img", mib)
            ctl = Controller(name, str(self.work / f"{name}.sock"), img, mib * MIB // BLOCK, extra)
            result = self.daemon.cli(
                "controller", "create", name, "--socket", ctl.socket, "--ns", str(img), *extra
            )
            if result.returncode != 0:
                raise RuntimeError(f"controller create {name}: {result.stderr.strip()}")
            self.controllers[name] = ctl
        # Each controller serves one client first (I/O threads, io_uring rings and the
        # like may start on first use): the baseline is what is left after that.
        rng = self.rng("setup")
        for name, ctl in self.controllers.items():
            with Host(ctl.socket, ctl.blocks) as h:
                h.nvme.enable()
                if name == "guest":
                    h.io_queue()
                else:
                    h.check(rng)
        time.sleep(2)
        self.baseline = self.sample()
        self.out.say(
            f"controllers: {', '.join(self.controllers)}; baseline: "
            f"RSS {self.baseline.rss_kib / 1024:.1f} MiB, {self.baseline.fds} fds, "
            f"{self.baseline.threads} threads"
        )

    def sample(self) -> Sample:
        assert self.daemon is not None
        s = read_proc(self.daemon.pid)
        if s is None:
            return Sample(self.elapsed(), 0, 0, 0)
        return Sample(self.elapsed(), s.rss_kib, s.fds, s.threads)

    # -- the guest

    def start_guest(self) -> None:
        a = self.args
        # fio ends this long before the deadline: the guest's kernel log and power-off,
        # then the end of the run (namespace 2 out, the daemon back to its baseline)
        tail = 15.0
        seconds = int(max(30.0, self.deadline - time.monotonic() - tail))
        env = {
            "SOAK_END_EPOCH": str(int(time.time() + seconds)),
            "SOAK_SECONDS": str(seconds),
            "FIO_ROUND": str(a.fio_round_seconds),
        }
        vm = guestvm.GuestVM(
            sockets=[self.controllers["guest"].socket], memory_mb=a.memory_mib, smp=a.smp
        )
        self.out.say(
            f"booting the guest: fio until {seconds} s from now (less the boot), in rounds"
            f" of {a.fio_round_seconds} s"
        )

        def run() -> None:
            try:
                self.guest_result = vm.run(
                    GUEST_SCRIPT, timeout=seconds + 900, env=env, log_path=self.console
                )
            except Exception as exc:
                self.errors.add("guest", f"could not run the guest: {exc!r}")

        self.guest_thread = threading.Thread(target=run, name="guest", daemon=True)
        self.guest_thread.start()

    def guest_ready(self) -> bool:
        return "SOAK-GUEST-READY" in self.console_text()

    # -- loops

    def loop(self, name: str, body: Callable[[], None], pause: float) -> None:
        """Run `body` until the soak stops; an exception is a failed operation."""
        while not self.stop.is_set():
            try:
                body()
            except Exception as exc:
                self.failed(name, f"{type(exc).__name__}: {exc}")
                if not self.sleep(2):
                    return
            if not self.sleep(pause):
                return

    def namespace_cycle(self) -> None:
        """Namespace 2 on the guest's controller: added, held, removed, left out."""
        assert self.daemon is not None
        a = self.args
        if not a.no_guest and not self.guest_ready():
            self.sleep(1)
            return
        self.remove_ns2()  # left attached by a cycle that failed half-way
        result = self.daemon.cli("ns", "add", "guest", str(self.ns2_image), "--json")
        if result.returncode != 0:
            raise Unexpected(f"ns add: {result.stderr.strip()}")
        with self.ns2_lock:
            self.ns2_attached = True
        if json.loads(result.stdout).get("nsid") != 2:
            raise Unexpected(f"ns add gave {result.stdout.strip()[:200]}")
        if 2 not in self.guest_nsids():
            raise Unexpected("list does not show nsid 2 after ns add")
        self.counts.inc("ns-add")
        self.sleep(a.ns_hold_seconds)
        self.remove_ns2()
        self.counts.inc("ns-remove")
        if 2 in self.guest_nsids():
            raise Unexpected("list still shows nsid 2 after ns remove")

    def remove_ns2(self) -> None:
        assert self.daemon is not None
        with self.ns2_lock:
            if not self.ns2_attached:
                return
            result = self.daemon.cli("ns", "remove", "guest", "2")
            if result.returncode != 0:
                raise Unexpected(f"ns remove: {result.stderr.strip()}")
            self.ns2_attached = False

    def guest_nsids(self) -> set[int]:
        assert self.daemon is not None
        listing = self.daemon.call("list")
        (guest,) = [c for c in listing["controllers"] if c["name"] == "guest"]
        return {ns["nsid"] for ns in guest["namespaces"]}

    def query(self) -> None:
        """`list` and `stats` for every controller; every fifth round through the CLI."""
        assert self.daemon is not None
        n = self.counts.get("query")
        listing = self.daemon.call("list")
        names = {c["name"] for c in listing["controllers"]}
        if missing := set(self.controllers) - names:
            raise Unexpected(f"list lacks {sorted(missing)}")
        if "evil" in names:
            raise Unexpected("a smuggled controller_create ran")
        for name in self.controllers:
            stats = self.daemon.call("stats", {"controller": name})
            if name == "guest":
                self.guest_stats(stats)
        if n % 5 == 0:
            for args in (
                ("list",),
                ("stats", "--controller", "guest"),
                ("stats", "--controller", "storm1", "--json"),
            ):
                result = self.daemon.cli(*args)
                if result.returncode != 0 or not result.stdout.strip():
                    raise Unexpected(f"nvme-mdev {' '.join(args)}: {result.stderr.strip()}")
        self.counts.inc("query")

    def guest_stats(self, stats: dict[str, Any]) -> None:
        queues = stats.get("queues", [])
        commands = sum(q.get("commands", 0) for q in queues)
        errors = sum(q.get("errors", 0) for q in queues)
        self.counts.set("guest-commands", commands)
        if errors > self.counts.get("guest-queue-errors-seen"):
            self.errors.add("device", f"the guest's I/O queues count {errors} error completions")
            self.counts.set("guest-queue-errors-seen", errors)
        host_errors = int(stats.get("host_io_errors", 0))
        if host_errors > self.counts.get("host-io-errors-seen"):
            self.errors.add(
                "device", f"the guest's controller counts {host_errors} host I/O errors"
            )
            self.counts.set("host-io-errors-seen", host_errors)

    def storm(self, ctl: Controller) -> Callable[[], None]:
        rng = self.rng(f"storm-{ctl.name}")

        def body() -> None:
            variant = rng.choice(STORM_VARIANTS)
            try:
                storm_cycle(ctl, variant, rng)
            except Exception as exc:
                raise Unexpected(f"{ctl.name} {variant}: {type(exc).__name__}: {exc}") from exc
            self.counts.inc(f"storm:{variant}")

        return body

    def hostile(self) -> Callable[[], None]:
        rng = self.rng("hostile")
        targets = [self.controllers["hostile"], self.controllers["hostile-py"]]
        kinds = [*ATTACKS, "control-garbage"]
        state = {"round": 0, "i": 0}

        def body() -> None:
            assert self.daemon is not None
            kind = kinds[state["i"] % len(kinds)]
            target = targets[(state["i"] // len(kinds)) % len(targets)]
            state["i"] += 1
            if state["i"] % len(kinds) == 0:
                state["round"] += 1
            if state["round"] % EXPENSIVE.get(kind, 1):
                return
            began = time.monotonic()
            try:
                if kind == "control-garbage":
                    control_garbage(self.daemon.control, self.work, rng)
                else:
                    ATTACKS[kind](target, rng)
            except Exception as exc:
                self.failed("hostile", f"{kind} on {target.name}: {type(exc).__name__}: {exc}")
            # Whatever the attack did: the daemon lives and answers, and the attacked
            # controller serves the next client.
            if not self.check_daemon():
                return
            try:
                names = {c["name"] for c in self.daemon.call("list")["controllers"]}
                if set(self.controllers) - names:
                    raise Unexpected(f"list lacks {sorted(set(self.controllers) - names)}")
                with Host(target.socket, target.blocks) as h:
                    h.nvme.enable()
                    h.check(rng)
            except Exception as exc:
                self.failed(
                    "hostile",
                    f"after {kind} on {target.name}: {type(exc).__name__}: {exc}",
                )
            self.counts.inc(f"attack:{kind}")
            self.counts.set(f"attack-seconds:{kind}", int(time.monotonic() - began))

        return body

    def corrupt(self) -> None:
        """--inject-corruption (a self-test): overwrite part of the guest's image behind
        the device's back once; fio's verification must report it."""
        if not self.sleep(self.args.inject_corruption):
            return
        with open(self.guest_image, "r+b") as f:
            f.seek(self.args.image_mib * MIB // 4)
            f.write(os.urandom(8 * MIB))
            f.flush()
            os.fsync(f.fileno())
        self.out.say("self-test: overwrote 8 MiB of the guest's image behind the device's back")

    # -- sampling

    HEADER = (
        f"{'time':>7} {'RSS MiB':>8} {'fds':>5} {'thr':>4} | {'fio':>4} {'guest cmds':>11}"
        f" {'ns+/-':>7} {'query':>6} {'storm':>6} {'attack':>6} | {'errors':>6}"
    )

    def sampler(self) -> None:
        self.out.raw(self.HEADER)
        last_cmds, last_change = -1, time.monotonic()
        stalled = False
        shown = 0  # fio job results printed so far (judged at the end)
        while True:
            s = self.sample()
            if s.rss_kib:
                self.samples.append(s)
            text = self.console_text()
            jobs = re.findall(r"^SOAK-FIO-JOB (.*)$", text, re.MULTILINE)
            for job in jobs[shown:]:
                self.out.say(f"guest fio round {job.strip()}")
            shown = len(jobs)
            rounds = text.count("SOAK-FIO-ROUND")
            fio_running = text.count("SOAK-FIO-START") > rounds
            cmds = self.counts.get("guest-commands")
            now = time.monotonic()
            if cmds != last_cmds or not fio_running:
                last_cmds, last_change, stalled = cmds, now, False
            elif now - last_change > STALL_SECONDS and not stalled:
                stalled = True
                self.errors.add(
                    "hang", f"the guest's I/O count stayed at {cmds} for {STALL_SECONDS:.0f} s"
                )
            storms = sum(self.counts.prefixed("storm:").values())
            attacks = sum(self.counts.prefixed("attack:").values())
            ns = f"{self.counts.get('ns-add')}/{self.counts.get('ns-remove')}"
            self.out.raw(
                f"{s.t:7.0f} {s.rss_kib / 1024:8.1f} {s.fds:5d} {s.threads:4d} |"
                f" {rounds:4d} {cmds:11d} {ns:>7} {self.counts.get('query'):6d}"
                f" {storms:6d} {attacks:6d} | {len(self.errors):6d}"
            )
            if self.stop.wait(self.args.sample_seconds):
                return

    # -- the run

    def run(self) -> int:
        self.setup()
        threads = [threading.Thread(target=self.sampler, name="sampler", daemon=True)]
        if not self.args.no_guest:
            self.start_guest()
        a = self.args
        bodies: list[tuple[str, Callable[[], None], float]] = [
            ("ns", self.namespace_cycle, a.ns_gap_seconds),
            ("query", self.query, a.query_seconds),
            ("hostile", self.hostile(), a.hostile_pause),
        ]
        bodies += [
            ("storm", self.storm(self.controllers[n]), a.storm_pause) for n in ("storm0", "storm1")
        ]
        for name, body, pause in bodies:
            threads.append(
                threading.Thread(target=self.loop, args=(name, body, pause), name=name, daemon=True)
            )
        if a.inject_corruption is not None:
            threads.append(threading.Thread(target=self.corrupt, name="corrupt", daemon=True))
        for t in threads:
            t.start()
        try:
            self.wait()
        except KeyboardInterrupt:
            self.interrupted = True
            self.errors.add("interrupted", "stopped by the user before the end")
            kill_my_qemu()
        self.stop.set()
        for t in threads:
            t.join(120)
            if t.is_alive():
                self.errors.add("hang", f"the {t.name} loop did not stop within 120 s")
        self.finish()
        return self.report()

    def wait(self) -> None:
        hard = self.deadline + (900 if not self.args.no_guest else 60)
        while not self.stop.is_set():
            if not self.check_daemon():
                return
            if self.args.no_guest:
                if time.monotonic() >= self.deadline:
                    return
            elif self.guest_thread is not None and not self.guest_thread.is_alive():
                return
            if time.monotonic() > hard:
                self.errors.add("hang", "the guest did not finish in time")
                kill_my_qemu()
                return
            time.sleep(1)

    def finish(self) -> None:
        """Everything stopped: namespace 2 out, the guest gone; wait for the daemon to
        come back to its baseline, then stop it."""
        assert self.daemon is not None and self.baseline is not None
        if self.guest_thread is not None:
            self.guest_thread.join(120)
        if self.daemon.alive():
            try:
                self.remove_ns2()
            except Exception as exc:
                self.failed("ns", f"final ns remove: {exc}")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                s = self.sample()
                if (s.fds, s.threads) == (self.baseline.fds, self.baseline.threads):
                    break
                time.sleep(1)
            self.quiesced = self.sample()
        self.daemon_exit = self.daemon.stop()
        if not self.fatal.is_set() and self.daemon_exit != 0:
            self.errors.add("daemon", f"did not stop cleanly on SIGTERM: status {self.daemon_exit}")
        self.check_daemon_log()
        if not self.args.no_guest:
            self.check_guest()

    def check_daemon_log(self) -> None:
        assert self.daemon is not None
        text = self.daemon.log_path.read_text(errors="replace")
        levels: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        for line in text.splitlines():
            match = re.match(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (\S+): (.*)", line)
            if match:
                levels[match[1]] += 1
                text_n = re.sub(r"0x[0-9a-f]+|\d+", "N", match[3])
                messages[f"{match[1]} {match[2]}: {text_n}"] += 1
        self.daemon_log_levels = levels
        self.daemon_log_messages = messages
        tracebacks = text.count("Traceback (most recent call last)")
        self.daemon_tracebacks = tracebacks
        if tracebacks:
            blocks = re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)*(.*)", text)
            kinds = Counter(blocks)
            for last, n in kinds.most_common(5):
                self.errors.add("daemon-log", f"{n} traceback(s) ending: {last.strip()[:200]}")

    def check_guest(self) -> None:
        r = self.guest_result
        if r is None:
            if not self.fatal.is_set() and not self.interrupted:
                self.errors.add("guest", "the guest gave no result")
            return
        out = r.output
        if r.status != 0 and not self.fatal.is_set() and not self.interrupted:
            why = "timed out" if r.timed_out else f"exited {r.status}"
            self.errors.add("guest", f"the guest script {why} (QEMU {r.qemu_returncode})")
        rounds = re.findall(r"^SOAK-FIO-ROUND (\d+) rc=(\d+)", out, re.MULTILINE)
        jobs = re.findall(
            r"^SOAK-FIO-JOB (\d+) (\S+) error=(-?\d+) writes=(\d+) reads=(\d+)(.*)$",
            out,
            re.MULTILINE,
        )
        self.fio_rounds = len(rounds)
        self.fio_writes = sum(int(j[3]) for j in jobs)
        self.fio_reads = sum(int(j[4]) for j in jobs)
        self.fio_jobs = jobs
        if not rounds and not self.fatal.is_set() and not self.interrupted:
            self.errors.add("fio", "fio never finished a round")
        for n, rc in rounds:
            if rc != "0":
                self.errors.add("fio", f"round {n}: fio exited {rc}")
        for n, name, error, writes, reads, _ in jobs:
            if error != "0":
                self.errors.add("fio", f"round {n} job {name}: error {error}")
            elif int(writes) == 0 or int(reads) == 0:
                self.errors.add("fio", f"round {n} job {name}: {writes} writes, {reads} verified")
        bad = re.compile(r"verify|error|err=|fio:|bad|fail|mismatch", re.IGNORECASE)
        for line in re.findall(r"^SOAK-FIO-OUT (\d+ .*)$", out, re.MULTILINE):
            if bad.search(line):
                self.errors.add("fio", f"round {line}")
        for line in re.findall(r"^SOAK-GUEST-FATAL.*$", out, re.MULTILINE):
            self.errors.add("guest", line)
        ready = re.search(r"^SOAK-GUEST-READY (.*)$", out, re.MULTILINE)
        self.guest_ready_line = ready[1].strip() if ready else "never ready"
        self.ns2_seen = len(re.findall(r"^SOAK-NS2 1", out, re.MULTILINE))
        self.rescan_failures = len(re.findall(r"^SOAK-RESCAN-FAILED", out, re.MULTILINE))
        if self.rescan_failures:
            self.errors.add("guest", f"nvme ns-rescan failed {self.rescan_failures} time(s)")
        adds = self.counts.get("ns-add")
        if adds >= 3 and self.ns2_seen == 0:
            self.errors.add("guest", f"{adds} namespace adds, the guest never saw namespace 2")
        if "SOAK-KLOG-END" not in out:
            if not self.fatal.is_set() and not self.interrupted:
                self.errors.add("guest", "the guest printed no kernel log")
            return
        addresses: list[str] = []
        for line in out.splitlines():
            if line.startswith("SOAK-KLOG-DEVICES:"):
                addresses = line.split(":", 1)[1].split()
        about = re.compile("|".join([*ABOUT_NVME, *(re.escape(x) + ":" for x in addresses)]))
        found: list[str] = []
        for line in out.splitlines():
            if line.startswith("SOAK-KLOG: "):
                message = line[len("SOAK-KLOG: ") :]
                if about.search(message):
                    found.append(message)
            elif line.startswith("SOAK-KNVME: "):
                found.append(line[len("SOAK-KNVME: ") :])
        for message in found:
            if SCAN_MET_REMOVAL.search(message):
                self.counts.inc("scan-met-removal")
        for message in dict.fromkeys(found):
            if not SCAN_MET_REMOVAL.search(message):
                self.errors.add("guest-kernel", message)

    # -- the verdict

    def flatness(self) -> list[tuple[str, bool, str]]:
        a = self.args
        warmup = max(60.0, 0.2 * self.duration)
        post = [s for s in self.samples if s.t >= warmup]
        verdicts: list[tuple[str, bool, str]] = []
        if len(post) < 4:
            verdicts.append(
                ("samples", False, f"only {len(post)} samples after {warmup:.0f} s warm-up")
            )
        else:
            k = max(1, len(post) // 4)
            first, last = post[:k], post[-k:]
            f_rss, l_rss = max(s.rss_kib for s in first), max(s.rss_kib for s in last)
            allowed = max(a.rss_margin_mib * 1024, f_rss * a.rss_margin_pct / 100)
            verdicts.append(
                (
                    "RSS",
                    l_rss - f_rss <= allowed,
                    f"last-quarter max {l_rss / 1024:.1f} MiB vs first-quarter max "
                    f"{f_rss / 1024:.1f} MiB (+{(l_rss - f_rss) / 1024:.1f}, "
                    f"allowed +{allowed / 1024:.1f}; {k} samples each after {warmup:.0f} s)",
                )
            )
            counts: list[tuple[str, Callable[[Sample], int], int]] = [
                ("fds", lambda s: s.fds, a.fd_margin),
                ("threads", lambda s: s.threads, a.thread_margin),
            ]
            # Connections come and go all the time: a leak raises the floor.
            for name, get, margin in counts:
                fm, lm = min(get(s) for s in first), min(get(s) for s in last)
                peaks = f"maxima {max(get(s) for s in first)}, {max(get(s) for s in last)}"
                verdicts.append(
                    (
                        f"{name} (run)",
                        lm <= fm + margin,
                        f"last-quarter floor {lm} vs first-quarter floor {fm} "
                        f"(allowed +{margin}; {peaks})",
                    )
                )
        b, q = self.baseline, self.quiesced
        if b is not None and q is not None:
            verdicts.append(
                ("fds (end)", q.fds == b.fds, f"{q.fds} after everything stopped, {b.fds} baseline")
            )
            verdicts.append(
                (
                    "threads (end)",
                    q.threads == b.threads,
                    f"{q.threads} after everything stopped, {b.threads} baseline",
                )
            )
        elif not self.fatal.is_set():
            verdicts.append(("end", False, "no sample after the run"))
        return verdicts

    def report(self) -> int:
        out = self.out.raw
        s = self.samples
        out("")
        out(f"=== soak summary: {self.elapsed() / 60:.1f} min, work directory {self.work}")
        if s:
            b, q = self.baseline, self.quiesced
            out(f"{'':9}{'baseline':>10}{'first':>10}{'last':>10}{'max':>10}{'ended':>10}")
            rows: list[tuple[str, Callable[[Sample], float], str]] = [
                ("RSS MiB", lambda x: x.rss_kib / 1024, "{:10.1f}"),
                ("fds", lambda x: x.fds, "{:10.0f}"),
                ("threads", lambda x: x.threads, "{:10.0f}"),
            ]
            for label, get, fmt in rows:
                cells = [
                    fmt.format(get(b)) if b else f"{'-':>10}",
                    fmt.format(get(s[0])),
                    fmt.format(get(s[-1])),
                    fmt.format(max(get(x) for x in s)),
                    fmt.format(get(q)) if q else f"{'-':>10}",
                ]
                out(f"{label:9}{''.join(cells)}")
            warmup = max(60.0, 0.2 * self.duration)
            post = [x for x in s if x.t >= warmup]
            if len(post) >= 3 and post[-1].t > post[0].t:
                mt = sum(x.t for x in post) / len(post)
                mr = sum(x.rss_kib for x in post) / len(post)
                var = sum((x.t - mt) ** 2 for x in post)
                slope = sum((x.t - mt) * (x.rss_kib - mr) for x in post) / var * 3600 / 1024
                out(
                    f"RSS trend after the {warmup:.0f} s warm-up (least squares, {len(post)} "
                    f"samples): {slope:+.1f} MiB/hour"
                )
        out("")
        if not self.args.no_guest:
            out(
                f"guest: fio rounds {self.fio_rounds}, "
                f"writes {self.fio_writes}, verified reads "
                f"{self.fio_reads}; device-side I/O commands "
                f"{self.counts.get('guest-commands')}; namespace 2 seen appearing "
                f"{self.ns2_seen} time(s); namespace 1: {self.guest_ready_line}"
            )
            for n, name, error, writes, reads, rest in self.fio_jobs:
                out(f"  round {n} {name}: error {error}, {writes} writes, {reads} reads{rest}")
        out(
            f"host: ns add/remove {self.counts.get('ns-add')}/{self.counts.get('ns-remove')}, "
            f"queries {self.counts.get('query')}; retried: vfio-user connections refused "
            f"as busy {REFUSALS.get('refused')}, control connects that got EAGAIN "
            f"{REFUSALS.get('control-eagain')}; guest scans that met namespace 2 being "
            f"removed {self.counts.get('scan-met-removal')}"
        )
        storms = self.counts.prefixed("storm:")
        out(
            f"reconnect storms: {sum(storms.values())} cycles: "
            + ", ".join(f"{k} {v}" for k, v in storms.items())
        )
        attacks = self.counts.prefixed("attack:")
        out(
            f"hostile clients: {sum(attacks.values())} attacks: "
            + ", ".join(f"{k} {v}" for k, v in attacks.items())
        )
        levels = self.daemon_log_levels
        out(
            f"daemon: exit status {self.daemon_exit}; log: "
            + (", ".join(f"{n} {k}" for k, n in sorted(levels.items())) or "no warnings")
            + f", {self.daemon_tracebacks} tracebacks"
        )
        for message, times in self.daemon_log_messages.most_common(12):
            out(f"  {times:6d}  {message[:150]}")
        out("")
        flat = self.flatness()
        for name, ok, text in flat:
            out(f"{'flat' if ok else 'NOT FLAT':8} {name}: {text}")
        by = self.errors.by_category()
        out("")
        out(f"errors: {len(self.errors)}" + (f" ({dict(by)})" if by else ""))
        with self.errors.lock:
            items = list(self.errors.items)
        for t, category, message in items[:40]:
            out(f"  [{t - self.start:7.1f}s] {category}: {message.splitlines()[0][:220]}")
        if len(items) > 40:
            out(f"  ... and {len(items) - 40} more")
        passed = not items and all(ok for _, ok, _ in flat)
        out(f"RESULT: {'PASS' if passed else 'FAIL'}")
        if passed and not self.args.keep and not self.args.workdir:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            out(f"(logs kept in {self.work}: daemon.log, guest-console.log)")
        return 0 if passed else 1


def kill_my_qemu() -> None:
    """SIGKILL the QEMU processes this process started (guestvm runs it as a child)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and b"qemu-system" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Exit status: 0 pass, 1 fail, 2 could not start.",
    )
    parser.add_argument("--minutes", type=float, default=30, help="how long (default 30)")
    parser.add_argument(
        "--sample-seconds", type=float, default=10, help="RSS/fd/thread sampling interval"
    )
    parser.add_argument("--workdir", help="where images and logs go (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory on a pass")
    parser.add_argument("--no-guest", action="store_true", help="the host side only")
    parser.add_argument("--image-mib", type=int, default=256, help="the guest's namespace 1")
    parser.add_argument("--memory-mib", type=int, default=1024, help="guest RAM")
    parser.add_argument("--smp", type=int, default=2, help="guest CPUs")
    parser.add_argument("--fio-round-seconds", type=int, default=120, help="one fio run")
    parser.add_argument(
        "--data-plane", choices=("native", "python"), default="native", help="the guest's"
    )
    parser.add_argument("--ns-hold-seconds", type=float, default=6, help="namespace 2 attached")
    parser.add_argument("--ns-gap-seconds", type=float, default=4, help="namespace 2 detached")
    parser.add_argument("--query-seconds", type=float, default=2, help="between list/stats")
    parser.add_argument("--storm-pause", type=float, default=0.2, help="between storm cycles")
    parser.add_argument("--hostile-pause", type=float, default=2, help="between attacks")
    parser.add_argument("--rss-margin-mib", type=float, default=8)
    parser.add_argument("--rss-margin-pct", type=float, default=5)
    parser.add_argument("--fd-margin", type=int, default=8)
    parser.add_argument("--thread-margin", type=int, default=4)
    parser.add_argument("--seed", type=int, help="for the random choices (default: random)")
    parser.add_argument(
        "--inject-corruption",
        type=float,
        metavar="SECONDS",
        help="self-test: overwrite part of the guest's image after SECONDS; the run must fail",
    )
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.sample_seconds <= 0:
        parser.error("--minutes and --sample-seconds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_guest and not guestvm.is_prepared():
        print(
            f"soak: no guest tree in {guestvm.GUEST_DIR}: run tools/guest/prepare.sh "
            "(as root), or pass --no-guest",
            file=sys.stderr,
        )
        return 2
    soak = Soak(args)
    try:
        return soak.run()
    except RuntimeError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        kill_my_qemu()
        if soak.daemon is not None:
            soak.daemon.stop()
        return 2
    finally:
        kill_my_qemu()


if __name__ == "__main__":
    sys.exit(main())
