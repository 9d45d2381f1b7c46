"""Counters of one virtual controller: per queue, commands and bytes by opcode,
errors and a latency histogram (submission seen → completion posted); per
vector, interrupts sent; for the I/O thread, time polling and parked.

Counters only ever grow (across resets and queue re-creation too), as Prometheus
expects of counters. The I/O thread is their only writer on the hot path, and it
writes plain ints into preallocated lists: no allocation, no lock. Readers take
a snapshot that may be a few commands stale, which is all a monitor needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .nvme.spec import IoOpcode

#: latency buckets: bucket b counts latencies of [2**(b-1), 2**b) nanoseconds; one per
#: bit of a 64-bit count, so the bucket is bit_length() with no bounds check
LATENCY_BUCKETS = 65


#: the buckets Prometheus sees: 1 µs to 69 s (and +Inf)
EXPOSED_BUCKETS = range(10, 37)


def latency_bucket_bounds_ns() -> list[int]:
    """Upper bound (exclusive) of each exposed bucket, in nanoseconds."""
    return [1 << b for b in EXPOSED_BUCKETS]


class QueueStats:
    """One I/O submission queue's counters."""

    __slots__ = ("bytes", "commands", "errors", "latency", "latency_sum_ns", "qid")

    def __init__(self, qid: int) -> None:
        self.qid = qid
        self.commands = [0] * 256  # by opcode
        self.bytes = [0] * 256  # data moved, by opcode
        self.errors = 0  # completions with a non-zero status
        self.latency = [0] * LATENCY_BUCKETS
        self.latency_sum_ns = 0

    def record(self, opcode: int, nbytes: int, failed: bool, latency_ns: int) -> None:
        self.commands[opcode] += 1
        self.bytes[opcode] += nbytes
        if failed:
            self.errors += 1
        self.latency[latency_ns.bit_length()] += 1
        self.latency_sum_ns += latency_ns

    def snapshot(self) -> dict[str, Any]:
        by_opcode = {
            opcode_name(op): {"commands": n, "bytes": self.bytes[op]}
            for op, n in enumerate(self.commands)
            if n
        }
        return {
            "qid": self.qid,
            "commands": sum(self.commands),
            "errors": self.errors,
            "by_opcode": by_opcode,
            "latency_sum_ns": self.latency_sum_ns,
            # [upper bound ns, count] for the non-empty buckets
            "latency_histogram": [[1 << b, n] for b, n in enumerate(self.latency) if n],
        }


class ControllerStats:
    def __init__(self, max_queues: int, vectors: int) -> None:
        self.queues = [QueueStats(qid) for qid in range(max_queues + 1)]
        self.interrupts = [0] * vectors  # MSI-X messages sent (or set pending), by vector
        self.parked_ns = 0
        self.parks = 0
        self.doorbell_traps = 0  # doorbell writes that reached us as MMIO (not polled)

    def used_queues(self) -> Iterator[QueueStats]:
        return (q for q in self.queues if any(q.commands))

    def snapshot(self, polling_ns: int, parked_ns: int, host_io_errors: int) -> dict[str, Any]:
        """Everything as plain JSON types; the I/O thread's time split and the backend
        error count come from their owners."""
        return {
            "queues": [q.snapshot() for q in self.used_queues()],
            "interrupts": {str(v): n for v, n in enumerate(self.interrupts) if n},
            "io_thread": {
                "polling_s": polling_ns / 1e9,
                "parked_s": parked_ns / 1e9,
                "parks": self.parks,
            },
            "doorbell_traps": self.doorbell_traps,
            "host_io_errors": host_io_errors,
        }


def opcode_name(opcode: int) -> str:
    try:
        return IoOpcode(opcode).name.lower()
    except ValueError:
        return f"{opcode:#04x}"


