"""StoreResponder: the C-STORE responses it encodes itself are the bytes pynetdicom would send; the rest is pynetdicom's."""

from __future__ import annotations

import random
from io import BytesIO
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SegmentationStorage

from dicom_node.receive.responder import StoreResponder, encode_store_response


class _Dul:
    def __init__(self) -> None:
        self.sent: list[list[tuple[int, bytes]]] = []

    def send_pdu(self, primitive: Any) -> None:
        self.sent.append([(cid, bytes(data)) for cid, data in primitive.presentation_data_value_list])


def _association(maximum_length: int = 16382, handlers: list[Any] | None = None) -> Any:
    bound = {evt.EVT_DIMSE_SENT: handlers} if handlers else {}
    return SimpleNamespace(
        dul=_Dul(), is_requestor=False, requestor=SimpleNamespace(maximum_length=maximum_length),
        acceptor=SimpleNamespace(maximum_length=maximum_length), dimse_timeout=30,
        get_handlers=lambda event: bound.get(event, []),
    )


def _response(message_id: int, sop_class: str, sop_instance: str, status: int, **extra: Any) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    for name, value in extra.items():
        setattr(rsp, name, value)
    return rsp


def _sent_by(provider_class: type[DIMSEServiceProvider], primitive: Any, context_id: int = 1,
              **assoc: Any) -> list[list[tuple[int, bytes]]]:
    association = _association(**assoc)
    provider_class(association).send_msg(primitive, context_id)
    return association.dul.sent  # type: ignore[no-any-return]


def _uid(rng: random.Random) -> str:
    """A valid UID of 1 to 64 characters (odd and even lengths)."""
    length = rng.randint(1, 64)
    parts: list[str] = []
    while len(".".join(parts)) < length:
        parts.append(str(rng.randint(0, 10 ** rng.randint(1, 12))))
    return ".".join(parts)[:length].rstrip(".").rstrip("0").rstrip(".") or "1"


def test_plain_responses_are_the_bytes_pynetdicom_sends() -> None:
    rng = random.Random(7)
    cases = [
        (1, CTImageStorage, generate_uid(), 0x0000),
        (65535, MRImageStorage, "1.2", 0xA700),
        (2, SegmentationStorage, "1.2.3", 0xC210),
        (40000, "1.2.840.10008.5.1.4.1.1.2", "1" * 64, 0xB000),
        (0, "1.2.840.10008.5.1.4.1.1.2", "1" * 63, 0xFFFF),
    ]
    cases += [(rng.randint(0, 65535), _uid(rng), _uid(rng), rng.choice([0, 0xA700, 0xA900, 0xC001, 0xB007]))
              for _ in range(200)]
    for message_id, sop_class, sop_instance, status in cases:
        context_id = rng.choice([1, 3, 127, 255])
        ours = _sent_by(StoreResponder, _response(message_id, sop_class, sop_instance, status), context_id)
        theirs = _sent_by(DIMSEServiceProvider, _response(message_id, sop_class, sop_instance, status), context_id)
        assert ours == theirs, (message_id, sop_class, sop_instance, status)
        assert len(ours) == 1 and ours[0][0][1][0] == 0x03  # one PDV: the whole command, last fragment


def test_encoded_command_set_reads_back() -> None:
    from pydicom.filereader import read_dataset

    command = encode_store_response(12, CTImageStorage, "1.2.345", 0xA700)
    ds = read_dataset(BytesIO(command), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(command) - 12
    assert (ds.AffectedSOPClassUID, ds.CommandField, ds.MessageIDBeingRespondedTo) == (CTImageStorage, 0x8001, 12)
    assert (ds.CommandDataSetType, ds.Status, ds.AffectedSOPInstanceUID) == (0x0101, 0xA700, "1.2.345")


@pytest.mark.parametrize("extra", [{"ErrorComment": "SOP Instance UID differs"}, {"OffendingElement": [0x00080018]}])
def test_responses_with_more_elements_go_to_pynetdicom(extra: dict[str, Any]) -> None:
    rsp = _response(3, CTImageStorage, "1.2.3", 0xA900, **extra)
    expected = _sent_by(DIMSEServiceProvider, _response(3, CTImageStorage, "1.2.3", 0xA900, **extra))
    assert _sent_by(StoreResponder, rsp) == expected
    assert len(expected[0][0][1]) > len(encode_store_response(3, CTImageStorage, "1.2.3", 0xA900)) + 1


def test_other_messages_and_small_peers_go_to_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    original = DIMSEServiceProvider.send_msg

    def counting(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
        calls.append(primitive)
        if not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):  # a handler would want a real association
            original(self, primitive, context_id)

    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", counting)
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo, echo.Status = 1, 0
    request = C_STORE()  # a request (no Message ID Being Responded To): the node's SCU side
    request.MessageID, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = 5, CTImageStorage, "1.2.3"
    request.Priority, request.DataSet = 2, BytesIO(b"\x08\x00\x18\x00\x06\x00\x00\x001.2.3\x00")
    plain = _response(4, CTImageStorage, "1.2.3", 0)
    _sent_by(StoreResponder, echo)
    _sent_by(StoreResponder, request)
    assert calls == [echo, request]
    calls.clear()
    # the command (84 bytes here) and its 6 PDV bytes do not fit a 64-byte PDU: pynetdicom fragments it
    fragmented = _sent_by(StoreResponder, plain, maximum_length=64)
    assert calls == [plain] and len(fragmented) == 2
    calls.clear()
    _sent_by(StoreResponder, plain, handlers=[(lambda event: None, None)])  # EVT_DIMSE_SENT bound
    assert calls == [plain]
    calls.clear()
    assert _sent_by(StoreResponder, plain, maximum_length=0) == _sent_by(DIMSEServiceProvider, plain, maximum_length=0)
    assert calls == [plain]  # only the reference went through pynetdicom; unlimited PDU length: ours
