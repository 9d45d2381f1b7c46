"""Command line: `nvme-mdev serve --socket SOCKET PATH [PATH ...]`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .bench import add_arguments as add_bench_arguments
from .bench import main as bench_main
from .config import ConfigError, NamespaceSpec
from .control import ControlError, ControlServer, Method, call
from .engine.poller import DEFAULT_POLL_TIMEOUT
from .metrics import MetricsServer
from .nvme.identity import ControllerConfig
from .statistics import prometheus_text

if TYPE_CHECKING:
    from .virtual_controller import VirtualController

log = logging.getLogger("nvme_mdev")


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
            "Append options with commas: PATH,ro (read-only), PATH,bs=4096 (4 KiB blocks). "
            "'null:SIZE' is a namespace with no storage, for benchmarks. Attach it to QEMU "
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
    serve.add_argument(
        "--poll-timeout-ms",
        type=int,
        default=int(DEFAULT_POLL_TIMEOUT * 1000),
        help="idle time before the I/O thread parks (0: poll forever; default %(default)s)",
    )
    defaults = ControllerConfig()
    serve.add_argument("--serial", default=defaults.serial, help="serial number (20 ASCII max)")
    serve.add_argument("--model", default=defaults.model, help="model number (40 ASCII max)")
    serve.add_argument(
        "--max-io-queues", type=int, default=defaults.max_io_queues, help="I/O queue pairs (1-64)"
    )
    serve.add_argument(
        "--queue-depth",
        type=int,
        default=defaults.max_queue_entries,
        help="largest queue the guest may create (2-4096, CAP.MQES + 1)",
    )
    serve.add_argument(
        "--mdts",
        type=int,
        default=defaults.mdts,
        help="max transfer size as a power of two of 4 KiB pages (default %(default)s: 512 KiB)",
    )
    serve.add_argument(
        "--mmap-doorbells",
        action="store_true",
        help=(
            "put the doorbell registers in memory the VM maps: no doorbell ever traps, "
            "and the I/O thread polls without parking (one busy CPU per controller)"
        ),
    )
    serve.add_argument(
        "--iothread-cpu",
        type=cpu_list,
        metavar="CPUS",
        help="pin the I/O thread to these CPUs (3, 2,5 or 0-3; changeable: nvme-mdev iothread)",
    )
    serve.add_argument(
        "--control",
        metavar="PATH",
        help="control socket for nvme-mdev stats/iothread (mode 0600; default SOCKET.ctl)",
    )
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="also serve the statistics for Prometheus at http://HOST:PORT/metrics",
    )
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    stats = commands.add_parser(
        "stats",
        help="show a running device's statistics",
        description=(
            "Per I/O queue: commands and bytes by opcode, errors, device-side latency "
            "(submission seen to completion posted); interrupts by vector; the I/O "
            "thread's time polling and parked; backend I/O errors."
        ),
    )
    stats.add_argument(
        "--control", required=True, metavar="PATH", help="the device's control socket"
    )
    output = stats.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON")
    output.add_argument("--prometheus", action="store_true", help="print Prometheus text format")
    iothread = commands.add_parser(
        "iothread",
        help="show or change a running device's I/O thread (CPU pinning, poll timeout)",
    )
    iothread.add_argument(
        "--control", required=True, metavar="PATH", help="the device's control socket"
    )
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
            "on a page-cache file and a null namespace, and print a table with the ratios."
        ),
    )
    add_bench_arguments(bench)
    return parser


def cpu_list(text: str) -> set[int]:
    """'3', '2,5', '0-3' → a set of CPU numbers."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CPUs like 3, 2,5 or 0-3") from None
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CPUs like 3, 2,5 or 0-3")
    return cpus


def cpu_list_or_any(text: str) -> set[int] | None:
    return None if text == "any" else cpu_list(text)


