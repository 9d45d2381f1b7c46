"""What the e2e tests that act on the host while a Linux guest runs share: a daemon
with its CLI, and a guest booted in the background whose console the test follows."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "guest"))

import guestvm  # noqa: E402

CLI = [sys.executable, "-m", "nvme_mdev.cli"]


class Daemon:
    """`nvme-mdev daemon` on `directory`/control.sock; on exit it must stop with 0."""

    def __init__(self, directory: Path) -> None:
        self.control = directory / "control.sock"
        self.log_path = directory / "daemon.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [*CLI, "daemon", "--control", str(self.control)],
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
    """A guest running `script` in a thread, its console written to `console`."""

    def __init__(self, script: str, sockets: Sequence[Path], console: Path) -> None:
        self.console = console
        self._results: list[guestvm.GuestResult] = []
        self._thread = threading.Thread(
            target=lambda: self._results.append(
                guestvm.run_guest(
                    script, sockets=[str(s) for s in sockets], timeout=600, log_path=console
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
        return result
