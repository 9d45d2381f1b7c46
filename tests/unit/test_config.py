from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvme_mdev.backends.rbd import Connection, RbdImage
from nvme_mdev.config import (
    MAX_BYTES,
    MAX_CPU,
    ConfigError,
    NamespaceSpec,
    RbdOptions,
    parse_cpu_list,
    parse_size,
)
from nvme_mdev.nvme.admin.identify import namespace_data


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        ("4K", 4096),
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("2GiB", 2 << 30),
        ("1t", 1 << 40),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1G", "1P", "12 34"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text)


def test_namespace_options() -> None:
    assert NamespaceSpec.parse("a.img") == NamespaceSpec("a.img", False, 512)
    assert NamespaceSpec.parse("a.img,ro,bs=4096") == NamespaceSpec("a.img", True, 4096)
    assert NamespaceSpec.parse("a.img", block_size=4096, readonly=True) == NamespaceSpec(
        "a.img", True, 4096
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (",ro", "empty path"),
        ("a,bs=1024", "block size 1024"),
        ("a,rw", "unknown option"),
        ("a,bs=x", "unknown option"),
        # found by tests/fuzz (namespace_spec): int() refused these with a ValueError
        ("a,bs=\u00b2", "unknown option"),
        ("a,bs=" + "1" * 5000, "unknown option"),
    ],
)
def test_namespace_spec_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NamespaceSpec.parse(text)


@given(st.text(max_size=40))
def test_parse_never_fails_with_anything_but_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        NamespaceSpec.parse(text)


def test_open_file_and_null(tmp_path: Path) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(bytes(8192 + 100))
    ns = NamespaceSpec.parse(f"{image},ro,bs=4096").open(3)
    assert (ns.nsid, ns.blocks, ns.readonly, ns.block_size) == (3, 2, True, 4096)
    ns.backend.close()
    null = NamespaceSpec.parse("null:1G").open(1)
    assert null.blocks == (1 << 30) // 512


def test_open_too_small(tmp_path: Path) -> None:
    image = tmp_path / "tiny.img"
    image.write_bytes(bytes(100))
    with pytest.raises(ConfigError, match="smaller than one block"):
        NamespaceSpec.parse(str(image)).open(1)


def test_direct_option() -> None:
    assert NamespaceSpec.parse("a.img").direct is None  # block devices yes, files no
    on, off = NamespaceSpec.parse("a.img,direct=on"), NamespaceSpec.parse("a.img,direct=off")
    assert (on.direct, off.direct) == (True, False)
    assert NamespaceSpec.parse(on.text()) == on and NamespaceSpec.parse(off.text()) == off
    with pytest.raises(ConfigError, match=r"unknown option .direct=yes.*direct=on\|off"):
        NamespaceSpec.parse("a.img,direct=yes")


def test_window_and_force_options() -> None:
    spec = NamespaceSpec.parse("/dev/sdb,offset=1G,size=2G,force,ro")
    assert (spec.offset, spec.size, spec.force, spec.readonly) == (1 << 30, 2 << 30, True, True)
    assert NamespaceSpec.parse("a.img,length=4K").size == 4096
    assert not NamespaceSpec.parse("a.img").windowed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,offset=100", "offset 100 is not a multiple of the 512-byte block size"),
        ("a,offset=512,bs=4096", "not a multiple of the 4096-byte"),
        ("a,size=0", "size > 0"),
        ("a,offset=x", "not a size"),
        ("a,offset=", "unknown option"),
        ("null:1G,size=1M", "a null namespace has no window"),
    ],
)
def test_window_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NamespaceSpec.parse(text)


def test_open_a_window(tmp_path: Path) -> None:
    image = tmp_path / "w.img"
    image.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    ns = NamespaceSpec.parse(f"{image},offset=4K,size=8K").open(1)
    try:
        assert ns.blocks == 16
        buf = bytearray(512)
        ns.backend.readv(512, [memoryview(buf)])
        assert bytes(buf) == (bytes(range(256)) * 64)[4096 + 512 : 4096 + 1024]
        assert "offset=4096,size=8192" in ns.backend.description
    finally:
        ns.backend.close()
    with pytest.raises(ConfigError, match="reaches past the end"):
        NamespaceSpec.parse(f"{image},offset=8K,size=16K").open(1)


