"""What the data plane tells the control side: events it queues and the control side
applies (the data plane's thread never writes controller state itself). Besides
these, the data plane's `notify()` also means "look": at the admin queue when its
mapped doorbell moved, and at the INTx level when MSI-X is off."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CommandFailed:
    """An I/O command completed with an error: one Error Information log entry."""

    sqid: int
    cid: int
    #: the Status Field as posted (with DNR)
    status: int
    nsid: int
    lba: int


@dataclass(frozen=True)
class StorageFailed:
    """A backend failure changed what a namespace is (media_errors.HostFailure)."""

    nsid: int
    #: the storage has gone: every later command fails at once
    gone: bool
    #: the storage went read-only: the namespace becomes write protected
    read_only: bool
    reason: str


@dataclass(frozen=True)
class InvalidDoorbell:
    """A trapped doorbell write the host got wrong: an Error asynchronous event."""

    #: Base 5.2 Figure 148: 0 Invalid Doorbell Register, 1 Invalid Doorbell Write Value
    info: int


@dataclass(frozen=True)
class Fatal:
    """The data plane cannot go on: Controller Fatal Status until the host resets."""

    reason: str


DataPlaneEvent = CommandFailed | StorageFailed | InvalidDoorbell | Fatal
