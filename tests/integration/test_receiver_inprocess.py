"""The receiver in-process over real loopback associations: access control, limits, back-pressure, TLS."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_node.receive.handlers import StoreHandler
from dicom_node.receive.server import Receiver
from dicom_node.receive.store_dimse import StoreDimseProvider
from dicom_node.settings import NodeSettings
from dicom_node.spool import Spool
from dicom_node.store import Database, SeriesStore
from tests.integration.conftest import free_port, require_tool
from tests.phantoms import make_chest_phantom, write_ct_series

pytestmark = pytest.mark.integration


class Running:
    """An in-process receiver on a free loopback port, with a controllable free-space gauge."""

    def __init__(self, tmp: Path, min_free_mb: float = 100, handler_class: type[StoreHandler] = StoreHandler,
                 **node: Any) -> None:
        self.free = 10_000.0
        self.db = Database(tmp / "state.sqlite3")
        self.spool = Spool(tmp)
        self.series = SeriesStore(self.db)
        self.handler = handler_class(self.spool, self.series, min_free_mb, free_mb=lambda: self.free)
        self.settings = NodeSettings(**{"host": "127.0.0.1", "port": free_port(), **node})
        self.receiver = Receiver(self.settings, self.handler)
        self.port = self.receiver.start()[1]

    def stop(self) -> None:
        self.receiver.stop()
        self.handler.close()
        self.db.close()


@pytest.fixture()
def receiver(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def factory(**kw: Any) -> Running:
        r = Running(tmp_path / f"r{len(started)}", **kw)
        started.append(r)
        return r

    yield factory
    for r in started:
        r.stop()


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    hu, _ = make_chest_phantom(shape=(16, 48, 48), spacing=(2.0, 2.0, 2.0))
    return write_ct_series(hu[:3], (2.0, 2.0, 2.0), tmp_path_factory.mktemp("ct"))


def _associate(port: int, ae_title: str = "MODALITY", called: str = "DICOMNODE", source: str = "127.0.0.1") -> Any:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called, bind_address=(source, 0))


def _rj(assoc: Any) -> tuple[int, int, int]:
    p = assoc.acceptor.primitive
    return (p.result, p.result_source, p.diagnostic)


def test_low_space_refuses_then_intake_resumes_by_itself(receiver: Callable[..., Running], slices: list[Path],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    r = receiver(min_free_mb=500)
    assoc = _associate(r.port)
    assert assoc.is_established
    with caplog.at_level(logging.WARNING):
        r.free = 499.0
        assert assoc.send_c_store(pydicom.dcmread(slices[0])).Status == 0xA700
        assert assoc.send_c_store(pydicom.dcmread(slices[1])).Status == 0xA700
        assert assoc.send_c_echo().Status == 0x0000  # still serving
        assert list(r.spool.incoming_files()) == [] and r.series.get(
            pydicom.dcmread(slices[0]).SeriesInstanceUID) is None
        r.free = 501.0  # space returns (retention ran, an operator cleaned up): no restart needed
        for f in slices:
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    assoc.release()
    assert caplog.text.count("Intake paused") == 1  # said once, not per refused instance
    assert "Intake resumed" in caplog.text
    assert len(r.spool.incoming_files()) == len(slices)


def test_a_release_hints_its_series_once_recorded_an_abort_does_not(receiver: Callable[..., Running],
                                                                   slices: list[Path]) -> None:
    r = receiver()
    r.handler.attach_journal()  # as the node runs: recorded behind the C-STORE path
    hints: list[tuple[str, list[str], int]] = []
    arrived = threading.Event()

    def on_released(calling_ae: str, series_uids: list[str]) -> None:
        hints.append((calling_ae, series_uids, r.series.get(series_uids[0])["instance_count"]))
        arrived.set()

    r.handler.on_released = on_released
    series_uid = str(pydicom.dcmread(slices[0]).SeriesInstanceUID)
    aborted = _associate(r.port, ae_title="PACS")
    assert aborted.send_c_store(pydicom.dcmread(slices[0])).Status == 0x0000
    aborted.abort()  # no hint: an aborted association says nothing about the series
    assoc = _associate(r.port, ae_title="PACS")
    for f in slices:
        assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    assert not arrived.is_set(), "no hint while the association is open"
    assoc.release()
    assert arrived.wait(10)
    # Once, for the released association, with every instance of it already recorded.
    assert hints == [("PACS", [series_uid], len(slices))]


def test_known_ae_from_a_wrong_host_gets_a_proper_reject(receiver: Callable[..., Running],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    r = receiver(allowed_peers=[{"ae_title": "PACS", "host": "10.0.0.0/8"}, {"ae_title": "LOCAL",
                                                                              "host": "127.0.0.1"}])
    with caplog.at_level(logging.WARNING):
        wrong_host = _associate(r.port, ae_title="PACS")
        unknown = _associate(r.port, ae_title="INTRUDER")
    assert wrong_host.is_rejected and not wrong_host.is_aborted
    assert _rj(wrong_host) == (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
    assert unknown.is_rejected and _rj(unknown) == (0x01, 0x01, 0x03)
    assert "Audit: association from PACS@127.0.0.1" in caplog.text
    assert "Audit: association from INTRUDER@127.0.0.1" in caplog.text
    ok = _associate(r.port, ae_title="LOCAL")
    assert ok.is_established
    assert ok.send_c_echo().Status == 0x0000
    ok.release()


def test_wrong_called_ae_title_is_rejected_with_its_reason(receiver: Callable[..., Running],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    r = receiver()
    with caplog.at_level(logging.WARNING):
        assoc = _associate(r.port, called="NOTTHENODE")
    assert assoc.is_rejected and _rj(assoc) == (0x01, 0x01, 0x07)
    assert "called AE title not recognised" in caplog.text


def test_max_associations_rejects_one_too_many(receiver: Callable[..., Running],
                                               caplog: pytest.LogCaptureFixture) -> None:
    r = receiver(max_associations=1)
    first = _associate(r.port)
    assert first.is_established
    with caplog.at_level(logging.WARNING):
        second = _associate(r.port)
    assert second.is_rejected and _rj(second) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
    assert "node.max_associations" in caplog.text
    first.release()


def test_one_address_holds_at_most_its_share_of_the_slots(receiver: Callable[..., Running],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A peer keeping its associations open (a slow drip within the network timeout, a modality reconnecting in a
    loop) gets half of the slots by default; another address still associates; a slot freed is taken again."""
    r = receiver(max_associations=4)
    hog = [_associate(r.port) for _ in range(2)]
    try:
        assert all(a.is_established for a in hog)
        with caplog.at_level(logging.WARNING):
            third = _associate(r.port)
        assert third.is_rejected and _rj(third) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
        assert "node.max_associations_per_host" in caplog.text
        other = [_associate(r.port, source="127.0.0.2") for _ in range(2)]
        assert all(a.is_established for a in other), "another address keeps the other half"
        for a in other:
            a.release()
    finally:
        hog.pop().release()
    again = _associate(r.port)
    assert again.is_established, "the address may take a slot again once one of its associations ended"
    for a in [*hog, again]:
        a.release()