@pytest.mark.parametrize(
    ("text", "size"),
    [("8388607T", 8388607 << 40), ("9223372036854775807", MAX_BYTES), ("0" * 100 + "1K", 1024)],
)
def test_parse_size_up_to_the_largest_file_offset(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["8388608T", "9223372036854775808", "1000000000000000000000000T", "9" * 5000]
)
def test_parse_size_refuses_what_no_file_can_hold(text: str) -> None:
    with pytest.raises(ConfigError, match=r"too large; give at most 8388607T") as refused:
        parse_size(text)
    assert len(str(refused.value)) < 200  # one short line, however long the number


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("null:1000000000000000000000000T", r"null:SIZE: .* too large; give at most 8388607T"),
        ("null:8388608T", "too large"),
        ("null:" + "9" * 5000, "too large"),
        ("a.img,size=9223372036854775808", "too large"),
        ("a.img,offset=8388607T,size=1T", r"offset \+ size is too large"),
        ("a.img,offset=4T,size=8388604T", r"offset \+ size is too large"),
        ("null:x", "not a size"),  # refused when parsed, not later when opened
    ],
)
def test_sizes_nvme_and_files_cannot_hold_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NamespaceSpec.parse(text)


def test_the_largest_null_namespace_is_identified() -> None:
    """The largest size taken still fits what the guest is told (NSZE is 64 bits)."""
    ns = NamespaceSpec.parse(f"null:{MAX_BYTES >> 40}T").open(1)
    nsze, ncap, nuse = struct.unpack_from("<QQQ", namespace_data(ns, 1 << 20))
    assert nsze == ncap == nuse == ns.blocks == (MAX_BYTES >> 40 << 40) // 512


@pytest.mark.parametrize("text", ["8000-9000", "8192", "0-99999999999"])
def test_cpu_lists_are_bounded(text: str) -> None:
    with pytest.raises(ConfigError, match=r"CPUs are numbered 0\.\.8191"):
        parse_cpu_list(text)
    assert parse_cpu_list("8191") == {MAX_CPU}


# --- Ceph RBD images (backends/rbd.py; tests/integration/test_rbd_namespace.py opens them)


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("rbd:rbd/vm1", "rbd:rbd/vm1"),
        ("rbd:rbd/vm1,ro", "rbd:rbd/vm1,ro"),
        ("rbd:rbd/vm1@gold", "rbd:rbd/vm1@gold,ro"),  # a snapshot is always read-only
        (
            "rbd:pool/img,conf=/etc/ceph/other.conf,id=vm,keyring=/k,bs=4096,create=10G",
            "rbd:pool/img,bs=4096,conf=/etc/ceph/other.conf,id=vm,keyring=/k,create=10G",
        ),
        (
            "rbd:p/vm7,clone=base/debian@v12,break-lock",
            "rbd:p/vm7,clone=base/debian@v12,break-lock",
        ),
    ],
)
def test_rbd_specs_round_trip(text: str, written: str) -> None:
    spec = NamespaceSpec.parse(text)
    assert spec.is_rbd and spec.text() == written
    assert NamespaceSpec.parse(spec.text()) == spec


