"""StoreDimseProvider: the C-STORE responses it encodes itself are the bytes pynetdicom would send; the rest is pynetdicom's."""

from __future__ import annotations

import queue
import random
import struct
import warnings
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, SegmentationStorage

from dicom_node.receive.dataset_buffer import IntakeLimits, SpilledDataSet
from dicom_node.receive.journal import part10_head_for
from dicom_node.receive.store_dimse import StoreDimseProvider, encode_store_response


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
        ours = _sent_by(StoreDimseProvider, _response(message_id, sop_class, sop_instance, status), context_id)
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
    assert _sent_by(StoreDimseProvider, rsp) == expected
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
    _sent_by(StoreDimseProvider, echo)
    _sent_by(StoreDimseProvider, request)
    assert calls == [echo, request]
    calls.clear()
    # the command (84 bytes here) and its 6 PDV bytes do not fit a 64-byte PDU: pynetdicom fragments it
    fragmented = _sent_by(StoreDimseProvider, plain, maximum_length=64)
    assert calls == [plain] and len(fragmented) == 2
    calls.clear()
    _sent_by(StoreDimseProvider, plain, handlers=[(lambda event: None, None)])  # EVT_DIMSE_SENT bound
    assert calls == [plain]
    calls.clear()
    assert _sent_by(StoreDimseProvider, plain, maximum_length=0) == _sent_by(DIMSEServiceProvider, plain, maximum_length=0)
    assert calls == [plain]  # only the reference went through pynetdicom; unlimited PDU length: ours


# -- requests ---------------------------------------------------------------

class _QueueDul(_Dul):
    def __init__(self) -> None:
        super().__init__()
        self.event_queue: queue.Queue[str] = queue.Queue()


def _receiving(handlers: list[Any] | None = None) -> Any:
    association = _association(handlers=handlers)
    association.dul = _QueueDul()
    association.get_handlers = (lambda event: handlers or []) if handlers else (lambda event: [])
    return association


def _request_pdatas(message_id: int, sop_class: str, sop_instance: str, data: bytes, max_pdu: int,
                    context_id: int = 1, **extra: Any) -> list[P_DATA]:
    """What a peer sends for one C-STORE-RQ, cut by pynetdicom's own encoder at ``max_pdu``."""
    request = C_STORE()
    request.MessageID, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = message_id, sop_class, sop_instance
    request.Priority, request.DataSet = extra.pop("Priority", 2), BytesIO(data)
    for name, value in extra.items():
        setattr(request, name, value)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return list(message.encode_msg(context_id, max_pdu))


def _received(provider_class: type[DIMSEServiceProvider], pdatas: list[Any]) -> tuple[list[Any], list[str]]:
    """Feed P-DATA primitives in; the (context ID, request attributes) queued and the DUL events put."""
    association = _receiving()
    provider = provider_class(association)
    for pdata in pdatas:
        provider.receive_primitive(pdata)
    queued = []
    while not provider.msg_queue.empty():
        context_id, primitive = provider.msg_queue.get()
        queued.append((context_id, type(primitive).__name__, _attributes(primitive)))
    events = []
    while not association.dul.event_queue.empty():
        events.append(association.dul.event_queue.get())
    return queued, events


def _attributes(primitive: Any) -> dict[str, Any]:
    names = ("MessageID", "MessageIDBeingRespondedTo", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
             "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID", "_context_id")
    out = {name: getattr(primitive, name, None) for name in names}
    for name in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
        out[name] = (out[name], type(out[name]).__name__)
    dataset = getattr(primitive, "DataSet", None) or getattr(primitive, "Identifier", None)
    out["data"] = dataset.getvalue() if isinstance(dataset, BytesIO) else dataset
    return out


