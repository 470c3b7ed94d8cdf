"""C-STORE messages without pydicom data sets for their command sets: pynetdicom's DIMSE provider, made cheaper.

For every C-STORE a receiver takes, pynetdicom's
:class:`~pynetdicom.dimse.DIMSEServiceProvider` decodes the request's
command set into a pydicom data set and copies its elements one by one onto
the ``C_STORE`` primitive, then builds the response's command set as another
data set (every element created, set, iterated and encoded in Python) and
encodes it.  Under ``py-spy --gil`` on a receiver taking a 200-instance
series over one association, the response was ~22 % of the process's GIL
time (about 0.7 ms per instance on the thread that answers the sender) and
the request's command set another ~11 %.

Both command sets have a small fixed form (PS3.7 9.3.1.1 and 9.3.1.2,
Implicit VR Little Endian as every command set, PS3.7 6.3.1)::

    C-STORE-RQ                                  C-STORE-RSP
    (0000,0000) UL Command Group Length         (0000,0000) UL Command Group Length
    (0000,0002) UI Affected SOP Class UID       (0000,0002) UI Affected SOP Class UID
    (0000,0100) US Command Field 0001H          (0000,0100) US Command Field 8001H
    (0000,0110) US Message ID                   (0000,0120) US Message ID Being Responded To
    (0000,0700) US Priority                     (0000,0800) US Command Data Set Type 0101H
    (0000,0800) US Command Data Set Type        (0000,0900) US Status
    (0000,1000) UI Affected SOP Instance UID    (0000,1000) UI Affected SOP Instance UID
    (0000,1030) AE Move Originator AE Title (U)
    (0000,1031) US Move Originator Message ID (U)

:class:`StoreDimseProvider` (pynetdicom's documented provider class, its
documented ``receive_primitive`` and ``send_msg``) reads and writes those
forms with :mod:`struct`: a request's command set becomes the same
``C_STORE`` primitive pynetdicom would put on its message queue (its values
go through the primitive's own checks), its data set fragments gathered in
a :class:`~dicom_node.receive.dataset_buffer.DataSetBuffer` (in memory as
pynetdicom gathers them while small, in a spool file beyond, refused past
``node.max_instance_mb``); a response goes to pynetdicom's DUL
as the one P-DATA primitive pynetdicom would send.  Anything else is
pynetdicom's, unchanged: every other message; a request whose command set
holds any other element, a value of another length, a multi-valued or
non-ASCII UID, no data set, or a value the primitive refuses (the P-DATA
received so far for that message are handed to pynetdicom in order, so it
decodes, accepts or refuses the message itself); a response with Offending
Element or an Error Comment, or that would not fit the peer's maximum PDU in
one fragment; whatever arrives while ``STORE_RECV_CHUNKED_DATASET`` is set
or a handler is bound to ``EVT_DIMSE_RECV`` / ``EVT_DIMSE_SENT`` (those want
pynetdicom's message objects).  A command fragment inside a data set this
class is gathering, or command fragments past :data:`MAX_COMMAND_BYTES`,
end the association as pynetdicom ends a message it cannot decode
(``Evt19``: A-ABORT).  ``tests/unit/test_store_dimse.py``
compares both directions with pynetdicom's own.

A whole plain C-STORE request is also *served* here, in the DUL's thread
that read its last fragment (:meth:`StoreDimseProvider._serve`), instead of
being queued for pynetdicom's association thread: that thread polls its
queue every millisecond, and the DUL's thread, idle while the handler runs,
polls for the response every millisecond too.  `py-spy` on a receiver taking
a 200-instance series had the DUL's thread asleep in its poll 92 % of the
association and the association's thread 58 %; served here, the handler's
response is sent at the DUL's next turn.  The handler bound to
``EVT_C_STORE`` is triggered and answered as pynetdicom's Storage SCP does
(``evt.trigger``; the status validated by its ``StorageServiceClass``; a
handler's exception answered ``0xC211``); anything else (no handler, an
association not established, SOP Class extended negotiation, an unknown
context, a SOP class of another service) is queued for pynetdicom as before.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any, Final, cast

from pynetdicom import _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from dicom_node.receive.dataset_buffer import DataSetBuffer, IntakeLimits, SpilledDataSet
from dicom_node.receive.journal import part10_head_for
from dicom_node.receive.wakeups import WAIT_S

logger = logging.getLogger(__name__)

#: (0000,0100) Command Field of a C-STORE-RQ and -RSP; (0000,0800) Command Data Set Type "no data set".
_C_STORE_RQ: Final = 0x0001
_C_STORE_RSP: Final = 0x8001
_NO_DATA_SET: Final = 0x0101
#: Message control header of a PDV holding a whole command (bit 0: command, bit 1: last fragment).
_LAST_COMMAND_FRAGMENT: Final = b"\x03"
#: Longest command set gathered before the association is aborted (a C-STORE-RQ's is ~200 bytes; pynetdicom
#: itself would gather command fragments without end).
MAX_COMMAND_BYTES: Final = 65536
#: A PDV item adds 6 bytes to its fragment inside the PDU: item length (4), context ID (1), control header (1).
_PDV_OVERHEAD: Final = 6

_US_ELEMENTS: Final = struct.Struct("<HHIH HHIH HHIH")  # (0000,0100), (0000,0120), (0000,0800)
_STATUS: Final = struct.Struct("<HHIH")  # (0000,0900)
_ELEMENT_HEADER: Final = struct.Struct("<HHI")
_GROUP_LENGTH: Final = struct.Struct("<HHII")  # (0000,0000) UL
_US: Final = struct.Struct("<H")
_UL: Final = struct.Struct("<I")

#: The elements of a C-STORE-RQ command set (element number of group 0000 -> its VR).
_REQUEST_ELEMENTS: Final = {
    0x0000: "UL", 0x0002: "UI", 0x0100: "US", 0x0110: "US", 0x0700: "US", 0x0800: "US", 0x1000: "UI",
    0x1030: "AE", 0x1031: "US",
}
#: Element number -> the C_STORE primitive's attribute it sets (what pynetdicom's message_to_primitive sets).
_REQUEST_ATTRIBUTES: Final = {
    0x0002: "AffectedSOPClassUID", 0x0110: "MessageID", 0x0700: "Priority", 0x1000: "AffectedSOPInstanceUID",
    0x1030: "MoveOriginatorApplicationEntityTitle", 0x1031: "MoveOriginatorMessageID",
}


def _ui(tag_element: int, uid: str) -> bytes:
    """A UI element of group 0000, Implicit VR Little Endian, its value padded to even length with NUL."""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return _ELEMENT_HEADER.pack(0x0000, tag_element, len(value)) + value


def encode_store_response(message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
    """The command set of a C-STORE-RSP without Offending Element or Error Comment, as PS3.7 encodes it.

    Raises ``UnicodeEncodeError`` for a UID that is not ASCII and
    ``struct.error`` for a message ID or status outside 0-FFFFH.
    """
    body = b"".join((
        _ui(0x0002, sop_class_uid),
        _US_ELEMENTS.pack(0x0000, 0x0100, 2, _C_STORE_RSP,
                          0x0000, 0x0120, 2, message_id,
                          0x0000, 0x0800, 2, _NO_DATA_SET),
        _STATUS.pack(0x0000, 0x0900, 2, status),
        _ui(0x1000, sop_instance_uid),
    ))
    return _GROUP_LENGTH.pack(0x0000, 0x0000, 4, len(body)) + body


def decode_store_request(command: bytes | bytearray) -> dict[str, Any] | None:
    """The C_STORE primitive's attributes of a C-STORE-RQ command set that has a data set; ``None`` otherwise.

    ``None`` (pynetdicom decodes it instead) for anything but the plain form
    of the module docstring: another command, no data set, an element of
    another group or number, a repeated element, a value of another
    length, a group length that is not the rest's, a UID or AE title that
    is not ASCII or has several values.
    """
    values: dict[int, bytes] = {}
    offset, end = 0, len(command)
    view = memoryview(command)
    while offset < end:
        if end - offset < 8:
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(view, offset)
        offset += 8
        vr = _REQUEST_ELEMENTS.get(element)
        if group != 0x0000 or vr is None or element in values or length > end - offset:
            return None
        if (vr == "US" and length != 2) or (vr == "UL" and length != 4):
            return None
        values[element] = bytes(view[offset:offset + length])
        offset += length
    view.release()
    if (
        0x0000 not in values or _UL.unpack(values[0x0000])[0] != end - 12
        or not all(element in values for element in (0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000))
        or _US.unpack(values[0x0100])[0] != _C_STORE_RQ
        or _US.unpack(values[0x0800])[0] == _NO_DATA_SET
    ):
        return None
    attributes: dict[str, Any] = {}
    for element, attribute in _REQUEST_ATTRIBUTES.items():
        raw = values.get(element)
        if raw is None:
            continue
        vr = _REQUEST_ELEMENTS[element]
        if vr == "US":
            attributes[attribute] = _US.unpack(raw)[0]
            continue
        if not raw.isascii() or b"\\" in raw:
            return None
        text = raw.decode("ascii")
        attributes[attribute] = text.rstrip("\0 ") if vr == "UI" else text.strip()
    return attributes


class _Incoming:
    """The C-STORE request being received by :class:`StoreDimseProvider` itself."""

    __slots__ = ("command", "primitives", "request", "context_id", "data")

    def __init__(self) -> None:
        self.command = bytearray()
        self.primitives: list[P_DATA] = []  # until the command set is decoded: handed to pynetdicom if it is not ours
        self.request: C_STORE | None = None
        self.context_id = 0
        self.data = DataSetBuffer()


class StoreDimseProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE service provider with plain C-STORE command sets read and written directly (module docstring)."""

    def __init__(self, assoc: Any, limits: IntakeLimits | None = None) -> None:
        super().__init__(assoc)
        self.limits = limits
        self._incoming: _Incoming | None = None
        self._accepted: dict[int, Any] | None = None
        self._handed_bytes = 0  # of the message pynetdicom is gathering
        #: Set when a message or primitive is queued for the association's thread (see receive/wakeups.py).
        self.work = threading.Event()
        self.waking = False  # set by wakeups.install: get_msg(block=False) then waits for ``work``

    def get_msg(self, block: bool = False) -> Any:
        """pynetdicom's, except that without ``block`` on a woken association it waits up to ``WAIT_S`` for work.

        The association's reactor calls it without blocking after each 1 ms
        sleep; here, when no message and no primitive of the DUL is queued
        for that thread, it first waits for one to be (``work``, set by the
        queues :func:`~dicom_node.receive.wakeups.install` gives the
        association), so that an idle association's thread wakes ~50 times a
        second instead of 1000.
        """
        if not block and self.waking and self.msg_queue.empty() and self.dul.to_user_queue.empty():
            self.work.wait(WAIT_S)
        self.work.clear()  # after the wait: something queued from now on sets it again
        return super().get_msg(block)

    # -- requests ------------------------------------------------------------
    def receive_primitive(self, primitive: P_DATA) -> None:
        incoming = self._incoming
        if incoming is None:
            if (self.message is not None or type(primitive) is not P_DATA or _config.STORE_RECV_CHUNKED_DATASET
                    or self.assoc.get_handlers(evt.EVT_DIMSE_RECV)):
                self._to_pynetdicom(primitive)  # pynetdicom is decoding this message, or must
                return
            incoming = self._incoming = _Incoming()
        if incoming.request is None:
            incoming.primitives.append(primitive)
        for context_id, pdv in primitive.presentation_data_value_list:
            control = pdv[0]
            if control & 1:  # a command fragment
                if incoming.request is not None:  # a command fragment inside a data set: a broken message
                    self._incoming = None
                    self.dul.event_queue.put("Evt19")  # as pynetdicom ends a message it cannot decode: A-ABORT
                    return
                incoming.command += pdv[1:]
                if len(incoming.command) > MAX_COMMAND_BYTES:  # command fragments without end: a hostile peer
                    self._incoming = None
                    self.dul.event_queue.put("Evt19")
                    return
                if control & 2 and not self._start_request(incoming, context_id):
                    self._hand_over()
                    return
            else:
                if incoming.request is None:
                    self._hand_over()  # data before a whole command set
                    return
                incoming.data.write(memoryview(pdv)[1:])
                if control & 2:  # the data set's last fragment: the message is complete (as pynetdicom ends it)
                    request = incoming.request
                    self._incoming = None
                    if incoming.data.refused is not None:
                        self._refuse(request, incoming.context_id, incoming.data.refused)
                        return
                    dataset = incoming.data.result()
                    request.DataSet = cast(Any, dataset)
                    request._context_id = incoming.context_id
                    try:
                        served = self._serve(request, incoming.context_id)
                    except BaseException:
                        dataset.close()
                        raise
                    if not served:  # pynetdicom's now (a spill file is removed when it is collected)
                        self.msg_queue.put((incoming.context_id, request))
                    elif isinstance(dataset, SpilledDataSet):
                        dataset.close()  # the handler committed it, or its file goes
                    return

    def _start_request(self, incoming: _Incoming, context_id: int) -> bool:
        """Decode the whole command set into a C_STORE primitive; ``False`` when it is not ours to decode."""
        attributes = decode_store_request(incoming.command)
        if attributes is None:
            return False
        request = C_STORE()
        try:
            for name, value in attributes.items():
                setattr(request, name, value)  # the primitive's own checks, as in pynetdicom's decoding
        except (ValueError, TypeError):
            return False
        incoming.request, incoming.context_id, incoming.primitives = request, context_id, []
        if self.limits is not None:
            incoming.data = DataSetBuffer(self.limits, lambda: self._part10_head(request, context_id))
        return True

    def _part10_head(self, request: C_STORE, context_id: int) -> bytes | None:
        """The Part 10 head of the instance ``request`` sends (for a data set that spills), if it can be made."""
        context = self._contexts().get(context_id)
        if context is None or context.transfer_syntax is None:
            return None
        try:
            return part10_head_for(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                                   str(context.transfer_syntax[0]))
        except (ValueError, UnicodeEncodeError):
            return None

    def _refuse(self, request: C_STORE, context_id: int, reason: str) -> None:
        """Answer a request whose data set was not kept ``0xA700`` (Refused: Out of Resources)."""
        logger.warning("C-STORE of %s refused (0xA700): %s", request.AffectedSOPInstanceUID, reason)
        response = C_STORE()
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        response.Status = 0xA700
        self.send_msg(response, context_id)

    def _to_pynetdicom(self, primitive: Any) -> None:
        """pynetdicom's own decoding, its message bounded by ``node.max_instance_mb`` (then an A-ABORT)."""
        if self.message is None:
            self._handed_bytes = 0
        if self.limits is not None and type(primitive) is P_DATA:
            self._handed_bytes += sum(len(pdv) for _, pdv in primitive.presentation_data_value_list)
            if self._handed_bytes > self.limits.max_bytes + MAX_COMMAND_BYTES:
                logger.warning("Association aborted: a DIMSE message of more than %d MiB (node.max_instance_mb)",
                               self.limits.max_bytes // (1024 * 1024))
                self.message = None
                self.dul.event_queue.put("Evt19")
                return
        super().receive_primitive(primitive)

    def _hand_over(self) -> None:
        """Give the message's P-DATA received so far to pynetdicom, in order, to decode as it would have."""
        incoming, self._incoming = self._incoming, None
        assert incoming is not None and incoming.request is None
        for primitive in incoming.primitives:
            self._to_pynetdicom(primitive)

    def discard(self) -> None:
        """Drop a data set being gathered when the association ends (its spill file, if any, is removed)."""
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            incoming.data.discard()

    def _serve(self, request: C_STORE, context_id: int) -> bool:
        """Serve a whole C-STORE request here, in the DUL's thread, as pynetdicom's Storage SCP serves it; ``False``
        (nothing done) when it is not the plain case, for pynetdicom's association thread to serve.

        pynetdicom's association thread finds a request by polling its queue every
        millisecond, and the DUL's thread, idle while the handler runs, finds the
        response on its own queue by polling every millisecond too: about 1 ms per
        instance of the sender waiting on two polls.  Here the handler bound to
        ``EVT_C_STORE`` is triggered as the Storage SCP triggers it (``evt.trigger``
        with the request and the context's tuple), its status validated by
        pynetdicom's :class:`~pynetdicom.service_class.StorageServiceClass`, an
        exception answered ``0xC211`` as pynetdicom answers it; the response
        queued for the DUL, which sends it at its next turn, without waiting.
        """
        assoc = self.assoc
        if not assoc.get_handlers(evt.EVT_C_STORE) or not (assoc.is_acceptor and assoc.is_established) \
                or assoc.acceptor.accepted_common_extended:
            return False
        context = self._contexts().get(context_id)
        if (context is None or request.AffectedSOPClassUID is None
                or uid_to_service_class(request.AffectedSOPClassUID) is not StorageServiceClass):
            return False
        response = C_STORE()
        response.MessageID = request.MessageID
        response.MessageIDBeingRespondedTo = request.MessageID
        response.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
        response.AffectedSOPClassUID = request.AffectedSOPClassUID
        try:
            status = evt.trigger(assoc, evt.EVT_C_STORE, {"request": request, "context": context.as_tuple})
        except Exception:
            logger.exception("Exception in handler bound to 'evt.EVT_C_STORE'")
            response.Status = 0xC211
            self.send_msg(response, context_id)
            return True
        if assoc.is_established:
            self.send_msg(StorageServiceClass(assoc).validate_status(cast(Any, status), response), context_id)
        return True

    def _contexts(self) -> dict[int, Any]:
        """The association's accepted presentation contexts by ID (fixed once it is established)."""
        if self._accepted is None:
            self._accepted = {cx.context_id: cx for cx in self.assoc.accepted_contexts if cx.context_id is not None}
        return self._accepted

    # -- responses -----------------------------------------------------------
    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = self._plain_store_response(primitive)
        if command is None:
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
        self.dul.send_pdu(pdata)

    def _plain_store_response(self, primitive: Any) -> bytes | None:
        """The encoded command set when ``primitive`` is a response this class sends itself, else ``None``."""
        if (
            type(primitive) is not C_STORE
            or primitive.MessageIDBeingRespondedTo is None
            or primitive.Status is None
            or primitive.AffectedSOPClassUID is None
            or primitive.AffectedSOPInstanceUID is None
            or primitive.OffendingElement is not None
            or primitive.ErrorComment is not None
            or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            return None
        try:
            command = encode_store_response(
                primitive.MessageIDBeingRespondedTo, primitive.AffectedSOPClassUID,
                primitive.AffectedSOPInstanceUID, primitive.Status,
            )
        except (UnicodeEncodeError, struct.error):
            return None
        maximum = self.maximum_pdu_size
        if maximum and len(command) + _PDV_OVERHEAD > maximum:
            return None
        return command
