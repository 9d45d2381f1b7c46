"""The one way a command handler fails: raise CommandError with the status to post."""

from __future__ import annotations


class CommandError(Exception):
    """Completes the command with `status` (a Status Field value, DNR added by the caller)."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or f"status {status:#05x}")
        self.status = status


class ControllerFatal(Exception):
    """The controller cannot go on (Base 3.5.3 'Controller Fatal Status'): set CSTS.CFS."""