def serve(args: argparse.Namespace) -> int:
    from .vfio_user.server import SocketInUse
    from .virtual_controller import VirtualController

    if args.poll_timeout_ms < 0:
        raise ConfigError("--poll-timeout-ms: must be 0 or more")
    try:
        config = ControllerConfig(
            serial=args.serial,
            model=args.model,
            max_io_queues=args.max_io_queues,
            max_queue_entries=args.queue_depth,
            mdts=args.mdts,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    specs = [NamespaceSpec.parse(p, args.block_size, args.read_only) for p in args.paths]
    if len(specs) > config.max_namespaces:
        raise ConfigError(f"{len(specs)} namespaces: at most {config.max_namespaces}")
    namespaces = []
    try:
        for nsid, spec in enumerate(specs, start=1):
            namespaces.append(spec.open(nsid))
    except ConfigError:
        for ns in namespaces:
            ns.backend.close()
        raise
    try:
        device = VirtualController(
            args.socket,
            namespaces,
            config,
            poll_timeout=args.poll_timeout_ms / 1000,
            mmap_doorbells=args.mmap_doorbells,
        )
    except SocketInUse as exc:
        for ns in namespaces:
            ns.backend.close()
        raise ConfigError(f"{exc} (choose another --socket)") from exc
    try:
        control, metrics = _control_plane(args, device)
    except ConfigError:
        device.server.stop()
        for ns in namespaces:
            ns.backend.close()
        raise
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    device.start()
    control.start()
    if metrics is not None:
        metrics.start()
    log.info(
        "serving %d namespace(s) on %s: %s",
        len(namespaces),
        args.socket,
        ", ".join(f"nsid {ns.nsid}={ns.backend.description}" for ns in namespaces),
    )
    while not stop.wait(1.0):
        pass
    log.info("stopping: finishing in-flight commands and flushing")
    if metrics is not None:
        metrics.stop()
    control.stop()
    device.stop()
    return 0


def _control_plane(
    args: argparse.Namespace, device: VirtualController
) -> tuple[ControlServer, MetricsServer | None]:
    from .vfio_user.server import SocketInUse

    if args.iothread_cpu is not None:
        try:
            device.io_thread.pin(args.iothread_cpu)
        except OSError as exc:
            raise ConfigError(f"--iothread-cpu: {exc.strerror or exc}") from exc
    control_path = args.control or f"{args.socket}.ctl"
    try:
        control = ControlServer(control_path, device_methods(device))
    except SocketInUse as exc:
        raise ConfigError(f"{exc} (choose another --control)") from exc
    if not args.metrics:
        return control, None
    try:
        return control, MetricsServer(args.metrics, lambda: {"nvme-mdev": device.statistics()})
    except (OSError, ValueError) as exc:
        control.stop()
        raise ConfigError(f"--metrics {args.metrics}: {exc}") from exc


def device_methods(device: VirtualController) -> dict[str, Method]:
    """The control methods of one `serve` device."""

    def stats(params: dict[str, Any]) -> Any:
        return device.statistics()

    def prometheus(params: dict[str, Any]) -> Any:
        return prometheus_text({"nvme-mdev": device.statistics()})

    def iothread(params: dict[str, Any]) -> Any:
        kwargs: dict[str, Any] = {}
        if "cpus" in params:
            cpus = params["cpus"]
            kwargs["cpus"] = None if cpus is None else {int(c) for c in cpus}
        if "poll_timeout_ms" in params:
            kwargs["poll_timeout_ms"] = int(params["poll_timeout_ms"])
        try:
            device.set_io_thread(**kwargs)
        except OSError as exc:
            raise ControlError(
                f"CPUs {sorted(kwargs.get('cpus') or [])}: {exc.strerror or exc}"
            ) from exc
        return device.io_thread_settings()

    return {"stats": stats, "prometheus": prometheus, "iothread": iothread}


def show_stats(args: argparse.Namespace) -> int:
    if args.prometheus:
        print(call(args.control, "prometheus"), end="")
        return 0
    snapshot = call(args.control, "stats")
    if args.json:
        print(json.dumps(snapshot, indent=2))
        return 0
    print(format_stats(snapshot))
    return 0


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
        f"I/O thread: polling {t['polling_s']:.3f} s, parked {t['parked_s']:.3f} s, "
        f"parked {t['parks']} times"
    )
    lines.append(f"backend I/O errors: {snap['host_io_errors']}")
    return "\n".join(lines)


def set_iothread(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
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
        if args.command == "serve":
            return serve(args)
        if args.command == "bench":
            return bench_main(args)
        if args.command == "stats":
            return show_stats(args)
        if args.command == "iothread":
            return set_iothread(args)
    except ConfigError as exc:
        print(f"nvme-mdev: error: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"nvme-mdev: error: {exc}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
