"""Deterministic identity and provenance of the objects the node produces.

A result object (SEG, SR...) is identified by its Series and SOP Instance
UIDs.  They are *derived*, never random: the same source series processed by
the same model and model version always gives the same UIDs, so a series that
the PACS routes to the node twice replaces the first copy in the archive
instead of adding a second, different one.

UID derivation
--------------
Under the default root ``2.25.`` (PS3.5 B.2, UUID-derived UIDs) a UID is the
decimal form of a name-based (SHA-1, version 5) UUID of the inputs, at most
44 characters.  Under an organisation root configured by the site, a UID is
the root followed by the decimal digits of a SHA-256 hash of the inputs,
truncated to 64 characters.  The inputs are serialised without ambiguity
(JSON list), and a role (``"series"``, ``"instance"``, ``"tracking"``...) is
part of them, so that no two kinds of UID can collide.

The manufacturer constants below are written into every object; other modules
recognise the node's own output by them (loop protection).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Final

from pydicom.uid import RE_VALID_UID

from dicom_node.errors import InvalidUIDError, ResultError
from inference.types import ModelCard

logger = logging.getLogger(__name__)

DEFAULT_UID_ROOT: Final[str] = "2.25."
"""Root of derived UIDs when the site configures none (UUID-derived UIDs)."""

SOFTWARE_NAME: Final[str] = "dicom-node"
"""Written as Manufacturer's Model Name of every object the node produces."""

MANUFACTURER: Final[str] = "dicom-node project"
"""Written as Manufacturer of every object the node produces."""

DEFAULT_DEVICE_SERIAL_NUMBER: Final[str] = "1"
"""Device Serial Number used when the caller does not name the node instance."""

MAX_UID_ROOT_LENGTH: Final[int] = 44
"""Longest accepted organisation root, so that at least 20 hash digits follow it."""

_UID_ROOT_PATTERN: Final[re.Pattern[str]] = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?$")
_UUID_NAMESPACE: Final[uuid.UUID] = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-node:derived-uid")
_MAX_UID_LENGTH: Final[int] = 64
_MAX_LO_LENGTH: Final[int] = 64
_MAX_IS_VALUE: Final[int] = 2**31 - 1


def _software_version() -> str:
    """Return the installed version of the ``dicom-node`` distribution, or ``"0.0.0"``."""
    try:
        return importlib.metadata.version("dicom-node")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


SOFTWARE_VERSION: Final[str] = _software_version()
"""Written as Software Versions of every object the node produces."""


def software_versions(card: ModelCard) -> list[str]:
    """Software Versions (0018,1020) of an object made with the model of ``card``.

    Parameters
    ----------
    card:
        Card of the model that made the prediction.

    Returns
    -------
    list of str
        The node's version, ``"<model name> <model version>"`` and, when the
        card has one, the model hash; each value cut to 63 characters (VR LO).
        The complete hash is also written as an algorithm parameter of the SEG
        and SR (see :func:`algorithm_parameters`).
    """
    values = [SOFTWARE_VERSION, f"{card.name} {card.version}"]
    if card.model_hash:
        values.append(card.model_hash)
    return [_lo(value) for value in values]


def algorithm_parameters(card: ModelCard) -> dict[str, str] | None:
    """Algorithm Parameters (0066,0032) recording the model hash, or ``None`` without one."""
    return {"model_hash": card.model_hash} if card.model_hash else None


def _lo(value: str) -> str:
    # 63, not 64: a multi-valued element of odd length is padded with a space,
    # which readers then count as part of its last value.
    return value.replace("\\", "/")[: _MAX_LO_LENGTH - 1]


def normalize_uid_root(uid_root: str) -> str:
    """Return a UID root in canonical form: valid UID syntax ending with ``"."``.

    Parameters
    ----------
    uid_root:
        An organisation root such as ``"1.2.826.0.1.3680043.10.99"`` (the
        trailing ``"."`` is optional) or ``"2.25."``.

    Returns
    -------
    str
        The root with exactly one trailing ``"."``.

    Raises
    ------
    InvalidUIDError
        If the root is empty, longer than :data:`MAX_UID_ROOT_LENGTH`
        characters, or not made of numeric components without leading zeros.
    """
    if not uid_root or not _UID_ROOT_PATTERN.match(uid_root):
        raise InvalidUIDError(
            f"UID root {uid_root!r} is not a valid DICOM UID prefix: use digits separated by dots, "
            "no leading zeros (e.g. '1.2.826.0.1.3680043.10.99.'), or '2.25.'"
        )
    root = uid_root if uid_root.endswith(".") else uid_root + "."
    if len(root) > MAX_UID_ROOT_LENGTH:
        raise InvalidUIDError(
            f"UID root {uid_root!r} is {len(root)} characters long; at most {MAX_UID_ROOT_LENGTH} are "
            "accepted so that derived UIDs stay unique within 64 characters: use a shorter root"
        )
    return root


