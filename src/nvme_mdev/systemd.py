"""The two halves of systemd's service protocol that nvme-mdev speaks: sd_notify
(readiness, the main pid, the file descriptor store) and the fds a service gets at
start (LISTEN_FDS, with their names in LISTEN_FDNAMES). See sd_notify(3) and
sd_listen_fds(3); nothing here needs libsystemd."""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Sequence
from typing import Final

log = logging.getLogger(__name__)

#: the first fd systemd passes (SD_LISTEN_FDS_START)
LISTEN_FDS_START: Final = 3


def under_systemd() -> bool:
    """Whether a service manager listens for sd_notify messages."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(state: str, fds: Sequence[int] = ()) -> bool:
    """Send `state` (newline-separated assignments) to the service manager, with `fds`
    (for FDSTORE=1). False when not run by systemd (or it could not be told)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            if fds:
                rights = array.array("i", fds)
                sock.sendmsg([state.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            else:
                sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify: %s", exc)
        return False
    return True


def listen_fds() -> list[tuple[str, int]]:
    """The fds systemd passed to this process, with their names (once: the variables
    are removed, so that children do not take them for theirs). Each is close-on-exec."""
    pid, count, names = (
        os.environ.pop(v, "") for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    )
    if not (pid.isdigit() and count.isdigit()) or int(pid) != os.getpid():
        return []
    named = names.split(":")
    fds = []
    for i in range(int(count)):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        fds.append((named[i] if i < len(named) and named[i] else "unknown", fd))
    return fds
