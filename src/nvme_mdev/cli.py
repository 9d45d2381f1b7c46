"""Command line: `nvme-mdev serve` (one controller), `nvme-mdev daemon` (many, managed
at run time), and the commands that talk to either over its control socket."""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import __version__, systemd
from .backends.io_engine import ENGINE_NAMES
from .bench import add_arguments as add_bench_arguments
from .bench import main as bench_main
from .bench_spdk import add_arguments as add_spdk_arguments
from .config import (
    MAX_POLL_TIMEOUT_MS,
    POLL_TIMEOUT_RANGE,
    ConfigError,
    NamespaceSpec,
    parse_cpu_list,
)
from .control import ControlError, ControlServer, call, default_control_path
from .dataplane import DATA_PLANES
from .engine.poller import DEFAULT_POLL_TIMEOUT
from .handover import upgrade as handover
from .handover.document import Channel, HandoverError
from .handover.supervisor import Checkpointer, supervise
from .handover.upgrade import Served
from .metrics import MetricsServer
from .nvme.identity import ControllerConfig

if TYPE_CHECKING:
    # The device stack loads only in the processes that serve (not in client commands).
    from .daemon import Daemon

log = logging.getLogger("nvme_mdev")


RBD_HELP = (
    "rbd:POOL/IMAGE is a Ceph RBD image (through librbd), whole; its options: "
    "conf=FILE (default /etc/ceph/ceph.conf), id=CLIENT (default admin), keyring=FILE, "
    "create=SIZE (make the image first), clone=POOL/IMAGE@SNAP (make it first as a "
    "copy-on-write clone of that snapshot), break-lock (take the exclusive lock from a "
    "holder that is dead: it is blocklisted). A writable one holds the image's "
    "exclusive lock: another opener, on any host, is refused. rbd:POOL/IMAGE@SNAP, a "
    "snapshot, is always read-only."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nvme-mdev",
        description="Virtual NVMe controllers over vfio-user, backed by slices of host storage.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve one virtual NVMe controller on a vfio-user socket",
        description=(
            "Serve one virtual NVMe controller. Each PATH becomes a namespace, in order "
            "(nsid 1, 2, ...): a regular file (disk image), a block device or a partition. "
            "Append options with commas: PATH,ro (read-only), PATH,bs=4096 (4 KiB blocks), "
            "PATH,offset=1G,size=2G (a window), PATH,force (storage the host uses). "
            "nvme0:n1p3 is partition 3 of namespace 1 of host controller nvme0. "
            "'null:SIZE' is a namespace with no storage, for benchmarks. "
            f"{RBD_HELP} Attach it to QEMU "
            'with -device \'{"driver":"vfio-user-pci","socket":{"type":"unix",'
            '"path":"SOCKET"}}\' and shared guest RAM (memory-backend-memfd,share=on).'
        ),
    )
    serve.add_argument("--socket", required=True, help="vfio-user socket to create (mode 0600)")
    serve.add_argument("paths", nargs="+", metavar="PATH", help="namespace backing store")
    serve.add_argument(
        "--block-size",
        type=int,
        default=512,
        choices=(512, 4096),
        help="default logical block size",
    )
    serve.add_argument("--read-only", action="store_true", help="make every namespace read-only")
    add_controller_options(serve, defaults_shown=True)
    serve.add_argument(
        "--control",
        metavar="PATH",
        help="control socket for nvme-mdev stats/iothread/ns (mode 0600; default SOCKET.ctl)",
    )
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="also serve the statistics for Prometheus at http://HOST:PORT/metrics",
    )
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_supervision_options(serve)
    stats = commands.add_parser(
        "stats",
        help="show a running device's statistics",
        description=(
            "Per I/O queue: commands and bytes by opcode, errors, device-side latency "
            "(submission seen to completion posted); interrupts by vector; the I/O "
            "thread's time polling and parked; backend I/O errors."
        ),
    )
    add_client_arguments(stats, json_flag=False)
    stats.add_argument("--controller", metavar="NAME", help="which controller (daemon)")
    output = stats.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("--prometheus", action="store_true", help="print Prometheus text format")
    iothread = commands.add_parser(
        "iothread",
        help="show or change a running device's I/O thread (CPU pinning, poll timeout)",
    )
    add_client_arguments(iothread, json_flag=False)
    iothread.add_argument("--controller", metavar="NAME", help="which controller (daemon)")
    iothread.add_argument(
        "--cpu",
        type=cpu_list_or_any,
        default=argparse.SUPPRESS,  # absent: leave as is; 'any' (None): unpin
        metavar="CPUS",
        help="pin to these CPUs ('any': unpin)",
    )
    iothread.add_argument("--poll-timeout-ms", type=int, help="idle time before parking (0: never)")
    iothread.add_argument("--json", action="store_true", help="print JSON")
    bench = commands.add_parser(
        "bench",
        help="measure the device against native fio on this machine",
        description=(
            "Run fio on the host (io_uring, psync) and the device (nvme-mdev serve, driven "
            "by the project's own NVMe host driver as the guest) with the same workloads, "
            "on a page-cache file and a null namespace (with --rbd: on a Ceph RBD image, "
            "against fio's rbd ioengine), and print a table with the ratios."
        ),
    )
    add_bench_arguments(bench)
    add_spdk_arguments(bench)
    add_daemon_parsers(commands)
    return parser


