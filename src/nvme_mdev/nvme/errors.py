"""The one way a command handler fails: raise CommandError with the status to post."""

from __future__ import annotations


class CommandError(Exception):
    """Completes the command with `status` (a Status Field value). Do Not Retry is the
    caller's: spec.with_dnr() decides unless `dnr` says; `lba` is what the Error
    Information log entry reports as the first LBA that failed; `result` is the
    completion's Dword 0 (a passthrough command's, from the host)."""

    def __init__(
        self,
        status: int,
        message: str = "",
        dnr: bool | None = None,
        lba: int = 0,
        result: int = 0,
    ) -> None:
        super().__init__(message or f"status {status:#05x}")
        self.status = status
        self.dnr = dnr
        self.lba = lba
        self.result = result


class ControllerFatal(Exception):
    """The controller cannot go on (Base 3.5.3 'Controller Fatal Status'): set CSTS.CFS."""
