"""Command line: `nvme-mdev serve --socket SOCKET PATH [PATH ...]`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from . import __version__
from .config import ConfigError, NamespaceSpec
from .engine.poller import DEFAULT_POLL_TIMEOUT
from .nvme.identity import ControllerConfig

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
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


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
            args.socket, namespaces, config, poll_timeout=args.poll_timeout_ms / 1000
        )
    except SocketInUse as exc:
        for ns in namespaces:
            ns.backend.close()
        raise ConfigError(f"{exc} (choose another --socket)") from exc
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    device.start()
    log.info(
        "serving %d namespace(s) on %s: %s",
        len(namespaces),
        args.socket,
        ", ".join(f"nsid {ns.nsid}={ns.backend.description}" for ns in namespaces),
    )
    while not stop.wait(1.0):
        pass
    log.info("stopping: finishing in-flight commands and flushing")
    device.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            return serve(args)
    except ConfigError as exc:
        print(f"nvme-mdev: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