def add_controller_options(parser: argparse.ArgumentParser, defaults_shown: bool) -> None:
    """A controller's limits and identity: `serve` and `controller create` share them."""
    defaults = ControllerConfig()
    parser.add_argument(
        "--poll-timeout-ms",
        type=int,
        default=int(DEFAULT_POLL_TIMEOUT * 1000),
        help="idle time before the I/O thread parks (0: poll forever; default %(default)s)",
    )
    parser.add_argument(
        "--serial",
        default=defaults.serial if defaults_shown else None,
        help="serial number (20 ASCII max)" + ("" if defaults_shown else "; default MDEV-NAME"),
    )
    parser.add_argument("--model", default=defaults.model, help="model number (40 ASCII max)")
    parser.add_argument(
        "--max-io-queues", type=int, default=defaults.max_io_queues, help="I/O queue pairs (1-64)"
    )
    parser.add_argument(
        "--queue-depth",
        type=int,
        default=defaults.max_queue_entries,
        help="largest queue the guest may create (2-4096, CAP.MQES + 1)",
    )
    parser.add_argument(
        "--mdts",
        type=int,
        default=defaults.mdts,
        help="max transfer size as a power of two of 4 KiB pages (default %(default)s: 512 KiB)",
    )
    parser.add_argument(
        "--mmap-doorbells",
        action="store_true",
        help=(
            "put the doorbell registers in memory the VM maps: no doorbell ever traps, "
            "and the I/O thread polls without parking (one busy CPU per controller)"
        ),
    )
    parser.add_argument(
        "--io-engine",
        choices=ENGINE_NAMES,
        default="auto",
        help=(
            "how reads and writes reach the storage: uring (io_uring, many in flight), "
            "sync (preadv/pwritev), auto (uring where the kernel allows it; default)"
        ),
    )
    parser.add_argument(
        "--data-plane",
        choices=DATA_PLANES,
        default=DATA_PLANES[0],
        help=(
            "what runs the I/O queues: native (the Rust data plane, no GIL; default) or "
            "python (the readable reference)"
        ),
    )
    parser.add_argument(
        "--iothread-cpu",
        type=cpu_list,
        metavar="CPUS",
        help="pin the I/O thread to these CPUs (3, 2,5 or 0-3; changeable: nvme-mdev iothread)",
    )


def add_supervision_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--supervised",
        action="store_true",
        help="run under a small supervisor that keeps the VMs' connections and the "
        "controllers' state, and starts a new process if this one dies (SIGKILL, a crash, "
        "an out-of-memory kill): the guests see a pause and retry what was in flight",
    )
    parser.add_argument("--checkpoint-fd", type=int, help=argparse.SUPPRESS)