def test_requests_are_the_primitives_pynetdicom_queues() -> None:
    rng = random.Random(11)
    for case in range(120):
        data = rng.randbytes(rng.choice([2, 100, 5000, 70_000]))
        extra: dict[str, Any] = {"Priority": rng.choice([0, 1, 2])}
        if case % 3 == 0:
            extra["MoveOriginatorApplicationEntityTitle"] = rng.choice(["MOVER", "A", "SIXTEEN_CHARS_AE"])
            extra["MoveOriginatorMessageID"] = rng.randint(0, 65535)
        # PDUs small enough to cut the command set itself into fragments, up to unlimited
        max_pdu = rng.choice([0, 16382, 4096, 64, 40])
        pdatas = _request_pdatas(rng.randint(0, 65535), _uid(rng), _uid(rng), data, max_pdu,
                                 rng.choice([1, 5, 255]), **extra)
        ours, theirs = _received(StoreDimseProvider, pdatas), _received(DIMSEServiceProvider, pdatas)
        assert ours == theirs and len(ours[0]) == 1 and not ours[1], (case, max_pdu)


def _command(*elements: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack("<HHI", 0x0000, number, len(value)) + value for number, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _pdata(context_id: int, control: int, payload: bytes) -> P_DATA:
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, bytes([control]) + payload))
    return pdata


def _plain_elements(**replace: bytes) -> list[tuple[int, bytes]]:
    us = lambda value: struct.pack("<H", value)  # noqa: E731
    elements = {0x0002: CTImageStorage.encode() + b"\x00", 0x0100: us(1), 0x0110: us(7), 0x0700: us(0),
                0x0800: us(0), 0x1000: b"1.2.3.4 "}
    elements.update({int(k[1:], 16): v for k, v in replace.items()})
    return sorted((k, v) for k, v in elements.items() if v != b"-")


