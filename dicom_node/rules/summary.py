"""What the rules see of a series: attributes of its first instance, derived facts, loop protection.

:func:`attributes_from_dataset` turns a pydicom dataset into the plain values of
:attr:`~dicom_node.domain.SeriesSummary.attributes`; :func:`instance_geometry`
and :func:`series_facts` derive ``slice_spacing``, ``orientation``, ``image_type``
and ``frames`` from the headers of every instance; :func:`read_series` does both
for a list of files, and :func:`scan_paths` groups files on disk into series
(``dicom-node rules test PATH...``);
:func:`never_process_reason` says when a series must never be processed at all
(results of ours or of another AI, presentation states, reports), whatever the rules say.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from dicom_node.domain import SeriesSummary

logger = logging.getLogger(__name__)

__all__ = [
    "DERIVED_MODALITIES",
    "OWN_MANUFACTURER",
    "InstanceGeometry",
    "attributes_from_dataset",
    "instance_geometry",
    "never_process_reason",
    "read_series",
    "scan_paths",
    "series_facts",
]

#: The Manufacturer (0008,0070) the node writes into its results.
OWN_MANUFACTURER = "dicom-node project"

#: Modalities of objects derived from images (results, annotations): never processed.
DERIVED_MODALITIES: frozenset[str] = frozenset({"SEG", "SR", "KO", "PR", "RTSTRUCT", "REG"})

# SOP Class UIDs (PS3.4 Annex B) of objects that are never processed: a UID ending in "."
# is a prefix of a family of storage classes, any other must match exactly.
_DERIVED_SOP_CLASSES: tuple[tuple[str, str], ...] = (
    # 66.1-66.3 registration and fiducials, 66.4 SEG, 66.5 surface SEG, 66.6 tractography, 66.7+ newer SEG
    ("1.2.840.10008.5.1.4.1.1.66.", "a segmentation, registration or other derived object"),
    ("1.2.840.10008.5.1.4.1.1.88.", "a structured report or key object selection"),  # all SR, KO is 88.59
    ("1.2.840.10008.5.1.4.1.1.11.", "a presentation state"),  # every softcopy/volumetric PR class
    ("1.2.840.10008.5.1.4.1.1.481.3", "an RT structure set"),
)

# VRs whose values are bytes.
_SKIPPED_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW", "US or SS or OW"})

#: Sequence items kept per sequence, and nesting depth kept, in a summary's attributes.
MAX_SEQUENCE_ITEMS = 64
MAX_SEQUENCE_DEPTH = 4

#: Angle (degrees) within which a slice normal counts as along a patient axis; beyond: oblique.
ORIENTATION_TOLERANCE_DEG = 30.0


def attributes_from_dataset(ds: Dataset, *, _depth: int = 0) -> dict[str, Any]:
    """Public and private attributes of ``ds`` as JSON-serialisable values.

    Public elements are keyed by keyword, private ones by their tag written
    ``(GGGG,EEEE)``.  Strings (including person names, UIDs, dates and times)
    become ``str``, IS ``int``, DS and binary numbers ``float``/``int``, AT a
    ``"GGGGEEEE"`` hex string, multi-valued elements a ``list`` of those, and
    sequences a ``list`` of such mappings (the first :data:`MAX_SEQUENCE_ITEMS`
    items, :data:`MAX_SEQUENCE_DEPTH` levels deep).  An empty element becomes
    ``""`` (text VRs) or ``None`` (numeric VRs).  Skipped: bulk data (OB/OW/...
    and UN VRs, so Pixel Data), the overlay and curve repeating groups (50xx,
    60xx), group lengths, numeric VRs whose text is not a number, and any
    element whose value cannot be decoded (each logged at DEBUG; the rest
    still comes back).

    Parameters
    ----------
    ds:
        A dataset, typically read with ``stop_before_pixels=True``.  File meta
        information is not included.

    Returns
    -------
    dict[str, Any]
        Key -> value, in tag order.
    """
    attributes: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        tag = BaseTag(tag)
        if tag.element == 0 or tag.group in (0x0000, 0x0002) or tag.group >> 8 in (0x50, 0x60):
            continue
        try:
            # Decoding a raw element can fail (or warn, which a warnings filter may make an error)
            # on malformed values; one bad element must not hide the others.
            elem = ds[tag]
            key = f"({tag.group:04X},{tag.element:04X})" if tag.is_private else elem.keyword
            if not key or elem.VR in _SKIPPED_VRS:
                continue
            if elem.VR == "SQ":
                if _depth < MAX_SEQUENCE_DEPTH:
                    attributes[key] = [attributes_from_dataset(item, _depth=_depth + 1)
                                       for item in list(elem.value)[:MAX_SEQUENCE_ITEMS]]
                continue
            value = _plain(elem.value)
        except Exception as exc:  # noqa: BLE001 - any decoding failure means "skip this element"
            logger.debug("Attribute %s skipped: %s: %s", tag, type(exc).__name__, exc)
            continue
        if value is _SKIP or (elem.VR in _NUMERIC_VRS and not _all_numbers(value)):
            logger.debug("Attribute %s skipped: value not representable as %s", tag, elem.VR)
            continue
        if value is None and elem.VR not in _NUMERIC_VRS:
            value = ""
        attributes[key] = value
    return attributes


_SKIP = object()
_NUMERIC_VRS = frozenset({"DS", "IS", "FL", "FD", "SL", "SS", "UL", "US", "SV", "UV", "US or SS"})


def _all_numbers(value: Any) -> bool:
    items = value if isinstance(value, list) else [value]
    return all(item is None or (isinstance(item, (int, float)) and not isinstance(item, bool)) for item in items)


def _plain(value: Any) -> Any:
    """One element value as a plain Python value, ``None`` when empty, or ``_SKIP``."""
    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        items = [_plain(v) for v in value]
        if any(item is _SKIP for item in items):
            return _SKIP
        return items
    if isinstance(value, (bytes, bytearray, Dataset)):
        return _SKIP
    if isinstance(value, BaseTag):
        return f"{int(value):08X}"
    if isinstance(value, int):
        return int(value)  # IS and other int subclasses -> plain int
    if isinstance(value, float):
        number = float(value)  # DSfloat -> plain float
        return number if math.isfinite(number) else _SKIP
    if isinstance(value, (PersonName, str)):
        return str(value)
    if isinstance(value, (datetime.date, datetime.time, datetime.datetime)):
        original = getattr(value, "original_string", None)
        return original if isinstance(original, str) else value.isoformat()
    try:
        number = float(value)  # DSdecimal and other numeric types
    except (TypeError, ValueError):
        return _SKIP
    return number if math.isfinite(number) else _SKIP


# --------------------------------------------------------------------------- derived facts

# Header elements read from every instance but the first (which is read whole).
_GEOMETRY_TAGS = ["ImageType", "NumberOfFrames", "ImagePositionPatient", "ImageOrientationPatient",
                  "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"]


@dataclass(frozen=True)
class InstanceGeometry:
    """What one instance contributes to a series' derived facts.

    ``positions`` are ImagePositionPatient of each frame (LPS, mm), ``orientation``
    the ImageOrientationPatient (row then column cosines), both from the
    top level or, for enhanced multi-frame objects, the functional groups.
    """

    positions: tuple[tuple[float, float, float], ...] = ()
    orientation: tuple[float, ...] | None = None
    image_type: tuple[str, ...] = ()
    frames: int = 1


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n and all(math.isfinite(x) for x in numbers) else None


def _macro_value(item: Dataset, macro: str, keyword: str) -> Any:
    """``item.<macro>[0].<keyword>`` of a functional group item, ``None`` when any part is missing."""
    try:
        return getattr(item, macro)[0].get(keyword)
    except (AttributeError, IndexError, TypeError):
        return None


def instance_geometry(ds: Dataset) -> InstanceGeometry:
    """Positions, orientation, image type and frame count of one instance (missing parts left empty).

    Parameters
    ----------
    ds:
        The instance's header (pixel data not needed).

    Returns
    -------
    InstanceGeometry
        Malformed values are treated as absent.
    """
    try:
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        frames = 1
    orientation = _floats(ds.get("ImageOrientationPatient"), 6) if "ImageOrientationPatient" in ds else None
    if orientation is None:
        shared = ds.get("SharedFunctionalGroupsSequence", None) or [Dataset()]
        orientation = _floats(_macro_value(shared[0], "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    positions: list[tuple[float, float, float]] = []
    position = _floats(ds.get("ImagePositionPatient"), 3) if "ImagePositionPatient" in ds else None
    if position is not None:
        positions.append(position)  # type: ignore[arg-type]
    else:
        for item in ds.get("PerFrameFunctionalGroupsSequence", None) or []:
            if orientation is None:
                orientation = _floats(_macro_value(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
            p = _floats(_macro_value(item, "PlanePositionSequence", "ImagePositionPatient"), 3)
            if p is not None:
                positions.append(p)  # type: ignore[arg-type]
    image_type = ds.get("ImageType")
    values = [image_type] if isinstance(image_type, str) else list(image_type or [])
    return InstanceGeometry(tuple(positions), orientation,
                            tuple(str(v).strip().upper() for v in values if str(v).strip()), frames)


def series_facts(instances: Sequence[InstanceGeometry]) -> dict[str, Any]:
    """Derived facts of a series from the geometry of all its instances.

    Parameters
    ----------
    instances:
        One entry per instance, any order.

    Returns
    -------
    dict[str, Any]
        ``slice_spacing``: median distance (mm, 4 decimals) between consecutive
        distinct slice positions along the slice normal of the first
        orientation, ``None`` with fewer than two positions; ``orientation``:
        ``axial``, ``coronal`` or ``sagittal`` when the slice normal is within
        :data:`ORIENTATION_TOLERANCE_DEG` of the patient's foot-head,
        anterior-posterior or left-right axis, else ``oblique``, ``None``
        without ImageOrientationPatient; ``image_type``: every ImageType value
        in order of appearance, upper case; ``frames``: total frames.
    """
    orientation = next((g.orientation for g in instances if g.orientation is not None), None)
    facts: dict[str, Any] = {"slice_spacing": None, "orientation": None,
                             "image_type": list(dict.fromkeys(v for g in instances for v in g.image_type)),
                             "frames": sum(g.frames for g in instances)}
    if orientation is None:
        return facts
    row, col = orientation[:3], orientation[3:]
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0])
    length = math.sqrt(sum(c * c for c in normal))
    if length < 1e-6:
        return facts  # row and column parallel: not an orientation
    normal = (normal[0] / length, normal[1] / length, normal[2] / length)
    axis = max(range(3), key=lambda i: abs(normal[i]))
    aligned = abs(normal[axis]) >= math.cos(math.radians(ORIENTATION_TOLERANCE_DEG))
    facts["orientation"] = ("sagittal", "coronal", "axial")[axis] if aligned else "oblique"
    along = sorted({round(sum(p[i] * normal[i] for i in range(3)), 4) for g in instances for p in g.positions})
    steps = sorted(b - a for a, b in zip(along, along[1:]))
    if steps:
        facts["slice_spacing"] = round(steps[len(steps) // 2], 4)
    return facts


class GeometryCache:
    """:class:`InstanceGeometry` of files read before (while their series arrived), by path.

    A file changed since (inode, size or modification time) is read again.
    Holds at most ``limit`` files, the least recently read dropped first;
    safe to use from several threads.
    """

    def __init__(self, limit: int = 50_000) -> None:
        self.limit = limit
        self._entries: OrderedDict[str, tuple[tuple[int, int, int], InstanceGeometry]] = OrderedDict()
        self._lock = threading.Lock()

    def forget(self, paths: Iterable[Path]) -> None:
        """Drop ``paths`` (a series whose completion summary is made: the cache has done its job for it)."""
        with self._lock:
            for path in paths:
                self._entries.pop(str(path), None)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: Path) -> InstanceGeometry | None:
        """The geometry of ``path`` (read now if unknown or changed); ``None`` when it cannot be read."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._entries.get(str(path))
        if known is not None and known[0] == key:
            return known[1]
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_GEOMETRY_TAGS)
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not hide the series' facts
            logger.debug("File %s skipped for derived facts: %s: %s", path, type(exc).__name__, exc)
            return None
        geometry = instance_geometry(ds)
        with self._lock:
            self._entries[str(path)] = (key, geometry)
            self._entries.move_to_end(str(path))
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)
        return geometry


