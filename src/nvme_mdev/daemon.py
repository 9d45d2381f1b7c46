"""The daemon: one process hosting any number of virtual NVMe controllers, each with
its own vfio-user socket and I/O thread, managed at run time over a JSON-RPC 2.0
control socket (control.py). `nvme-mdev serve` is this with one controller.

Methods (params → result); errors are JSON-RPC errors with a one-line message:
  controller_create  name socket [max_io_queues queue_depth mdts serial model
                     poll_timeout_ms iothread_cpu mmap_doorbells namespaces] → controller
  controller_delete  name                                          → controller
  namespace_add      controller spec [nsid ro bs offset size force] → namespace
  namespace_remove   controller nsid                               → namespace
  namespace_rescan   [controller [nsid]]       → {"namespaces": [size before/after, error]}
  list                                                             → {"controllers": [...]}
  iothread           [controller] [cpus poll_timeout_ms]            → I/O thread settings
  stats              [controller]                                  → statistics
  prometheus                                                       → text, all controllers
`controller` may be left out where the daemon has exactly one.

The TOML file the daemon loads at start declares controllers with the same keys:
    [[controller]]
    name = "vm1"
    socket = "/run/nvme-mdev/vm1.sock"
    [[controller.namespace]]
    spec = "nvme0:n1p3"
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import re
import threading
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .backends.file import BackendError
from .backends.io_engine import ENGINE_NAMES
from .config import (
    MAX_POLL_TIMEOUT_MS,
    POLL_TIMEOUT_RANGE,
    ConfigError,
    NamespaceSpec,
    RbdOptions,
    parse_cpu_list,
    parse_size,
)
from .control import INVALID_PARAMS, ControlError, Method
from .dataplane import DATA_PLANES
from .engine.poller import DEFAULT_POLL_TIMEOUT
from .handover.supervisor import state_changed
from .nvme.identity import ControllerConfig
from .statistics import prometheus_text
from .storage import HostStorage, Lease
from .virtual_controller import VirtualController

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CONTROLLER_KEYS = frozenset(
    (
        "name",
        "socket",
        "max_io_queues",
        "queue_depth",
        "mdts",
        "serial",
        "model",
        "poll_timeout_ms",
        "iothread_cpu",
        "mmap_doorbells",
        "io_engine",
        "data_plane",
        "namespaces",
        "namespace",  # the TOML spelling: [[controller.namespace]]
    )
)
NAMESPACE_KEYS = frozenset(("spec", "nsid", "ro", "bs", "offset", "size", "force"))

T = TypeVar("T")


class SocketTaken(ConfigError):
    """The controller's vfio-user socket path is taken."""

    def __init__(self, controller: str, reason: str) -> None:
        super().__init__(f"controller {controller}: {reason}")
        self.reason = reason


