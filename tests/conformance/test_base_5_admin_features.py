"""NVMe Base 2.2, 5.1.11 Get Features and 5.1.25 Set Features, for every feature the
specification makes mandatory (3.1.3.6, Figure 32) and every optional one the controller
reports (docs/support.md), with SEL 0-3; refused features are refused."""

from __future__ import annotations

import struct
import time

import pytest
from conformance_support import assert_ok, assert_status

from nvme_mdev.nvme.admin.features import SUPPORTED
from nvme_mdev.nvme.spec import FeatureId, Status
from nvme_mdev.nvme_host import NvmeHost, create_io_cq

SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_SUPPORTED = range(4)
#: Supported Capabilities (SEL 11b) in DW0: saveable (0), namespace specific (1), changeable (2)
CHANGEABLE = 1 << 2

#: per feature, the CDW11 Get Features needs to select an instance (vector, sensor)
GET_CDW11: dict[int, int] = {FeatureId.INTERRUPT_VECTOR_CONFIG: 1}
TIMESTAMP_BYTES = 8
#: per feature, a legal new value (Set CDW11) and what Get then returns in DW0
ROUND_TRIP: dict[int, tuple[int, int]] = {
    FeatureId.ARBITRATION: (0x04030201, 0x04030201),
    FeatureId.POWER_MANAGEMENT: (0, 0),
    FeatureId.TEMPERATURE_THRESHOLD: (350, 350),
    FeatureId.ERROR_RECOVERY: (25, 25),
    FeatureId.VOLATILE_WRITE_CACHE: (0, 0),
    FeatureId.INTERRUPT_COALESCING: (0x0A05, 0x0A05),
    FeatureId.INTERRUPT_VECTOR_CONFIG: (1 | (1 << 16), 1 | (1 << 16)),
    FeatureId.WRITE_ATOMICITY: (1, 1),
    FeatureId.ASYNC_EVENT_CONFIG: (1 << 8, 1 << 8),
}
#: Feature Identifiers an I/O controller on PCIe shall support, written out from the
#: specifications (not from the device's tables): NVMe Base 2.2, 3.1.3.6 Figure 32
#: 'Feature Support Requirements', I/O column M (08h and 09h: note 2, mandatory for NVMe
#: over PCIe; Keep Alive Timer 0Fh is M only where the transport requires it, which PCIe
#: does not), and NVM Command Set 1.2, 2.2 Figure 16 'I/O Controller - Feature Support'
#: for the NVM Command Set's (05h, 0Ah).
MANDATORY = [
    FeatureId.ARBITRATION,  # 01h
    FeatureId.POWER_MANAGEMENT,  # 02h
    FeatureId.TEMPERATURE_THRESHOLD,  # 04h
    FeatureId.ERROR_RECOVERY,  # 05h (NVM Command Set)
    FeatureId.NUMBER_OF_QUEUES,  # 07h
    FeatureId.INTERRUPT_COALESCING,  # 08h
    FeatureId.INTERRUPT_VECTOR_CONFIG,  # 09h
    FeatureId.WRITE_ATOMICITY,  # 0Ah (NVM Command Set)
    FeatureId.ASYNC_EVENT_CONFIG,  # 0Bh
]
REFUSED = sorted(set(FeatureId) - SUPPORTED)
#: the mandatory features and the optional ones the device reports
REPORTED = sorted(set(MANDATORY) | SUPPORTED)


def _get(host: NvmeHost, fid: int, sel: int) -> tuple[int, bytes]:
    length = TIMESTAMP_BYTES if fid == FeatureId.TIMESTAMP else 0
    c, data = host.get_features(fid, sel, GET_CDW11.get(fid, 0), data_length=length)
    assert_ok(c)
    return c.dw0, data


@pytest.mark.parametrize("fid", REPORTED, ids=lambda f: FeatureId(f).name.lower())
def test_5_1_11_sel_current_equals_sel_default_after_a_reset(host: NvmeHost, fid: int) -> None:
    """SEL 000b (current) and 001b (default) succeed; a freshly reset controller runs
    with the default values."""
    current, current_data = _get(host, fid, SEL_CURRENT)
    default, default_data = _get(host, fid, SEL_DEFAULT)
    assert current == default
    if fid == FeatureId.TIMESTAMP:
        assert current_data[6] & 0b1110 == 0  # Origin 000b: reset, not set by the host
    else:
        assert current_data == default_data


