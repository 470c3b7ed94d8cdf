"""Series completion: when a receiving series is complete.

DICOM has no "end of series" message.  A receiving series is complete when

1. its quiet timer fires: no instance for ``completion.quiet_seconds``, or the
   longest ``quiet_seconds`` of the rules that apply to it (see
   :func:`dicom_node.rules.matcher.quiet_seconds_for`); or
2. the sending PACS confirms it: the series' Calling AE Title is a
   ``completion.cfind`` peer, the series has been quiet for the peer's
   ``after_seconds`` (or, with ``on_release``, the peer has just released
   the association that delivered its instances and every one of them is
   recorded), and a C-FIND (Study Root, SERIES level) answers
   NumberOfSeriesRelatedInstances (0020,1209) equal to the instances received.
   A peer that is unreachable or answers another count leaves the timer in
   charge; it is asked again after ``interval_seconds``.

A PACS routes a series in one association and releases it: asking then
instead of ``after_seconds`` later takes that wait off every routed series'
latency.  The release is only a moment to ask, never proof: the count
decides, as it does after ``after_seconds``.  At most one query per series
per ``interval_seconds`` either way (a sender that opens one association per
instance gets no more queries than one that is quiet).

A late instance re-opens a complete series (see
:meth:`dicom_node.store.SeriesStore.record_instance`), which then completes again
the same way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicom_node.domain import SeriesState, SeriesSummary
from dicom_node.rules.matcher import quiet_seconds_for
from dicom_node.send.requestor import configure_timeouts, requestor_handlers
from dicom_node.settings import CFindPeerSettings, RuleSettings, Settings
from dicom_node.store import SeriesStore

logger = logging.getLogger(__name__)

__all__ = ["CountInstances", "PeerUnavailable", "SeriesCompletion", "cfind_series_count"]

#: ``(peer, calling AE title, study UID, series UID) -> count or None``.
CountInstances = Callable[[CFindPeerSettings, str, str, str], "int | None"]

_PENDING = (0xFF00, 0xFF01)


class PeerUnavailable(ConnectionError):
    """A C-FIND peer that could not be associated with: not asked again for its ``interval_seconds``."""


def cfind_series_count(peer: CFindPeerSettings, calling_ae: str, study_uid: str, series_uid: str) -> int | None:
    """Ask ``peer`` how many instances it holds of one series (C-FIND, Study Root, SERIES level).

    Parameters
    ----------
    peer:
        The PACS to ask.
    calling_ae:
        Our Calling AE Title (``peer.calling_ae_title`` or the node's).
    study_uid, series_uid:
        The series.

    Returns
    -------
    int | None
        NumberOfSeriesRelatedInstances, or ``None`` when the peer fails the
        query or does not return the attribute (each logged).

    Raises
    ------
    PeerUnavailable
        No association: refused, or no answer within ``peer.timeout_s``
        (the TCP connection included).
    """
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    configure_timeouts(ae, peer.timeout_s)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=requestor_handlers())
    if not assoc.is_established:
        raise PeerUnavailable(f"association with {peer.ae_title}@{peer.host}:{peer.port} not established "
                              f"(refused, unreachable, or no answer within {peer.timeout_s:g} s)")
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.NumberOfSeriesRelatedInstances = None
    count: int | None = None
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code in _PENDING and identifier is not None:
                value = identifier.get("NumberOfSeriesRelatedInstances")
                try:
                    count = int(value) if value not in (None, "") else None
                except (TypeError, ValueError):
                    logger.warning("C-FIND to %s: NumberOfSeriesRelatedInstances %r is not a number",
                                   peer.ae_title, value)
            elif code is None or code not in (0x0000, *_PENDING):
                logger.warning("C-FIND to %s failed (status %s); completion falls back to the timer",
                               peer.ae_title, "none" if code is None else f"0x{code:04X}")
                return None
    finally:
        assoc.release()
    return count


class SeriesCompletion:
    """Decides which receiving series are complete, by timer or by C-FIND confirmation.

    Parameters
    ----------
    settings:
        Returns the current settings (rules may be reloaded while running).
    series:
        The series store (performs the transition).
    summarise:
        Builds the :class:`SeriesSummary` of a series row (for per-rule quiet
        times); called only when a rule sets ``quiet_seconds``.
    count_instances:
        Asks a peer for a series' instance count (:func:`cfind_series_count`;
        a parameter for tests).
    """

    def __init__(self, settings: Callable[[], Settings], series: SeriesStore,
                 summarise: Callable[[dict[str, Any]], SeriesSummary],
                 count_instances: CountInstances = cfind_series_count) -> None:
        self.settings = settings
        self.series = series
        self.summarise = summarise
        self.count_instances = count_instances
        self._asked: dict[str, float] = {}  # series UID -> when its peer was last asked
        self._unavailable: dict[str, float] = {}  # peer AE title -> when it could not be associated with
        self._released: dict[str, float] = {}  # series UID -> when its peer released a delivering association
        self._released_lock = threading.Lock()  # released() runs in the receivers' event thread

    def released(self, calling_ae: str, series_uids: list[str], now: float) -> bool:
        """``calling_ae`` released an association that delivered ``series_uids``, all of them recorded.

        Returns
        -------
        bool
            Whether that peer is a ``completion.cfind`` peer asked on release
            (``on_release``): then the series are asked about at the next
            tick, which the caller should bring forward.
        """
        peer = self.settings().completion.cfind_peer(calling_ae)
        if peer is None or not peer.on_release:
            return False
        with self._released_lock:
            for uid in series_uids:
                self._released[uid] = now
        return True

    def next_due(self, now: float) -> float | None:
        """Earliest time a receiving series may complete (its last instance + the shortest quiet time).

        The node schedules its next tick then, so a series completes when its
        quiet time ends rather than up to a tick interval later.  ``None``
        when nothing is receiving.
        """
        settings = self.settings()
        conf = settings.completion
        overrides = [r.quiet_seconds for r in settings.rules if r.quiet_seconds is not None]
        shortest = min([conf.quiet_seconds, *overrides, *(p.after_seconds for p in conf.cfind)])
        receiving = self.series.in_state(SeriesState.RECEIVING)
        if not receiving:
            return None
        # A series still short of its quiet time after the earliest guess is checked again at the next tick.
        due = min(row["last_received"] for row in receiving) + shortest
        return max(due, now)

    def complete(self, now: float) -> list[str]:
        """Mark every receiving series that is complete at ``now``; returns their UIDs.

        Parameters
        ----------
        now:
            Seconds since the epoch.

        Returns
        -------
        list[str]
            Series that became ``complete``, in order of their last instance.
        """
        settings = self.settings()
        conf = settings.completion
        overrides = [r.quiet_seconds for r in settings.rules if r.quiet_seconds is not None]
        shortest = min([conf.quiet_seconds, *overrides, *(p.after_seconds for p in conf.cfind)])
        completed: list[str] = []
        receiving = self.series.in_state(SeriesState.RECEIVING)
        with self._released_lock:
            released = set(self._released)
        to_ask: list[dict[str, Any]] = []
        # The timers first: a series whose quiet time is over never waits behind a C-FIND to a slow peer.
        for row in receiving:
            quiet = now - row["last_received"]
            hinted = row["series_uid"] in released
            if quiet < shortest and not hinted:
                continue
            how = self._timer(row, quiet, conf.quiet_seconds, overrides, settings.rules)
            if how is None:
                to_ask.append(row)
            elif self._mark(row, now, how):
                completed.append(row["series_uid"])
        for row in to_ask:
            how = self._confirmed(row, now - row["last_received"], now, settings, row["series_uid"] in released)
            if how is not None and self._mark(row, now, how):
                completed.append(row["series_uid"])
        live = {row["series_uid"] for row in receiving}
        for uid in [u for u in self._asked if u not in live]:
            del self._asked[uid]
        with self._released_lock:
            for uid in [u for u in self._released if u not in live and u in released]:
                del self._released[uid]  # a hint that came after this pass read them stays for the next
        return completed

    def _mark(self, row: dict[str, Any], now: float, how: str) -> bool:
        if not self.series.mark_complete(row["series_uid"], now, row["last_received"]):
            return False
        logger.info("Series %s: complete after %d instance(s) (%s)", row["series_uid"], row["instance_count"], how)
        self._asked.pop(row["series_uid"], None)
        return True

    def _timer(self, row: dict[str, Any], quiet: float, default: float, overrides: list[float],
               rules: tuple[RuleSettings, ...]) -> str | None:
        if not overrides:
            return f"quiet for {default:g} s" if quiet >= default else None
        if quiet < min([default, *overrides]):
            return None
        try:
            wait = quiet_seconds_for(rules, self.summarise(row), default)
        except Exception as exc:  # noqa: BLE001 - unreadable header: the default timer decides
            logger.debug("Series %s: no summary for per-rule quiet time (%s)", row["series_uid"], exc)
            wait = default
        return f"quiet for {wait:g} s" if quiet >= wait else None

    def _confirmed(self, row: dict[str, Any], quiet: float, now: float, settings: Settings,
                   hinted: bool = False) -> str | None:
        peer = settings.completion.cfind_peer(row["calling_ae"] or "")
        if peer is None or (quiet < peer.after_seconds and not (hinted and peer.on_release)):
            return None
        asked = self._asked.get(row["series_uid"])
        if asked is not None and now - asked < peer.interval_seconds:
            return None  # a release hint stays until the interval has passed
        down = self._unavailable.get(peer.ae_title)
        if down is not None and now - down < peer.interval_seconds:
            return None  # each query would wait its timeout again: asked once the interval has passed
        self._asked[row["series_uid"]] = now
        with self._released_lock:
            self._released.pop(row["series_uid"], None)
        calling = peer.calling_ae_title or settings.node.ae_title
        try:
            count = self.count_instances(peer, calling, row["study_uid"], row["series_uid"])
        except PeerUnavailable as exc:
            if down is None:
                logger.warning("C-FIND peer %s unavailable (%s); not asked for %g s, completion falls back to "
                               "the timer meanwhile", peer.ae_title, exc, peer.interval_seconds)
            self._unavailable[peer.ae_title] = now
            return None
        except Exception as exc:  # noqa: BLE001 - a network problem must never stop completion by timer
            logger.warning("Series %s: C-FIND to %s failed (%s: %s); completion falls back to the timer",
                           row["series_uid"], peer.ae_title, type(exc).__name__, exc)
            return None
        if self._unavailable.pop(peer.ae_title, None) is not None:
            logger.warning("C-FIND peer %s answers again", peer.ae_title)
        if count is not None and count == row["instance_count"]:
            return f"{peer.ae_title} confirms {count} instance(s) by C-FIND"
        logger.debug("Series %s: %s holds %s instance(s), %d received; waiting", row["series_uid"],
                     peer.ae_title, count, row["instance_count"])
        return None
