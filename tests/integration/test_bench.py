"""`nvme-mdev bench` in its quick mode: every row is there, and the device really did
the I/O (its own counters agree with the client, and its writes are on the file); with
--rbd, on an RBD image of the session's one-node Ceph cluster, as scripts/bench-rbd.sh
runs it. Nothing here asserts a speed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from nvme_mdev import bench, cli
from nvme_mdev.backends import uring
from nvme_mdev.bench import BACKENDS, BLOCK, FIO_WRITE_PATTERN, WORKLOADS, WRITE_PATTERN
from nvme_mdev.config import NamespaceSpec
from nvme_mdev.nvme_host import NvmeHost, need_event, read_write
from nvme_mdev.virtual_controller import VirtualController

if TYPE_CHECKING:
    from ceph_cluster import CephCluster

ROOT = Path(__file__).resolve().parents[2]


def _rows(table: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """The table's rows by (workload, backend, target), each {column: cell}."""
    rows = {}
    header: list[str] = []
    for line in table.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == "workload":
            header = cells
        elif cells[0] in {w.name for w in WORKLOADS}:
            rows[(cells[0], cells[1], cells[2])] = dict(zip(header, cells, strict=False))
    return rows


def test_quick_bench_runs_every_cell_through_the_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, report_path = tmp_path / "bench.img", tmp_path / "bench.json"
    argv = ["bench", "--quick", "--seconds", "0.1", "--size", "4M", "--file", str(image)]
    assert cli.main([*argv, "--json", str(report_path)]) == 0
    table = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    results = {(r["workload"], r["backend"], r["target"]): r for r in report["results"]}
    rows = _rows(table)
    fio = shutil.which("fio") is not None
    engines = ["sync"] if uring.unavailable() else ["sync", "uring"]
    for backend in BACKENDS:
        natives = ["fio-io_uring", "fio-psync"] if backend == "file" else ["fio-null"]
        devices = [f"nvme-mdev/{e}" for e in (engines if backend == "file" else engines[:1])]
        for w in WORKLOADS:
            for device in devices:
                r = results[(w.name, backend, device)]
                assert r["error"] is None and r["ios"] > 0 and r["iops"] > 0
                # The device's own SMART counters saw exactly the I/Os the client completed.
                assert r["device_commands"] == r["ios"]
                assert r["device_cpu_us"] > 0 and r["client_cpu_us"] > 0
                assert rows[(w.name, backend, device)]["IOPS"].replace(",", "").isdigit()
            for target in natives if fio else []:
                native = results[(w.name, backend, target)]
                assert (w.name, backend, target) in rows
                if target == "fio-io_uring" and native["error"]:
                    continue  # a kernel without io_uring: the row says so
                assert native["error"] is None and native["iops"] > 0
                if target == natives[0]:  # the reference: the device's rows have a ratio
                    for device in devices:
                        assert results[(w.name, backend, device)]["ratio"] > 0
                        assert rows[(w.name, backend, device)]["vs native"].endswith("x")
    if len(engines) > 1:
        assert "I/O engines, randread-4k-qd32, file: uring" in table
    if not fio:
        assert "not found" in table
    # Only the device writes this pattern (the file starts random, fio writes its own).
    data = image.read_bytes()
    written = sum(
        data[off : off + len(WRITE_PATTERN)] == WRITE_PATTERN
        for off in range(0, len(data), len(WRITE_PATTERN))
    )
    assert written > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="--cold drops the page cache: root only")
def test_cold_bench_drops_the_page_cache_before_every_file_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    drops: list[int] = []
    real = bench.drop_page_cache

    def counted() -> None:
        real()
        drops.append(1)

    monkeypatch.setattr(bench, "drop_page_cache", counted)
    argv = ["bench", "--quick", "--seconds", "0.1", "--size", "4M", "--cold"]
    argv += ["--workloads", "randread-4k-qd32", "--file", str(tmp_path / "cold.img")]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "page cache dropped before every cell" in table
    file_rows = [key for key in _rows(table) if key[1] == "file"]
    assert len(drops) == len(file_rows) > 0  # fio's rows and each engine's


