"""A throwaway one-node Ceph cluster, one monitor and one OSD: the integration and e2e
tests' (through tests/ceph_cluster.py) and `scripts/bench-rbd.sh`'s (tools/bench_rbd.py).

Everything lives under a scratch directory: ceph.conf, the keyrings, the monitor's
store, the OSD's BlueStore (a sparse file), logs, admin sockets and pid files. The
daemons are child processes of this one, run in the foreground (``-f``) and ended by
`CephCluster.stop()` (or, should this process die first, by the kernel: they are
started with PR_SET_PDEATHSIG, which fires when the *thread* that started them ends, so
start a cluster from a thread that outlives it, as pytest's main thread does). Nothing
under /etc/ceph or /var/lib/ceph is read or written, and no systemd is needed.

There is no manager (ceph-mgr): pool creation, ``rbd pool init`` and RBD images need
only the monitor and the OSD. Without a manager the monitor knows nothing of placement
group states (``ceph pg stat`` and the like are manager commands), so the PGs are
watched on the OSD's admin socket instead.

    with CephCluster(tmp_path) as cluster:
        cluster.run("rbd", "create", "--size", "64M", f"{cluster.pool}/img")

Needs the Debian packages ceph-mon, ceph-osd (which bring ceph-base, for monmaptool)
and ceph-common (written against Ceph 16 "Pacific"); `CephCluster.missing()` names the
programs that are not installed.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

#: the programs a cluster needs: the daemons, the command-line clients, monmaptool
PROGRAMS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "rados", "monmaptool")

_MON_ID = "a"
_OSD_ID = 0
#: the longest path a unix socket (an admin socket) can have
_SUN_PATH_MAX = 107
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


class CephClusterError(RuntimeError):
    """The cluster did not come up (or back), or a command against it failed."""


def _die_with_parent() -> None:
    """In a daemon, between fork and exec: be killed when the process that started it
    dies, so that a test run killed outright leaves no daemons behind."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _secret() -> str:
    """A new cephx secret as a keyring holds it (what ``ceph-authtool --gen-print-key``
    prints): a CryptoKey header (type AES, creation time, length) and 16 random bytes,
    in base64."""
    header = struct.pack("<HIIH", 1, int(time.time()), 0, 16)
    return base64.b64encode(header + os.urandom(16)).decode("ascii")


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _keyring_entry(name: str, key: str, **caps: str) -> str:
    lines = [f"[{name}]", f"\tkey = {key}"]
    lines += [f'\tcaps {service} = "{cap}"' for service, cap in sorted(caps.items())]
    return "\n".join(lines) + "\n"


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class CephCluster:
    """One monitor and one BlueStore OSD on 127.0.0.1, cephx on, rooted at `root`.

    `start()` brings it up and creates `pool` (size 1, application ``rbd``); `stop()`
    ends its daemons. `stop_osd()` / `start_osd()` take the only OSD away and bring it
    back: in between, every read and write to the cluster waits.
    """

    def __init__(
        self,
        root: Path,
        *,
        pool: str = "rbd",
        pg_num: int = 8,
        block_size: int = 2 << 30,
        timeout: float = 120.0,
    ) -> None:
        """`block_size`: the size of the OSD's (sparse) block file; `timeout`: how long
        start() and start_osd() wait for the cluster before they give up."""
        self._root = Path(root).resolve()
        self._pool = pool
        self._pg_num = pg_num
        self._block_size = block_size
        self._timeout = timeout
        self._fsid = str(uuid.uuid4())
        self._osd_uuid = str(uuid.uuid4())
        self._port = 0
        self._pool_id: int | None = None
        self._mon: subprocess.Popen[bytes] | None = None
        self._osd: subprocess.Popen[bytes] | None = None
        if len(str(self._osd_asok)) > _SUN_PATH_MAX:
            raise ValueError(f"{root}: too long a path for the admin sockets under it")

    # --- what clients need -------------------------------------------------------

    @property
    def root(self) -> Path:
        return self._root

    @property
    def conf_path(self) -> Path:
        return self._root / "ceph.conf"

    @property
    def keyring_path(self) -> Path:
        """The keyring of client.admin (all capabilities)."""
        return self._root / "ceph.client.admin.keyring"

    @property
    def client_id(self) -> str:
        """The client's id (its name is ``client.admin``)."""
        return "admin"

    @property
    def pool(self) -> str:
        """A replicated pool, size 1, application ``rbd``, created by start()."""
        return self._pool

    @property
    def fsid(self) -> str:
        return self._fsid

    @property
    def mon_addr(self) -> str:
        """The monitor's address (msgr2 only): ``v2:127.0.0.1:PORT``."""
        return f"v2:127.0.0.1:{self._port}"

    @property
    def log_dir(self) -> Path:
        return self._root / "log"

    @property
    def run_dir(self) -> Path:
        """The daemons' admin sockets and pid files."""
        return self._root / "run"

    @property
    def osd_running(self) -> bool:
        return self._osd is not None

    @property
    def _mon_data(self) -> Path:
        return self._root / "mon" / f"ceph-{_MON_ID}"

    @property
    def _osd_data(self) -> Path:
        return self._root / "osd" / f"ceph-{_OSD_ID}"

    @property
    def _osd_asok(self) -> Path:
        return self.run_dir / f"osd.{_OSD_ID}.asok"

    @staticmethod
    def missing() -> list[str]:
        """The programs a cluster needs that are not on PATH."""
        return [name for name in PROGRAMS if shutil.which(name) is None]

    def cli(self, program: str, *args: str) -> list[str]:
        """The command line of a ceph / rbd / rados command against this cluster:
        ``cli("rbd", "ls", pool)`` is ``["rbd", "-c", CONF, "--keyring", KEYRING,
        "--id", "admin", "ls", pool]``. Run it with `env()`."""
        conn = ["-c", str(self.conf_path), "--keyring", str(self.keyring_path)]
        return [program, *conn, "--id", self.client_id, *args]

    @staticmethod
    def env() -> dict[str, str]:
        """The environment for a command: this one less any CEPH_* variables (a
        CEPH_ARGS or CEPH_CONF of the caller's could point it elsewhere)."""
        return {k: v for k, v in os.environ.items() if not k.startswith("CEPH_")}

    def run(self, program: str, *args: str, timeout: float = 60.0) -> str:
        """Run a ceph / rbd / rados command against this cluster (``run("ceph", "osd",
        "dump")``) and return its stdout; CephClusterError if it fails or takes longer
        than `timeout` seconds."""
        return self._exec(self.cli(program, *args), timeout).decode(errors="replace")

    def run_bytes(
        self, program: str, *args: str, input: bytes | None = None, timeout: float = 60.0
    ) -> bytes:
        """run() with bytes for its stdin and its stdout."""
        return self._exec(self.cli(program, *args), timeout, input)

    def run_json(self, program: str, *args: str, timeout: float = 60.0) -> Any:
        """run() with ``--format json``, its output decoded."""
        return json.loads(self.run(program, *args, "--format", "json", timeout=timeout))

    def logs_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of each daemon's log and of its stderr."""
        parts = []
        paths = sorted(self.log_dir.iterdir()) if self.log_dir.is_dir() else []
        for path in paths:
            if path.name.startswith(("client.", "cluster.")):
                continue
            text = _tail(path, lines)
            if text:
                parts.append(f"--- {path} ---\n{text}")
        return "\n".join(parts) if parts else "(no daemon logs)"

    # --- life cycle --------------------------------------------------------------

    def __enter__(self) -> CephCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Create the cluster, start its monitor and OSD, and create the pool; return
        when all of the pool's placement groups are active and an object written to
        it reads back. Should anything fail, end the daemons started so far and raise
        CephClusterError, with the tail of their logs."""
        if self._mon is not None:
            raise CephClusterError("already started")
        missing = self.missing()
        if missing:
            raise CephClusterError(f"not installed: {', '.join(missing)}")
        if self._mon_data.exists():
            raise CephClusterError(f"{self._root} already holds a cluster (start it once)")
        deadline = time.monotonic() + self._timeout
        try:
            self._write_files()
            self._mkfs_mon()
            self._mon = self._spawn("mon", "ceph-mon", "-i", _MON_ID)
            # BlueStore's mkfs needs no monitor: it runs while the monitor starts
            mkfs = self._osd_mkfs()
            try:
                self._wait("the monitor to answer", deadline, self._mon_answers)
                self._wait_exit(mkfs, "ceph-osd --mkfs", deadline)
            finally:
                if mkfs.poll() is None:
                    mkfs.kill()
                    mkfs.wait()
            self.run("ceph", "osd", "new", self._osd_uuid, str(_OSD_ID))
            self._osd = self._spawn("osd", "ceph-osd", "-i", str(_OSD_ID))
            self._wait("the OSD to be up and in", deadline, self._osd_up_in)
            pg_num = str(self._pg_num)
            self.run("ceph", "osd", "pool", "create", self._pool, pg_num, pg_num, "replicated")
            self.run("rbd", "pool", "init", self._pool)
            pools = self.run_json("ceph", "osd", "pool", "ls", "detail")
            self._pool_id = next(p["pool_id"] for p in pools if p["pool_name"] == self._pool)
            self._wait_usable(deadline)
        except BaseException as exc:
            detail = self.logs_tail()
            self.stop()
            if isinstance(exc, CephClusterError):
                raise CephClusterError(f"{exc}\n{detail}") from exc
            raise

    def stop(self) -> None:
        """End the daemons this cluster started, OSD first, and wait for them. Safe to
        call more than once, and after a failed start()."""
        self._end("_osd")
        self._end("_mon")

    def stop_osd(self) -> None:
        """End the OSD and return when the monitor has it down: until start_osd(),
        every read and write to the cluster waits."""
        if self._osd is None:
            raise CephClusterError("the OSD is not running")
        self._end("_osd")
        deadline = time.monotonic() + self._timeout
        try:
            if self._osd_state()[0]:
                # a dead OSD that did not say goodbye stays up in the OSD map (there is
                # no other OSD to report it) until mon_osd_report_timeout, 15 minutes
                self.run("ceph", "osd", "down", str(_OSD_ID))
            self._wait("the OSD to be down", deadline, lambda: not self._osd_state()[0])
        except CephClusterError as exc:
            raise CephClusterError(f"{exc}\n{self.logs_tail()}") from exc

    def start_osd(self) -> None:
        """Start the OSD again; return when it is up and in, all of the pool's
        placement groups are active and an object written to it reads back."""
        if self._mon is None or self._pool_id is None:
            raise CephClusterError("the cluster is not started")
        if self._osd is not None:
            raise CephClusterError("the OSD is already running")
        deadline = time.monotonic() + self._timeout
        try:
            self._osd = self._spawn("osd", "ceph-osd", "-i", str(_OSD_ID))
            self._wait("the OSD to be up and in", deadline, self._osd_up_in)
            self._wait_usable(deadline)
        except CephClusterError as exc:
            raise CephClusterError(f"{exc}\n{self.logs_tail()}") from exc

    # --- setting up --------------------------------------------------------------

    def _write_files(self) -> None:
        for path in (self.log_dir, self.run_dir, self._root / "crash"):
            path.mkdir(parents=True, exist_ok=True)
        self._mon_data.mkdir(parents=True)
        self._osd_data.mkdir(parents=True)
        self._port = _free_port()
        self.conf_path.write_text(self._conf())

        admin = _keyring_entry(
            f"client.{self.client_id}",
            _secret(),
            mon="allow *",
            osd="allow *",
            mds="allow *",
            mgr="allow *",
        )
        osd = _keyring_entry(
            f"osd.{_OSD_ID}",
            _secret(),
            mon="allow profile osd",
            osd="allow *",
            mgr="allow profile osd",
        )
        mon = _keyring_entry("mon.", _secret(), mon="allow *")
        # the monitor's mkfs takes every key of its keyring into its auth database
        for path, text in (
            (self.keyring_path, admin),
            (self._osd_data / "keyring", osd),
            (self._root / "mon.keyring", mon + admin + osd),
        ):
            path.write_text(text)
            path.chmod(0o600)

    def _conf(self) -> str:
        r = self._root
        return f"""\
