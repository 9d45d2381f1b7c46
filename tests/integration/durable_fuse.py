"""A FUSE filesystem that knows what a power cut would leave of each file: what was
written to it (what reads return), and what of that was made durable. The crash
consistency tests (test_durability.py) run it as a process of their own:

    python durable_fuse.py MOUNTPOINT

mount a namespace's image file on it, and drive it through its standard input and
output: one JSON request a line, one JSON answer a line, followed by `size` raw bytes
where the answer has a size (see `serve`).

What makes data durable is what the kernel tells a FUSE filesystem (fs/fuse/file.c):

- a FUSE_WRITE whose flags (fuse_write_in.flags, which libfuse hands to the write as
  its fuse_file_info.flags) have O_DSYNC: the kernel sets it there for a write with
  RWF_DSYNC or RWF_SYNC, and on a descriptor opened O_DSYNC or O_SYNC (fuse_write_flags:
  the file's f_flags, plus O_DSYNC when iocb_is_dsync()). That write's bytes are
  durable when it is answered, and only they;
- a FUSE_FSYNC (fsync or fdatasync of any descriptor of the file, io_uring's FSYNC
  too): everything written to the file before it.

Nothing else: not FUSE_FLUSH (sent by close) nor FUSE_RELEASE, and not a write through
an O_DIRECT descriptor (on a real disk it may sit in the drive's volatile cache).

The kernel's page cache is kept out of the way, so that it can neither hide a write
from this process nor answer a read from data this process has forgotten: every open
is answered with direct_io (FOPEN_DIRECT_IO: each read and write goes to the
filesystem when it is made) and the writeback cache is refused (a write handed over
later by the kernel with FUSE_WRITE_CACHE would be counted in `writepage_writes`).

A power cut (`powercut`) forgets what was not durable: `written` becomes `durable`.
Only data is modelled: a file's creation and size are durable at once.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

# mfusepy takes libfuse 2 if it finds it first; the structures it lays out differ.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy

#: fuse_common.h
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
#: the exit status when the filesystem could not be mounted (the tests skip then)
MOUNT_REFUSED = 3


@dataclass
class File:
    #: what reads return: every write, durable or not
    written: bytearray = field(default_factory=bytearray)
    #: what a power cut leaves
    durable: bytearray = field(default_factory=bytearray)
    #: what the kernel sent, for the tests' messages
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "writes": 0,
            "dsync_writes": 0,
            "direct_writes": 0,
            "writepage_writes": 0,
            "fsyncs": 0,
            "fdatasyncs": 0,
            "flushes": 0,
            "opens": 0,
            "dsync_opens": 0,
            "direct_opens": 0,
            "powercuts": 0,
        }
    )

    def resize(self, size: int) -> None:
        for data in (self.written, self.durable):
            if size < len(data):
                del data[size:]
            else:
                data.extend(bytes(size - len(data)))


class DurableFs(mfusepy.Operations):
    use_ns = True

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, File] = {}
        self.ready = threading.Event()
        self.want_writeback_cache = False
        self.now = time.time_ns()

    # --- what the kernel asks -------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            self.want_writeback_cache = bool(conn.want & FUSE_CAP_WRITEBACK_CACHE)
            conn.want &= ~FUSE_CAP_WRITEBACK_CACHE
        if config is not None:
            config.direct_io = 1
            config.attr_timeout = 0.0
            config.entry_timeout = 0.0
        self.ready.set()

    def _file(self, path: str) -> File:
        f = self.files.get(path)
        if f is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return f

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        common = {"st_atime": self.now, "st_mtime": self.now, "st_ctime": self.now}
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **common}
        with self.lock:
            f = self._file(path)
            size = len(f.written)
        return {
            "st_mode": stat.S_IFREG | 0o644,
            "st_nlink": 1,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_blksize": 4096,
            **common,
        }

    def readdir(self, path: str, fh: Any) -> list[str]:
        with self.lock:
            return [".", "..", *(p.lstrip("/") for p in self.files)]

    def statfs(self, path: str) -> dict[str, int]:
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": 1 << 20,
            "f_bfree": 1 << 19,
            "f_bavail": 1 << 19,
            "f_namemax": 255,
        }

    def _opened(self, f: File, fi: Any) -> None:
        f.stats["opens"] += 1
        f.stats["dsync_opens"] += bool(fi.flags & os.O_DSYNC)
        f.stats["direct_opens"] += bool(fi.flags & os.O_DIRECT)
        fi.direct_io = 1  # past the kernel's page cache, both ways
        fi.keep_cache = 0

    def create(self, path: str, mode: int, fi: Any) -> int:
        with self.lock:
            if path in self.files:
                raise mfusepy.FuseOSError(errno.EEXIST)
            f = self.files[path] = File()
            self._opened(f, fi)
        return 0

    def open(self, path: str, fi: Any) -> int:
        with self.lock:
            f = self._file(path)
            if fi.flags & os.O_TRUNC:  # (libfuse 3 asks for atomic O_TRUNC)
                f.resize(0)
            self._opened(f, fi)
        return 0

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        with self.lock:
            self._file(path).resize(length)
        return 0

    def unlink(self, path: str) -> int:
        with self.lock:
            self._file(path)
            del self.files[path]
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        with self.lock:
            return bytes(self._file(path).written[offset : offset + size])

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        end = offset + len(data)
        with self.lock:
            f = self._file(path)
            if end > len(f.written):
                f.resize(end)
            f.written[offset:end] = data
            f.stats["writes"] += 1
            f.stats["direct_writes"] += bool(fi.flags & os.O_DIRECT)
            f.stats["writepage_writes"] += fi.writepage
            if fi.flags & os.O_DSYNC:  # RWF_DSYNC, RWF_SYNC, O_DSYNC, O_SYNC
                f.durable[offset:end] = data
                f.stats["dsync_writes"] += 1
        return len(data)

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        with self.lock:
            f = self._file(path)
            f.durable[:] = f.written
            f.stats["fdatasyncs" if datasync else "fsyncs"] += 1
        return 0

    def flush(self, path: str, fh: Any) -> int:
        with self.lock:
            if path in self.files:
                self.files[path].stats["flushes"] += 1
        return 0

    def release(self, path: str, fh: Any) -> int:
        return 0

    # --- what the test asks ---------------------------------------------------------

    def answer(self, request: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        op = request["op"]
        with self.lock:
            if op == "hello":
                return {"writeback_cache_offered": self.want_writeback_cache}, b""
            f = self.files.get("/" + request["name"])
            if f is None:
                return {"error": f"no file {request['name']!r}"}, b""
            if op == "written":
                data = bytes(f.written)
            elif op == "durable":
                data = bytes(f.durable)
            elif op == "powercut":
                f.written[:] = f.durable
                f.stats["powercuts"] += 1
                data = bytes(f.durable)
            elif op == "stats":
                data = b""
            else:
                return {"error": f"unknown op {op!r}"}, b""
            return {"size": len(data), "stats": dict(f.stats)}, data


def serve(fs: DurableFs, mountpoint: str) -> None:
    """Answer the test on stdin/stdout until it closes stdin; then unmount, which ends
    the FUSE loop."""
    out = sys.stdout.buffer
    fs.ready.wait()
    out.write(json.dumps({"ready": True}).encode() + b"\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            answer, data = fs.answer(json.loads(line))
        except Exception as exc:
            answer, data = {"error": repr(exc)}, b""
        out.write(json.dumps(answer).encode() + b"\n" + data)
        out.flush()
    subprocess.run(["umount", "-l", mountpoint], check=False)


def main() -> int:
    mountpoint = sys.argv[1]
    fs = DurableFs()
    threading.Thread(target=serve, args=(fs, mountpoint), daemon=True).start()
    try:
        mfusepy.FUSE(
            fs,
            mountpoint,
            raw_fi=True,
            foreground=True,
            nothreads=True,
            fsname="nvme-mdev-durable",
            direct_io=True,
        )
    except Exception as exc:
        mounted = fs.ready.is_set()
        print(f"durable_fuse: {mountpoint}: {exc!r}", file=sys.stderr)
        return 1 if mounted else MOUNT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
