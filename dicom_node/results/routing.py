"""Which result kinds to produce for a rule, and which of them each destination receives.

A rule's ``outputs`` is what its destinations receive, unless a destination
sets its own ``outputs`` (e.g. ``[sc, sr]`` for a PACS that cannot show
SEG), which then replaces the rule's for that destination; one with
``sr_form: measurements`` receives the SR in that form (``sr_measurements``)
instead of the viewer form.  The INFER job
produces the union of what the destinations receive (the rule's outputs when
it sends nowhere).  A destination that receives the SEG and has
``seg_fallback: sc`` gets the overlay series (``sc``) instead when it refuses
the SEG SOP class in association negotiation.  The overlay is produced up
front only for destinations already known to refuse the SEG (an earlier send
was refused); for any other, the node cannot know before the association,
and rendering an overlay series nobody needs would cost seconds per series,
so the first refusal queues a job that renders it then.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dicom_node.domain import OutputKind

#: The SR in its ``measurements`` form, for a destination with ``sr_form: measurements`` (an SR of its own,
#: with its own UIDs: each destination gets one form of the report, never both).
SR_MEASUREMENTS = "sr_measurements"

_ORDER = (OutputKind.SEG.value, OutputKind.SR.value, SR_MEASUREMENTS, OutputKind.SC.value, OutputKind.PDF.value)

SEG_SOP_CLASSES: frozenset[str] = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
})
"""SOP classes the overlay series replaces when a destination refuses them."""


@dataclass(frozen=True)
class Route:
    """What one destination receives.

    Parameters
    ----------
    outputs:
        Kinds sent to it.
    seg_fallback:
        Kind sent instead of the SEG when the destination refuses the SEG SOP
        class in association negotiation (``"sc"``), or ``None``.
    """

    outputs: tuple[str, ...]
    seg_fallback: str | None = None

    def as_payload(self) -> dict[str, Any]:
        """JSON form stored in the INFER job's payload."""
        return {"outputs": list(self.outputs), "seg_fallback": self.seg_fallback}

    @classmethod
    def from_payload(cls, value: Mapping[str, Any]) -> Route:
        """Inverse of :meth:`as_payload`."""
        return cls(tuple(value.get("outputs", ())), value.get("seg_fallback"))


def _ordered(kinds: Iterable[str]) -> tuple[str, ...]:
    wanted = {str(k) for k in kinds}
    return tuple(k for k in _ORDER if k in wanted)


def plan_outputs(
    rule_outputs: Sequence[str], destination_names: Sequence[str], destinations: Mapping[str, Any],
    refusing_seg: Collection[str] = (),
) -> tuple[tuple[str, ...], dict[str, Route]]:
    """Kinds to produce and the route of each destination of a rule.

    Parameters
    ----------
    rule_outputs:
        The rule's ``outputs``.
    destination_names:
        The rule's ``send_to``.
    destinations:
        Configured destinations by name (objects with an optional ``outputs``
        and, for DIMSE, ``seg_fallback``); unknown names get the rule's outputs.
    refusing_seg:
        Destinations known to refuse the SEG SOP class: their fallback is produced up front.

    Returns
    -------
    tuple
        Kinds to produce (in :class:`~dicom_node.domain.OutputKind` order) and
        ``{destination: Route}``.
    """
    routes: dict[str, Route] = {}
    produce: set[str] = set() if destination_names else {str(k) for k in rule_outputs}
    for name in destination_names:
        dest = destinations.get(name)
        own = getattr(dest, "outputs", None)
        kinds = _ordered(own if own is not None else rule_outputs)
        if getattr(dest, "sr_form", "viewer") == "measurements" and OutputKind.SR.value in kinds:
            kinds = _ordered([SR_MEASUREMENTS if k == OutputKind.SR.value else k for k in kinds])
        fallback = getattr(dest, "seg_fallback", "none")
        use_fallback = OutputKind.SEG.value in kinds and OutputKind.SC.value not in kinds and fallback == "sc"
        routes[name] = Route(kinds, OutputKind.SC.value if use_fallback else None)
        produce.update(kinds)
        if use_fallback and name in refusing_seg:
            produce.add(OutputKind.SC.value)
    return _ordered(produce), routes


def files_for(route: Route, objects: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Files a destination receives and, if any, its SEG fallback files.

    Parameters
    ----------
    route:
        The destination's route.
    objects:
        ``(kind, spool path)`` of every object the INFER job produced.

    Returns
    -------
    tuple of list of str
        The files to send, and the files to send instead of the SEG when the
        destination refuses it (empty without a fallback, or when no SEG was made).
    """
    files = [path for kind, path in objects if kind in route.outputs]
    has_seg = any(kind == OutputKind.SEG.value for kind, _ in objects if kind in route.outputs)
    fallback = [path for kind, path in objects if route.seg_fallback and kind == route.seg_fallback] if has_seg \
        else []
    return files, fallback