def read_series(paths: Sequence[Path], known: GeometryCache | None = None,
                every_header: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Attributes of the first file and derived facts of all files of one series.

    Parameters
    ----------
    paths:
        The series' files; the first is read whole (without pixel data), the
        others only for the elements the derived facts need.
    known:
        Geometry of files read before (the node reads it while a series
        arrives, so its completion does not wait for a pass over every file).
    every_header:
        ``False``: the first file alone, and no derived facts (when no rule
        uses one: :func:`~dicom_node.rules.matcher.needs_every_header`).

    Returns
    -------
    tuple[dict[str, Any], dict[str, Any]]
        :func:`attributes_from_dataset` of the first file, and
        :func:`series_facts` of all files.

    Raises
    ------
    OSError, pydicom.errors.InvalidDicomError
        The first file cannot be read; a later unreadable file is skipped
        (logged at DEBUG).
    """
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    if not every_header:
        return attributes_from_dataset(first), {}
    geometry = [instance_geometry(first)]
    cache = known if known is not None else GeometryCache(limit=len(paths))
    for path in paths[1:]:
        one = cache.get(path)
        if one is not None:
            geometry.append(one)
    return attributes_from_dataset(first), series_facts(geometry)


@dataclass
class _SeriesScan:
    study_uid: str
    first_key: tuple[float, str]
    first: Dataset
    files: list[tuple[tuple[float, str], Path]] = field(default_factory=list)
    geometry: list[InstanceGeometry] = field(default_factory=list)


def scan_paths(paths: Sequence[Path]) -> list[tuple[SeriesSummary, list[Path]]]:
    """Read DICOM files under ``paths`` and summarise each series found.

    Folders are walked recursively (symbolic links to folders are not followed);
    files that are not DICOM (no ``DICM`` preamble marker), cannot be read, or
    lack Study/Series Instance UID are skipped with a DEBUG log.

    Parameters
    ----------
    paths:
        Files and/or folders.

    Returns
    -------
    list[tuple[SeriesSummary, list[Path]]]
        One entry per SeriesInstanceUID, in the order the series were first met
        (folders are walked in sorted order).  The summary's attributes are those
        of the instance with the lowest InstanceNumber (instances without one
        sort last, ties by path); its facts are ``instance_count`` and the
        :func:`series_facts` of all its files (the association facts
        ``calling_ae``... are unknown for files on disk).  The paths are sorted
        the same way.

    Raises
    ------
    FileNotFoundError
        A path does not exist.
    """
    series: dict[str, _SeriesScan] = {}
    for file in _walk(paths):
        ds = _read_header(file)
        if ds is None:
            continue
        study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
        series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        if not study_uid or not series_uid:
            logger.debug("File %s skipped: no StudyInstanceUID or SeriesInstanceUID", file)
            continue
        key = (_instance_number(ds), str(file))
        scan = series.get(series_uid)
        if scan is None:
            scan = series[series_uid] = _SeriesScan(study_uid, key, ds)
        elif key < scan.first_key:
            scan.first_key, scan.first = key, ds
        scan.files.append((key, file))
        scan.geometry.append(instance_geometry(ds))
    results: list[tuple[SeriesSummary, list[Path]]] = []
    for series_uid, scan in series.items():
        files = [path for _, path in sorted(scan.files)]
        summary = SeriesSummary(
            study_uid=scan.study_uid,
            series_uid=series_uid,
            attributes=attributes_from_dataset(scan.first),
            facts={"instance_count": len(files), **series_facts(scan.geometry)},
        )
        logger.debug("Series %s: %d instances found", series_uid, len(files))
        results.append((summary, files))
    return results


def _walk(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            for folder, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    yield Path(folder, name)
        elif path.exists():
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")


def _read_header(file: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(file, stop_before_pixels=True)
    except InvalidDicomError:
        logger.debug("File %s skipped: not a DICOM file", file)
    except Exception as exc:  # noqa: BLE001 - truncated or malformed files are skipped, the scan goes on
        logger.debug("File %s skipped: unreadable (%s: %s)", file, type(exc).__name__, exc)
    return None


def _instance_number(ds: Dataset) -> float:
    try:
        return float(ds.InstanceNumber)
    except Exception:  # noqa: BLE001 - absent, empty or malformed: sort last
        return math.inf


def never_process_reason(summary: SeriesSummary, *, manufacturer: str = OWN_MANUFACTURER) -> str | None:
    """Why a series must never be processed, or ``None`` when rules may decide.

    Protects against loops (our results routed back to us by the PACS) and
    against running image models on non-image objects.

    Parameters
    ----------
    summary:
        The series.
    manufacturer:
        The Manufacturer the node writes into its own results; compared
        case-insensitively after stripping.

    Returns
    -------
    str | None
        A reason such as ``"Modality SEG is a derived object"``, or ``None``.
    """
    modality = _text(summary.attributes.get("Modality"))
    if modality in DERIVED_MODALITIES:
        return f"Modality {modality} is a derived object (segmentation, report or annotation), never processed"
    sop_class = _text(summary.attributes.get("SOPClassUID"))
    for uid, what in _DERIVED_SOP_CLASSES:
        if sop_class.startswith(uid) if uid.endswith(".") else sop_class == uid:
            return f"SOP Class {sop_class} is {what}, never processed"
    own = _text(summary.attributes.get("Manufacturer"))
    if own and own.casefold() == manufacturer.strip().casefold():
        return f"Manufacturer {own!r} is this node: its own results are never processed"
    return None


def _text(value: Any) -> str:
    if isinstance(value, list):
        value = value[0] if value else ""
    return str(value).strip() if value is not None else ""
