from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvme_mdev.config import ConfigError, NamespaceSpec, parse_size


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
