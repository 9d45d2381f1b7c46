"""Get Features / Set Features (NVMe Base 2.0: the commands and the Feature Identifiers)."""

from __future__ import annotations

import struct
import time

import pytest
from harness import PAGE, Host, with_dnr

from nvme_mdev.nvme.spec import FeatureId, Status

SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_SUPPORTED = 0, 1, 2, 3
CHANGEABLE = 1 << 2

#: every feature the controller supports, with its default (DW0 of Get Features)
DEFAULTS: dict[int, int] = {
    FeatureId.ARBITRATION: 5,  # AB: bursts of 32
    FeatureId.POWER_MANAGEMENT: 0,
    FeatureId.TEMPERATURE_THRESHOLD: 343,  # composite, over-temperature
    FeatureId.ERROR_RECOVERY: 0,
    FeatureId.VOLATILE_WRITE_CACHE: 1,
    FeatureId.NUMBER_OF_QUEUES: 63 | (63 << 16),
    FeatureId.INTERRUPT_COALESCING: 0,
    FeatureId.INTERRUPT_VECTOR_CONFIG: 1,  # vector 1 (DW11), coalescing enabled
    FeatureId.WRITE_ATOMICITY: 0,
    FeatureId.ASYNC_EVENT_CONFIG: 0,
    FeatureId.TIMESTAMP: 0,  # the value travels in the data buffer
}


@pytest.mark.parametrize("fid", list(DEFAULTS))
def test_get_features_current_default_saved(host: Host, fid: int) -> None:
    dw11 = 1 if fid == FeatureId.INTERRUPT_VECTOR_CONFIG else 0
    for sel in (SEL_CURRENT, SEL_DEFAULT, SEL_SAVED):
        c = host.get_feature(fid, sel=sel, dw11=dw11)
        assert c.status == 0, (fid, sel)
        assert c.dw0 == DEFAULTS[fid], (fid, sel)


@pytest.mark.parametrize("fid", list(DEFAULTS))
def test_get_features_supported_capabilities(host: Host, fid: int) -> None:
    c = host.get_feature(fid, sel=SEL_SUPPORTED)
    assert c.status == 0
    assert c.dw0 == CHANGEABLE  # changeable; not saveable (bit 0); not per namespace (bit 1)


@pytest.mark.parametrize("sel", [4, 5, 7])
def test_get_features_reserved_select(host: Host, sel: int) -> None:
    c = host.get_feature(FeatureId.ARBITRATION, sel=sel)
    assert c.status == with_dnr(Status.INVALID_FIELD)


@pytest.mark.parametrize("fid", list(DEFAULTS))
def test_set_features_save_not_supported(host: Host, fid: int) -> None:
    c = host.set_feature(fid, 0, save=True)
    assert c.status == with_dnr(Status.FEATURE_ID_NOT_SAVEABLE)


@pytest.mark.parametrize("fid", [0x00, 0x03, 0x0C, 0x0D, 0x0F, 0x10, 0x16, 0x19, 0x80, 0x81, 0xFF])
def test_unsupported_feature(host: Host, fid: int) -> None:
    assert host.get_feature(fid).status == with_dnr(Status.INVALID_FIELD)
    assert host.set_feature(fid, 0).status == with_dnr(Status.INVALID_FIELD)


def test_controller_feature_with_a_namespace_id(host: Host) -> None:
    c = host.get_feature(FeatureId.VOLATILE_WRITE_CACHE, nsid=1)
    assert c.status == with_dnr(Status.FEATURE_NOT_NAMESPACE_SPECIFIC)
    c = host.set_feature(FeatureId.VOLATILE_WRITE_CACHE, 0, nsid=1)
    assert c.status == with_dnr(Status.FEATURE_NOT_NAMESPACE_SPECIFIC)
    assert host.get_feature(FeatureId.VOLATILE_WRITE_CACHE, nsid=0xFFFFFFFF).status == 0


def test_feature_arbitration(host: Host) -> None:
    assert host.set_feature(FeatureId.ARBITRATION, 0x0302_01FB).status == 0
    assert host.get_feature(FeatureId.ARBITRATION).dw0 == 0x0302_0103  # bits 7:3 reserved
    assert host.get_feature(FeatureId.ARBITRATION, sel=SEL_DEFAULT).dw0 == 5


def test_feature_power_management(host: Host) -> None:
    assert host.set_feature(FeatureId.POWER_MANAGEMENT, 1).status == with_dnr(
        Status.INVALID_FIELD
    )  # NPSS = 0: only power state 0
    assert host.set_feature(FeatureId.POWER_MANAGEMENT, 0xE0).status == 0  # WH 7:5
    assert host.get_feature(FeatureId.POWER_MANAGEMENT).dw0 == 0xE0


