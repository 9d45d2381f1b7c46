"""Per-queue statistics as the I/O path keeps them, and interrupt coalescing
(Base 5.27.1.9 Interrupt Coalescing, 5.27.1.10 Interrupt Vector Configuration)."""

from __future__ import annotations

import time

import pytest
from harness import Host, NamespaceFactory, rw

from nvme_mdev.nvme.spec import FeatureId, IoOpcode
from nvme_mdev.statistics import EXPOSED_BUCKETS, prometheus_text


@pytest.fixture
def h(file_ns: NamespaceFactory) -> Host:
    host = Host(
        [file_ns(block_size=512)],
    )
    host.enable()
    host.create_io_queue_pair(1, vector=1)
    host.create_io_queue_pair(2, vector=2)
    return host


def submit(h: Host, qid: int, opcode: int, count: int, nlb: int = 8) -> None:
    buf = h.buffer(nlb * 512)
    for i in range(count):
        h.io[qid].submit(rw(opcode, 1, buf, i * nlb, nlb))


def test_commands_bytes_and_latency_by_queue_and_opcode(h: Host) -> None:
    submit(h, 1, IoOpcode.WRITE, 3, nlb=8)
    submit(h, 1, IoOpcode.READ, 2, nlb=4)
    submit(h, 2, IoOpcode.FLUSH, 1)
    h.ctrl.process_io()
    q1, q2 = h.ctrl.stats.queues[1], h.ctrl.stats.queues[2]
    assert q1.commands[IoOpcode.WRITE] == 3 and q1.bytes[IoOpcode.WRITE] == 3 * 8 * 512
    assert q1.commands[IoOpcode.READ] == 2 and q1.bytes[IoOpcode.READ] == 2 * 4 * 512
    assert q2.commands[IoOpcode.FLUSH] == 1 and q2.bytes[IoOpcode.FLUSH] == 0
    assert sum(q1.latency) == 5 and q1.latency_sum_ns > 0
    assert q1.errors == 0
    snap = h.ctrl.stats.snapshot(0, 0, 0)
    assert [q["qid"] for q in snap["queues"]] == [1, 2]
    assert snap["queues"][0]["by_opcode"]["write"] == {"commands": 3, "bytes": 12288}


def test_failed_commands_count_as_errors_and_move_no_bytes(h: Host) -> None:
    buf = h.buffer(512)
    h.io_cmd(1, rw(IoOpcode.READ, 1, buf, 1 << 40, 1))  # LBA out of range
    h.io_cmd(1, [0x7F, 1])  # invalid opcode
    q1 = h.ctrl.stats.queues[1]
    assert q1.errors == 2
    assert q1.commands[IoOpcode.READ] == 1 and q1.bytes[IoOpcode.READ] == 0
    assert q1.commands[0x7F] == 1


def test_counters_survive_a_reset(h: Host) -> None:
    submit(h, 1, IoOpcode.WRITE, 2)
    h.ctrl.process_io()
    h.disable()
    h.enable()
    h.create_io_queue_pair(1, vector=1)
    submit(h, 1, IoOpcode.WRITE, 1)
    h.ctrl.process_io()
    assert h.ctrl.stats.queues[1].commands[IoOpcode.WRITE] == 3  # counters only grow


def test_one_interrupt_per_batch_and_counted(h: Host) -> None:
    submit(h, 1, IoOpcode.WRITE, 5)
    h.interrupts.signalled.clear()
    h.ctrl.process_io()
    assert h.interrupts.signalled == [1]
    assert h.ctrl.stats.interrupts[1] == 1


def coalesce(h: Host, threshold: int, time_100us: int) -> None:
    # THR is 0's based: `threshold` + 1 completions per interrupt
    assert h.set_feature(FeatureId.INTERRUPT_COALESCING, threshold | (time_100us << 8)).status == 0