@pytest.mark.parametrize("fid", REPORTED, ids=lambda f: FeatureId(f).name.lower())
def test_5_1_11_sel_saved_of_a_feature_that_is_not_saveable_returns_the_default(
    host: NvmeHost, fid: int
) -> None:
    """SEL 010b (saved) of a feature without a saved value returns its default."""
    if fid in ROUND_TRIP:
        assert_ok(host.set_features(fid, ROUND_TRIP[fid][0]))
    saved, _ = _get(host, fid, SEL_SAVED)
    default, _ = _get(host, fid, SEL_DEFAULT)
    assert saved == default


@pytest.mark.parametrize("fid", REPORTED, ids=lambda f: FeatureId(f).name.lower())
def test_5_1_11_sel_supported_capabilities_reports_changeable_not_saveable(
    host: NvmeHost, fid: int
) -> None:
    """SEL 011b: DW0 reports the capabilities: changeable, not saveable, not namespace
    specific."""
    capabilities, _ = _get(host, fid, SEL_SUPPORTED)
    assert capabilities == CHANGEABLE


def test_5_1_11_reserved_sel_value_is_invalid_field(host: NvmeHost) -> None:
    """SEL 100b-111b are reserved."""
    c, _ = host.get_features(FeatureId.ARBITRATION, sel=4)
    assert_status(c, Status.INVALID_FIELD, dnr=True)


@pytest.mark.parametrize("fid", MANDATORY, ids=lambda f: FeatureId(f).name.lower())
def test_3_1_3_6_every_mandatory_feature_is_supported(host: NvmeHost, fid: int) -> None:
    """Get Features succeeds for each mandatory feature, and Set Features of its current
    value is accepted."""
    c, _ = host.get_features(fid, SEL_CURRENT, GET_CDW11.get(fid, 0))
    assert_ok(c)
    value = c.dw0
    if fid == FeatureId.INTERRUPT_VECTOR_CONFIG:
        value = (value & ~0xFFFF) | GET_CDW11[fid]
    if fid != FeatureId.NUMBER_OF_QUEUES:  # settable once per reset; a test of its own
        assert_ok(host.set_features(fid, value))


@pytest.mark.parametrize("fid", REFUSED, ids=lambda f: FeatureId(f).name.lower())
def test_5_1_11_and_5_1_25_a_feature_not_supported_is_invalid_field(
    host: NvmeHost, fid: int
) -> None:
    """Get and Set Features of a feature the controller does not support: Invalid Field
    in Command, DNR."""
    assert fid not in MANDATORY, "a mandatory feature cannot be refused"
    c, _ = host.get_features(fid)
    assert_status(c, Status.INVALID_FIELD, dnr=True)
    assert_status(host.set_features(fid, 0), Status.INVALID_FIELD, dnr=True)


@pytest.mark.parametrize("fid", sorted(ROUND_TRIP), ids=lambda f: FeatureId(f).name.lower())
def test_5_1_25_set_features_value_is_returned_by_get_features_current(
    host: NvmeHost, fid: int
) -> None:
    """Set Features changes the current value; Get Features SEL 000b returns it and the
    default is unchanged."""
    value, expected = ROUND_TRIP[fid]
    default, _ = _get(host, fid, SEL_DEFAULT)
    assert_ok(host.set_features(fid, value))
    current, _ = _get(host, fid, SEL_CURRENT)
    assert current & 0xFFFF_FFFF == expected | (GET_CDW11.get(fid, 0) & 0xFFFF)
    assert _get(host, fid, SEL_DEFAULT)[0] == default