def add_client_arguments(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    parser.add_argument(
        "--control",
        default=default_control_path(),
        metavar="PATH",
        help="the daemon's (or a serve's) control socket (default %(default)s, "
        "or $NVME_MDEV_CONTROL)",
    )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON")


def add_daemon_parsers(commands: Any) -> None:
    daemon = commands.add_parser(
        "daemon",
        help="host any number of virtual NVMe controllers, managed over a control socket",
        description=(
            "Host virtual NVMe controllers, each on its own vfio-user socket with its own "
            "I/O thread. Manage them with 'nvme-mdev controller' and 'nvme-mdev ns' over "
            "the control socket (JSON-RPC 2.0, mode 0600). --config declares controllers "
            "to create at start (TOML; see contrib/nvme-mdev.toml)."
        ),
    )
    daemon.add_argument(
        "--control",
        default=default_control_path(),
        metavar="PATH",
        help="control socket to create (mode 0600; default %(default)s)",
    )
    daemon.add_argument("--config", metavar="FILE", help="TOML file of controllers to create")
    add_supervision_options(daemon)
    daemon.add_argument(
        "--metrics", metavar="HOST:PORT", help="serve every controller's statistics at /metrics"
    )
    daemon.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )

    upgrade = commands.add_parser(
        "upgrade",
        help="hand every controller to a new process (of the installed nvme-mdev), VMs running",
        description=(
            "Start a new nvme-mdev process (the version installed now) that takes over every "
            "controller of the daemon (or serve) while its VMs run: the guests see a pause, "
            "no reset and no I/O error. If the new process cannot take over, the old one "
            "keeps serving and this prints why. SIGHUP to the daemon does the same."
        ),
    )
    add_client_arguments(upgrade)
    upgrade.add_argument(
        "--successor",
        metavar="PROGRAM",
        help="the nvme-mdev program of another installation to hand over to (default: the "
        "daemon's own Python and the nvme-mdev installed there now)",
    )
    takeover = commands.add_parser("takeover")  # (the new process of an upgrade)
    takeover.add_argument("--fd", type=int, required=True)
    takeover.add_argument("--crashed", action="store_true")
    takeover.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )

    controller = commands.add_parser(
        "controller", help="create, delete or list a daemon's controllers"
    )
    actions = controller.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="create a controller on a new vfio-user socket",
        description=(
            "Create a controller. Attach it to QEMU with -device "
            '\'{"driver":"vfio-user-pci","socket":{"type":"unix","path":"SOCKET"}}\' '
            "and shared guest RAM (memory-backend-memfd,share=on)."
        ),
    )
    create.add_argument("name", metavar="NAME", help="the controller's name (letters, digits, ._-)")
    create.add_argument("--socket", required=True, help="vfio-user socket to create (mode 0600)")
    create.add_argument(
        "--ns",
        action="append",
        default=[],
        metavar="SPEC",
        help="a namespace (nsid 1, 2, ... in order; see 'nvme-mdev ns add --help')",
    )
    add_controller_options(create, defaults_shown=False)
    add_client_arguments(create)
    delete = actions.add_parser("delete", help="stop a controller and release its storage")
    delete.add_argument("name", metavar="NAME")
    add_client_arguments(delete)
    for parser in (
        actions.add_parser("list", help="list controllers and their namespaces"),
        commands.add_parser("list", help="list controllers and their namespaces"),
    ):
        add_client_arguments(parser)

    ns = commands.add_parser("ns", help="attach, detach or rescan namespaces while the guest runs")
    ns_actions = ns.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = ns_actions.add_parser(
        "add",
        help="attach a namespace (the guest sees it appear)",
        description=(
            "Attach a namespace to a running controller; the guest is told through an "
            "asynchronous event. SPEC: a file, a block device or partition, null:SIZE, or "
            "nvmeX:nYpZ (partition Z of namespace Y of host controller nvmeX), with options "
            "after commas: ro, bs=4096, offset=SIZE, size=SIZE (a window), force (share "
            "storage the host is using). No two writable namespaces of the daemon may "
            f"overlap. {RBD_HELP}"
        ),
    )
    add.add_argument("controller", metavar="CONTROLLER")
    add.add_argument("spec", metavar="SPEC")
    add.add_argument("--nsid", type=int, help="namespace ID (default: the lowest free)")
    add.add_argument("--ro", action="store_true", help="read-only")
    add.add_argument("--bs", type=int, choices=(512, 4096), help="logical block size")
    add.add_argument("--offset", metavar="SIZE", help="window: start this far in (1G, 4096)")
    add.add_argument("--size", metavar="SIZE", help="window: this long (default: to the end)")
    add.add_argument("--force", action="store_true", help="use storage the host is using")
    add_client_arguments(add)
    remove = ns_actions.add_parser(
        "remove", help="detach a namespace (the guest sees it disappear)"
    )
    remove.add_argument("controller", metavar="CONTROLLER")
    remove.add_argument("nsid", type=int, metavar="NSID")
    add_client_arguments(remove)
    rescan = ns_actions.add_parser(
        "rescan",
        help="notice resized backing files and devices (the guest sees the new size)",
        description=(
            "Read the size of each namespace's file or block device again (of every "
            "controller, of CONTROLLER, or only NSID) and tell the guest about each one "
            "whose size changed (Namespace Attribute Changed: no reset). A size that is "
            "not a multiple of the block size is rounded down. A window keeps its size, "
            "or follows the end of its store if it was given no size; one that no longer "
            "fits, or a namespace that would grow into another's bytes, keeps its size and "
            "is reported as an error (exit status 1)."
        ),
    )
    rescan.add_argument("controller", metavar="CONTROLLER", nargs="?")
    rescan.add_argument("nsid", type=int, metavar="NSID", nargs="?")
    add_client_arguments(rescan)


