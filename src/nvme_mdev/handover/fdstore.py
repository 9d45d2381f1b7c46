"""The supervisor's last checkpoint, kept in systemd's file descriptor store as well,
so that the supervisor itself may die: systemd kills what is left of the service and
starts it again with the stored fds, and the new supervisor recovers from the
checkpoint it finds there as it would after its worker's crash (supervisor.py).

systemd suppresses an fd whose open file description it holds already, keeping it under
the name it came with first, so the checkpoint's fds (mostly the same files, checkpoint
after checkpoint) cannot be stored one by one under names that say which is which.
Each checkpoint travels inside one new socket instead: a socket pair carries the document
(in a memfd) and its fds as unread messages, and its reading end alone goes to the store
as CHECKPOINT-G, G counting up, after which CHECKPOINT-(G-1) is removed. Fds in flight
live as long as the socket that holds them. systemd must not poll the stored socket
(FDPOLL=0): its writing end is closed, which reads as a hang-up.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, Final

from .. import systemd
from ..vfio_user.framing import close_fds
from .document import Channel, HandoverError

log = logging.getLogger(__name__)

CHECKPOINT: Final = "nvme-mdev-checkpoint-"


class CheckpointStore:
    """Keeps each new checkpoint in systemd's fd store, in place of the one before."""

    def __init__(self, generation: int = 0) -> None:
        self.generation = generation

    def keep(self, document: dict[str, Any], fds: list[int]) -> bool:
        """Store `document` with `fds` (an fd of -1: a place that needs none, kept by a
        stand-in). False if systemd could not be told (the old checkpoint stays)."""
        reader, writer = socket.socketpair()
        memfd = os.memfd_create("nvme-mdev-checkpoint", os.MFD_CLOEXEC)
        try:
            with open(os.dup(memfd), "wb") as out:
                out.write(json.dumps(document, separators=(",", ":")).encode())
            # The messages wait in the socket for the next supervisor: never block on them.
            writer.setblocking(False)
            Channel(writer).send(
                {"checkpoint": 0}, [memfd, *(memfd if fd < 0 else fd for fd in fds)]
            )
        except OSError as exc:
            log.error("supervisor: checkpoint not kept in systemd's fd store: %s", exc)
            return False
        finally:
            writer.close()
            os.close(memfd)
        with reader:
            name = f"{CHECKPOINT}{self.generation + 1}"
            if not systemd.notify(f"FDSTORE=1\nFDPOLL=0\nFDNAME={name}", [reader.fileno()]):
                return False
        self.generation += 1
        if self.generation > 1:
            systemd.notify(f"FDSTOREREMOVE=1\nFDNAME={CHECKPOINT}{self.generation - 1}")
        return True


def stored_checkpoint() -> tuple[CheckpointStore, tuple[dict[str, Any], list[int]] | None]:
    """The newest checkpoint among the fds systemd passed at start (none if it passed
    none), and a store that goes on counting from it. Other fds are closed."""
    checkpoints: dict[int, int] = {}
    for name, fd in systemd.listen_fds():
        number = name.removeprefix(CHECKPOINT)
        if name.startswith(CHECKPOINT) and number.isdigit():
            checkpoints[int(number)] = fd
        else:
            log.warning("supervisor: fd %d (%s) from systemd is not a checkpoint", fd, name)
            os.close(fd)
    if not checkpoints:
        return CheckpointStore(), None
    generation = max(checkpoints)
    fd = checkpoints.pop(generation)
    for older in checkpoints.values():  # (a supervisor died between storing and removing)
        os.close(older)
    channel = Channel(socket.socket(fileno=fd))
    try:
        _, fds = channel.receive(timeout=5)
    except HandoverError as exc:
        log.error("supervisor: the checkpoint in systemd's fd store is unreadable: %s", exc)
        return CheckpointStore(generation), None
    finally:
        channel.close()
    try:
        with open(os.dup(fds[0]), "rb") as f:
            f.seek(0)  # (the writer's offset: the file's end)
            document = json.loads(f.read())
    except (OSError, ValueError, IndexError) as exc:
        log.error("supervisor: the checkpoint in systemd's fd store is unreadable: %s", exc)
        close_fds(fds)
        return CheckpointStore(generation), None
    os.close(fds[0])
    return CheckpointStore(generation), (document, fds[1:])
