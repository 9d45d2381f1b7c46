"""What the daemon accepts as a controller or namespace (control-socket params and
TOML tables are the same dictionaries), checked before anything is opened."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from nvme_mdev.config import ConfigError
from nvme_mdev.daemon import ControllerSettings, NamespaceRequest, load_config, subsystem_nqn

ROOT = Path(__file__).resolve().parents[2]


def test_controller_defaults() -> None:
    s = ControllerSettings.from_params({"name": "vm1", "socket": "/run/vm1.sock"})
    assert (s.name, s.socket, s.poll_timeout_ms, s.iothread_cpu) == (
        "vm1",
        "/run/vm1.sock",
        500,
        None,
    )
    assert s.config.serial == "MDEV-vm1"  # each controller its own serial and NQN
    assert s.config.subsystem_nqn == "nqn.2026-11.io.nvme-mdev:subsys-mdev-vm1"
    assert s.namespaces == ()


def test_serve_keeps_its_subsystem_nqn() -> None:
    """`serve` derives the NQN from its serial: the default serial gives the old NQN."""
    from nvme_mdev.nvme.identity import ControllerConfig

    default = ControllerConfig()
    assert subsystem_nqn(default.serial) == default.subsystem_nqn


def test_controller_everything() -> None:
    s = ControllerSettings.from_params(
        {
            "name": "db-1",
            "socket": "s",
            "max_io_queues": 2,
            "queue_depth": 64,
            "mdts": 5,
            "serial": "S1",
            "model": "M",
            "poll_timeout_ms": 0,
            "iothread_cpu": "0-2,5",
            "mmap_doorbells": True,
            "io_engine": "sync",
            "namespace": [
                "a.img,ro",
                {
                    "spec": "b.img",
                    "nsid": 4,
                    "bs": 4096,
                    "offset": "1M",
                    "size": 8192,
                    "force": True,
                },
            ],
        }
    )
    c = s.config
    assert (c.max_io_queues, c.max_queue_entries, c.mdts, c.serial, c.model) == (
        2,
        64,
        5,
        "S1",
        "M",
    )
    assert (s.poll_timeout_ms, s.iothread_cpu, s.mmap_doorbells, s.io_engine) == (
        0,
        frozenset({0, 1, 2, 5}),
        True,
        "sync",
    )
    a, b = s.namespaces
    assert (a.spec.path, a.spec.readonly, a.nsid) == ("a.img", True, None)
    assert (b.spec.block_size, b.spec.offset, b.spec.size, b.spec.force, b.nsid) == (
        4096,
        1 << 20,
        8192,
        True,
        4,
    )
    assert ControllerSettings.from_params(
        {"name": "x", "socket": "s", "iothread_cpu": [3]}
    ).iothread_cpu == {3}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"socket": "s"}, "controller: name is required"),
        ({"name": "a b", "socket": "s"}, "name 'a b'"),
        ({"name": "a"}, "controller a: socket is required"),
        ({"name": "a", "socket": "s", "queues": 1}, "unknown key 'queues'"),
        ({"name": "a", "socket": "s", "max_io_queues": "4"}, "max_io_queues must be int"),
        ({"name": "a", "socket": "s", "mdts": True}, "mdts must be int"),
        ({"name": "a", "socket": "s", "max_io_queues": 65}, "max_io_queues must be 1..64"),
        ({"name": "a", "socket": "s", "serial": "x" * 21}, "serial"),
        ({"name": "a", "socket": "s", "poll_timeout_ms": -1}, "0 or more"),
        ({"name": "a", "socket": "s", "io_engine": "aio"}, "io_engine 'aio'"),
        ({"name": "a", "socket": "s", "iothread_cpu": "x"}, "expected CPUs"),
        ({"name": "a", "socket": "s", "iothread_cpu": [True]}, "iothread_cpu"),
        ({"name": "a", "socket": "s", "namespaces": "a.img"}, "namespaces must be a list"),
        (
            {"name": "a", "socket": "s", "namespaces": [{"nsid": 1}]},
            "namespace 1: spec is required",
        ),
        ({"name": "a", "socket": "s", "namespaces": ["a.img,bs=3"]}, "block size 3"),
    ],
)
def test_controller_refusals(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ControllerSettings.from_params(params)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"spec": "a", "size": "huge"}, "not a size"),
        ({"spec": "a", "offset": 1.5}, "offset must be bytes or a size"),
        ({"spec": "a", "offset": 100}, "not a multiple"),
        ({"spec": "a", "ro": "yes"}, "ro must be bool"),
        ({"spec": "a", "path": "b"}, "unknown key 'path'"),
    ],
)
def test_namespace_refusals(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NamespaceRequest.from_params(params, "ns")


def test_the_example_config_is_valid() -> None:
    vm1, vm2, vm3 = load_config(str(ROOT / "contrib" / "nvme-mdev.toml"))
    assert [n.spec.path for n in vm1.namespaces] == ["nvme0:n1p3", "/var/lib/images/data.img"]
    assert vm1.iothread_cpu == {11} and vm2.config.serial == "VM2DISK"
    assert (vm3.namespaces[0].spec.offset, vm3.namespaces[0].spec.size) == (200 << 30, 200 << 30)


def test_the_unit_file_runs_the_daemon() -> None:
    unit = (ROOT / "contrib" / "nvme-mdev.service").read_text()
    assert "Type=notify" in unit and "nvme-mdev daemon" in unit
    assert "--config /etc/nvme-mdev/nvme-mdev.toml" in unit
    # Supervised, with room in the fd store for the checkpoint (and its successor while
    # the older one is removed); systemd signals the supervisor alone, which stops its
    # worker, and kills whatever is left when the supervisor dies.
    assert "--supervised" in unit
    store = re.search(r"^FileDescriptorStoreMax=(\d+)$", unit, re.M)
    assert store is not None and int(store.group(1)) >= 2
    assert re.search(r"^KillMode=mixed$", unit, re.M)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("controller = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: write controllers as \[\[controller\]\]"):
        load_config(str(bad))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"spec": "a", "size": 10**30}, "too large"),
        ({"spec": "a", "offset": 1 << 63}, "too large"),
        ({"spec": "a", "offset": "8388607T", "size": "1T"}, "too large"),
        ({"spec": "null:1000000000000000000000000T"}, "too large"),
    ],
)
def test_namespace_sizes_are_bounded(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NamespaceRequest.from_params(params, "ns")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"poll_timeout_ms": 10**30}, "at most 3600000"),
        ({"poll_timeout_ms": 3_600_001}, "at most 3600000"),
        # (unbounded, this one was a set of 10^11 numbers: the daemon ran out of memory)
        ({"iothread_cpu": "0-99999999999"}, r"numbered 0\.\.8191"),
        ({"iothread_cpu": "8000-9000"}, r"numbered 0\.\.8191"),
    ],
    ids=["poll-huge", "poll-over-an-hour", "cpus-0-99999999999", "cpus-8000-9000"],
)
def test_controller_numbers_are_bounded(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ControllerSettings.from_params({"name": "a", "socket": "s", **params})
    assert (
        ControllerSettings.from_params(
            {"name": "a", "socket": "s", "poll_timeout_ms": 3_600_000}
        ).poll_timeout_ms
        == 3_600_000
    )


def test_a_config_file_with_a_namespace_too_large_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    path.write_text(
        '[[controller]]\nname = "vm1"\nsocket = "/run/vm1.sock"\n'
        '[[controller.namespace]]\nspec = "null:1000000000000000000000000T"\n'
    )
    with pytest.raises(ConfigError, match=r"big.toml: .*too large; give at most 8388607T"):
        load_config(str(path))


def test_rbd_namespaces_in_a_config_file(tmp_path: Path) -> None:
    """An rbd: image is a spec like any other: in a TOML file, over the control socket."""
    path = tmp_path / "rbd.toml"
    path.write_text(
        '[[controller]]\nname = "vm1"\nsocket = "/run/vm1.sock"\n'
        "[[controller.namespace]]\n"
        'spec = "rbd:vms/vm1,conf=/etc/ceph/ceph.conf,id=nvme,keyring=/etc/ceph/k"\n'
        "[[controller.namespace]]\n"
        'spec = "rbd:images/debian@v12"\n'
        "bs = 4096\n"
    )
    (vm1,) = load_config(str(path))
    disk, base = (n.spec for n in vm1.namespaces)
    assert (disk.rbd_options.client_id, disk.readonly) == ("nvme", False)
    assert (base.readonly, base.block_size, base.text()) == (
        True,
        4096,
        "rbd:images/debian@v12,ro,bs=4096",
    )
    ro = NamespaceRequest.from_params({"spec": "rbd:vms/vm1", "ro": True}, "ns").spec
    assert ro.readonly and ro.text() == "rbd:vms/vm1,ro"
    with pytest.raises(ConfigError, match="an rbd namespace is a whole image"):
        NamespaceRequest.from_params({"spec": "rbd:vms/vm1", "size": "1G"}, "ns")
    with pytest.raises(ConfigError, match="a read-only one takes none"):
        NamespaceRequest.from_params({"spec": "rbd:vms/vm1,break-lock", "ro": True}, "ns")


def test_the_cli_sends_the_daemon_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon does not share the client's working directory: relative files in a
    spec (an image; an rbd: image's conf= and keyring=) are made absolute first."""
    from nvme_mdev.cli import _absolute_spec

    monkeypatch.chdir(tmp_path)
    assert _absolute_spec("a.img,ro") == f"{tmp_path}/a.img,ro"
    assert _absolute_spec("null:1G") == "null:1G"
    assert _absolute_spec("rbd:p/i") == "rbd:p/i"
    assert _absolute_spec("rbd:p/i,conf=c.conf,id=vm,keyring=k/key,ro") == (
        f"rbd:p/i,conf={tmp_path}/c.conf,id=vm,keyring={tmp_path}/k/key,ro"
    )
    assert _absolute_spec("rbd:p/i,conf=/etc/ceph/ceph.conf") == "rbd:p/i,conf=/etc/ceph/ceph.conf"