def prometheus_text(controllers: dict[str, dict[str, Any]]) -> str:
    """Prometheus text exposition (format 0.0.4) of controller snapshots by name."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP nvme_mdev_{name} {help_text}")
        lines.append(f"# TYPE nvme_mdev_{name} {kind}")

    def sample(name: str, labels: dict[str, str], value: float) -> None:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"nvme_mdev_{name}{{{text}}} {value}")

    for name, key, help_text in (
        ("commands_total", "commands", "I/O commands completed, by queue and opcode."),
        ("bytes_total", "bytes", "Data moved by I/O commands, by queue and opcode."),
    ):
        family(name, "counter", help_text)
        for ctrl, snap in controllers.items():
            for q in snap["queues"]:
                for op, c in q["by_opcode"].items():
                    labels = {"controller": ctrl, "qid": str(q["qid"]), "opcode": op}
                    sample(name, labels, c[key])
    family("command_errors_total", "counter", "I/O commands completed with an error status.")
    for ctrl, snap in controllers.items():
        for q in snap["queues"]:
            sample("command_errors_total", {"controller": ctrl, "qid": str(q["qid"])}, q["errors"])
    family(
        "command_latency_seconds",
        "histogram",
        "Device-side latency, submission seen to completion posted.",
    )
    for ctrl, snap in controllers.items():
        for q in snap["queues"]:
            labels = {"controller": ctrl, "qid": str(q["qid"])}
            histogram = q["latency_histogram"]
            for bound in latency_bucket_bounds_ns():
                below = sum(n for upper, n in histogram if upper <= bound)
                le = {**labels, "le": f"{bound / 1e9:g}"}
                sample("command_latency_seconds_bucket", le, below)
            total = sum(n for _, n in histogram)
            sample("command_latency_seconds_bucket", {**labels, "le": "+Inf"}, total)
            sample("command_latency_seconds_sum", labels, q["latency_sum_ns"] / 1e9)
            sample("command_latency_seconds_count", labels, total)
    family("interrupts_total", "counter", "MSI-X interrupts sent, by vector.")
    for ctrl, snap in controllers.items():
        for vector, n in snap["interrupts"].items():
            sample("interrupts_total", {"controller": ctrl, "vector": vector}, n)
    family("io_thread_seconds_total", "counter", "I/O thread time, polling or parked.")
    for ctrl, snap in controllers.items():
        for state in ("polling", "parked"):
            sample(
                "io_thread_seconds_total",
                {"controller": ctrl, "state": state},
                snap["io_thread"][f"{state}_s"],
            )
    family("io_thread_parks_total", "counter", "Times the I/O thread parked.")
    for ctrl, snap in controllers.items():
        sample("io_thread_parks_total", {"controller": ctrl}, snap["io_thread"]["parks"])
    family("doorbell_traps_total", "counter", "Doorbell writes that trapped (were not polled).")
    for ctrl, snap in controllers.items():
        sample("doorbell_traps_total", {"controller": ctrl}, snap["doorbell_traps"])
    family(
        "host_io_errors_total",
        "counter",
        "Backend I/O errors (each failed its command; see nvme/media_errors.py).",
    )
    for ctrl, snap in controllers.items():
        sample("host_io_errors_total", {"controller": ctrl}, snap["host_io_errors"])
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def add_snapshots(carried: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """`now` with the counters of `carried` added: the last snapshot of a predecessor
    process (upgrade in place, crash recovery), so that counters still only grow."""
    if not carried:
        return now
    total = dict(now)
    earlier = {q["qid"]: q for q in carried.get("queues", [])}
    queues = [
        _add_queue(earlier.pop(q["qid"]), q) if q["qid"] in earlier else q for q in now["queues"]
    ]
    total["queues"] = sorted([*queues, *earlier.values()], key=lambda q: int(q["qid"]))
    total["interrupts"] = _add_counts(carried.get("interrupts", {}), now["interrupts"])
    total["io_thread"] = _add_counts(carried.get("io_thread", {}), now["io_thread"])
    for key in ("doorbell_traps", "host_io_errors", "direct_transfers", "slow_commands"):
        if key in now:
            total[key] = now[key] + carried.get(key, 0)
    return total


def _add_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {key: a.get(key, 0) + b.get(key, 0) for key in sorted(a.keys() | b.keys())}


def _add_queue(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    by_opcode = {}
    for name in sorted(a["by_opcode"].keys() | b["by_opcode"].keys()):
        x, y = a["by_opcode"].get(name, {}), b["by_opcode"].get(name, {})
        by_opcode[name] = _add_counts(x, y)
    histogram = dict(map(tuple, a["latency_histogram"]))
    for bound, n in b["latency_histogram"]:
        histogram[bound] = histogram.get(bound, 0) + n
    return {
        "qid": b["qid"],
        "commands": a["commands"] + b["commands"],
        "errors": a["errors"] + b["errors"],
        "by_opcode": by_opcode,
        "latency_sum_ns": a["latency_sum_ns"] + b["latency_sum_ns"],
        "latency_histogram": [[bound, histogram[bound]] for bound in sorted(histogram)],
    }
