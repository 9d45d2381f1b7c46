#!/usr/bin/env python3
"""Fuzz target `vfio_user`: every vfio-user decoder of protocol.py, both sides.

Input: a mode byte, an fd-count byte, then a message (16-byte header and payload).
Mode 0 decodes the message as a command the server receives (decode_request), mode 1
as a reply the client receives, mode 2 as the client's reply to our DMA_READ/
DMA_WRITE, mode 3 builds a GET_REGION_INFO reply from the bytes and decodes it.

Invariants: a decoder returns a value or raises ProtocolError (any other exception
is a finding); what it returns is what its encoder turns back into a message that
decodes to the same value; the header round-trips byte for byte; negotiated
capabilities are a subset of the client's, within our limits.
"""

from __future__ import annotations

import errno
import sys

import fuzzing

with fuzzing.instrumented(__name__):
    from nvme_mdev.vfio_user import protocol as p

_LIMITS = (p.Limits(), p.Limits(max_data_xfer_size=4096, max_msg_fds=2))
_ERRNOS = frozenset(errno.errorcode)


def _refused(exc: p.ProtocolError) -> None:
    assert exc.errno in _ERRNOS and exc.errno != 0, f"errno {exc.errno!r} in {exc}"


def _round_trip(decoded: p.Decoded, num_fds: int) -> None:
    """The request, encoded again, decodes to itself."""
    request = decoded.request
    again: object
    if request is None:
        assert decoded.command == p.Command.DEVICE_RESET
        return
    if isinstance(request, p.Version):
        again = p.Version.decode(request.encode())
    elif isinstance(request, p.DmaMap):
        again = p.DmaMap.decode(request.encode())
    elif isinstance(request, p.DmaUnmap):
        again = p.DmaUnmap.decode(request.encode())
    elif isinstance(request, p.DeviceInfo):
        again = p.DeviceInfo.decode_request(request.encode())
    elif isinstance(request, p.RegionInfoRequest):
        again = p.RegionInfoRequest.decode(request.encode())
    elif isinstance(request, p.IrqInfo):
        again = p.IrqInfo.decode(request.encode())
    elif isinstance(request, p.IrqSet):
        again = p.IrqSet.decode(request.encode(), num_fds)
    elif isinstance(request, p.RegionAccess):
        if decoded.is_write:
            again = p.RegionAccess.decode_write(request.encode())
        else:
            again = p.RegionAccess.decode_read(request.encode())
    elif isinstance(request, p.WriteMulti):
        again = p.WriteMulti.decode(request.encode())
    else:
        raise AssertionError(f"unexpected request type {type(request).__name__}")
    assert again == request, f"{request!r} re-decoded as {again!r}"


def _check_request(header: p.Header, payload: bytes, num_fds: int, limits: p.Limits) -> None:
    try:
        decoded = p.decode_request(header.command, payload, num_fds, limits)
    except p.ProtocolError as exc:
        _refused(exc)
        return
    assert decoded.command == header.command
    kinds: dict[p.Command, type | None] = {
        p.Command.VERSION: p.Version,
        p.Command.DMA_MAP: p.DmaMap,
        p.Command.DMA_UNMAP: p.DmaUnmap,
        p.Command.DEVICE_GET_INFO: p.DeviceInfo,
        p.Command.DEVICE_GET_REGION_INFO: p.RegionInfoRequest,
        p.Command.DEVICE_GET_IRQ_INFO: p.IrqInfo,
        p.Command.DEVICE_SET_IRQS: p.IrqSet,
        p.Command.REGION_READ: p.RegionAccess,
        p.Command.REGION_WRITE: p.RegionAccess,
        p.Command.REGION_WRITE_MULTI: p.WriteMulti,
        p.Command.DEVICE_RESET: None,
    }
    assert decoded.command in kinds, decoded.command
    kind = kinds[decoded.command]
    assert (decoded.request is None) if kind is None else isinstance(decoded.request, kind)
    assert decoded.is_write == (decoded.command == p.Command.REGION_WRITE)
    assert num_fds <= limits.max_msg_fds
    if num_fds:
        assert decoded.command in (p.Command.DMA_MAP, p.Command.DEVICE_SET_IRQS)
    request = decoded.request
    if isinstance(request, p.RegionAccess):
        assert request.count <= limits.max_data_xfer_size
        assert len(request.data) == (request.count if decoded.is_write else 0)
    if isinstance(request, p.WriteMulti):
        assert all(len(w.data) == w.count <= p.WRITE_MULTI_DATA for w in request.writes)
    if isinstance(request, p.IrqSet):
        assert request.start + request.count <= 2 * p.MAX_IRQ_COUNT
        if request.bools is not None:
            assert len(request.bools) == request.count
    if isinstance(request, p.Version) and request.capabilities is not None:
        _check_negotiation(request.capabilities)
    _round_trip(decoded, num_fds)