def _get(params: Mapping[str, Any], key: str, kind: type[T], where: str) -> T | None:
    """params[key] if present, checked to be a `kind` (a bool is not an int here)."""
    if key not in params or params[key] is None:
        return None
    value = params[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {kind.__name__}, not {value!r}")
    return value


def _require(params: Mapping[str, Any], key: str, kind: type[T], where: str) -> T:
    value = _get(params, key, kind, where)
    if value is None:
        raise ConfigError(f"{where}: {key} is required")
    return value


def _size(params: Mapping[str, Any], key: str, where: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return parse_size(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: {key} must be bytes or a size like 1G, not {value!r}")


def _known(params: Mapping[str, Any], keys: frozenset[str], where: str) -> None:
    unknown = sorted(set(params) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")


@dataclass(frozen=True)
class NamespaceRequest:
    spec: NamespaceSpec
    nsid: int | None = None  # None: the lowest free one

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | str, where: str) -> NamespaceRequest:
        if isinstance(params, str):
            params = {"spec": params}
        _known(params, NAMESPACE_KEYS, where)
        text = _require(params, "spec", str, where)
        spec = NamespaceSpec.parse(text)
        # Keys add to what the spec's options say ('ro' in either makes it read-only).
        changes: dict[str, Any] = {}
        if _get(params, "ro", bool, where):
            changes["readonly"] = True
        if _get(params, "force", bool, where):
            changes["force"] = True
        if (bs := _get(params, "bs", int, where)) is not None:
            changes["block_size"] = bs
        if (offset := _size(params, "offset", where)) is not None:
            changes["offset"] = offset
        if (size := _size(params, "size", where)) is not None:
            changes["size"] = size
        spec = dataclasses.replace(spec, **changes).checked(text)
        return cls(spec, _get(params, "nsid", int, where))


@dataclass(frozen=True)
class ControllerSettings:
    name: str
    socket: str
    config: ControllerConfig
    poll_timeout_ms: int = round(DEFAULT_POLL_TIMEOUT * 1000)
    iothread_cpu: frozenset[int] | None = None
    mmap_doorbells: bool = False
    namespaces: tuple[NamespaceRequest, ...] = ()
    #: how Reads and Writes reach the storage: auto, sync or uring (io_engine.py)
    io_engine: str = "auto"
    #: what runs the I/O queues: native (the Rust crate) or python (dataplane/)
    data_plane: str = DATA_PLANES[0]

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], where: str = "controller"
    ) -> ControllerSettings:
        _known(params, CONTROLLER_KEYS, where)
        name = _require(params, "name", str, where)
        if not NAME.match(name):
            raise ConfigError(f"{where}: name {name!r}: use letters, digits, '.', '_', '-'")
        where = f"controller {name}"
        socket = _require(params, "socket", str, where)
        defaults = ControllerConfig()
        # A serial of its own by default: a guest given two controllers must not take
        # them for two paths to one subsystem.
        serial = _get(params, "serial", str, where) or f"MDEV-{name}"[:20]
        cpus = params.get("iothread_cpu")
        if isinstance(cpus, str):
            cpu_set: frozenset[int] | None = frozenset(parse_cpu_list(cpus))
        elif isinstance(cpus, int) and not isinstance(cpus, bool):
            cpu_set = frozenset({cpus})
        elif isinstance(cpus, list) and all(
            isinstance(c, int) and not isinstance(c, bool) for c in cpus
        ):
            cpu_set = frozenset(cpus) or None
        elif cpus is None:
            cpu_set = None
        else:
            raise ConfigError(f"{where}: iothread_cpu must be CPUs like 3, '2,5' or '0-3'")
        try:
            config = ControllerConfig(
                serial=serial,
                model=_get(params, "model", str, where) or defaults.model,
                subsystem_nqn=subsystem_nqn(serial),
                max_io_queues=_or(
                    _get(params, "max_io_queues", int, where), defaults.max_io_queues
                ),
                max_queue_entries=_or(
                    _get(params, "queue_depth", int, where), defaults.max_queue_entries
                ),
                mdts=_or(_get(params, "mdts", int, where), defaults.mdts),
            )
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        poll = _get(params, "poll_timeout_ms", int, where)
        if poll is not None and not 0 <= poll <= MAX_POLL_TIMEOUT_MS:
            raise ConfigError(f"{where}: poll_timeout_ms must be {POLL_TIMEOUT_RANGE}")
        listed = params.get("namespaces", params.get("namespace")) or []
        if not isinstance(listed, list):
            raise ConfigError(f"{where}: namespaces must be a list")
        namespaces = tuple(
            NamespaceRequest.from_params(ns, f"{where} namespace {i + 1}")
            for i, ns in enumerate(listed)
        )
        engine = _get(params, "io_engine", str, where) or "auto"
        if engine not in ENGINE_NAMES:
            raise ConfigError(f"{where}: io_engine {engine!r}: one of {', '.join(ENGINE_NAMES)}")
        plane = _get(params, "data_plane", str, where) or DATA_PLANES[0]
        if plane not in DATA_PLANES:
            raise ConfigError(f"{where}: data_plane {plane!r}: one of {', '.join(DATA_PLANES)}")
        return cls(
            name,
            socket,
            config,
            _or(poll, round(DEFAULT_POLL_TIMEOUT * 1000)),
            cpu_set,
            bool(_get(params, "mmap_doorbells", bool, where)),
            namespaces,
            engine,
            plane,
        )


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def subsystem_nqn(serial: str) -> str:
    """An NQN of the controller's own (see ControllerConfig's default for the form)."""
    tail = re.sub(r"[^a-z0-9.-]", "-", serial.lower())
    return f"nqn.2026-11.io.nvme-mdev:subsys-{tail}"


def load_config(path: str) -> list[ControllerSettings]:
    """The controllers a TOML file declares, checked; ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    unknown = sorted(set(data) - {"controller"})
    if unknown:
        raise ConfigError(f"{path}: unknown table {unknown[0]!r} (expected [[controller]])")
    tables = data.get("controller", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{path}: write controllers as [[controller]] tables")
    try:
        return [
            ControllerSettings.from_params(t, f"controller {i + 1}") for i, t in enumerate(tables)
        ]
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


@dataclass
class _Attached:
    spec: NamespaceSpec
    lease: Lease


@dataclass
class ManagedController:
    settings: ControllerSettings
    device: VirtualController
    namespaces: dict[int, _Attached] = field(default_factory=dict)


class Daemon:
    def __init__(self, storage: HostStorage | None = None, journal: bool = False) -> None:
        """`journal`: controllers keep an I/O journal (a supervisor recovers them)."""
        #: the sharing rules hold across every controller of the process
        self.storage = storage or HostStorage()
        self.journal = journal
        self.controllers: dict[str, ManagedController] = {}
        # Control connections run in parallel threads: one change at a time.
        self._lock = threading.RLock()
        # Storage that tells of its own size changes (an RBD image resized on its
        # cluster) puts (controller, nsid) here from its own threads; they are
        # rescanned, as by `ns rescan`, on a thread of ours (started when needed).
        self._changed: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        self._rescanner: threading.Thread | None = None

    # --- controllers -----------------------------------------------------------

    def create_controller(
        self,
        settings: ControllerSettings,
        predecessor: tuple[dict[str, Any], Sequence[int]] | None = None,
        crashed: bool = False,
    ) -> dict[str, Any]:
        """`predecessor`: the controller's state from a predecessor process and the fds
        that came with it (upgrade in place): it goes on from there, and is started by
        start_restored() once the predecessor has let go."""
        from .vfio_user.server import SocketInUse

        name = settings.name
        with self._lock:
            if name in self.controllers:
                raise ConfigError(f"controller {name} already exists")
            for other in self.controllers.values():
                if other.settings.config.serial == settings.config.serial:
                    raise ConfigError(
                        f"controller {name}: serial {settings.config.serial} is controller "
                        f"{other.settings.name}'s"
                    )
            nsids = self._assign_nsids(settings)
            attached: dict[int, _Attached] = {}
            namespaces = []
            try:
                for req, nsid in zip(settings.namespaces, nsids, strict=True):
                    ns, lease = self.storage.open(req.spec, nsid, f"controller {name} nsid {nsid}")
                    namespaces.append(ns)
                    attached[nsid] = _Attached(req.spec, lease)
                device = VirtualController(
                    settings.socket,
                    namespaces,
                    settings.config,
                    poll_timeout=settings.poll_timeout_ms / 1000,
                    mmap_doorbells=settings.mmap_doorbells,
                    io_engine=settings.io_engine,
                    data_plane=settings.data_plane,
                    predecessor=predecessor,
                    journal=self.journal,
                    crashed=crashed,
                )
            except (ConfigError, SocketInUse) as exc:
                for ns in namespaces:
                    ns.backend.close()
                for a in attached.values():
                    a.lease.release()
                if isinstance(exc, SocketInUse):
                    raise SocketTaken(name, str(exc)) from exc
                raise
            managed = ManagedController(settings, device, attached)
            if settings.iothread_cpu is not None:
                try:
                    device.data.pin(set(settings.iothread_cpu))
                except OSError as exc:
                    self._dispose(managed)
                    cpus = ",".join(map(str, sorted(settings.iothread_cpu)))
                    raise ConfigError(
                        f"controller {name}: iothread_cpu {cpus}: {exc.strerror or exc}"
                    ) from exc
            if predecessor is None:
                device.start()
            self.controllers[name] = managed
            for nsid, ns in zip(nsids, namespaces, strict=True):
                self._watch(name, nsid, ns.backend)
            log.info(
                "controller %s on %s: %s",
                name,
                settings.socket,
                ", ".join(f"nsid {n}={a.lease.path}" for n, a in attached.items())
                or "no namespaces",
            )
            return self.describe_controller(managed)

    def _assign_nsids(self, settings: ControllerSettings) -> list[int]:
        taken = {r.nsid for r in settings.namespaces if r.nsid is not None}
        nsids = []
        for req in settings.namespaces:
            if req.nsid is not None:
                nsids.append(req.nsid)
                continue
            nsid = next(n for n in range(1, len(nsids) + len(taken) + 2) if n not in taken)
            taken.add(nsid)
            nsids.append(nsid)
        for nsid in nsids:
            self._check_nsid(settings, nsid)
        if len(set(nsids)) != len(nsids):
            raise ConfigError(f"controller {settings.name}: an nsid is given twice")
        return nsids

    @staticmethod
    def _check_nsid(settings: ControllerSettings, nsid: int) -> None:
        limit = settings.config.max_namespaces
        if not 1 <= nsid <= limit:
            raise ConfigError(f"controller {settings.name}: nsid {nsid} outside 1..{limit}")

    def delete_controller(self, name: str) -> dict[str, Any]:
        with self._lock:
            managed = self._controller(name)
            description = self.describe_controller(managed)
            del self.controllers[name]
            self._dispose(managed)
            log.info("controller %s deleted", name)
            return description

    # --- upgrade in place ------------------------------------------------------------

    @property
    def lock(self) -> threading.RLock:
        """Held: no control request changes anything (an upgrade holds it)."""
        return self._lock

    def release_cluster_locks(self) -> list[Any]:
        """Give back the exclusive locks of RBD images (flushed first), for a successor
        to take: they cannot travel as fds do. Returns the backends that held one (for
        retake_cluster_locks if the handover fails). BackendError if one cannot."""
        released = []
        try:
            for managed in self.controllers.values():
                for ns in managed.device.controller.namespaces.values():
                    release = getattr(ns.backend, "release_lock", None)
                    if release is not None and release():
                        released.append(ns.backend)
        except BackendError:
            self.retake_cluster_locks(released)
            raise
        return released

    @staticmethod
    def retake_cluster_locks(backends: list[Any]) -> None:
        for backend in backends:
            try:
                backend.lock()
            except BackendError as exc:  # someone took it meanwhile: say so loudly
                log.error("after a failed upgrade: %s", exc)

    def handover_state(self, fds: list[int], checkpoint: bool = False) -> list[dict[str, Any]]:
        """Every controller (each held: VirtualController.held()), as a successor
        recreates it: its settings with the namespaces attached now, and its state."""
        out = []
        for managed in self.controllers.values():
            s = managed.settings
            device = managed.device
            cpus = device.data.cpus
            out.append(
                {
                    "name": s.name,
                    "socket": s.socket,
                    "config": dataclasses.asdict(s.config),
                    "poll_timeout_ms": round(device.data.poll_timeout * 1000),
                    "iothread_cpu": sorted(cpus) if cpus is not None else None,
                    "mmap_doorbells": s.mmap_doorbells,
                    "io_engine": s.io_engine,
                    "data_plane": s.data_plane,
                    "namespaces": [
                        {"nsid": nsid, "spec": _spec_state(a.spec)}
                        for nsid, a in managed.namespaces.items()
                    ],
                    "device": (
                        device.checkpoint_state(fds) if checkpoint else device.handover_state(fds)
                    ),
                }
            )
        return out

    def restore_controllers(
        self, controllers: list[dict[str, Any]], fds: Sequence[int], crashed: bool = False
    ) -> None:
        """Recreate a predecessor's controllers (handover_state), not yet started."""
        for c in controllers:
            settings = ControllerSettings(
                name=c["name"],
                socket=c["socket"],
                config=ControllerConfig(**c["config"]),
                poll_timeout_ms=int(c["poll_timeout_ms"]),
                iothread_cpu=frozenset(c["iothread_cpu"]) if c["iothread_cpu"] else None,
                mmap_doorbells=bool(c["mmap_doorbells"]),
                namespaces=tuple(
                    NamespaceRequest(_spec_from_state(ns["spec"]), ns["nsid"])
                    for ns in c["namespaces"]
                ),
                io_engine=c["io_engine"],
                data_plane=c["data_plane"],
            )
            self.create_controller(settings, predecessor=(c["device"], fds), crashed=crashed)

    def start_restored(self) -> None:
        """Start what restore_controllers() made: the predecessor has let go."""
        for managed in self.controllers.values():
            managed.device.start()
            managed.device.signal_unconsumed()
            managed.device.controller.admin_doorbell.set()  # admin commands rung meanwhile
            managed.device.data.wake()

    def _dispose(self, managed: ManagedController) -> None:
        """Stop the device (flushing and closing every backend), then let go of the
        storage it held."""
        managed.device.stop()
        for a in managed.namespaces.values():
            a.lease.release()
        managed.namespaces.clear()

    def stop(self) -> None:
        with self._lock:
            for name in list(self.controllers):
                self._dispose(self.controllers.pop(name))
            rescanner, self._rescanner = self._rescanner, None
        if rescanner is not None:
            self._changed.put(None)
            rescanner.join()

    # --- storage that changes by itself ----------------------------------------------

    def _watch(self, controller: str, nsid: int, backend: object) -> None:
        """Have `backend` tell of its own size changes, if it can (backends/rbd.py)."""
        watch_size = getattr(backend, "watch_size", None)
        if watch_size is None:
            return
        if self._rescanner is None:
            self._rescanner = threading.Thread(
                target=self._rescan_changed, name="storage-events", daemon=True
            )
            self._rescanner.start()
        # (called on the storage's own thread: a put, and nothing else)
        watch_size(functools.partial(self._changed.put, (controller, nsid)))

    def _rescan_changed(self) -> None:
        while (changed := self._changed.get()) is not None:
            controller, nsid = changed
            try:
                self.rescan_namespaces(controller, nsid)
            except ConfigError:
                pass  # removed meanwhile: nothing to tell
            except Exception:
                log.exception("controller %s nsid %d: rescan after a change", controller, nsid)

    def _controller(self, name: str | None) -> ManagedController:
        if name is None:
            if len(self.controllers) == 1:
                return next(iter(self.controllers.values()))
            have = ", ".join(sorted(self.controllers)) or "none"
            raise ConfigError(f"which controller? (have: {have})")
        managed = self.controllers.get(name)
        if managed is None:
            have = ", ".join(sorted(self.controllers)) or "none"
            raise ConfigError(f"no controller {name} (have: {have})")
        return managed

    # --- namespaces ------------------------------------------------------------

    def add_namespace(self, controller: str | None, req: NamespaceRequest) -> dict[str, Any]:
        with self._lock:
            managed = self._controller(controller)
            name = managed.settings.name
            nsid = req.nsid
            if nsid is None:
                nsid = next(
                    n for n in range(1, len(managed.namespaces) + 2) if n not in managed.namespaces
                )
            self._check_nsid(managed.settings, nsid)
            if nsid in managed.namespaces:
                raise ConfigError(
                    f"controller {name}: nsid {nsid} is in use "
                    f"({managed.namespaces[nsid].spec.text()})"
                )
            ns, lease = self.storage.open(req.spec, nsid, f"controller {name} nsid {nsid}")
            try:
                managed.device.add_namespace(ns)
            except BaseException as exc:
                # Whatever failed, the controller took nothing: let go of the storage.
                ns.backend.close()
                lease.release()
                if isinstance(exc, ValueError):
                    raise ConfigError(f"controller {name}: {exc}") from exc
                raise
            managed.namespaces[nsid] = _Attached(req.spec, lease)
            self._watch(name, nsid, ns.backend)
            log.info("controller %s: nsid %d attached (%s)", name, nsid, lease.path)
            return self.describe_namespace(managed, nsid)

    def remove_namespace(self, controller: str | None, nsid: int) -> dict[str, Any]:
        with self._lock:
            managed = self._controller(controller)
            name = managed.settings.name
            if nsid not in managed.namespaces:
                have = ", ".join(map(str, sorted(managed.namespaces))) or "none"
                raise ConfigError(f"controller {name} has no nsid {nsid} (has: {have})")
            description = self.describe_namespace(managed, nsid)
            managed.device.remove_namespace(nsid)
            managed.namespaces.pop(nsid).lease.release()
            log.info("controller %s: nsid %d detached", name, nsid)
            return description

    def rescan_namespaces(self, controller: str | None, nsid: int | None) -> dict[str, Any]:
        """Read each namespace's storage size again (all of `controller`'s, or every
        controller's; or one nsid) and tell the guests what changed. A namespace that
        cannot take its new size keeps its old one and reports why in its `error`."""
        with self._lock:
            if controller is None and nsid is None:
                targets = [
                    (m, n)
                    for _, m in sorted(self.controllers.items())
                    for n in sorted(m.namespaces)
                ]
            else:
                managed = self._controller(controller)
                if nsid is None:
                    targets = [(managed, n) for n in sorted(managed.namespaces)]
                elif nsid in managed.namespaces:
                    targets = [(managed, nsid)]
                else:
                    have = ", ".join(map(str, sorted(managed.namespaces))) or "none"
                    raise ConfigError(
                        f"controller {managed.settings.name} has no nsid {nsid} (has: {have})"
                    )
            return {"namespaces": [self._rescan(m, n) for m, n in targets]}

    def _rescan(self, managed: ManagedController, nsid: int) -> dict[str, Any]:
        name = managed.settings.name
        label = f"controller {name} nsid {nsid}"
        attached = managed.namespaces[nsid]
        ns = managed.device.controller.namespaces[nsid]
        result: dict[str, Any] = {
            "controller": name,
            "nsid": nsid,
            "spec": attached.spec.text(),
            "size_before": ns.backend.size,
            "blocks_before": ns.blocks,
            "size": ns.backend.size,
            "blocks": ns.blocks,
            "changed": False,
            "error": None,
            "warning": attached.lease.replaced(),
            "failure": ns.failure,
        }
        try:
            size = ns.backend.current_size()
            if size != ns.backend.size:
                attached.lease.resize(size, label)
        except BackendError as exc:
            result["error"] = f"{label}: {exc}"
        except ConfigError as exc:
            result["error"] = str(exc)
        except OSError as exc:
            result["error"] = f"{label}: {attached.lease.path}: {exc.strerror or exc}"
        else:
            result["changed"] = managed.device.controller.resize_namespace(nsid, size)
            result["size"], result["blocks"] = size, ns.blocks
            if result["changed"]:
                log.info(
                    "controller %s: nsid %d resized, %d -> %d blocks (guest told)",
                    name,
                    nsid,
                    result["blocks_before"],
                    ns.blocks,
                )
        if result["error"]:
            log.warning("rescan: %s", result["error"])
        if result["warning"]:
            log.warning("rescan: %s: %s", label, result["warning"])
        return result

    # --- what there is ---------------------------------------------------------

    def describe_namespace(self, managed: ManagedController, nsid: int) -> dict[str, Any]:
        attached = managed.namespaces[nsid]
        ns = managed.device.controller.namespaces.get(nsid)
        extent = attached.lease.extent
        return {
            "nsid": nsid,
            "spec": attached.spec.text(),
            "path": attached.lease.path,
            "size": ns.backend.size if ns else None,
            "block_size": attached.spec.block_size,
            "blocks": ns.blocks if ns else None,
            "readonly": ns.readonly if ns else attached.spec.readonly,
            "extent": extent.as_dict() if extent else None,
            # what the host's storage did to it (media_errors.py)
            "failure": ns.failure if ns else None,
            "host_read_only": ns.host_read_only if ns else None,
        }

    def describe_controller(self, managed: ManagedController) -> dict[str, Any]:
        s = managed.settings
        return {
            "name": s.name,
            "socket": s.socket,
            "serial": s.config.serial,
            "model": s.config.model,
            "subsystem_nqn": s.config.subsystem_nqn,
            "max_io_queues": s.config.max_io_queues,
            "queue_depth": s.config.max_queue_entries,
            "mdts": s.config.mdts,
            "mmap_doorbells": s.mmap_doorbells,
            "io_engine": managed.device.engine.name,
            "data_plane": managed.device.data.kind,
            "enabled": managed.device.controller.registers.ready,
            "iothread": managed.device.io_thread_settings(),
            "namespaces": [self.describe_namespace(managed, n) for n in sorted(managed.namespaces)],
        }

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "controllers": [
                    self.describe_controller(self.controllers[n]) for n in sorted(self.controllers)
                ],
                "pid": os.getpid(),  # (an upgrade or a crash recovery changes it)
            }

    def snapshots(self) -> dict[str, dict[str, Any]]:
        """Statistics of every controller by name (Prometheus, /metrics)."""
        with self._lock:
            managed = dict(self.controllers)
        return {name: m.device.statistics() for name, m in sorted(managed.items())}

    # --- the control socket ----------------------------------------------------

    def methods(self) -> dict[str, Method]:
        def controller_create(params: dict[str, Any]) -> Any:
            return self.create_controller(ControllerSettings.from_params(params))

        def controller_delete(params: dict[str, Any]) -> Any:
            name = _get(params, "name", str, "controller_delete")
            return self.delete_controller(
                name or _require(params, "controller", str, "controller_delete")
            )

        def namespace_add(params: dict[str, Any]) -> Any:
            controller = _get(params, "controller", str, "namespace_add")
            request = {k: v for k, v in params.items() if k != "controller"}
            return self.add_namespace(
                controller, NamespaceRequest.from_params(request, "namespace_add")
            )

        def namespace_remove(params: dict[str, Any]) -> Any:
            controller = _get(params, "controller", str, "namespace_remove")
            return self.remove_namespace(
                controller, _require(params, "nsid", int, "namespace_remove")
            )

        def namespace_rescan(params: dict[str, Any]) -> Any:
            return self.rescan_namespaces(
                _get(params, "controller", str, "namespace_rescan"),
                _get(params, "nsid", int, "namespace_rescan"),
            )

        def list_all(params: dict[str, Any]) -> Any:
            return self.describe()

        def stats(params: dict[str, Any]) -> Any:
            with self._lock:
                managed = self._controller(_get(params, "controller", str, "stats"))
            return managed.device.statistics()

        def prometheus(params: dict[str, Any]) -> Any:
            return prometheus_text(self.snapshots())

        def iothread(params: dict[str, Any]) -> Any:
            with self._lock:
                managed = self._controller(_get(params, "controller", str, "iothread"))
            return iothread_request(managed.device, params)

        table: dict[str, Callable[[dict[str, Any]], Any]] = {
            "controller_create": controller_create,
            "controller_delete": controller_delete,
            "namespace_add": namespace_add,
            "namespace_remove": namespace_remove,
            "namespace_rescan": namespace_rescan,
            "list": list_all,
            "stats": stats,
            "prometheus": prometheus,
            "iothread": iothread,
        }
        changes = {"controller_create", "controller_delete", "namespace_add", "namespace_remove",
                   "namespace_rescan", "iothread"}  # fmt: skip
        return {
            name: _refusals_as_errors(_checkpointed(method) if name in changes else method)
            for name, method in table.items()
        }