def test_5_1_25_timestamp_set_by_the_host_is_returned_with_origin_001b(host: NvmeHost) -> None:
    """Timestamp: Get returns the value Set gave plus the time since, Origin 001b."""
    stamp = 1_700_000_000_000
    start = time.monotonic_ns()
    assert_ok(host.set_features(FeatureId.TIMESTAMP, data=struct.pack("<Q", stamp)[:6] + bytes(2)))
    _, data = _get(host, FeatureId.TIMESTAMP, SEL_CURRENT)
    now = int.from_bytes(data[:6], "little")
    # Counting: by at most the milliseconds that really passed since the Set.
    elapsed_ms = -(-(time.monotonic_ns() - start) // 1_000_000)  # rounded up
    assert stamp <= now <= stamp + elapsed_ms
    assert (data[6] >> 1) & 0x7 == 0b001


def test_5_1_25_saving_a_feature_that_is_not_saveable_is_refused(host: NvmeHost) -> None:
    """SV set for a feature that is not saveable: Feature Identifier Not Saveable, DNR."""
    c = host.set_features(FeatureId.VOLATILE_WRITE_CACHE, 1, save=True)
    assert_status(c, Status.FEATURE_ID_NOT_SAVEABLE, dnr=True)


def test_5_1_25_controller_scope_feature_with_a_namespace_id_is_refused(host: NvmeHost) -> None:
    """A feature that is not namespace specific, addressed to a namespace: Feature
    Identifier Not Namespace Specific."""
    c = host.set_features(FeatureId.ARBITRATION, 0, nsid=1)
    assert_status(c, Status.FEATURE_NOT_NAMESPACE_SPECIFIC, dnr=True)
    c, _ = host.get_features(FeatureId.ARBITRATION, nsid=1)
    assert_status(c, Status.FEATURE_NOT_NAMESPACE_SPECIFIC, dnr=True)


def test_5_1_25_power_state_that_does_not_exist_is_invalid_field(host: NvmeHost) -> None:
    """Power Management: a PS above NPSS is Invalid Field in Command."""
    assert_status(host.set_features(FeatureId.POWER_MANAGEMENT, 1), Status.INVALID_FIELD)


def test_5_1_25_error_recovery_dulbe_without_support_is_invalid_field(host: NvmeHost) -> None:
    """Error Recovery: DULBE set where deallocated-block errors are not supported."""
    assert_status(host.set_features(FeatureId.ERROR_RECOVERY, 1 << 16), Status.INVALID_FIELD)


def test_5_1_25_interrupt_vector_configuration_of_a_missing_vector_is_invalid_field(
    host: NvmeHost,
) -> None:
    """Interrupt Vector Configuration for a vector the controller does not have."""
    assert_status(
        host.set_features(FeatureId.INTERRUPT_VECTOR_CONFIG, 0xFFFF), Status.INVALID_FIELD
    )


def test_5_1_25_temperature_threshold_per_sensor(host: NvmeHost) -> None:
    """Temperature Threshold: each sensor (TMPSEL) and threshold type (THSEL) has its own
    value; Get returns the one CDW11 selects."""
    assert_ok(host.set_features(FeatureId.TEMPERATURE_THRESHOLD, 330 | (1 << 16)))
    assert_ok(host.set_features(FeatureId.TEMPERATURE_THRESHOLD, 270 | (1 << 20)))
    c, _ = host.get_features(FeatureId.TEMPERATURE_THRESHOLD, cdw11=1 << 16)
    assert c.dw0 & 0xFFFF == 330
    c, _ = host.get_features(FeatureId.TEMPERATURE_THRESHOLD, cdw11=1 << 20)
    assert c.dw0 & 0xFFFF == 270
    c, _ = host.get_features(FeatureId.TEMPERATURE_THRESHOLD, cdw11=3 << 20)
    assert_status(c, Status.INVALID_FIELD)


def test_5_1_25_number_of_queues_grants_at_most_what_the_controller_has(host: NvmeHost) -> None:
    """Number of Queues: DW0 returns NSQA/NCQA, at most the controller's maximum, and
    Get Features reports the same."""
    c = host.set_features(FeatureId.NUMBER_OF_QUEUES, 0x1000_1000)
    assert_ok(c)
    nsqa, ncqa = c.dw0 & 0xFFFF, c.dw0 >> 16
    assert 0 < nsqa < 0x1000 and 0 < ncqa < 0x1000
    assert host.get_features(FeatureId.NUMBER_OF_QUEUES)[0].dw0 == c.dw0


def test_5_1_25_number_of_queues_limits_the_queue_ids_that_can_be_created(
    host: NvmeHost,
) -> None:
    """I/O queue IDs above the number allocated are Invalid Queue Identifier."""
    c = host.set_features(FeatureId.NUMBER_OF_QUEUES, 0)  # one SQ, one CQ
    assert_ok(c)
    assert c.dw0 == 0
    host.create_queue_pair(1, entries=8)
    c = host.admin_command(create_io_cq(2, host.alloc(4096), 8, vector=2))
    assert_status(c, Status.INVALID_QUEUE_IDENTIFIER, dnr=True)


def test_5_1_25_number_of_queues_65536_is_invalid_field(host: NvmeHost) -> None:
    """NSQR or NCQR of FFFFh is Invalid Field in Command."""
    c = host.set_features(FeatureId.NUMBER_OF_QUEUES, 0xFFFF)
    assert_status(c, Status.INVALID_FIELD, dnr=True)


def test_5_1_25_number_of_queues_after_queues_exist_is_a_sequence_error(host: NvmeHost) -> None:
    """Number of Queues once I/O queues exist: Command Sequence Error."""
    host.create_queue_pair(1, entries=8)
    c = host.set_features(FeatureId.NUMBER_OF_QUEUES, 0x0001_0001)
    assert_status(c, Status.COMMAND_SEQUENCE_ERROR)