def test_rbd_spec_fields() -> None:
    spec = NamespaceSpec.parse("rbd:p/img,conf=c.conf,id=client.vm,keyring=k,create=1G,break-lock")
    assert str(spec.rbd_image()) == "p/img" and spec.rbd_image().snapshot is None
    options = spec.rbd_options
    assert (options.create, options.break_lock, spec.readonly) == (1 << 30, True, False)
    assert options.connection == Connection("c.conf", "client.vm", "k")
    # The defaults: librados' search for ceph.conf, client.admin, the conf's keyring
    assert NamespaceSpec.parse("rbd:p/i").rbd_options.connection == Connection(None, "admin")
    snap = NamespaceSpec.parse("rbd:p/img@s1")
    assert (snap.readonly, snap.rbd_image().snapshot) == (True, "s1")
    clone = NamespaceSpec.parse("rbd:p/vm,clone=q/base@gold")
    assert clone.rbd_clone() == RbdImage("q", "base", "gold")
    assert NamespaceSpec.parse("a.img").rbd is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rbd:pool", r"'rbd:pool': expected POOL/IMAGE .*write rbd:POOL/IMAGE\[@SNAP\]"),
        ("rbd:/img", "expected POOL/IMAGE"),
        ("rbd:p/", "expected POOL/IMAGE"),
        ("rbd:p/i@", "an empty snapshot name"),
        ("rbd:p/i/x", "no '/' or '@'"),
        ("rbd:p/i,offset=1G", "an rbd namespace is a whole image; leave out offset=/size="),
        ("rbd:p/i,size=1G", "leave out offset=/size="),
        ("rbd:p/i,force", "leave out force"),
        ("rbd:p/i,direct=on", "leave out direct="),
        ("rbd:p/i,passthrough", "leave out passthrough"),
        ("rbd:p/i,create=1G,clone=p/b@s", "create=SIZE or clone=POOL/IMAGE@SNAP, not both"),
        ("rbd:p/i@s,create=1G", "makes an image, not a snapshot"),
        ("rbd:p/i,ro,clone=p/b@s", "clone= makes a new image to write; leave out ro"),
        ("rbd:p/i,ro,break-lock", "a read-only one takes none"),
        ("rbd:p/i@s,break-lock", "a read-only one takes none"),
        ("rbd:p/i,clone=p/b", r"clone=p/b: a clone is made from a snapshot \(write clone=POOL"),
        ("rbd:p/i,clone=b@s", "clone=b@s: expected POOL/IMAGE"),
        ("rbd:p/i,create=100", "create=100: smaller than one 512-byte block"),
        ("rbd:p/i,create=1X", "create='1X': not a size"),
        ("rbd:p/i,create=9000000T", "too large"),
        ("rbd:p/i,conf=", "give conf=FILE"),
        ("rbd:p/i,id=", "give id=CLIENT"),
        ("rbd:p/i,break-lock=yes", "break-lock takes no value"),
        ("rbd:p/i,offset", r"unknown option 'offset' \(known for rbd: ro, bs=512\|4096, conf="),
        ("a.img,conf=ceph.conf", r"conf is an option of rbd:POOL/IMAGE\[@SNAP\] namespaces only"),
        ("/dev/sdb,break-lock", "break-lock is an option of rbd:"),
        ("a.img,creat=1G", "unknown option 'creat=1G'.*for rbd:POOL/IMAGE.*create="),
    ],
)
def test_rbd_spec_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        NamespaceSpec.parse(text)
    assert "\n" not in str(caught.value)


def test_rbd_options_on_another_spec_are_refused() -> None:
    with pytest.raises(ConfigError, match="options of rbd:POOL/IMAGE"):
        NamespaceSpec("a.img", rbd=RbdOptions(conf="x")).checked()


def test_without_librbd_an_rbd_namespace_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The package does not need librbd: it is loaded when an rbd: namespace opens."""
    from nvme_mdev.backends import rbd
    from nvme_mdev.storage import HostStorage

    monkeypatch.setattr(rbd, "_libraries", None)
    monkeypatch.setattr(rbd, "LIBRARIES", {"rados": "libnot-rados.so.0", "rbd": "libnot-rbd.so.0"})
    monkeypatch.setattr(rbd.ctypes.util, "find_library", lambda name: None)
    expected = "rbd:p/i: librbd is not installed (Debian: apt-get install librbd1)"
    with pytest.raises(ConfigError) as caught:
        NamespaceSpec.parse("rbd:p/i").open(1)
    assert str(caught.value) == expected
    with pytest.raises(ConfigError) as caught:
        HostStorage().open(NamespaceSpec.parse("rbd:p/i,ro"), 1, "test")
    assert str(caught.value) == expected