def cpu_list(text: str) -> set[int]:
    """'3', '2,5', '0-3' → a set of CPU numbers."""
    try:
        return parse_cpu_list(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cpu_list_or_any(text: str) -> set[int] | None:
    return None if text == "any" else cpu_list(text)


def serve(args: argparse.Namespace) -> int:
    """One controller: the daemon's machinery, with the controller given on the command
    line and the control socket beside the vfio-user socket."""
    from .daemon import ControllerSettings, Daemon, NamespaceRequest, SocketTaken, subsystem_nqn

    _raise_fd_limit()
    stop = _stop_on_signals()

    if not 0 <= args.poll_timeout_ms <= MAX_POLL_TIMEOUT_MS:
        raise ConfigError(f"--poll-timeout-ms: {args.poll_timeout_ms}: {POLL_TIMEOUT_RANGE}")
    if args.iothread_cpu is not None and not args.iothread_cpu <= os.sched_getaffinity(0):
        raise ConfigError(
            f"--iothread-cpu: CPUs {sorted(args.iothread_cpu)} not available to this process"
        )
    try:
        config = ControllerConfig(
            serial=args.serial,
            model=args.model,
            subsystem_nqn=subsystem_nqn(args.serial),
            max_io_queues=args.max_io_queues,
            max_queue_entries=args.queue_depth,
            mdts=args.mdts,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    specs = [NamespaceSpec.parse(p, args.block_size, args.read_only) for p in args.paths]
    if len(specs) > config.max_namespaces:
        raise ConfigError(f"{len(specs)} namespaces: at most {config.max_namespaces}")
    settings = ControllerSettings(
        # The name labels the statistics (Prometheus 'controller').
        name="nvme-mdev",
        socket=args.socket,
        config=config,
        poll_timeout_ms=args.poll_timeout_ms,
        iothread_cpu=frozenset(args.iothread_cpu) if args.iothread_cpu is not None else None,
        mmap_doorbells=args.mmap_doorbells,
        namespaces=tuple(NamespaceRequest(spec) for spec in specs),
        io_engine=args.io_engine,
        data_plane=args.data_plane,
    )
    daemon = Daemon(journal=args.checkpoint_fd is not None)
    try:
        daemon.create_controller(settings)
    except SocketTaken as exc:
        raise ConfigError(f"{exc.reason} (choose another --socket)") from exc
    try:
        control, metrics = _control_plane(
            args.control or f"{args.socket}.ctl", args.metrics, daemon
        )
    except ConfigError:
        daemon.stop()
        raise
    return _run_until_signal(Served(daemon, control, metrics, _supervisor(args)), stop)


def _supervisor(args: argparse.Namespace) -> Channel | None:
    if args.checkpoint_fd is None:
        return None
    return Channel(socket.socket(fileno=args.checkpoint_fd))


def run_daemon(args: argparse.Namespace) -> int:
    from .daemon import Daemon, load_config

    _raise_fd_limit()
    stop = _stop_on_signals()
    # Check the whole file before anything is opened or bound.
    declared = load_config(args.config) if args.config else []
    parent = os.path.dirname(os.path.abspath(args.control))
    os.makedirs(parent, mode=0o700, exist_ok=True)  # /run/nvme-mdev on a fresh boot
    daemon = Daemon(journal=args.checkpoint_fd is not None)
    control, metrics = _control_plane(args.control, args.metrics, daemon)
    try:
        for settings in declared:
            daemon.create_controller(settings)
    except ConfigError as exc:
        if metrics is not None:
            metrics.stop()
        control.stop()
        daemon.stop()
        raise ConfigError(f"{args.config}: {exc}") from exc
    log.info(
        "daemon ready on %s: %d controller(s)%s",
        args.control,
        len(declared),
        f" from {args.config}" if args.config else "",
    )
    return _run_until_signal(Served(daemon, control, metrics, _supervisor(args)), stop)


def take_over(args: argparse.Namespace) -> int:
    """The new process of an upgrade (handover/upgrade.py)."""
    stop = _stop_on_signals()
    return handover.take_over(
        args.fd, lambda served: _run_until_signal(served, stop), crashed=args.crashed
    )


def upgrade(args: argparse.Namespace) -> int:
    params = {"executable": os.path.abspath(args.successor)} if args.successor else {}
    result = call(args.control, "upgrade", params, timeout=handover.START_TIMEOUT * 3)
    _print(
        args,
        result,
        f"upgraded: pid {result['pid']} serves now (guests paused {result['paused_ms']:.1f} ms)",
    )
    return 0


def _control_plane(
    path: str, metrics_address: str | None, daemon: Daemon
) -> tuple[ControlServer, MetricsServer | None]:
    from .vfio_user.server import SocketInUse

    try:
        control = ControlServer(path, daemon.methods())
    except SocketInUse as exc:
        raise ConfigError(f"{exc} (choose another --control)") from exc
    if not metrics_address:
        return control, None
    try:
        return control, MetricsServer(metrics_address, daemon.snapshots)
    except (OSError, ValueError) as exc:
        control.stop()
        raise ConfigError(f"--metrics {metrics_address}: {exc}") from exc


def _raise_fd_limit() -> None:
    """Lift the soft limit on open files to the hard one. Each VM costs the process
    tens of fds (its socket, guest memory, interrupt eventfds, images), so the usual
    soft limit of 1024 would cap a daemon at a few dozen VMs; nothing here uses
    select(2), the reason that soft limit is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _stop_on_signals() -> threading.Event:
    """An event SIGINT and SIGTERM set, from now on: installed before any socket exists,
    so that a signal that comes as soon as a socket appears still stops cleanly."""
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def _run_until_signal(served: Served, stop: threading.Event) -> int:
    """Serve until SIGINT or SIGTERM, then finish in-flight commands, flush, exit 0.
    SIGHUP, or the control method 'upgrade', hands everything to a new process."""
    daemon, control, metrics = served.daemon, served.control, served.metrics
    hangup = threading.Event()

    def on_hangup(signum: int, frame: object) -> None:
        hangup.set()
        stop.set()

    signal.signal(signal.SIGHUP, on_hangup)

    def upgrade_method(params: dict[str, Any]) -> Any:
        executable = params.get("executable")
        if executable is not None and not (
            isinstance(executable, str)
            and os.path.isabs(executable)
            and os.access(executable, os.X_OK)
        ):
            raise ControlError(f"executable {executable!r}: not an absolute path to a program")
        try:
            handed = handover.upgrade(served, _successor_command(executable))
        except HandoverError as exc:
            log.error("upgrade refused: %s", exc)
            raise ControlError(f"upgrade failed, still serving: {exc}") from None
        control.exit_after_reply(handover.exit_now)
        return {"pid": handed.pid, "paused_ms": round(handed.paused_ms, 1)}

    control.methods["upgrade"] = upgrade_method
    checkpointer = Checkpointer(served) if served.supervisor is not None else None
    if checkpointer is not None:
        checkpointer.start()
    control.start()
    if metrics is not None:
        metrics.start()
    # Supervised, the supervisor stays systemd's main process (its death is the
    # service's); otherwise this process is, whether it started or took over.
    main_pid = f"MAINPID={os.getpid()}\n" if served.supervisor is None else ""
    systemd.notify(f"{main_pid}READY=1")
    while True:
        stop.wait()
        if not hangup.is_set():
            break
        hangup.clear()
        stop.clear()
        try:
            handover.upgrade(served, _successor_command())
        except HandoverError as exc:
            log.error("SIGHUP: upgrade refused, still serving: %s", exc)
            continue
        handover.exit_now()
        return 0  # (not reached)
    if checkpointer is not None:
        checkpointer.stop()
    systemd.notify("STOPPING=1")
    log.info("stopping: finishing in-flight commands and flushing")
    if metrics is not None:
        metrics.stop()
    control.stop()
    daemon.stop()
    return 0


def _supervise(argv: Sequence[str]) -> int:
    """Run this very command (less --supervised) as the worker of a supervisor."""
    program = [sys.executable, "-m", "nvme_mdev.cli"]
    worker = [*program, *(a for a in argv if a != "--supervised")]
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    successor = [*program, "takeover", "--crashed", "--log-level", level]
    return supervise(worker, successor)


def _successor_command(executable: str | None = None) -> list[str]:
    """The new process: this Python's nvme_mdev (the version installed now), or the
    `nvme-mdev` program of another installation."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    if level not in ("debug", "info", "warning", "error"):
        level = "info"
    program = [executable] if executable else [sys.executable, "-m", "nvme_mdev.cli"]
    return [*program, "takeover", "--log-level", level, "--fd"]


# --- client commands: talk to a daemon (or a serve) over its control socket ------------


def _print(args: argparse.Namespace, result: Any, text: str) -> None:
    print(json.dumps(result, indent=2) if args.json else text)


def controller_create(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        "name": args.name,
        "socket": os.path.abspath(args.socket),  # the daemon's cwd is not ours
        "max_io_queues": args.max_io_queues,
        "queue_depth": args.queue_depth,
        "mdts": args.mdts,
        "model": args.model,
        "poll_timeout_ms": args.poll_timeout_ms,
        "mmap_doorbells": args.mmap_doorbells,
        "io_engine": args.io_engine,
        "data_plane": args.data_plane,
        "namespaces": [_absolute_spec(spec) for spec in args.ns],
    }
    if args.serial is not None:
        params["serial"] = args.serial
    if args.iothread_cpu is not None:
        params["iothread_cpu"] = sorted(args.iothread_cpu)
    result = call(args.control, "controller_create", params)
    _print(args, result, format_controller(result))
    return 0


def _absolute_spec(spec: str) -> str:
    """A relative path in a spec, made absolute: the daemon does not share our cwd
    (for an rbd: image, the files its conf= and keyring= name)."""
    path, sep, options = spec.partition(",")
    if path.startswith("rbd:"):
        return ",".join([path, *(_absolute_option(o) for o in options.split(",") if sep)])
    if path.startswith("null:") or ":" in path or os.path.isabs(path):
        return spec
    return os.path.abspath(path) + sep + options


def _absolute_option(option: str) -> str:
    key, _, value = option.partition("=")
    if key in ("conf", "keyring") and value and not os.path.isabs(value):
        return f"{key}={os.path.abspath(value)}"
    return option


def controller_delete(args: argparse.Namespace) -> int:
    result = call(args.control, "controller_delete", {"name": args.name})
    _print(args, result, f"controller {result['name']} deleted")
    return 0


def list_controllers(args: argparse.Namespace) -> int:
    result = call(args.control, "list")
    text = "\n".join(format_controller(c) for c in result["controllers"]) or "no controllers"
    _print(args, result, text)
    return 0


def namespace_add(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"controller": args.controller, "spec": _absolute_spec(args.spec)}
    for key, value in (
        ("nsid", args.nsid),
        ("bs", args.bs),
        ("offset", args.offset),
        ("size", args.size),
    ):
        if value is not None:
            params[key] = value
    if args.ro:
        params["ro"] = True
    if args.force:
        params["force"] = True
    result = call(args.control, "namespace_add", params)
    _print(args, result, f"{args.controller} {format_namespace(result).strip()}")
    return 0


def namespace_remove(args: argparse.Namespace) -> int:
    result = call(
        args.control, "namespace_remove", {"controller": args.controller, "nsid": args.nsid}
    )
    _print(args, result, f"{args.controller} nsid {result['nsid']} removed ({result['spec']})")
    return 0


def namespace_rescan(args: argparse.Namespace) -> int:
    from .storage import human

    params: dict[str, Any] = {}
    if args.controller is not None:
        params["controller"] = args.controller
    if args.nsid is not None:
        params["nsid"] = args.nsid
    result = call(args.control, "namespace_rescan", params)
    lines = []
    errors = []
    for ns in result["namespaces"]:
        where = f"{ns['controller']} nsid {ns['nsid']}"
        if ns["error"]:
            errors.append(ns["error"])
            continue
        if ns["changed"]:
            lines.append(
                f"{where}: {human(ns['size_before'])} -> {human(ns['size'])} "
                f"({ns['blocks_before']} -> {ns['blocks']} blocks), guest told"
            )
        else:
            lines.append(f"{where}: {human(ns['size'])}, unchanged")
        if ns["warning"]:
            lines.append(f"{where}: warning: {ns['warning']}")
        if ns["failure"]:
            lines.append(f"{where}: failed: {ns['failure']}")
    _print(args, result, "\n".join(lines) or "no namespaces")
    for error in errors:
        print(f"nvme-mdev: error: {error}", file=sys.stderr)
    return 1 if errors else 0


def format_controller(c: dict[str, Any]) -> str:
    t = c["iothread"]
    cpus = ",".join(map(str, t["cpus"])) if t["cpus"] is not None else "any"
    lines = [
        f"{c['name']}: {c['socket']}  serial {c['serial']}  "
        f"{c['max_io_queues']} queues x {c['queue_depth']}  mdts {c['mdts']}  "
        f"iothread cpus {cpus}, poll {t['poll_timeout_ms']} ms  "
        f"{'enabled' if c['enabled'] else 'not enabled'}"
        + ("  mapped doorbells" if c["mmap_doorbells"] else "")
        + (f"  io engine {c['io_engine']}" if "io_engine" in c else "")
        + (f"  {c['data_plane']} data plane" if "data_plane" in c else "")
    ]
    lines += [format_namespace(ns) for ns in c["namespaces"]] or ["  no namespaces"]
    return "\n".join(lines)


def format_namespace(ns: dict[str, Any]) -> str:
    from .storage import human

    extent = ns["extent"]
    where = (
        f"  on {extent['store']} {human(extent['start'])}..{human(extent['end'])}" if extent else ""
    )
    size = human(ns["size"]) if ns["size"] is not None else "?"
    mode = "ro" if ns["readonly"] else "rw"
    state = ""
    if ns.get("failure"):
        state = f"  FAILED: {ns['failure']}"
    elif ns.get("host_read_only"):
        state = f"  READ-ONLY: {ns['host_read_only']}"
    return (
        f"  nsid {ns['nsid']}  {ns['spec']}  {size}, {ns['block_size']}-byte blocks, {mode}{where}"
        f"{state}"
    )


def show_stats(args: argparse.Namespace) -> int:
    if args.prometheus:
        print(call(args.control, "prometheus"), end="")
        return 0
    snapshot = call(args.control, "stats", _which(args))
    if args.json:
        print(json.dumps(snapshot, indent=2))
        return 0
    print(format_stats(snapshot))
    return 0


def _which(args: argparse.Namespace) -> dict[str, Any]:
    return {"controller": args.controller} if args.controller else {}


def format_stats(snap: dict[str, Any]) -> str:
    lines = [
        f"{'qid':>4} {'opcode':<20} {'commands':>12} {'bytes':>16} {'errors':>8} {'mean µs':>9}"
    ]
    for q in snap["queues"]:
        mean_us = q["latency_sum_ns"] / q["commands"] / 1000 if q["commands"] else 0.0
        first = True
        for op, c in q["by_opcode"].items():
            errors = str(q["errors"]) if first else ""
            mean = f"{mean_us:.1f}" if first else ""
            lines.append(
                f"{q['qid']:>4} {op:<20} {c['commands']:>12} {c['bytes']:>16} {errors:>8} {mean:>9}"
            )
            first = False
    t = snap["io_thread"]
    interrupts = ", ".join(f"vector {v}: {n}" for v, n in snap["interrupts"].items()) or "none"
    lines.append(f"interrupts: {interrupts}")
    lines.append(
        f"I/O thread ({snap.get('data_plane', '?')} data plane): polling {t['polling_s']:.3f} s, "
        f"parked {t['parked_s']:.3f} s, parked {t['parks']} times"
    )
    lines.append(f"backend I/O errors: {snap['host_io_errors']}")
    return "\n".join(lines)


def set_iothread(args: argparse.Namespace) -> int:
    params: dict[str, Any] = _which(args)
    if "cpu" in args:
        params["cpus"] = None if args.cpu is None else sorted(args.cpu)
    if args.poll_timeout_ms is not None:
        params["poll_timeout_ms"] = args.poll_timeout_ms
    settings = call(args.control, "iothread", params)
    if args.json:
        print(json.dumps(settings))
    else:
        cpus = ",".join(map(str, settings["cpus"])) if settings["cpus"] is not None else "any"
        print(f"cpus {cpus}, poll timeout {settings['poll_timeout_ms']} ms")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "warning").upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if getattr(args, "supervised", False):
            return _supervise(argv if argv is not None else sys.argv[1:])
        if args.command == "serve":
            return serve(args)
        if args.command == "bench":
            if args.spdk is not None or args.scaling:
                from .bench_spdk import main as spdk_bench_main

                return spdk_bench_main(args)
            return bench_main(args)
        if args.command == "stats":
            return show_stats(args)
        if args.command == "iothread":
            return set_iothread(args)
        if args.command == "daemon":
            return run_daemon(args)
        if args.command == "takeover":
            return take_over(args)
        if args.command == "upgrade":
            return upgrade(args)
        if args.command == "list":
            return list_controllers(args)
        if args.command == "controller":
            return {
                "create": controller_create,
                "delete": controller_delete,
                "list": list_controllers,
            }[args.action](args)
        if args.command == "ns":
            return {"add": namespace_add, "remove": namespace_remove, "rescan": namespace_rescan}[
                args.action
            ](args)
    except ConfigError as exc:
        print(f"nvme-mdev: error: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"nvme-mdev: error: {exc}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