def _check_negotiation(client: p.Capabilities) -> None:
    ours = p.negotiate(client)
    for key in ("max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps"):
        if getattr(client, key) is None:
            assert getattr(ours, key) is None, key  # only what the client offered
    assert ours.effective_max_data_xfer_size <= p.MAX_DATA_XFER_SIZE
    assert ours.effective_max_data_xfer_size <= client.effective_max_data_xfer_size
    assert ours.effective_max_dma_maps <= p.MAX_DMA_MAPS
    if not client.write_multiple:
        assert ours.write_multiple is None
    reply = p.Version(p.MAJOR, p.MINOR, ours)
    assert p.Version.decode(reply.encode()) == reply
    assert p.decode_version(reply.encode()) == (p.MAJOR, p.MINOR, ours)


def _check_reply(header: p.Header, payload: bytes, arg: int) -> None:
    """Mode 1: the message as a reply the project's client decodes."""
    try:
        command = header.command % 16
        if command == p.Command.VERSION:
            major, minor, caps = p.decode_version(payload)
            assert p.Version.decode(p.Version(major, minor, caps).encode()).capabilities == caps
        elif command == p.Command.DMA_UNMAP:
            unmap = p.DmaUnmap.decode(payload)
            assert p.DmaUnmap.decode(unmap.encode()) == unmap
        elif command == p.Command.DEVICE_GET_INFO:
            info = p.DeviceInfo.decode(payload)
            assert p.DeviceInfo.decode(info.encode()) == info
        elif command == p.Command.DEVICE_GET_REGION_INFO:
            region = p.RegionInfo.decode(payload)
            if region.sparse_areas:
                assert region.flags & p.REGION_INFO_FLAG_CAPS and region.cap_offset
        elif command == p.Command.DEVICE_GET_IRQ_INFO:
            irq = p.IrqInfo.decode(payload)
            assert p.IrqInfo.decode(irq.encode()) == irq
        elif command == p.Command.REGION_READ:
            read = p.RegionAccess.decode_read_reply(payload, arg)
            assert read.count <= arg and len(read.data) == read.count
            assert p.RegionAccess.decode_read_reply(read.encode(), arg) == read
        elif command == p.Command.REGION_WRITE:
            written = p.RegionAccess.decode_write_reply(payload)
            assert p.RegionAccess.decode_write_reply(written.encode()) == written
            offset, region_index, count, data = p.decode_region_rw(payload, with_data=False)
            assert (offset, region_index, count, data) == (
                written.offset,
                written.region,
                written.count,
                b"",
            )
        elif command == p.Command.REGION_WRITE_MULTI:
            writes = p.decode_write_multi(payload)
            assert len(writes) <= p.WRITE_MULTI_MAX
        elif command == p.Command.DMA_WRITE:
            address, count, data = p.decode_dma_rw(payload)
            assert count == len(data) <= p.MAX_MAX_DATA_XFER_SIZE and address + count <= 1 << 64
            assert p.decode_dma_rw(p.encode_dma_write(address, data)) == (address, count, data)
        else:
            caps = p.Capabilities.from_json({"capabilities": {"max_msg_fds": arg}})
            assert caps.max_msg_fds == arg
    except p.ProtocolError as exc:
        _refused(exc)