def test_without_fio_the_bench_says_so_and_runs_the_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--quick", "--seconds", "0.1", "--size", "1M", "--fio", str(tmp_path / "no")]
    assert cli.main([*argv, "--backends", "null", "--workloads", "randread-4k-qd32"]) == 0
    table = capsys.readouterr().out
    assert sum("not found" in line for line in table.splitlines()) == 1
    engine = "sync"  # the first of the default engines
    assert list(_rows(table)) == [("randread-4k-qd32", "null", f"nvme-mdev/{engine}")]


def _bench_rbd() -> ModuleType:
    """tools/bench_rbd.py (scripts/bench-rbd.sh), loaded from its path: tools/ is no
    package."""
    spec = importlib.util.spec_from_file_location("bench_rbd", ROOT / "tools" / "bench_rbd.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("fio") is None, reason="the rbd rows need fio")
def test_rbd_bench_runs_the_device_and_fio_on_one_image(
    ceph_cluster: CephCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, size = "bench-rbd", 8 << 20
    report_path = tmp_path / "rbd.json"
    argv = ["--quick", "--seconds", "0.2", "--size", str(size), "--json", str(report_path)]
    assert _bench_rbd().bench_on(ceph_cluster, argv, image) == 0
    table = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    name = f"{ceph_cluster.pool}/{image}"
    assert report["settings"]["rbd"] == name and f"RBD image {name}" in table
    results = {(r["workload"], r["backend"], r["target"]): r for r in report["results"]}
    rows = _rows(table)
    # Each workload, both sides, and nothing else: rbd alone, as --rbd asks by default.
    expected = {(w.name, "rbd", t) for w in WORKLOADS for t in ("fio-rbd", "nvme-mdev")}
    assert set(results) == set(rows) == expected
    for w in WORKLOADS:
        for target in ("fio-rbd", "nvme-mdev"):
            r = results[(w.name, "rbd", target)]
            assert r["error"] is None and r["ios"] > 0 and r["iops"] > 0 and r["mean_us"] > 0
            assert rows[(w.name, "rbd", target)]["IOPS"].replace(",", "").isdigit()
        ours = results[(w.name, "rbd", "nvme-mdev")]
        assert ours["device_commands"] == ours["ios"]  # the device's SMART count agrees
        assert ours["ratio"] > 0  # ours / fio-rbd's
        assert rows[(w.name, "rbd", "nvme-mdev")]["vs native"].endswith("x")
    # One image, both sides: the cluster's copy has the blocks fio's rbd engine wrote and
    # those the device wrote (each side's own pattern), and no block of the span the
    # rows ran over is left unwritten (fio's fill).
    data = ceph_cluster.run_bytes("rbd", "export", name, "-", timeout=120)
    blocks = [data[off : off + BLOCK] for off in range(0, size, BLOCK)]
    assert blocks.count(FIO_WRITE_PATTERN) > 0
    assert blocks.count(WRITE_PATTERN) > 0
    assert bytes(BLOCK) not in blocks
    # Every device cell stopped its device, and the image's lock went with it.
    assert ceph_cluster.run_json("rbd", "lock", "ls", name) == []


def test_bench_refuses_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "precious.img"
    image.write_bytes(b"keep me")
    argv = ["bench", "--quick", "--backends", "file", "--file", str(image)]
    assert cli.main(argv) == 1
    assert "exists" in capsys.readouterr().err
    assert image.read_bytes() == b"keep me"


def test_batched_submission_with_shadow_doorbells(tmp_path: Path) -> None:
    """submit_batch rings once for many; with shadow doorbells the tail travels in
    guest memory and the device still runs every command. Between batches the host
    stalls for longer than the poll timeout, as a loaded machine makes it do: the I/O
    thread parks (seen in its statistics) with EventIdx armed at the consumed tail, so
    the next batch's shadow update finds that EventIdx asks for the real doorbell and
    rings it, as Linux does; nothing is stranded."""
    poll_timeout = 0.05
    ns = NamespaceSpec.parse("null:1M").open(1)
    vc = VirtualController(str(tmp_path / "s.sock"), [ns], poll_timeout=poll_timeout)
    vc.start()
    try:
        with NvmeHost(str(tmp_path / "s.sock")) as host:
            host.enable()
            host.enable_shadow_doorbells()
            assert host.shadow_doorbells is not None
            _, eventidx = host.shadow_doorbells
            q = host.create_queue_pair(1, vector=1)
            buf = host.alloc(4096)

            def counters() -> tuple[int, int]:
                stats = vc.statistics()
                return int(stats["io_thread"]["parks"]), int(stats["doorbell_traps"])

            def parked_since(parks: int) -> bool:
                armed = int.from_bytes(host.ram.read(eventidx + 8, 4), "little") == q.sq_tail
                return armed and counters()[0] > parks

            for round_ in range(3):
                parks, traps = counters()
                cids = q.submit_batch(read_write(0x02, 1, buf, i * 8, 8) for i in range(8))
                done = q.wait(8, timeout=60)
                assert sorted(c.cid for c in done) == sorted(cids)
                assert all(c.ok for c in done)
                if round_:  # it found the thread parked: EventIdx asked for a doorbell
                    assert counters()[1] > traps
                # The stall: until the thread has parked (whenever this machine gets it
                # there; the deadline only catches a thread that never does), then
                # three poll timeouts more.
                deadline = time.monotonic() + 60
                while not parked_since(parks):
                    assert time.monotonic() < deadline, "the I/O thread never parked"
                    time.sleep(0.005)
                time.sleep(3 * poll_timeout)
        assert vc.controller.counters.host_read_commands == 24
    finally:
        vc.stop()


@pytest.mark.parametrize(
    ("event_idx", "new", "old", "ring"),
    [
        (5, 6, 5, True),  # the device parked at 5: the next tail rings
        (4, 6, 5, False),  # EventIdx = tail - 1: the device polls, no ring
        (250, 4, 250, True),  # a batch that wraps a 256-entry queue past EventIdx
        (100, 4, 250, False),
        (0xFFFF, 1, 0, False),  # a CQ EventIdx of head - 1 at creation
    ],
)
def test_need_event_is_linux_rule(event_idx: int, new: int, old: int, ring: bool) -> None:
    assert need_event(event_idx, new, old) is ring


def test_rbd_bench_parts_the_cpus_of_the_cluster_and_the_rest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--cluster-cpus and --bench-cpus: the cluster's daemons start on the first set and
    inherit it, fio, the device and its guest run on the second; the bench's own CPUs are
    back afterwards. A CPU list that is not one is refused before any cluster starts."""
    module = _bench_rbd()
    seen: dict[str, set[int]] = {}

    class Cluster:
        @staticmethod
        def missing() -> list[str]:
            return []

        def __init__(self, root: Path) -> None:
            self.root = root

        def __enter__(self) -> Cluster:
            seen["cluster"] = os.sched_getaffinity(0)
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def bench_on(cluster: Cluster, argv: list[str]) -> int:
        seen["bench"] = os.sched_getaffinity(0)
        return 0

    monkeypatch.setattr(module, "CephCluster", Cluster)
    monkeypatch.setattr(module, "bench_on", bench_on)
    before = os.sched_getaffinity(0)
    first, last = min(before), max(before)
    argv = ["--cluster-dir", str(tmp_path), "--cluster-cpus", str(last)]
    assert module.main([*argv, "--bench-cpus", str(first), "--quick"]) == 0
    assert seen == {"cluster": {last}, "bench": {first}}
    assert os.sched_getaffinity(0) == before
    assert module.main(["--cluster-dir", str(tmp_path)]) == 0  # by default: every CPU
    assert seen == {"cluster": before, "bench": before}
    seen.clear()
    assert module.main([*argv, "--bench-cpus", "one"]) == 2
    assert seen == {}
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "bench-rbd: error: 'one': expected CPUs like 3, 2,5 or 0-3"
