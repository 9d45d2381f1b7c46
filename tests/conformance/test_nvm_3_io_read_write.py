"""NVM Command Set 1.2, 3.3.4 Read and 3.3.6 Write (FUA, LBA range, MDTS, write
protection, namespace checks); NVMe Base 2.2, 7.2 Flush."""

from __future__ import annotations

import pytest
from conformance_support import (
    BROADCAST,
    INACTIVE_NSID,
    LAYOUT,
    NS4K,
    NS512,
    NS_RO,
    Device,
    assert_ok,
    assert_status,
    pattern,
    read_blocks,
    write_blocks,
)

from nvme_mdev.nvme.spec import FeatureId, IoOpcode, Status
from nvme_mdev.nvme_host import HostQueuePair, NvmeHost, flush, nvm_command


@pytest.mark.parametrize("nsid", [NS512, NS4K], ids=["512", "4096"])
def test_3_3_6_write_stores_the_data_and_3_3_4_read_returns_it(
    device: Device, host: NvmeHost, io: HostQueuePair, nsid: int
) -> None:
    """Write puts the host's data in the logical blocks; Read returns them."""
    bs = LAYOUT[nsid].block_size
    data = pattern(3 * bs, nsid)
    assert_ok(write_blocks(host, io, nsid, 5, data))
    assert device.stored(nsid, 5, 3) == data
    c, back = read_blocks(host, io, nsid, 5, 3)
    assert_ok(c)
    assert back == data


def test_3_3_4_read_returns_what_is_on_the_medium(
    device: Device, host: NvmeHost, io: HostQueuePair
) -> None:
    """Read transfers the blocks' current content (written behind the controller)."""
    data = pattern(1024, 77)
    device.store(NS512, 40, data)
    c, back = read_blocks(host, io, NS512, 40, 2)
    assert_ok(c)
    assert back == data


def test_3_3_6_write_with_fua_is_durable_with_the_write_cache_enabled(
    device: Device, host: NvmeHost, io: HostQueuePair
) -> None:
    """FUA: the data is on the non-volatile medium when the Write completes, also with
    a volatile write cache enabled."""
    assert host.get_features(FeatureId.VOLATILE_WRITE_CACHE)[0].dw0 & 1
    data = pattern(4096, 5)
    assert_ok(write_blocks(host, io, NS4K, 9, data, fua=True))
    assert device.stored(NS4K, 9, 1) == data


def test_3_3_4_read_with_fua_succeeds(host: NvmeHost, io: HostQueuePair) -> None:
    """FUA on a Read (read from the medium, not a cache) is accepted."""
    buf = host.alloc(512)
    assert_ok(io.command(nvm_command(IoOpcode.READ, NS512, 0, 1, buf, fua=True)))


@pytest.mark.parametrize("opcode", [IoOpcode.READ, IoOpcode.WRITE])
@pytest.mark.parametrize("nsid", [NS512, NS4K], ids=["512", "4096"])
def test_3_3_4_and_3_3_6_range_past_the_namespace_is_lba_out_of_range(
    host: NvmeHost, io: HostQueuePair, opcode: int, nsid: int
) -> None:
    """Any block of the range beyond NSZE: LBA Out of Range, DNR, nothing transferred."""
    blocks = LAYOUT[nsid].blocks
    buf = host.alloc(2 * LAYOUT[nsid].block_size)
    prp2 = buf + 4096 if LAYOUT[nsid].block_size == 4096 else 0
    c = io.command(nvm_command(opcode, nsid, blocks - 1, 2, buf, prp2))
    assert_status(c, Status.LBA_OUT_OF_RANGE, dnr=True)
    c = io.command(nvm_command(opcode, nsid, blocks - 1, 1, buf))
    assert_ok(c)


def test_3_3_6_write_to_a_write_protected_namespace_is_refused(
    device: Device, host: NvmeHost, io: HostQueuePair
) -> None:
    """Write to a namespace that is write protected: Namespace is Write Protected, and
    the medium is unchanged."""
    before = device.stored(NS_RO, 0, 1)
    c = write_blocks(host, io, NS_RO, 0, b"\xff" * 512)
    assert_status(c, Status.NAMESPACE_WRITE_PROTECTED, dnr=True)
    assert device.stored(NS_RO, 0, 1) == before
    assert_ok(read_blocks(host, io, NS_RO, 0, 1)[0])


def test_3_3_4_transfer_larger_than_mdts_is_invalid_field(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """A data transfer beyond MDTS: Invalid Field in Command."""
    mdts = host.identify(1)[77]
    blocks = (4096 << mdts) // 512 + 1
    length = blocks * 512
    buf = host.alloc(length)
    prp1, prp2 = host.prps(buf, length)
    c = io.command(nvm_command(IoOpcode.READ, NS512, 0, blocks, prp1, prp2))
    assert_status(c, Status.INVALID_FIELD, dnr=True)
    c = io.command(nvm_command(IoOpcode.READ, NS512, 0, blocks - 1, prp1, prp2))
    assert_ok(c)


@pytest.mark.parametrize(
    ("nsid", "expected"),
    [
        (0, Status.INVALID_NAMESPACE),
        (BROADCAST, Status.INVALID_NAMESPACE),
        (0xFFFF_FF00, Status.INVALID_NAMESPACE),
        (INACTIVE_NSID, Status.INVALID_FIELD),
    ],
    ids=["zero", "broadcast", "above_nn", "inactive"],
)
def test_3_3_4_read_of_a_namespace_that_is_not_there_is_refused(
    host: NvmeHost, io: HostQueuePair, nsid: int, expected: int
) -> None:
    """NSID 0h, FFFFFFFFh or above NN: Invalid Namespace or Format; a valid but inactive
    NSID: Invalid Field in Command (Base 3.2.1, inactive NSIDs)."""
    c = io.command(nvm_command(IoOpcode.READ, nsid, 0, 1, host.alloc(512)))
    assert_status(c, expected, dnr=True)


def test_7_2_flush_completes_for_one_namespace_and_for_all(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """Flush of one namespace succeeds; NSID FFFFFFFFh flushes all (VWC bits 2:1 = 11b)."""
    vwc = host.identify(1)[525]
    assert vwc & 1 and (vwc >> 1) & 0x3 == 0b11
    assert_ok(io.command(flush(NS512)))
    assert_ok(io.command(flush(BROADCAST)))


def test_7_2_flush_of_an_invalid_namespace_is_invalid_namespace(
    host: NvmeHost, io: HostQueuePair
) -> None:
    """Flush with NSID 0h: Invalid Namespace or Format."""
    assert_status(io.command(flush(0)), Status.INVALID_NAMESPACE, dnr=True)


def test_7_2_write_with_the_write_cache_disabled_is_durable_at_completion(
    device: Device, host: NvmeHost, io: HostQueuePair
) -> None:
    """Volatile Write Cache off: every write is on the medium when it completes."""
    assert_ok(host.set_features(FeatureId.VOLATILE_WRITE_CACHE, 0))
    data = pattern(512, 99)
    assert_ok(write_blocks(host, io, NS512, 300, data))
    assert device.stored(NS512, 300, 1) == data