def _checkpointed(method: Method) -> Method:
    """A method whose changes a supervisor checkpoints (crash recovery)."""

    def wrapped(params: dict[str, Any]) -> Any:
        try:
            return method(params)
        finally:
            state_changed()

    return wrapped


def _spec_state(spec: NamespaceSpec) -> dict[str, Any]:
    """A namespace spec for a successor: what it is, not what was made for it (an RBD
    image created or cloned at `ns add` exists now; break-lock was for then)."""
    state = dataclasses.asdict(spec)
    if spec.rbd is not None:
        state["rbd"] = dataclasses.asdict(
            dataclasses.replace(spec.rbd, create=None, clone=None, break_lock=False)
        )
    return state


def _spec_from_state(state: dict[str, Any]) -> NamespaceSpec:
    rbd = state.get("rbd")
    return NamespaceSpec(**{**state, "rbd": RbdOptions(**rbd) if rbd is not None else None})


def _refusals_as_errors(method: Method) -> Method:
    def wrapped(params: dict[str, Any]) -> Any:
        try:
            return method(params)
        except ConfigError as exc:
            raise ControlError(str(exc)) from exc

    return wrapped


def iothread_request(device: VirtualController, params: Mapping[str, Any]) -> dict[str, Any]:
    """Pin the I/O thread (`cpus`: a list, or null to unpin) and/or set its poll timeout."""
    kwargs: dict[str, Any] = {}
    if "cpus" in params:
        cpus = params["cpus"]
        kwargs["cpus"] = None if cpus is None else {int(c) for c in cpus}
    if "poll_timeout_ms" in params:
        kwargs["poll_timeout_ms"] = int(params["poll_timeout_ms"])
        if not 0 <= kwargs["poll_timeout_ms"] <= MAX_POLL_TIMEOUT_MS:
            raise ControlError(
                f"iothread: poll_timeout_ms must be {POLL_TIMEOUT_RANGE}", INVALID_PARAMS
            )
    try:
        device.set_io_thread(**kwargs)
    except OSError as exc:
        raise ControlError(
            f"CPUs {sorted(kwargs.get('cpus') or [])}: {exc.strerror or exc}"
        ) from exc
    return device.io_thread_settings()
