"""Queue mechanics (NVMe Base 2.0, Queue Mechanisms: circular queues, full/empty, phase tag,
doorbells) and interrupt delivery (MSI-X vectors; INTx with INTMS/INTMC)."""

from __future__ import annotations

from harness import Host, HostQueue

from nvme_mdev.nvme.spec import DOORBELL_BASE, FeatureId, IoOpcode, Reg


def flush() -> list[int]:
    return [IoOpcode.FLUSH, 1]


def cq_memory(h: Host, q: HostQueue) -> bytes:
    return h.memory.read(q.cq_addr, q.cq_entries * 16)


def test_cq_full_never_overwrites_and_resumes(host: Host) -> None:
    q = host.create_io_queue_pair(1, entries=16, cq_entries=4)
    cids = [q.submit(flush(), ring=False) for _ in range(10)]
    q.ring_sq()
    assert host.run_io() == 3  # a 4-entry CQ is full at 3
    snapshot = cq_memory(host, q)
    assert [c.cid for c in q.peek()] == cids[:3]
    assert host.run_io() == 0  # no room: nothing fetched, nothing overwritten
    assert cq_memory(host, q) == snapshot
    assert host.sq(1).head == 3  # the rest wait in the SQ
    # Consuming one entry makes room for one more.
    q.cq_head = 1
    host.write_reg(DOORBELL_BASE + 8 + 4, 1)
    assert host.run_io() == 1
    got = [c.cid for c in q.reap()]
    assert got == cids[1:4]  # the two left unconsumed, then the new one
    got_all = [cids[0], *got]
    while len(got_all) < 10:
        assert host.run_io() > 0
        got_all += [c.cid for c in q.reap()]
    assert got_all == cids


def test_phase_tag_flips_on_wrap(host: Host) -> None:
    q = host.create_io_queue_pair(1, entries=8, cq_entries=4)
    phases = []
    for _ in range(10):
        c = host.io_cmd(1, flush())
        assert c.status == 0
        slot = (q.cq_head - 1) % 4
        raw = host.memory.read(q.cq_addr + slot * 16 + 14, 2)
        phases.append(raw[0] & 1)
    assert phases == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]


def test_sq_head_pointer_in_completions(host: Host) -> None:
    host.create_io_queue_pair(1, entries=4)
    heads = [host.io_cmd(1, flush()).sq_head for _ in range(6)]
    assert heads == [1, 2, 3, 0, 1, 2]


def test_several_sqs_on_one_cq(host: Host) -> None:
    q = HostQueue(host, 1, 16)
    assert host.create_cq(1, 16, q.cq_addr).status == 0
    assert host.create_sq(1, 16, 1, q.sq_addr).status == 0
    q2 = HostQueue(host, 2, 16)
    assert host.create_sq(2, 16, 1, q2.sq_addr).status == 0
    host.interrupts.signalled.clear()
    a = [q.submit(flush()) for _ in range(2)]
    b = [q2.submit(flush()) for _ in range(3)]
    assert host.run_io() == 5
    done = q.reap()  # every completion lands in CQ 1
    assert sorted((c.sq_id, c.cid) for c in done) == sorted(
        [(1, cid) for cid in a] + [(2, cid) for cid in b]
    )
    assert max(c.sq_head for c in done if c.sq_id == 1) == 2
    assert max(c.sq_head for c in done if c.sq_id == 2) == 3
    assert host.interrupts.signalled == [1]  # one CQ, one interrupt
    assert host.delete_cq(1).status != 0  # still has two SQs
    assert host.delete_sq(1).status == 0 and host.delete_sq(2).status == 0
    assert host.delete_cq(1).status == 0


def test_msix_one_signal_per_cq_per_batch(host: Host) -> None:
    q1 = host.create_io_queue_pair(1, vector=3)
    q2 = host.create_io_queue_pair(2, vector=5)
    host.interrupts.signalled.clear()
    for _ in range(4):
        q1.submit(flush())
        q2.submit(flush())
    assert host.run_io() == 8
    assert host.interrupts.signalled == [3, 5]
    host.interrupts.signalled.clear()
    assert host.run_io() == 0
    assert host.interrupts.signalled == []  # nothing new: no interrupt


def test_burst_limit_round_robins(host: Host) -> None:
    q1 = host.create_io_queue_pair(1)
    q2 = host.create_io_queue_pair(2)
    for _ in range(5):
        q1.submit(flush())
    q2.submit(flush())
    assert host.set_feature(FeatureId.ARBITRATION, 1).status == 0  # AB: bursts of 2
    assert host.run_io() == 3  # 2 from SQ 1, 1 from SQ 2
    assert len(q1.reap()) == 2 and len(q2.reap()) == 1