def _check_dma_reply(header: p.Header, payload: bytes, arg: int) -> None:
    """Mode 2: the client's reply to a DMA_READ/DMA_WRITE we sent (the header's
    msg_id/size give what we asked for)."""
    sent = p.DmaAccess(header.flags | header.error << 32, arg % (p.MAX_DATA_XFER_SIZE + 1))
    if sent.address + sent.count > 1 << 64:
        return  # we never send one
    try:
        if header.command & 1:
            data = p.DmaAccess.decode_read_reply(payload, sent)
            assert len(data) <= sent.count
        else:
            sent = p.DmaAccess(sent.address, sent.count, bytes(sent.count))
            written = p.DmaAccess.decode_write_reply(payload, sent)
            assert 0 <= written <= sent.count
    except p.ProtocolError as exc:
        _refused(exc)
    access = p.DmaAccess(sent.address, sent.count, payload[: sent.count])
    with_data = len(access.data) == access.count
    try:
        again = p.DmaAccess.decode(access.encode(), with_data)
    except p.ProtocolError as exc:
        _refused(exc)
    else:
        if with_data:
            assert again == access, (again, access)


def _check_region_info(data: fuzzing.Input) -> None:
    """Mode 3: a GET_REGION_INFO reply we build decodes to what we built."""
    client_argsz, index, flags = data.u32(), data.u32(), data.u32()
    size, offset = data.u64(), data.u64()
    areas = [(data.u64(), data.u64()) for _ in range(data.u8() % 8)]
    info, payload = p.RegionInfo.build(client_argsz, index, flags, size, offset, areas)
    assert len(payload) <= max(client_argsz, p.REGION_INFO.size)
    assert info.argsz == p.REGION_INFO.size + (len(p.RegionInfo.sparse_cap(areas)) if areas else 0)
    decoded = p.RegionInfo.decode(payload)
    assert decoded == info, (decoded, info)
    if offset == 0:
        assert p.encode_region_info(client_argsz, index, flags, size, areas) == payload


def fuzz(data: bytes) -> None:
    source = fuzzing.Input(data)
    mode, arg = source.u8(), source.u8()
    if mode % 4 == 3:
        _check_region_info(source)
        return
    message = source.rest()
    try:
        header = p.Header.decode(message, p.MAX_MESSAGE_SIZE if mode & 4 else 4096)
    except p.ProtocolError as exc:
        _refused(exc)
        if len(message) >= p.HEADER_SIZE:
            size = int.from_bytes(message[4:8], "little")
            assert size < p.HEADER_SIZE or size > (p.MAX_MESSAGE_SIZE if mode & 4 else 4096)
        return
    assert header.encode() == message[: p.HEADER_SIZE]
    assert header.size >= p.HEADER_SIZE
    try:
        header.check_command_flags()
    except p.ProtocolError as exc:
        _refused(exc)
    else:
        assert header.is_command and not header.is_error and not header.is_reply
    payload = message[p.HEADER_SIZE : header.size]
    if mode % 4 == 0:
        _check_request(header, payload, arg % 20, _LIMITS[(mode >> 3) & 1])
    elif mode % 4 == 1:
        _check_reply(header, payload, arg << (mode >> 4))
    else:
        _check_dma_reply(header, payload, arg << (mode >> 3))
    reply = p.encode_message(header.msg_id, header.command, payload, reply=True, error=header.error)
    again = p.Header.decode(reply)
    assert again.is_reply and again.msg_id == header.msg_id and again.command == header.command
    assert again.size == len(reply) and bool(again.is_error) == bool(header.error)


if __name__ == "__main__":
    fuzzing.main(fuzz)
    sys.exit(0)