@pytest.mark.parametrize("replace", [
    {},  # plain; the instance UID padded with a space, as some senders do
    {"x1000": b"1.2.3.4\x00"},
    {"x1030": b" MOVER  ", "x1031": struct.pack("<H", 9)},
    {"x0001": struct.pack("<I", 0)},  # a retired element: pynetdicom's
    {"x0800": struct.pack("<H", 0x0101)},  # no data set: pynetdicom's
    {"x1000": b"1.2.3\\1.2.4"},  # two values: pynetdicom takes the first and warns
    {"x0110": struct.pack("<I", 7)},  # a US of four bytes
    {"x0700": struct.pack("<H", 7)},  # a priority pynetdicom does not check
    {"x1000": b"1.2.\xe9"},  # not ASCII
    {"x0100": struct.pack("<H", 0x0030)},  # C-ECHO-RQ's command field with a data set
    {"x0002": b"-"},  # no SOP Class UID
])
def test_other_command_sets_are_decoded_by_pynetdicom(replace: dict[str, bytes]) -> None:
    command = _command(*_plain_elements(**replace))
    pdatas = [_pdata(3, 0x01, command[:10]), _pdata(3, 0x03, command[10:]), _pdata(3, 0x00, b"\x08\x00"),
              _pdata(3, 0x02, b"\x18\x00")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = _received(StoreDimseProvider, pdatas), _received(DIMSEServiceProvider, pdatas)
    assert ours == theirs


def test_a_handed_over_message_then_plain_ones_and_a_refused_one() -> None:
    echo_command = _command((0x0002, b"1.2.840.10008.1.1\x00"), (0x0100, struct.pack("<H", 0x0030)),
                            (0x0110, struct.pack("<H", 1)), (0x0800, struct.pack("<H", 0x0101)))
    too_long = "1." + "2" * 70  # 72 characters: the primitive refuses it, pynetdicom aborts (Evt19)
    pdatas = [
        _pdata(1, 0x03, echo_command),
        *_request_pdatas(2, CTImageStorage, "1.2.3", b"\x01\x02" * 40_000, 16382, 3),
        *_request_pdatas(3, MRImageStorage, "1.2.4", b"\x03\x04", 0, 5),
        _pdata(7, 0x03, _command(*_plain_elements(x1000=too_long.encode()))),
        _pdata(7, 0x02, b"\x00\x00"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's on the long UID
        ours, theirs = _received(StoreDimseProvider, pdatas), _received(DIMSEServiceProvider, pdatas)
    assert ours == theirs
    assert [name for _, name, _ in ours[0]] == ["C_ECHO", "C_STORE", "C_STORE"] and ours[1] == ["Evt19"]


def test_a_command_inside_a_data_set_aborts() -> None:
    pdatas = _request_pdatas(2, CTImageStorage, "1.2.3", b"\x01\x02" * 10_000, 4096)
    pdatas.insert(2, _pdata(1, 0x03, b"\x00"))
    assert _received(StoreDimseProvider, pdatas[:3]) == ([], ["Evt19"])  # the DUL aborts: nothing more is read


def test_requests_go_to_pynetdicom_with_a_receive_handler_or_chunked_data_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    original = DIMSEServiceProvider.receive_primitive

    def recording(self: DIMSEServiceProvider, primitive: Any) -> None:
        seen.append(primitive)
        # a handler would want a real association; chunked, pynetdicom would write a temporary file
        if not self.assoc.get_handlers(evt.EVT_DIMSE_RECV) and not _config.STORE_RECV_CHUNKED_DATASET:
            original(self, primitive)

    monkeypatch.setattr(DIMSEServiceProvider, "receive_primitive", recording)
    pdatas = _request_pdatas(2, CTImageStorage, "1.2.3", b"\x01\x02", 0)
    association = _receiving(handlers=[(lambda event: None, None)])
    association.get_handlers = lambda event: [] if event is not evt.EVT_DIMSE_RECV else [(lambda e: None, None)]
    for pdata in pdatas:
        StoreDimseProvider(association).receive_primitive(pdata)
    assert seen == pdatas
    seen.clear()
    _received(StoreDimseProvider, pdatas)
    assert seen == []  # ours
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    provider = StoreDimseProvider(_receiving())
    provider.receive_primitive(pdatas[0])  # the command set: pynetdicom's
    assert seen == [pdatas[0]]


def test_command_fragments_without_end_abort() -> None:
    fragment = _pdata(1, 0x01, b"\x00" * 16_000)  # command, not the last fragment
    assert _received(StoreDimseProvider, [fragment] * 4) == ([], [])  # 64,000 bytes: still gathered
    assert _received(StoreDimseProvider, [fragment] * 5) == ([], ["Evt19"])


def _statuses_and_threads(install: bool) -> tuple[list[tuple[int, ...]], list[str]]:
    """C-STOREs over one association to a pynetdicom SCP (with this provider installed or not): each response's
    Status (and Error Comment, if any) and the thread the handler ran in."""
    import threading

    from pydicom.dataset import Dataset
    from pynetdicom import AE

    threads: list[str] = []

    def handler(event: Any) -> Any:
        threads.append("dul" if threading.current_thread() is event.assoc.dul else "association")
        ending = str(event.request.AffectedSOPInstanceUID).rsplit(".", 1)[1]
        if ending == "3":
            raise RuntimeError("a handler's defect")
        if ending == "4":
            status = Dataset()
            status.Status, status.ErrorComment = 0xB000, "coerced"
            return status
        return {"1": 0x0000, "2": 0xA700, "5": 0xFFFF}[ending]  # 0xFFFF: not a storage status

    def opened(event: Any) -> None:
        if install and event.assoc.is_acceptor:
            event.assoc.dimse = StoreDimseProvider(event.assoc)

    scp = AE(ae_title="SCP")
    scp.add_supported_context(CTImageStorage)
    server = scp.start_server(("127.0.0.1", 0), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, handler), (evt.EVT_CONN_OPEN, opened)])
    out: list[tuple[int, ...]] = []
    try:
        scu = AE(ae_title="SCU")
        scu.add_requested_context(CTImageStorage)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="SCP")
        assert assoc.is_established
        for ending in "12345":
            ds = Dataset()
            ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = CTImageStorage, f"1.2.3.{ending}", "P"
            ds.file_meta = Dataset()
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
            rsp = assoc.send_c_store(ds)
            out.append((int(rsp.Status), *([1] if "ErrorComment" in rsp else [])))
        assoc.release()
    finally:
        server.shutdown()
    return out, threads