def tmpth(value: int, tmpsel: int = 0, thsel: int = 0) -> int:
    return value | (tmpsel << 16) | (thsel << 20)


def test_feature_temperature_threshold_selectors(host: Host) -> None:
    fid = FeatureId.TEMPERATURE_THRESHOLD
    # Defaults: over-temperature = WCTEMP, under-temperature = 0.
    assert host.get_feature(fid, dw11=tmpth(0)).dw0 == tmpth(343)
    assert host.get_feature(fid, dw11=tmpth(0, thsel=1)).dw0 == tmpth(0, thsel=1)
    # Composite over and under thresholds are separate.
    assert host.set_feature(fid, tmpth(350)).status == 0
    assert host.set_feature(fid, tmpth(260, thsel=1)).status == 0
    assert host.get_feature(fid, dw11=tmpth(0)).dw0 == tmpth(350)
    assert host.get_feature(fid, dw11=tmpth(0, thsel=1)).dw0 == tmpth(260, thsel=1)
    assert host.get_feature(fid, sel=SEL_DEFAULT, dw11=tmpth(0)).dw0 == tmpth(343)
    # Sensor 3 keeps its own value; TMPSEL Fh sets all of them.
    assert host.get_feature(fid, dw11=tmpth(0, tmpsel=3)).dw0 == tmpth(343, tmpsel=3)
    assert host.set_feature(fid, tmpth(300, tmpsel=0xF)).status == 0
    assert host.get_feature(fid, dw11=tmpth(0, tmpsel=3)).dw0 == tmpth(300, tmpsel=3)
    assert host.get_feature(fid, dw11=tmpth(0, tmpsel=8)).dw0 == tmpth(300, tmpsel=8)
    assert host.get_feature(fid, dw11=tmpth(0)).dw0 == tmpth(300)


@pytest.mark.parametrize(("tmpsel", "thsel"), [(0, 2), (0, 3), (9, 0), (0xE, 0)])
def test_feature_temperature_threshold_bad_selectors(host: Host, tmpsel: int, thsel: int) -> None:
    fid = FeatureId.TEMPERATURE_THRESHOLD
    c = host.set_feature(fid, tmpth(300, tmpsel, thsel))
    assert c.status == with_dnr(Status.INVALID_FIELD)
    c = host.get_feature(fid, dw11=tmpth(0, tmpsel, thsel))
    assert c.status == with_dnr(Status.INVALID_FIELD)


def test_feature_error_recovery(host: Host) -> None:
    fid = FeatureId.ERROR_RECOVERY
    assert host.set_feature(fid, 1 << 16).status == with_dnr(Status.INVALID_FIELD)  # DULBE
    assert host.set_feature(fid, 0x20).status == 0  # TLER
    assert host.get_feature(fid).dw0 == 0x20


def test_feature_volatile_write_cache_toggle(host: Host) -> None:
    fid = FeatureId.VOLATILE_WRITE_CACHE
    assert host.set_feature(fid, 0).status == 0
    assert host.get_feature(fid).dw0 == 0
    assert host.ctrl.features.volatile_write_cache is False
    assert host.get_feature(fid, sel=SEL_DEFAULT).dw0 == 1
    assert host.set_feature(fid, 0xFFFFFFFF).status == 0  # bits 31:1 reserved
    assert host.get_feature(fid).dw0 == 1


def test_feature_number_of_queues_grants_the_minimum(host: Host) -> None:
    fid = FeatureId.NUMBER_OF_QUEUES
    c = host.set_feature(fid, 3 | (5 << 16))
    assert c.status == 0 and c.dw0 == 3 | (5 << 16)
    assert host.get_feature(fid).dw0 == 3 | (5 << 16)
    c = host.set_feature(fid, 100 | (200 << 16))  # more than the controller has
    assert c.status == 0 and c.dw0 == 63 | (63 << 16)
    c = host.set_feature(fid, 0)  # one pair
    assert c.status == 0 and c.dw0 == 0


@pytest.mark.parametrize("value", [0xFFFF, 0xFFFF << 16, 0xFFFFFFFF])
def test_feature_number_of_queues_65536_is_invalid(host: Host, value: int) -> None:
    c = host.set_feature(FeatureId.NUMBER_OF_QUEUES, value)
    assert c.status == with_dnr(Status.INVALID_FIELD)


def test_feature_number_of_queues_after_queues_exist(host: Host) -> None:
    assert host.create_cq(1, 16).status == 0
    c = host.set_feature(FeatureId.NUMBER_OF_QUEUES, 1 | (1 << 16))
    assert c.status == with_dnr(Status.COMMAND_SEQUENCE_ERROR)
    assert host.get_feature(FeatureId.NUMBER_OF_QUEUES).dw0 == 63 | (63 << 16)