def test_limits_are_applied_to_the_listener(receiver: Callable[..., Running]) -> None:
    r = receiver(max_pdu_bytes=32768, acse_timeout_s=7, dimse_timeout_s=8, network_timeout_s=9,
                 max_associations=3, max_associations_per_host=3)
    assoc = _associate(r.port)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 32768  # what the node announced in its A-ASSOCIATE-AC
    assoc.release()
    ae = r.receiver.ae
    assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (7, 8, 9)
    # The node counts associations itself (half-open connections hold no slot): the 4th is refused.
    running = [_associate(r.port) for _ in range(3)]
    try:
        assert all(a.is_established for a in running)
        fourth = _associate(r.port)
        assert fourth.is_rejected and _rj(fourth) == (0x02, 0x03, 0x02)  # local limit exceeded
    finally:
        for a in running:
            a.release()
    again = _associate(r.port)
    assert again.is_established, "a slot is free again once an association has ended"
    again.release()


# --------------------------------------------------------------------------- DICOM TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=test CA", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    # A client certificate from a CA the node does not trust.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.crt",
             "-days", "2", "-subj", "/CN=rogue", cwd=d)
    return d


def _storescu_tls(port: int, files: list[Path], *tls: str) -> subprocess.CompletedProcess[str]:
    exe = require_tool("storescu")
    return subprocess.run([exe, *tls, "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TCP_NODELAY": "1"})


def test_dcmtk_storescu_over_tls_with_client_certificate(receiver: Callable[..., Running], pki: Path,
                                                         slices: list[Path]) -> None:
    r = receiver(tls={"certificate": pki / "server.crt", "private_key": pki / "server.key",
                      "ca_certificates": pki / "ca.crt", "require_client_certificate": True})
    out = _storescu_tls(r.port, slices, "+tls", str(pki / "client.key"), str(pki / "client.crt"),
                        "+cf", str(pki / "ca.crt"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(r.spool.incoming_files()) == len(slices)
    # Sent bit for bit: the spooled pixel data equals the original's.
    stored = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in r.spool.incoming_files()}
    assert all(stored[pydicom.dcmread(f).SOPInstanceUID] == pydicom.dcmread(f).PixelData for f in slices)

    # No client certificate, or one from an untrusted CA: the handshake fails, nothing is stored.
    before = len(r.spool.incoming_files())
    anonymous = _storescu_tls(r.port, slices[:1], "+tla", "+cf", str(pki / "ca.crt"))
    assert anonymous.returncode != 0
    rogue = _storescu_tls(r.port, slices[:1], "+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"),
                          "+cf", str(pki / "ca.crt"))
    assert rogue.returncode != 0
    # Plain TCP to a TLS port is not DICOM to it.
    plain = _storescu_tls(r.port, slices[:1])
    assert plain.returncode != 0
    assert len(r.spool.incoming_files()) == before
    # A peer that connects and says nothing must not block the listener for the others
    # (the TLS handshake runs in the association's thread, not in the accept loop).
    with socket.create_connection(("127.0.0.1", r.port)):
        again = _storescu_tls(r.port, slices[:1], "+tls", str(pki / "client.key"), str(pki / "client.crt"),
                              "+cf", str(pki / "ca.crt"))
    assert again.returncode == 0, again.stdout + again.stderr