def test_interrupts_disabled_cq(host: Host) -> None:
    q = host.create_io_queue_pair(1, ien=False)
    host.interrupts.signalled.clear()
    q.submit(flush())
    assert host.run_io() == 1
    assert host.interrupts.signalled == []
    assert q.reap()[0].status == 0  # still completed


def test_intx_level_follows_unconsumed_entries(host: Host) -> None:
    host.interrupts.msix = False
    q = host.create_io_queue_pair(1, vector=0)
    host.interrupts.intx = False
    q.submit(flush())
    q.submit(flush())
    host.run_io()
    assert host.interrupts.intx is True
    assert host.interrupts.signalled == []  # no MSI-X messages
    assert len(q.reap(ring=False)) == 2
    assert host.interrupts.intx is True  # still asserted until the head doorbell
    q.ring_cq()
    assert host.interrupts.intx is False


def test_intx_partial_consumption_keeps_level(host: Host) -> None:
    host.interrupts.msix = False
    q = host.create_io_queue_pair(1, vector=0)
    for _ in range(3):
        q.submit(flush())
    host.run_io()
    host.write_reg(DOORBELL_BASE + 8 + 4, 2)  # two of three consumed
    assert host.interrupts.intx is True
    host.write_reg(DOORBELL_BASE + 8 + 4, 3)
    assert host.interrupts.intx is False


def test_intx_masked_by_intms(host: Host) -> None:
    host.interrupts.msix = False
    q = host.create_io_queue_pair(1, vector=0)
    host.write_reg(Reg.INTMS, 1)
    q.submit(flush())
    host.run_io()
    assert host.interrupts.intx is False  # masked
    host.write_reg(Reg.INTMC, 1)
    assert host.interrupts.intx is True  # unmasking raises the pending level
    q.reap()
    assert host.interrupts.intx is False


def test_intx_ignores_interrupts_disabled_cq(host: Host) -> None:
    host.interrupts.msix = False
    q = host.create_io_queue_pair(1, vector=0, ien=False)
    q.submit(flush())
    host.run_io()
    assert host.interrupts.intx is False


def test_intx_admin_queue(host: Host) -> None:
    host.interrupts.msix = False
    host.admin.submit([0x18])  # Keep Alive
    host.ctrl.process_admin()
    assert host.interrupts.intx is True
    host.admin.reap()
    assert host.interrupts.intx is False


def test_sq_tail_doorbell_wraps(host: Host) -> None:
    q = host.create_io_queue_pair(1, entries=4)
    for _ in range(3):
        for _ in range(3):
            q.submit(flush())
        assert host.run_io() == 3
        assert [c.status for c in q.reap()] == [0, 0, 0]


def test_admin_cq_full_never_overwrites() -> None:
    h = Host(admin_entries=4)
    h.enable()
    cids = [h.admin.submit([0x18], ring=False) for _ in range(3)]
    h.admin.ring_sq()
    assert h.ctrl.process_admin() == 3  # the admin CQ holds 3
    cids += [h.admin.submit([0x18], ring=False) for _ in range(2)]
    h.admin.ring_sq()
    snapshot = h.memory.read(h.admin.cq_addr, 64)
    assert h.ctrl.process_admin() == 0
    assert h.memory.read(h.admin.cq_addr, 64) == snapshot
    got = [c.cid for c in h.admin.reap()]
    assert h.ctrl.process_admin() == 2
    got += [c.cid for c in h.admin.reap()]
    assert got == cids


def test_aer_waits_for_room_in_a_full_admin_cq() -> None:
    h = Host(admin_entries=4)
    h.enable()
    aer = h.admin.submit([0x0C], ring=False)
    ka = [h.admin.submit([0x18], ring=False) for _ in range(2)]
    h.admin.ring_sq()
    assert h.ctrl.process_admin() == 3
    ka.append(h.admin.submit([0x18]))
    assert h.ctrl.process_admin() == 1
    assert [c.cid for c in h.admin.peek()] == ka  # 3 entries: the admin CQ is full
    h.write_reg(DOORBELL_BASE + 8 * 7, 1)  # an error event for the AER
    h.ctrl.process_admin()
    assert [c.cid for c in h.admin.peek()] == ka  # no room: the event waits
    h.admin.reap()
    h.ctrl.process_admin()
    done = h.admin.reap()
    assert [(c.cid, c.dw0) for c in done] == [(aer, 0x00010000)]