def test_feature_interrupt_coalescing(host: Host) -> None:
    fid = FeatureId.INTERRUPT_COALESCING
    assert host.set_feature(fid, 0xFFFF_0A05).status == 0  # bits 31:16 reserved
    assert host.get_feature(fid).dw0 == 0x0A05


def test_feature_interrupt_vector_configuration(host: Host) -> None:
    fid = FeatureId.INTERRUPT_VECTOR_CONFIG
    assert host.get_feature(fid, dw11=5).dw0 == 5
    assert host.set_feature(fid, 5 | (1 << 16)).status == 0  # CD
    assert host.get_feature(fid, dw11=5).dw0 == 5 | (1 << 16)
    assert host.get_feature(fid, sel=SEL_DEFAULT, dw11=5).dw0 == 5
    assert host.get_feature(fid, dw11=6).dw0 == 6
    assert host.set_feature(fid, 5).status == 0
    assert host.get_feature(fid, dw11=5).dw0 == 5
    assert host.get_feature(fid, dw11=64).status == 0  # the last of 65 vectors


def test_feature_interrupt_vector_configuration_bounds(host: Host) -> None:
    fid = FeatureId.INTERRUPT_VECTOR_CONFIG
    assert host.get_feature(fid, dw11=65).status == with_dnr(Status.INVALID_FIELD)
    assert host.set_feature(fid, 65).status == with_dnr(Status.INVALID_FIELD)
    # Vector 0 (admin CQ) is never coalesced: it reads CD = 1 and cannot be set.
    assert host.set_feature(fid, 0).status == with_dnr(Status.INVALID_FIELD)
    c = host.get_feature(fid, dw11=0)
    assert c.status == 0 and c.dw0 == 1 << 16


def test_feature_write_atomicity(host: Host) -> None:
    assert host.set_feature(FeatureId.WRITE_ATOMICITY, 0xFF).status == 0
    assert host.get_feature(FeatureId.WRITE_ATOMICITY).dw0 == 1


def test_feature_async_event_config(host: Host) -> None:
    fid = FeatureId.ASYNC_EVENT_CONFIG
    assert host.set_feature(fid, 0x100).status == 0
    assert host.get_feature(fid).dw0 == 0x100
    assert host.ctrl.features.async_event_config == 0x100
    assert host.set_feature(fid, 0xFFFFFFFF).status == 0
    assert host.get_feature(fid).dw0 == 0x1FF  # only what the controller can report


def _get_timestamp(host: Host, sel: int = SEL_CURRENT) -> tuple[int, int]:
    host.memory.write(host.scratch, b"\xee" * 8)
    c = host.get_feature(FeatureId.TIMESTAMP, sel=sel)
    assert c.status == 0
    raw = host.memory.read(host.scratch, 8)
    return int.from_bytes(raw[:6], "little"), raw[6]


def _ms_since(start_ns: int) -> int:
    """Whole milliseconds since `start_ns` (time.monotonic_ns), rounded up."""
    return -(-(time.monotonic_ns() - start_ns) // 1_000_000)


def test_feature_timestamp_round_trip(host: Host) -> None:
    buf = host.alloc(PAGE)
    stamp = 0x0123_4567_89AB
    host.memory.write(buf, struct.pack("<Q", stamp))
    start = time.monotonic_ns()
    assert host.set_feature(FeatureId.TIMESTAMP, data=buf).status == 0
    value, attributes = _get_timestamp(host)
    # Milliseconds, still counting: at most as many as really passed since the set
    # (however many that was on this machine).
    assert stamp <= value <= stamp + _ms_since(start)
    assert attributes == 0b0010  # Timestamp Origin 001b: set by Set Features; Synch 0
    value, attributes = _get_timestamp(host, sel=SEL_DEFAULT)
    assert value == 0


def test_feature_timestamp_before_set_counts_from_reset(host: Host) -> None:
    start = time.monotonic_ns()
    host.disable()  # a Controller Level Reset, timed by this test
    host.enable()
    value, attributes = _get_timestamp(host)
    assert value <= _ms_since(start)
    assert attributes == 0  # Timestamp Origin 000b: initialized to 0 by a reset


def test_feature_timestamp_reset_by_controller_reset(host: Host) -> None:
    buf = host.alloc(PAGE)
    host.memory.write(buf, struct.pack("<Q", 1 << 40))
    assert host.set_feature(FeatureId.TIMESTAMP, data=buf).status == 0
    start = time.monotonic_ns()
    host.disable()
    host.enable()
    value, attributes = _get_timestamp(host)
    assert value <= _ms_since(start) and attributes == 0


def test_feature_timestamp_bad_buffer(host: Host) -> None:
    c = host.set_feature(FeatureId.TIMESTAMP, data=host.scratch + 1)
    assert c.status == with_dnr(Status.PRP_OFFSET_INVALID)