def test_coalescing_waits_for_the_threshold(h: Host) -> None:
    coalesce(h, threshold=3, time_100us=255)  # 4 entries, or 25.5 ms
    h.interrupts.signalled.clear()
    submit(h, 1, IoOpcode.WRITE, 2)
    h.ctrl.process_io()
    assert h.interrupts.signalled == []  # 2 of 4
    submit(h, 1, IoOpcode.WRITE, 2)
    h.ctrl.process_io()
    assert h.interrupts.signalled == [1]  # threshold reached: one interrupt for four


def test_coalescing_sends_after_the_aggregation_time(h: Host) -> None:
    coalesce(h, threshold=200, time_100us=10)  # 1 ms
    h.interrupts.signalled.clear()
    submit(h, 1, IoOpcode.WRITE, 1)
    h.ctrl.process_io()
    assert h.interrupts.signalled == []
    time.sleep(0.002)
    h.ctrl.process_io()  # an idle pass notices the deadline
    assert h.interrupts.signalled == [1]


def test_held_interrupts_go_out_before_parking(h: Host) -> None:
    coalesce(h, threshold=200, time_100us=255)
    h.interrupts.signalled.clear()
    submit(h, 1, IoOpcode.WRITE, 1)
    submit(h, 2, IoOpcode.WRITE, 1)
    h.ctrl.process_io()
    assert h.interrupts.signalled == []
    h.ctrl.flush_coalesced_interrupts(force=True)
    assert sorted(h.interrupts.signalled) == [1, 2]


def test_vector_with_coalescing_disabled_is_not_held(h: Host) -> None:
    coalesce(h, threshold=200, time_100us=255)
    assert h.set_feature(FeatureId.INTERRUPT_VECTOR_CONFIG, 2 | (1 << 16)).status == 0  # CD
    h.interrupts.signalled.clear()
    submit(h, 1, IoOpcode.WRITE, 1)
    submit(h, 2, IoOpcode.WRITE, 1)
    h.ctrl.process_io()
    assert h.interrupts.signalled == [2]  # vector 1 still coalesces


@pytest.mark.parametrize("value", [0, 0x00FF, 0xFF00], ids=["off", "no-time", "no-threshold"])
def test_coalescing_needs_both_threshold_and_time(h: Host, value: int) -> None:
    assert h.set_feature(FeatureId.INTERRUPT_COALESCING, value).status == 0
    h.interrupts.signalled.clear()
    submit(h, 1, IoOpcode.WRITE, 1)
    h.ctrl.process_io()
    assert h.interrupts.signalled == [1]


def test_admin_queue_is_never_coalesced(h: Host) -> None:
    coalesce(h, threshold=200, time_100us=255)
    h.interrupts.signalled.clear()
    assert h.get_feature(FeatureId.ARBITRATION).status == 0
    assert h.interrupts.signalled == [0]


def test_prometheus_text_is_well_formed(h: Host) -> None:
    submit(h, 1, IoOpcode.READ, 4, nlb=1)
    h.ctrl.process_io()
    text = prometheus_text({"vm1": h.ctrl.stats.snapshot(5_000_000, 1_000_000, 0)})
    lines = text.splitlines()
    assert 'nvme_mdev_commands_total{controller="vm1",qid="1",opcode="read"} 4' in lines
    assert 'nvme_mdev_bytes_total{controller="vm1",qid="1",opcode="read"} 2048' in lines
    assert 'nvme_mdev_command_latency_seconds_count{controller="vm1",qid="1"} 4' in lines
    buckets = [ln for ln in lines if ln.startswith("nvme_mdev_command_latency_seconds_bucket")]
    assert len(buckets) == len(EXPOSED_BUCKETS) + 1 and buckets[-1].endswith(" 4")
    counts = [float(ln.rsplit(" ", 1)[1]) for ln in buckets]
    assert counts == sorted(counts)  # cumulative
    assert 'nvme_mdev_io_thread_seconds_total{controller="vm1",state="polling"} 0.005' in lines
    for ln in lines:  # every sample line: name{labels} number
        if not ln.startswith("#"):
            name, value = ln.rsplit(" ", 1)
            float(value)
            assert name.startswith("nvme_mdev_") and name.endswith("}")