def test_tls_without_client_verification_accepts_anonymous_clients(receiver: Callable[..., Running], pki: Path,
                                                                   slices: list[Path]) -> None:
    r = receiver(tls={"certificate": pki / "server.crt", "private_key": pki / "server.key"})
    out = _storescu_tls(r.port, slices[:1], "+tla", "+cf", str(pki / "ca.crt"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(r.spool.incoming_files()) == 1


def test_unreadable_tls_files_are_a_startup_error_naming_the_key(tmp_path: Path) -> None:
    from dicom_node.errors import StartupError

    settings = NodeSettings(tls={"certificate": tmp_path / "missing.crt", "private_key": tmp_path / "missing.key"})
    with pytest.raises(StartupError, match=r"^node\.tls\.certificate: cannot read .*missing\.crt"):
        Receiver(settings, None)  # type: ignore[arg-type]



class _Capturing(StoreHandler):
    """The node's handler, keeping what pynetdicom itself would write as each C-STORE's file."""

    held: dict[str, bytes] = {}

    def __call__(self, event: Any) -> int:
        self.held[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(include_meta=True)
        return super().__call__(event)


def test_journaled_files_are_what_pynetdicom_holds_as_a_part10_file(receiver: Callable[..., Running],
                                                                      slices: list[Path]) -> None:
    # The handler journals the data set alone and the materialiser adds its file's head: each spooled file
    # is byte for byte what pynetdicom's own Event.encoded_dataset() makes of the C-STORE, in either syntax.
    r = receiver(handler_class=_Capturing)
    held = r.handler.held = {}  # type: ignore[attr-defined]
    r.handler.attach_journal()
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, [syntax])
        assoc = ae.associate("127.0.0.1", r.port, ae_title="DICOMNODE")
        assert assoc.is_established
        for f in slices:
            ds = pydicom.dcmread(f)
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    r.handler.close()  # records what the journal still holds
    files = {p.stem: p.read_bytes() for p in r.spool.incoming_files()}
    assert len(files) == 2 * len(slices) and files == held
    rows = {row["sop_uid"]: row["size"] for row in r.db.query("SELECT sop_uid, size FROM instances")}
    assert rows == {uid: len(data) for uid, data in held.items()}


def test_store_command_sets_of_real_senders_take_the_struct_path(receiver: Callable[..., Running],
                                                                  slices: list[Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # As the node runs (pynetdicom's standard log handlers unbound): every C-STORE from DCMTK's storescu (both
    # little-endian syntaxes) and from pynetdicom with Move Originator fields (what a C-MOVE's sub-operations
    # carry) has its command sets read and written by StoreDimseProvider, and the stored files are byte for
    # byte what pynetdicom's own Event.encoded_dataset() makes of each C-STORE.
    monkeypatch.setattr(pynetdicom_config, "LOG_HANDLER_LEVEL", "none")
    decoded: list[bool] = []
    start = StoreDimseProvider._start_request

    def counting(self: StoreDimseProvider, incoming: Any, context_id: int) -> bool:
        decoded.append(start(self, incoming, context_id))
        return decoded[-1]

    monkeypatch.setattr(StoreDimseProvider, "_start_request", counting)
    r = receiver(handler_class=_Capturing)
    held = r.handler.held = {}  # type: ignore[attr-defined]
    r.handler.attach_journal()
    exe = require_tool("storescu")
    for syntax_option in ("-xe", "-xi"):
        copies = []
        for i, f in enumerate(slices):
            ds = pydicom.dcmread(f)
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            copies.append(r.spool.root.parent / f"{syntax_option}-{i}.dcm")
            ds.save_as(copies[-1], enforce_file_format=True)
        out = subprocess.run([exe, syntax_option, "-aec", "DICOMNODE", "127.0.0.1", str(r.port), *map(str, copies)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", r.port, ae_title="DICOMNODE")
    ds = pydicom.dcmread(slices[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    status = assoc.send_c_store(ds, originator_aet="PACS", originator_id=17)
    assert status.Status == 0x0000
    assoc.release()
    r.handler.close()
    assert decoded == [True] * (2 * len(slices) + 1)
    files = {p.stem: p.read_bytes() for p in r.spool.incoming_files()}
    assert len(files) == 2 * len(slices) + 1 and files == held
