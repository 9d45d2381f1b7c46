"""Get Features / Set Features (NVMe Base 5.15, 5.27) and the feature values.

Every feature the controller reports has a current and a default value; none is
saveable (ONCS.SAVE is set so that SEL works, and SV answers 'not saveable').
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CommandError
from ..identity import ControllerConfig
from ..prp import receive_from_host, send_to_host
from ..spec import FeatureId, Status

if TYPE_CHECKING:
    from ..controller import Controller

SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_SUPPORTED = 0, 1, 2, 3
CAP_SAVEABLE, CAP_NS_SPECIFIC, CAP_CHANGEABLE = 1, 2, 4

WARNING_TEMPERATURE = 343  # Kelvin: WCTEMP in Identify Controller
REPORTED_TEMPERATURE = 313
ASYNC_EVENT_CONFIG_SUPPORTED = 0x1FF  # SMART warnings (7:0) and namespace attribute notices (8)
#: Arbitration Burst, log2 of commands taken from one SQ per turn (111b: no limit);
#: Identify Controller RAB recommends the same
DEFAULT_ARBITRATION_BURST = 5


def _defaults(config: ControllerConfig) -> dict[int, int]:
    return {
        FeatureId.ARBITRATION: DEFAULT_ARBITRATION_BURST,  # AB; round robin only
        FeatureId.POWER_MANAGEMENT: 0,
        FeatureId.TEMPERATURE_THRESHOLD: WARNING_TEMPERATURE,
        FeatureId.ERROR_RECOVERY: 0,
        FeatureId.VOLATILE_WRITE_CACHE: 1,
        FeatureId.NUMBER_OF_QUEUES: (config.max_io_queues - 1) | ((config.max_io_queues - 1) << 16),
        FeatureId.INTERRUPT_COALESCING: 0,
        FeatureId.WRITE_ATOMICITY: 0,
        FeatureId.ASYNC_EVENT_CONFIG: 0,
        FeatureId.TIMESTAMP: 0,
    }


@dataclass
class FeatureState:
    config: ControllerConfig
    current: dict[int, int] = field(init=False)
    #: Interrupt Vector Configuration: vectors with coalescing disabled
    coalescing_disabled: set[int] = field(default_factory=set)
    #: Temperature Threshold per (TMPSEL, THSEL); composite over-threshold lives in current
    thresholds: dict[tuple[int, int], int] = field(default_factory=dict)
    #: Number of Queues, once the host has set it (Base 5.27.1.5: once per reset)
    io_queues_requested: bool = False
    timestamp_origin: tuple[int, float] = (0, 0.0)
    #: whether the host set the Timestamp since the last reset (its Timestamp Origin)
    timestamp_set: bool = False

    def __post_init__(self) -> None:
        self.reset()

    def handover_state(self) -> dict[str, Any]:
        return {
            "current": {str(k): v for k, v in self.current.items()},
            "coalescing_disabled": sorted(self.coalescing_disabled),
            "thresholds": [[sel, thsel, v] for (sel, thsel), v in self.thresholds.items()],
            "io_queues_requested": self.io_queues_requested,
            "timestamp_origin": list(self.timestamp_origin),  # CLOCK_MONOTONIC: host-wide
            "timestamp_set": self.timestamp_set,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.current = {int(k): int(v) for k, v in state["current"].items()}
        self.coalescing_disabled = set(state["coalescing_disabled"])
        self.thresholds = {(sel, thsel): v for sel, thsel, v in state["thresholds"]}
        self.io_queues_requested = bool(state["io_queues_requested"])
        value, clock = state["timestamp_origin"]
        self.timestamp_origin = (int(value), float(clock))
        self.timestamp_set = bool(state["timestamp_set"])

    def reset(self) -> None:
        self.current = _defaults(self.config)
        self.coalescing_disabled = set()
        self.thresholds = {}
        self.io_queues_requested = False
        self.timestamp_origin = (0, time.monotonic())
        self.timestamp_set = False

    @property
    def io_queues_allocated(self) -> int:
        nq = self.current[FeatureId.NUMBER_OF_QUEUES]
        return min(nq & 0xFFFF, nq >> 16) + 1

    @property
    def arbitration_burst(self) -> int:
        """Commands the I/O thread may take from one SQ before moving to the next."""
        ab = self.current[FeatureId.ARBITRATION] & 0x7
        return 1 << 30 if ab == 0x7 else 1 << ab

    @property
    def volatile_write_cache(self) -> bool:
        return bool(self.current[FeatureId.VOLATILE_WRITE_CACHE] & 1)

    @property
    def async_event_config(self) -> int:
        return self.current[FeatureId.ASYNC_EVENT_CONFIG]

    def timestamp_ms(self) -> int:
        origin_ms, origin_clock = self.timestamp_origin
        return origin_ms + int((time.monotonic() - origin_clock) * 1000)


SUPPORTED = frozenset(
    {
        FeatureId.ARBITRATION,
        FeatureId.POWER_MANAGEMENT,
        FeatureId.TEMPERATURE_THRESHOLD,
        FeatureId.ERROR_RECOVERY,
        FeatureId.VOLATILE_WRITE_CACHE,
        FeatureId.NUMBER_OF_QUEUES,
        FeatureId.INTERRUPT_COALESCING,
        FeatureId.INTERRUPT_VECTOR_CONFIG,
        FeatureId.WRITE_ATOMICITY,
        FeatureId.ASYNC_EVENT_CONFIG,
        FeatureId.TIMESTAMP,
    }
)


def _check_fid(fid: int, nsid: int) -> None:
    if fid not in SUPPORTED:
        raise CommandError(Status.INVALID_FIELD, f"feature {fid:#x} not supported")
    if nsid not in (0, 0xFFFFFFFF):
        # None of our features is namespace specific (Base 5.27.1: such an NSID is an error).
        raise CommandError(Status.FEATURE_NOT_NAMESPACE_SPECIFIC, f"feature {fid:#x} nsid {nsid}")


def get_features(ctrl: Controller, dw: tuple[int, ...]) -> int:
    fid, sel = dw[10] & 0xFF, (dw[10] >> 8) & 0x7
    _check_fid(fid, dw[1])
    state = ctrl.features
    if sel == SEL_SUPPORTED:
        # Every feature here can be set (Number of Queues only before queues exist);
        # none is saveable or namespace specific.
        return CAP_CHANGEABLE
    if sel > SEL_SUPPORTED:
        raise CommandError(Status.INVALID_FIELD, f"SEL {sel}")
    values = state.current if sel == SEL_CURRENT else _defaults(ctrl.config)
    if fid == FeatureId.TEMPERATURE_THRESHOLD:
        return _get_temperature_threshold(state, dw[11], sel == SEL_CURRENT)
    if fid == FeatureId.INTERRUPT_VECTOR_CONFIG:
        vector = dw[11] & 0xFFFF
        if vector >= ctrl.config.msix_vectors:
            raise CommandError(Status.INVALID_FIELD, f"vector {vector}")
        # Coalescing never applies to the admin CQ (Interrupt Coalescing feature): CD reads 1.
        disabled = vector == 0 or (sel == SEL_CURRENT and vector in state.coalescing_disabled)
        return vector | (int(disabled) << 16)
    if fid == FeatureId.TIMESTAMP:
        current = sel == SEL_CURRENT
        stamp = state.timestamp_ms() if current else 0
        # Attributes: Timestamp Origin (bits 3:1) 001b once set by Set Features, else 000b
        # (zeroed by a Controller Level Reset); Synch (bit 0) 0: we never stop counting.
        origin = 0b001 if current and state.timestamp_set else 0b000
        send_to_host(ctrl.memory, dw, stamp.to_bytes(6, "little") + bytes([origin << 1, 0]))
        return 0
    return values[fid]


def _get_temperature_threshold(state: FeatureState, dw11: int, current: bool) -> int:
    tmpsel, thsel = (dw11 >> 16) & 0xF, (dw11 >> 20) & 0x3
    if thsel > 1 or (tmpsel > 8 and tmpsel != 0xF):
        raise CommandError(Status.INVALID_FIELD, "temperature threshold selector")
    default = WARNING_TEMPERATURE if thsel == 0 else 0
    value = state.thresholds.get((tmpsel, thsel), default) if current else default
    return value | (tmpsel << 16) | (thsel << 20)


def set_features(ctrl: Controller, dw: tuple[int, ...]) -> int:
    fid, save = dw[10] & 0xFF, bool(dw[10] >> 31)
    _check_fid(fid, dw[1])
    if save:
        raise CommandError(Status.FEATURE_ID_NOT_SAVEABLE)
    state, value = ctrl.features, dw[11]
    if fid == FeatureId.NUMBER_OF_QUEUES:
        return _set_number_of_queues(ctrl, value)
    if fid == FeatureId.POWER_MANAGEMENT and value & 0x1F:
        raise CommandError(Status.INVALID_FIELD, "only power state 0 exists")
    if fid == FeatureId.ERROR_RECOVERY and value & (1 << 16):
        raise CommandError(Status.INVALID_FIELD, "DULBE is not supported")
    if fid == FeatureId.TEMPERATURE_THRESHOLD:
        tmpsel, thsel = (value >> 16) & 0xF, (value >> 20) & 0x3
        if thsel > 1 or (tmpsel > 8 and tmpsel != 0xF):
            raise CommandError(Status.INVALID_FIELD, "temperature threshold selector")
        targets = range(9) if tmpsel == 0xF else (tmpsel,)
        for sel in targets:
            state.thresholds[(sel, thsel)] = value & 0xFFFF
        return 0
    if fid == FeatureId.INTERRUPT_VECTOR_CONFIG:
        vector = value & 0xFFFF
        if vector == 0 or vector >= ctrl.config.msix_vectors:
            # Coalescing never applies to the admin queue's vector 0 (Base 5.27.1.10).
            raise CommandError(Status.INVALID_FIELD, f"vector {vector}")
        if value & (1 << 16):
            state.coalescing_disabled.add(vector)
        else:
            state.coalescing_disabled.discard(vector)
        return 0
    if fid == FeatureId.TIMESTAMP:
        raw = receive_from_host(ctrl.memory, dw, 8)
        state.timestamp_origin = (int.from_bytes(raw[:6], "little"), time.monotonic())
        state.timestamp_set = True
        return 0
    masks = {
        FeatureId.ARBITRATION: 0xFFFFFF07,
        FeatureId.POWER_MANAGEMENT: 0xFF,
        FeatureId.ERROR_RECOVERY: 0xFFFF,
        FeatureId.VOLATILE_WRITE_CACHE: 0x1,
        FeatureId.INTERRUPT_COALESCING: 0xFFFF,
        FeatureId.WRITE_ATOMICITY: 0x1,
        FeatureId.ASYNC_EVENT_CONFIG: ASYNC_EVENT_CONFIG_SUPPORTED,
    }
    state.current[fid] = value & masks[FeatureId(fid)]
    return 0


def _set_number_of_queues(ctrl: Controller, value: int) -> int:
    nsqr, ncqr = value & 0xFFFF, value >> 16
    if nsqr == 0xFFFF or ncqr == 0xFFFF:
        raise CommandError(Status.INVALID_FIELD, "65536 queues requested")
    if ctrl.io_queues:
        raise CommandError(Status.COMMAND_SEQUENCE_ERROR, "I/O queues already exist")
    limit = ctrl.config.max_io_queues - 1
    granted = min(nsqr, limit) | (min(ncqr, limit) << 16)
    ctrl.features.current[FeatureId.NUMBER_OF_QUEUES] = granted
    ctrl.features.io_queues_requested = True
    return granted
