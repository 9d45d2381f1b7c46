"""What the e2e tests share: `run_guest`, which every guest of these tests boots
through and which fails the test on any warning the guest's kernel logged about an
NVMe controller (a guest-visible warning is a failure); a daemon with its CLI; and a
guest booted in the background whose console the test follows."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "guest"))

import guestvm  # noqa: E402

CLI = [sys.executable, "-m", "nvme_mdev.cli"]

#: Marks the lines of the guest's kernel log that the guest prints after the test's
#: script (the console also carries kernel messages as they happen, without levels).
KERNEL_LOG = "E2E-KERNEL-LOG:"
KERNEL_LOG_DEVICES = "E2E-KERNEL-LOG-DEVICES:"
KERNEL_LOG_UNREADABLE = "E2E-KERNEL-LOG-UNREADABLE"
KERNEL_LOG_END = "E2E-KERNEL-LOG-END"
_SCRIPT_END = "E2E_SCRIPT_END_OF_TEXT"

# The test's script runs as it would alone (a child bash with the same environment
# and working directory); then, however it ended, the guest prints the PCI functions of
# class 010802h (NVMe) and every kernel message of level warning or above.
_EPILOGUE = rf"""
/bin/bash "$e2e_tmp/e2e-script.sh"
status=$?
functions=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/class" 2>/dev/null)" = 0x010802 ] && functions="$functions ${{d##*/}}"
done
echo "{KERNEL_LOG_DEVICES}$functions"
dmesg --color=never --level=emerg,alert,crit,err,warn >"$e2e_tmp/e2e-kernel-log" ||
    echo "{KERNEL_LOG_UNREADABLE}"
sed 's/^/{KERNEL_LOG} /' "$e2e_tmp/e2e-kernel-log"
echo "{KERNEL_LOG_END}"
exit $status
"""

#: What makes a kernel message one about an NVMe controller (after the timestamp): the
#: nvme driver's messages on the controller (`nvme nvme0: ...`) and on its namespaces
#: (`nvme0n1: Read(0x2) @ LBA ...`), its module-wide ones (`nvme: ...`), and the block
#: layer's about a namespace (`I/O error, dev nvme0n1, ...`). Messages naming the PCI
#: address of an NVMe function (`pci 0000:00:04.0: ...`, `nvme 0000:00:04.0: ...`) are
#: added per guest.
ABOUT_NVME = [
    r"\bnvme nvme\d+:",
    r"^(\[[^\]]*\]\s*)?nvme\d+(c\d+)?n\d+:",
    r"^(\[[^\]]*\]\s*)?nvme(_core)?:",
    r"\bdev nvme\d",
]


def with_kernel_log(script: str, tmp: str = "/tmp") -> str:
    """`script`, followed by the report of the kernel's warnings that `kernel_warnings`
    reads; its files go to `tmp`."""
    assert _SCRIPT_END not in script
    return (
        f"e2e_tmp={shlex.quote(tmp)}\n"
        f"cat >\"$e2e_tmp/e2e-script.sh\" <<'{_SCRIPT_END}'\n{script}\n{_SCRIPT_END}\n{_EPILOGUE}"
    )


def _after(line: str, marker: str) -> str | None:
    at = line.find(marker)
    return None if at < 0 else line[at + len(marker) :].strip()


def kernel_warnings(output: str, expected: Iterable[str] = ()) -> list[str] | None:
    """The kernel messages of level warning or above about an NVMe controller (see
    ABOUT_NVME) in the console of a guest that ran `with_kernel_log(...)`, less those
    matching a regular expression in `expected`. None if the guest never printed its
    kernel log (it did not get that far)."""
    if KERNEL_LOG_END not in output:
        return None
    assert KERNEL_LOG_UNREADABLE not in output, "the guest could not read its kernel log"
    addresses: list[str] = []
    messages: list[str] = []
    for line in output.splitlines():
        devices = _after(line, KERNEL_LOG_DEVICES)
        message = _after(line, KERNEL_LOG) if devices is None else None
        if devices is not None:
            addresses = devices.split()
        elif message is not None:
            messages.append(message)
    ours = re.compile("|".join([*ABOUT_NVME, *(re.escape(a) + ":" for a in addresses)]))
    allowed = [re.compile(pattern) for pattern in expected]
    return [m for m in messages if ours.search(m) and not any(a.search(m) for a in allowed)]


def assert_no_kernel_warnings(result: guestvm.GuestResult, expected: Iterable[str] = ()) -> None:
    """The guest logged no warning about an NVMe controller (see kernel_warnings). A
    guest that never reported a status (killed, or out of time) is not checked; one
    that did must have printed its kernel log."""
    warnings = kernel_warnings(result.output, expected)
    if result.status == -1 and warnings is None:
        return
    assert warnings is not None, "the guest printed no kernel log after its script"
    assert not warnings, "the guest's kernel warned about an NVMe controller:\n" + "\n".join(
        warnings
    )


def run_guest(
    script: str, *, expected_kernel_warnings: Iterable[str] = (), **kwargs: Any
) -> guestvm.GuestResult:
    """guestvm.run_guest for a test: the console is printed, and the test fails if the
    guest's kernel warned about an NVMe controller (less `expected_kernel_warnings`,
    regular expressions, for a test that provokes them)."""
    result = guestvm.run_guest(with_kernel_log(script), **kwargs)
    print(result.output)
    assert_no_kernel_warnings(result, expected_kernel_warnings)
    return result


class Daemon:
    """`nvme-mdev daemon` on `directory`/control.sock, with more `options`; on exit it
    must stop with 0."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.control = directory / "control.sock"
        self.log_path = directory / "daemon.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [*CLI, "daemon", "--control", str(self.control), *options],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        for _ in range(500):
            if self.control.exists() or self.proc.poll() is not None:
                break
            time.sleep(0.02)

    def cli(self, *args: str) -> str:
        """A CLI command against this daemon; its output (it must succeed)."""
        result = subprocess.run(
            [*CLI, *args, "--control", str(self.control)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr + self.log_path.read_text()
        return result.stdout

    def __enter__(self) -> Daemon:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        assert self.proc.wait(30) == 0


class BackgroundGuest:
    """A guest running `script` in a thread, its console written to `console`;
    result() fails on the kernel warnings run_guest fails on."""

    def __init__(
        self,
        script: str,
        sockets: Sequence[Path],
        console: Path,
        expected_kernel_warnings: Iterable[str] = (),
    ) -> None:
        self.console = console
        self.expected_kernel_warnings = list(expected_kernel_warnings)
        self._results: list[guestvm.GuestResult] = []
        self._thread = threading.Thread(
            target=lambda: self._results.append(
                guestvm.run_guest(
                    with_kernel_log(script),
                    sockets=[str(s) for s in sockets],
                    timeout=600,
                    log_path=console,
                )
            )
        )
        self._thread.start()

    def wait_for(self, marker: str, limit: float = 600) -> None:
        """Until the guest prints `marker` (or gives up: the assertion says which)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and self._thread.is_alive():
            if self.console.exists() and marker in self.console.read_text(errors="replace"):
                return
            time.sleep(0.2)
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        assert marker in text, f"the guest never printed {marker}:\n{text}"

    def join(self) -> None:
        self._thread.join(660)

    def result(self) -> guestvm.GuestResult:
        """What the guest ended with (after join()); its output is printed."""
        (result,) = self._results
        print(result.output)
        assert_no_kernel_warnings(result, self.expected_kernel_warnings)
        return result