def test_a_plain_store_is_served_in_the_dul_thread_with_pynetdicoms_responses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Served where its last fragment is read (no poll of the association thread between the request and the
    handler, nor of the DUL's between the handler and the response); statuses, an Error Comment, a handler's
    exception (0xC211) and a status that is not the service's exactly as pynetdicom's own Storage SCP answers."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "none")  # as the node runs (dicom_node.logs)
    theirs, their_threads = _statuses_and_threads(install=False)
    ours, our_threads = _statuses_and_threads(install=True)
    assert ours == theirs
    assert [status for status, *_ in theirs] == [0x0000, 0xA700, 0xC211, 0xB000, 0xFFFF]
    assert their_threads == ["association"] * 5 and our_threads == ["dul"] * 5


def _limited(tmp_path: Path, max_bytes: int) -> tuple[Any, StoreDimseProvider]:
    """A receiving association with one accepted context (ID 1, Explicit VR Little Endian) and a provider that
    keeps 1000 bytes of a data set in memory, spills the rest to ``tmp_path`` and refuses past ``max_bytes``."""
    association = _receiving()
    association.accepted_contexts = [SimpleNamespace(context_id=1, transfer_syntax=[ExplicitVRLittleEndian])]
    limits = IntakeLimits(max_bytes=max_bytes, spill_dir=tmp_path, free_mb=lambda: 1e9, min_free_mb=1,
                          memory_bytes=1000)
    return association, StoreDimseProvider(association, limits)


def test_a_large_data_set_reaches_pynetdicom_as_a_spill_file_with_the_same_request(tmp_path: Path) -> None:
    data = bytes(range(256)) * 300
    pdatas = _request_pdatas(9, CTImageStorage, "1.2.3.4", data, 16382, 1)
    association, provider = _limited(tmp_path, max_bytes=10**6)
    for pdata in pdatas:
        provider.receive_primitive(pdata)
    context_id, request = provider.msg_queue.get(block=False)  # no handler: pynetdicom serves it
    assert isinstance(request.DataSet, SpilledDataSet)
    head = part10_head_for(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian)
    assert request.DataSet.path.read_bytes() == head + data
    theirs = _received(DIMSEServiceProvider, pdatas)[0]
    assert [(context_id, "C_STORE", _attributes(request) | {"data": request.DataSet.getvalue()})] == theirs
    request.DataSet.close()
    assert list(tmp_path.iterdir()) == []


def test_a_data_set_past_the_limit_is_answered_out_of_resources_and_the_next_is_served(tmp_path: Path) -> None:
    association, provider = _limited(tmp_path, max_bytes=50_000)
    for pdata in [*_request_pdatas(3, CTImageStorage, "1.2.3.5", b"\x01" * 60_000, 16382, 1),
                  *_request_pdatas(4, CTImageStorage, "1.2.3.6", b"\x02" * 40_000, 16382, 1)]:
        provider.receive_primitive(pdata)
    refusal = encode_store_response(3, CTImageStorage, "1.2.3.5", 0xA700)
    assert association.dul.sent == [[(1, b"\x03" + refusal)]]
    context_id, request = provider.msg_queue.get(block=False)
    assert (request.MessageID, request.DataSet.getvalue()) == (4, b"\x02" * 40_000) and provider.msg_queue.empty()
    assert association.dul.event_queue.empty()
    request.DataSet.close()
    assert list(tmp_path.iterdir()) == []


def test_a_message_pynetdicom_decodes_is_bounded_too(tmp_path: Path) -> None:
    command = _command(*_plain_elements(x0001=struct.pack("<I", 0)))  # a retired element: pynetdicom decodes it
    pdatas = [_pdata(1, 0x03, command)] + [_pdata(1, 0x00, b"\x00" * 16_000)] * 7 + [_pdata(1, 0x02, b"\x00\x00")]
    association, provider = _limited(tmp_path, max_bytes=20_000)
    for pdata in pdatas[:6]:  # the command and 80,005 bytes: within 20,000 and a command set's 65,536
        provider.receive_primitive(pdata)
    assert association.dul.event_queue.empty() and provider.message is not None  # pynetdicom's, gathering
    provider.receive_primitive(pdatas[6])
    assert association.dul.event_queue.get(block=False) == "Evt19"  # past it: A-ABORT


def test_a_spill_file_of_an_association_that_ended_is_removed(tmp_path: Path) -> None:
    association, provider = _limited(tmp_path, max_bytes=10**6)
    for pdata in _request_pdatas(5, CTImageStorage, "1.2.3.7", b"\x03" * 20_000, 4096, 1)[:-1]:
        provider.receive_primitive(pdata)
    assert len(list(tmp_path.iterdir())) == 1
    provider.discard()
    assert list(tmp_path.iterdir()) == []
