"""The kernel-log check every e2e guest goes through (live_guest.run_guest), without a
guest: the script wrapper run by bash here with a stand-in dmesg, and the filter on a
console."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from live_guest import assert_no_kernel_warnings, kernel_warnings, with_kernel_log

import guestvm

# What `dmesg --level=emerg,alert,crit,err,warn` printed in a guest whose controller
# reported CRTO.CRWMT below CAP.TO (the device at 0000:00:04.0).
DMESG = """\
[    0.412001] pci 0000:00:04.0: BAR 0 [mem 0xfebf0000-0xfebf3fff]: can't claim
[    0.412002] pci 0000:00:05.0: BAR 1: some other device
[    1.530000] nvme nvme0: bad crto:a0000 cap:80000200a0103ff
[    2.100000] nvme0n1: Read(0x2) @ LBA 8, 8 blocks, Namespace Not Ready (sct 0x0 / sc 0x82) DNR
[    2.100001] critical target error, dev nvme0n1, sector 8 op 0x0:(READ) flags 0x0
[    3.000000] EXT4-fs (vda): warning: mounting unchecked fs
[    3.100000] virtio_net virtio0: some warning
"""


def _console(dmesg: str, devices: str = " 0000:00:04.0") -> str:
    lines = [f"E2E-KERNEL-LOG-DEVICES:{devices}"]
    lines += [f"E2E-KERNEL-LOG: {line}" for line in dmesg.splitlines()]
    return "\r\n".join(["boot noise", *lines, "E2E-KERNEL-LOG-END", "GUESTVM-EXIT=0"])


def _result(status: int, output: str) -> guestvm.GuestResult:
    return guestvm.GuestResult(status=status, output=output, seconds=1.0)


def test_warnings_about_the_nvme_controller_are_found() -> None:
    found = kernel_warnings(_console(DMESG))
    assert found == [
        "[    0.412001] pci 0000:00:04.0: BAR 0 [mem 0xfebf0000-0xfebf3fff]: can't claim",
        "[    1.530000] nvme nvme0: bad crto:a0000 cap:80000200a0103ff",
        "[    2.100000] nvme0n1: Read(0x2) @ LBA 8, 8 blocks, Namespace Not Ready"
        " (sct 0x0 / sc 0x82) DNR",
        "[    2.100001] critical target error, dev nvme0n1, sector 8 op 0x0:(READ) flags 0x0",
    ]


def test_expected_warnings_are_left_out() -> None:
    found = kernel_warnings(_console(DMESG), [r"bad crto", r"\berror, dev nvme", r"@ LBA"])
    assert found == [
        "[    0.412001] pci 0000:00:04.0: BAR 0 [mem 0xfebf0000-0xfebf3fff]: can't claim"
    ]


def test_a_guest_with_warnings_fails_and_a_clean_one_passes() -> None:
    with pytest.raises(AssertionError, match="bad crto"):
        assert_no_kernel_warnings(_result(0, _console(DMESG)))
    assert_no_kernel_warnings(_result(0, _console("[ 1.0] virtio warn\n")))


def test_a_guest_that_never_printed_its_kernel_log() -> None:
    """Killed or out of time: not checked; but a script that ended must have printed it."""
    assert kernel_warnings("boot noise\r\n") is None
    assert_no_kernel_warnings(_result(-1, "boot noise"))
    with pytest.raises(AssertionError, match="no kernel log"):
        assert_no_kernel_warnings(_result(1, "boot noise"))


def test_the_wrapper_runs_the_script_then_prints_the_kernel_log(tmp_path: Path) -> None:
    """The script's output and exit status are its own, whatever it contains; the
    kernel log follows, however the script ended."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dmesg"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{DMESG}EOF\n")
    fake.chmod(0o755)
    script = (
        "set -e\necho \"in script: $GREETING $(pwd)\"\ncat <<'X'\n$literal 'quoted'\nX\nfalse\n"
    )
    run = subprocess.run(
        ["bash", "-c", with_kernel_log(script, tmp=str(tmp_path))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GREETING": "hello"},
        timeout=30,
    )
    assert run.returncode == 1, run.stderr
    assert f"in script: hello {tmp_path}" in run.stdout
    assert "$literal 'quoted'" in run.stdout
    found = kernel_warnings(run.stdout)
    assert (
        found is not None
        and "[    1.530000] nvme nvme0: bad crto:a0000 cap:80000200a0103ff" in found
    )