[global]
fsid = {self._fsid}
mon host = [{self.mon_addr}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind msgr2 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {r}/run
admin socket = {r}/run/$name.asok
pid file = {r}/run/$name.pid
log file = {r}/log/$name.log
log to stderr = false
err to stderr = true
crash dir = {r}/crash
mon cluster log file = {r}/log/cluster.$channel.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = {self._pg_num}
osd pool default pgp num = {self._pg_num}
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon allow pool delete = true
mon data avail warn = 2
mon data avail crit = 1
# the one OSD is never marked out, however long it is down
mon osd down out interval = 0
mon warn on osd down out interval zero = false
mon warn on insecure global id reclaim allowed = false
mon osd full ratio = .99
mon osd nearfull ratio = .99
mon osd backfillfull ratio = .99
osd failsafe full ratio = .99

[mon]
mon data = {r}/mon/$cluster-$id

[osd]
osd data = {r}/osd/$cluster-$id
keyring = $osd_data/keyring
osd objectstore = bluestore
osd crush initial weight = 1
# the block "device" is a sparse file, $osd_data/block, made by mkfs
bluestore block create = true
bluestore block size = {self._block_size}
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mkfs = false
bluestore fsck on mount = false
bluestore fsck on umount = false
bluestore cache autotune = false
bluestore cache size = {64 << 20}
osd memory target = {896 << 20}
osd op num shards = 2
osd op num threads per shard = 1

[client]
keyring = {self.keyring_path}
# one admin socket per client process: a new client pings an admin socket already at
# its path, and waits 10 s on one whose process is stopped
admin socket = {r}/run/$name.$pid.$cctid.asok
"""

    def _mkfs_mon(self) -> None:
        monmap = str(self._root / "monmap")
        addr = f"[{self.mon_addr}]"
        create = ["monmaptool", "--create", "--fsid", self._fsid, "--addv", _MON_ID, addr, monmap]
        self._exec(create, timeout=60)
        keyring = str(self._root / "mon.keyring")
        mkfs = ["ceph-mon", "-c", str(self.conf_path), "--mkfs", "-i", _MON_ID]
        self._exec([*mkfs, "--monmap", monmap, "--keyring", keyring], timeout=60)

    def _osd_mkfs(self) -> subprocess.Popen[bytes]:
        mkfs = ["ceph-osd", "-c", str(self.conf_path), "-i", str(_OSD_ID), "--mkfs"]
        return self._popen("osd-mkfs", [*mkfs, "--osd-uuid", self._osd_uuid, "--no-mon-config"])

    def _spawn(self, kind: str, program: str, *args: str) -> subprocess.Popen[bytes]:
        """A daemon in the foreground."""
        return self._popen(kind, [program, "-f", "-c", str(self.conf_path), *args])

    def _popen(self, kind: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """`argv` in a session of its own, its stdout and stderr (startup errors and
        crashes; the rest goes to its log file) appended to log/KIND.stderr."""
        with open(self.log_dir / f"{kind}.stderr", "ab") as out:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _end(self, attr: str) -> None:
        """End the daemon in `attr` (SIGTERM, then SIGKILL) and forget it."""
        proc: subprocess.Popen[bytes] | None = getattr(self, attr)
        if proc is None:
            return
        setattr(self, attr, None)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _exec(self, argv: list[str], timeout: float, input: bytes | None = None) -> bytes:
        try:
            done = subprocess.run(
                argv, input=input, capture_output=True, timeout=timeout, env=self.env()
            )
        except subprocess.TimeoutExpired as exc:
            raise CephClusterError(f"{argv[0]}: no answer in {timeout:g} s: {argv}") from exc
        if done.returncode != 0:
            raise CephClusterError(
                f"{argv[0]}: exit status {done.returncode}: {argv}\n"
                f"{(done.stdout + done.stderr).decode(errors='replace').strip()}"
            )
        return done.stdout

    # --- waiting -----------------------------------------------------------------

    def _check_alive(self) -> None:
        for name, proc in (("ceph-mon", self._mon), ("ceph-osd", self._osd)):
            if proc is not None and proc.poll() is not None:
                raise CephClusterError(f"{name} exited with status {proc.returncode}")

    def _wait(self, what: str, deadline: float, ready: Callable[[], bool]) -> None:
        """Poll `ready()` until it is true (a CephClusterError from it counts as not
        yet); CephClusterError if a daemon exits or `deadline` passes first."""
        last = ""
        while True:
            self._check_alive()
            try:
                if ready():
                    return
                last = ""
            except CephClusterError as exc:
                last = f"; last error: {exc}"
            if time.monotonic() > deadline:
                raise CephClusterError(f"timed out waiting for {what}{last}")
            time.sleep(0.25)

    def _wait_exit(self, proc: subprocess.Popen[bytes], what: str, deadline: float) -> None:
        try:
            status = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            raise CephClusterError(f"{what} did not finish in time") from None
        if status != 0:
            raise CephClusterError(f"{what} failed with exit status {status}")

    def _wait_usable(self, deadline: float) -> None:
        self._wait("the pool's placement groups to be active", deadline, self._pgs_active)
        self._wait("an object written to the pool to read back", deadline, self._pool_io)

    def _mon_answers(self) -> bool:
        self.run("ceph", "--connect-timeout", "5", "mon", "stat", timeout=15)
        return True

    def _osd_state(self) -> tuple[bool, bool]:
        """(up, in) of the OSD in the monitor's OSD map."""
        dump = self.run_json("ceph", "--connect-timeout", "5", "osd", "dump", timeout=15)
        for osd in dump["osds"]:
            if osd["osd"] == _OSD_ID:
                return bool(osd["up"]), bool(osd["in"])
        return False, False

    def _osd_up_in(self) -> bool:
        return self._osd_state() == (True, True)

    def _pgs_active(self) -> bool:
        """Whether the OSD has all of the pool's placement groups, and all active (its
        admin socket tells; with no manager, the monitor cannot)."""
        out = self._exec(
            ["ceph", "--admin-daemon", str(self._osd_asok), "dump_pgstate_history"], timeout=15
        )
        prefix = f"{self._pool_id}."
        states = [pg["currently"] for pg in json.loads(out)["pgs"] if pg["pg"].startswith(prefix)]
        return len(states) == self._pg_num and all(
            state.startswith("Started/Primary/Active") for state in states
        )

    def _pool_io(self) -> bool:
        """Write an object to the pool, read it back and remove it (each rados call
        gives up after 10 s rather than wait for the OSD)."""
        payload = os.urandom(64)
        rados = ("rados", "--rados-osd-op-timeout", "10", "-p", self._pool)
        self.run_bytes(*rados, "put", "probe", "-", input=payload, timeout=15)
        back = self.run_bytes(*rados, "get", "probe", "-", timeout=15)
        self.run_bytes(*rados, "rm", "probe", timeout=15)
        return back == payload
