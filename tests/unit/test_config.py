from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvme_mdev.config import (
    MAX_BYTES,
    MAX_CPU,
    ConfigError,
    NamespaceSpec,
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
