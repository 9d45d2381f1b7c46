"""The storage descriptors a successor process inherits (upgrade in place).

Namespaces hold open file descriptions that carry state no reopen would give back:
OFD write locks (storage.WriterLock), O_EXCL claims on block devices, and files that
were unlinked or replaced since they were opened. So every storage descriptor is
opened here, under a key (path, flags, tag): the process records what it holds, hands
it all over, and its successor's opens of the same keys take the inherited
descriptions instead of opening anew. Descriptors with one key are interchangeable
(the tag tells apart those that are not: a writer lock names its namespace).
"""

from __future__ import annotations

import os
import threading
from typing import Final

#: (path, open flags, tag)
Key = tuple[str, int, str]

_lock: Final = threading.Lock()
_held: dict[int, Key] = {}
_inherited: dict[Key, list[int]] = {}


def open_fd(path: str, flags: int, tag: str = "") -> int:
    """os.open(path, flags), or a description inherited under the same key."""
    key = (path, flags, tag)
    with _lock:
        pool = _inherited.get(key)
        fd = pool.pop() if pool else None
    if fd is None:
        fd = os.open(path, flags)
    with _lock:
        _held[fd] = key
    return fd


def close_fd(fd: int) -> None:
    with _lock:
        _held.pop(fd, None)
    os.close(fd)


def held() -> list[tuple[Key, int]]:
    """Every storage descriptor open now, with its key (for the state document)."""
    with _lock:
        return list((key, fd) for fd, key in _held.items())


def inherit(items: list[tuple[Key, int]]) -> None:
    """Descriptors a predecessor handed over, for open_fd() to take."""
    with _lock:
        for key, fd in items:
            _inherited.setdefault(key, []).append(fd)


def close_unclaimed() -> int:
    """Close inherited descriptors nothing took (a namespace the new process did not
    open again); returns how many."""
    with _lock:
        pools = list(_inherited.values())
        _inherited.clear()
    count = 0
    for pool in pools:
        for fd in pool:
            os.close(fd)
            count += 1
    return count
