"""Hostile vfio-user clients against a daemon that serves other VMs too: each test is
the hostile peer, over the real socket, and then checks that the neighbour controller
keeps serving and management keeps answering. At worst the hostile client loses its
own controller (fatal status) or its connection."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import DaemonProcess, image, write_read

from nvme_mdev.nvme.spec import CSTS_CFS, Reg
from nvme_mdev.nvme.spec import PAGE_SIZE as PAGE
from nvme_mdev.nvme_host import NvmeHost, read_write
from nvme_mdev.vfio_user import protocol as p
from nvme_mdev.vfio_user.client import ClientError, GuestRam, VfioUserClient

BAR0 = 0
DOORBELL_BUFFER_CONFIG = 0x7C


@pytest.fixture(params=["native", "python"])
def plane(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def daemon(tmp_path: Path, plane: str) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path)
    for name in ("victim", "hostile"):
        d.ok(
            "controller", "create", name, "--socket", str(tmp_path / f"{name}.sock"),
            "--ns", str(image(tmp_path, f"{name}.img")), "--data-plane", plane,
            "--mmap-doorbells",
        )  # fmt: skip
    yield d
    d.stop()


@pytest.fixture
def victim(daemon: DaemonProcess, tmp_path: Path) -> Iterator[NvmeHost]:
    """The neighbour VM: enabled, doorbells mapped, doing nothing wrong."""
    with NvmeHost(str(tmp_path / "victim.sock")) as host:
        host.enable()
        host.map_doorbells()
        yield host


def still_serving(daemon: DaemonProcess, victim: NvmeHost) -> None:
    assert daemon.proc.poll() is None, daemon.log()
    assert write_read(victim, 1, 0, b"\x5a" * 4096) == b"\x5a" * 4096
    assert {"hostile", "victim"} <= {c["name"] for c in daemon.ok("list")["controllers"]}


def wait_fatal(host: NvmeHost) -> int:
    return host.wait_csts(CSTS_CFS, CSTS_CFS, timeout=30)


def test_truncated_dma_memory_costs_only_its_own_controller(
    daemon: DaemonProcess, victim: NvmeHost, tmp_path: Path
) -> None:
    """The client shrinks the memfd it mapped with DMA_MAP, then rings a doorbell: the
    device's next access to the queue lands past the end of the file (SIGBUS). Twice,
    by one client after another on the same controller: each time is news."""
    still_serving(daemon, victim)
    for _ in range(2):
        with NvmeHost(str(tmp_path / "hostile.sock")) as hostile:
            hostile.enable()
            q = hostile.create_queue_pair(1)
            buf = hostile.alloc(4096)
            q.submit(read_write(0x02, 1, buf, 0, 8), ring=False)
            os.ftruncate(hostile.ram.fd, 0)  # from here on the client must not touch it
            hostile.write_doorbell(1, q.sq_tail)
            assert wait_fatal(hostile) & CSTS_CFS
        still_serving(daemon, victim)
    assert daemon.log().count("truncated guest memory") >= 2


def test_the_mapped_doorbell_page_cannot_be_truncated(
    daemon: DaemonProcess, victim: NvmeHost, tmp_path: Path
) -> None:
    """With --mmap-doorbells the client gets the doorbell page's memfd; shrinking it
    under the device's mapping would raise SIGBUS at the next poll. It is sealed."""
    with (
        NvmeHost(str(tmp_path / "hostile.sock")) as hostile,
    ):
        hostile.enable()
        info = hostile.client.region_info(BAR0)
        assert info.fd is not None
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(info.fd, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(info.fd, 1 << 30)
        finally:
            os.close(info.fd)
        hostile.map_doorbells()
        assert write_read(hostile, 1, 0, b"\x33" * 512) == b"\x33" * 512
        still_serving(daemon, victim)


def test_an_interrupt_fd_must_be_an_eventfd(
    daemon: DaemonProcess, victim: NvmeHost, tmp_path: Path
) -> None:
    """SET_IRQS with a pipe: a full one would block the device's interrupt write, with
    the MSI-X lock held, and with it the admin worker, resets and the daemon."""
    with (
        NvmeHost(str(tmp_path / "hostile.sock")) as hostile,
    ):
        hostile.enable()
        read_end, write_end = os.pipe()
        try:
            with pytest.raises(ClientError) as refused:
                hostile.client.set_irqs(2, p.IRQ_SET_ACTION_TRIGGER, 0, 1, fds=[write_end])
            assert refused.value.errno == errno.EINVAL
        finally:
            os.close(read_end)
            os.close(write_end)
        # The eventfds it had still work, and so does everyone else's device.
        assert write_read(hostile, 1, 0, b"\x44" * 512) == b"\x44" * 512
        still_serving(daemon, victim)
        assert victim.reg32(Reg.CSTS) & CSTS_CFS == 0


def test_a_full_blocking_eventfd_does_not_block_the_device(
    daemon: DaemonProcess, victim: NvmeHost, tmp_path: Path
) -> None:
    """An eventfd whose counter is at its maximum blocks a writer, unless the fd is
    non-blocking. The client opens it blocking and fills it before handing it over."""
    with (
        NvmeHost(str(tmp_path / "hostile.sock")) as hostile,
    ):
        hostile.enable()
        full = os.eventfd(0)
        os.eventfd_write(full, 0xFFFF_FFFF_FFFF_FFFE)  # the most a counter holds
        try:
            hostile.client.set_irqs(2, p.IRQ_SET_ACTION_TRIGGER, 1, 1, fds=[full])
            # Vector 1 interrupts for I/O queue 1: each completion writes to `full`.
            for lba in range(4):
                assert write_read(hostile, 1, lba, bytes([lba]) * 512) == bytes([lba]) * 512
            hostile.disable()  # CC.EN=0 is answered: nothing holds the MSI-X lock
            still_serving(daemon, victim)
        finally:
            os.close(full)


def test_unmapping_the_shadow_doorbells_under_the_io_thread(
    daemon: DaemonProcess, victim: NvmeHost, tmp_path: Path, plane: str
) -> None:
    """The client puts the shadow doorbells (Doorbell Buffer Config) in memory of their
    own and unmaps it while the I/O thread uses them: the next time the thread parks it
    must arm EventIdx there and cannot. The controller goes fatal; the I/O thread lives
    on, so after a reset the same controller serves I/O again."""
    # Shadow doorbells are for trapped doorbells: a controller without --mmap-doorbells.
    daemon.ok(
        "controller", "create", "shadowed", "--socket", str(tmp_path / "shadowed.sock"),
        "--ns", str(image(tmp_path, "shadowed.img")), "--poll-timeout-ms", "50",
        "--data-plane", plane,
    )  # fmt: skip
    shadow = GuestRam(2 * PAGE, base=0x8000_0000)
    with (
        contextlib.closing(shadow),
        NvmeHost(str(tmp_path / "shadowed.sock")) as hostile,
    ):
        hostile.enable()
        hostile.client.dma_map(shadow)
        pages = [shadow.base, 0, shadow.base + PAGE, 0]
        assert hostile.admin_command([DOORBELL_BUFFER_CONFIG, 0, 0, 0, 0, 0, *pages]).ok
        q = hostile.create_queue_pair(1)
        buf = hostile.alloc(4096)
        q.submit(read_write(0x02, 1, buf, 0, 8), ring=False)
        shadow.words[2] = q.sq_tail  # SQ 1's shadow tail (CAP.DSTRD = 0)
        hostile.write_doorbell(1, q.sq_tail)
        (done,) = q.wait(1)
        assert done.ok
        hostile.client.dma_unmap(shadow.base, shadow.size)
        assert wait_fatal(hostile) & CSTS_CFS
        still_serving(daemon, victim)
        hostile.disable()
        hostile.enable()
        assert write_read(hostile, 1, 0, b"\x66" * 512) == b"\x66" * 512


def test_dma_maps_are_bounded_by_what_the_server_advertised(
    daemon: DaemonProcess, victim: NvmeHost, tmp_path: Path
) -> None:
    """Each DMA_MAP costs a copy of the client's region table: the server says how many
    regions it takes (max_dma_maps) and refuses the one beyond with ENOSPC."""
    with (
        VfioUserClient(str(tmp_path / "hostile.sock")) as hostile,
    ):
        caps = hostile.negotiate()
        limit = caps.effective_max_dma_maps
        assert limit == p.SERVER_MAX_DMA_MAPS
        base = 1 << 40
        for i in range(limit):
            hostile.add_message_region(base + i * PAGE, PAGE)
        with pytest.raises(ClientError) as refused:
            hostile.add_message_region(base + limit * PAGE, PAGE)
        assert refused.value.errno == errno.ENOSPC
        still_serving(daemon, victim)