def derive_uid(uid_root: str, *parts: str) -> str:
    """Derive a DICOM UID deterministically from ``parts`` under ``uid_root``.

    Parameters
    ----------
    uid_root:
        UID root (see :func:`normalize_uid_root`).  ``"2.25."`` gives a
        UUID-derived UID (name-based UUID, version 5).
    *parts:
        Strings that identify what the UID names.  Order matters; the
        serialisation is unambiguous (``("a", "bc")`` and ``("ab", "c")``
        give different UIDs).

    Returns
    -------
    str
        A valid DICOM UID of at most 64 characters.

    Raises
    ------
    InvalidUIDError
        If ``uid_root`` is not a valid root.
    """
    root = normalize_uid_root(uid_root)
    name = json.dumps(list(parts), ensure_ascii=True, separators=(",", ":"))
    if root == DEFAULT_UID_ROOT:
        return f"{root}{uuid.uuid5(_UUID_NAMESPACE, name).int}"
    digits = str(int(hashlib.sha256(name.encode("ascii")).hexdigest(), 16))
    return (root + digits)[:_MAX_UID_LENGTH]


def _check_uid(uid: str, what: str) -> None:
    if not isinstance(uid, str) or len(uid) > _MAX_UID_LENGTH or not re.match(RE_VALID_UID, uid):
        raise InvalidUIDError(f"{what} {uid!r} is not a valid DICOM UID; nothing is built from it")


@dataclass(frozen=True)
class OutputIdentity:
    """Identity of one result object: its own series and instance.

    Build it with :func:`derive_identity`; the constructor only checks it.

    Parameters
    ----------
    series_instance_uid:
        Series Instance UID (0020,000E) of the result series.
    sop_instance_uid:
        SOP Instance UID (0008,0018) of the result object.
    series_number:
        Series Number (0020,0011), stable per output kind (from the configuration).
    series_description:
        Series Description (0008,103E), at most 64 characters.
    uid_root:
        The root the UIDs were derived under; further UIDs that belong to the
        object (SR tracking UIDs, device UIDs) are derived under it too.

    Raises
    ------
    InvalidUIDError
        If a UID or the root is not valid.
    ResultError
        If the series number or description cannot be encoded.
    """

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    series_description: str
    uid_root: str = DEFAULT_UID_ROOT

    def __post_init__(self) -> None:
        _check_uid(self.series_instance_uid, "Series Instance UID")
        _check_uid(self.sop_instance_uid, "SOP Instance UID")
        if self.series_instance_uid == self.sop_instance_uid:
            raise InvalidUIDError("Series Instance UID and SOP Instance UID of a result must differ")
        normalize_uid_root(self.uid_root)
        if isinstance(self.series_number, bool) or not 0 < self.series_number <= _MAX_IS_VALUE:
            raise ResultError(
                f"Series number {self.series_number!r} is not an integer in 1..{_MAX_IS_VALUE}: "
                "fix the series number configured for this output"
            )
        description = self.series_description
        if len(description) > _MAX_LO_LENGTH or "\\" in description or not description.isprintable():
            raise ResultError(
                f"Series description {description!r} must be at most {_MAX_LO_LENGTH} printable "
                "characters without '\\': fix the description configured for this output"
            )

    def derive(self, *parts: str) -> str:
        """Derive a further UID belonging to this object (e.g. an SR tracking UID).

        Parameters
        ----------
        *parts:
            What the UID names, e.g. ``("tracking", "3")``.

        Returns
        -------
        str
            A UID under :attr:`uid_root`, deterministic for this identity and ``parts``.
        """
        return derive_uid(self.uid_root, "object", self.sop_instance_uid, *parts)


def derive_identity(
    uid_root: str,
    source_series_uid: str,
    model_name: str,
    model_version: str,
    kind: str,
    series_number: int,
    series_description: str,
) -> OutputIdentity:
    """Derive the identity of a result object from what it was made of.

    Parameters
    ----------
    uid_root:
        Configured UID root, or :data:`DEFAULT_UID_ROOT`; a trailing ``"."``
        is optional.
    source_series_uid:
        Series Instance UID of the series the model ran on.
    model_name, model_version:
        Name and version of the model (from its card).  A new model version
        gives new UIDs, so its results never overwrite those of the old one.
    kind:
        Output kind (``"seg"``, ``"sr"``...; a :class:`~dicom_node.domain.OutputKind` works).
    series_number, series_description:
        Series Number and Series Description of the result series (from the
        configuration); not part of the UID derivation.

    Returns
    -------
    OutputIdentity
        Series and SOP Instance UIDs that are equal for equal inputs and
        different for different inputs.

    Raises
    ------
    InvalidUIDError
        If ``uid_root`` or ``source_series_uid`` is not valid.
    ResultError
        If ``series_number`` or ``series_description`` cannot be encoded.
    """
    _check_uid(source_series_uid, "Source Series Instance UID")
    if not model_name or not model_version or not kind:
        raise ResultError("Model name, model version and output kind are needed to derive result UIDs")
    root = normalize_uid_root(uid_root)
    inputs = (source_series_uid, model_name, model_version, str(kind))
    identity = OutputIdentity(
        series_instance_uid=derive_uid(root, "series", *inputs),
        sop_instance_uid=derive_uid(root, "instance", *inputs),
        series_number=series_number,
        series_description=series_description,
        uid_root=root,
    )
    logger.debug(
        "Derived %s identity %s for model %s %s", kind, identity.sop_instance_uid, model_name, model_version
    )
    return identity
