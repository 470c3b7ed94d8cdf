"""The node's configuration: pydantic models of the YAML file, loading and validation.

Every model is frozen and forbids unknown keys, so a typo is an error at start-up,
never a silently ignored setting.  :func:`load_settings` and
:func:`load_settings_text` turn every problem into one :class:`~dicom_node.errors.ConfigError`
whose message has one line per problem::

    node.yaml:14: node.ae_title: AE title must be at most 16 characters (got 18)

naming the file, the YAML line of the key, the dotted key path and the reason.

Every section and every key has a default (see ``dicom_node/default_config.yaml``
and ``config/node.example.yaml``, which documents each key), except the keys that
identify a peer (a destination's AE title, host and port) and a rule's ``name``,
``when`` and ``run``.  A file that parses to nothing (empty, only comments) is an
error; ``{}`` is a valid file that runs no model.

Relative paths (``storage.path``, a python model's ``path``) are relative to the
current working directory of the process, not to the configuration file; the
systemd unit sets ``WorkingDirectory``.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import re
import string
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydicom.datadict import dictionary_VR, keyword_dict, repeater_has_keyword, tag_for_keyword

from dicom_node.domain import OutputKind
from dicom_node.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODEL_NAMES",
    "DERIVED_FACTS",
    "OPERATORS",
    "BuiltinModel",
    "CodeSettings",
    "CompletionSettings",
    "Condition",
    "DimseDestination",
    "HttpSettings",
    "LabelSettings",
    "LoggingSettings",
    "NodeSettings",
    "OutputSeriesSettings",
    "OutputsSettings",
    "PeerSettings",
    "PythonModel",
    "RuleSettings",
    "SendSettings",
    "Settings",
    "StorageSettings",
    "WorkersSettings",
    "default_config_text",
    "default_settings",
    "load_settings",
    "load_settings_text",
]

#: Names accepted by ``models.<name>: {type: builtin, name: ...}``.
BUILTIN_MODEL_NAMES: tuple[str, ...] = ("lungs-ct",)

#: Keys of a rule's ``when`` that are facts about the series, not DICOM keywords.
DERIVED_FACTS: frozenset[str] = frozenset({"instance_count", "calling_ae", "called_ae", "source_host"})

#: Operator keys of a condition mapping, in the order the matcher checks them.
OPERATORS: tuple[str, ...] = ("equals", "in", "regex", "min", "max")

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")
_UID_PREFIX_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
_CALLABLE_RE = re.compile(rf"{_DOTTED}:{_DOTTED}")
# VRs whose values are bytes or nested datasets: attributes_from_dataset skips them.
_UNMATCHABLE_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_YAML_BOOL_HINT = "YAML reads unquoted yes/no/on/off/true/false as a boolean; quote the value"


# --------------------------------------------------------------------------- value checks


def _check_ae_title(value: Any) -> str:
    """Validate a DICOM Application Entity title (PS3.5 VR AE) and strip its padding."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"AE title must be a string (got {value!r})")
    text = str(value).strip(" ")
    if not text:
        raise ValueError("AE title must not be empty or all spaces")
    if len(text) > 16:
        raise ValueError(f"AE title must be at most 16 characters (got {len(text)})")
    if "\\" in text:
        raise ValueError(f"AE title must not contain a backslash (got {text!r})")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"AE title must not contain control characters (got {text!r})")
    if not text.isascii():
        raise ValueError(f"AE title must contain only ASCII characters (got {text!r})")
    return text


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"name {value!r} must be 1-64 characters: letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def _check_host(value: str) -> str:
    value = value.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is neither an IP address nor a valid host name") from None
    return value


def _check_network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address or CIDR network (e.g. 10.0.0.7 or 10.0.0.0/24); "
            "host names are not accepted"
        ) from None


def _check_when_key(key: str) -> str:
    """Accept a derived fact or a public, top-level, non-binary DICOM keyword."""
    if key in DERIVED_FACTS:
        return key
    if repeater_has_keyword(key):
        raise ValueError(f"{key!r} is in a repeating group (overlay/curve data), which rules do not see")
    tag = tag_for_keyword(key)
    if tag is None:
        close = difflib.get_close_matches(key, [*keyword_dict, *DERIVED_FACTS], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown DICOM keyword {key!r}{hint}; keys of 'when' are DICOM keywords "
            f"(e.g. Modality) or derived facts ({', '.join(sorted(DERIVED_FACTS))})"
        )
    if tag >> 16 in (0x0000, 0x0002):
        raise ValueError(f"{key!r} is a command or file meta element, which rules do not see")
    vr = dictionary_VR(tag)
    if any(part in _UNMATCHABLE_VRS for part in vr.split(" or ")):
        raise ValueError(f"{key!r} has VR {vr}; rules can only test attributes with text or numeric values")
    return key


def _check_scalar(value: Any) -> Any:
    """A condition value: text or a number (not a boolean, list or mapping)."""
    if isinstance(value, bool):
        raise ValueError(f"got the boolean {value}; {_YAML_BOOL_HINT}")
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"expected text or a number (got {type(value).__name__} {value!r})")
    return value


def _text_or_int(value: Any) -> Any:
    """Accept ``1`` for ``"1"`` (YAML numbers), but not floats: ``1.10`` would become ``"1.1"``."""
    if isinstance(value, bool):
        raise ValueError(f"got the boolean {value}; {_YAML_BOOL_HINT}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        raise ValueError(f"got the number {value}; quote the value (YAML reads 1.10 as 1.1)")
    return value


AETitle = Annotated[str, BeforeValidator(_check_ae_title)]
Name = Annotated[str, AfterValidator(_check_name)]
Host = Annotated[str, AfterValidator(_check_host)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]
Scalar = Annotated[Union[str, int, float], BeforeValidator(_check_scalar)]
WhenKey = Annotated[str, AfterValidator(_check_when_key)]


# --------------------------------------------------------------------------- node


class PeerSettings(BaseModel):
    """One entry of ``node.allowed_peers``; a peer must match every field that is set.

    ``host`` is an IP address or CIDR network (``10.0.0.0/24``), never a host
    name: reverse DNS is not a basis for access control.
    """

    model_config = _FROZEN

    ae_title: AETitle | None = None
    host: Annotated[str, AfterValidator(_check_network)] | None = None

    @model_validator(mode="after")
    def _needs_one(self) -> PeerSettings:
        if self.ae_title is None and self.host is None:
            raise ValueError("an allowed peer needs ae_title, host or both (an empty entry would allow anyone)")
        return self

    def matches(self, ae_title: str, address: str) -> bool:
        """Whether a peer calling with ``ae_title`` from ``address`` fits this entry.

        Parameters
        ----------
        ae_title:
            The Calling AE Title of the association request (padding is ignored).
        address:
            The peer's IP address; an IPv4-mapped IPv6 address matches its IPv4 form.

        Returns
        -------
        bool
            ``True`` when every field set on this entry matches.
        """
        if self.ae_title is not None and ae_title.strip(" ") != self.ae_title:
            return False
        if self.host is not None:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if ip not in ipaddress.ip_network(self.host):
                return False
        return True


class NodeSettings(BaseModel):
    """The node's own DICOM identity and association limits (``node:``).

    ``max_pdu_bytes`` is the largest P-DATA PDU the node accepts (it is announced
    to peers); ``16382`` is pynetdicom's and many PACS' default, ``0`` means
    unlimited.
    """

    model_config = _FROZEN

    ae_title: AETitle = "DICOMNODE"
    host: Host = "0.0.0.0"
    port: Port = 11112
    allowed_peers: tuple[PeerSettings, ...] = ()
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 10
    max_pdu_bytes: Annotated[int, Field(ge=0, le=2**32 - 1)] = 16382
    acse_timeout_s: Seconds = 30.0
    dimse_timeout_s: Seconds = 60.0
    network_timeout_s: Seconds = 120.0

    @field_validator("max_pdu_bytes")
    @classmethod
    def _pdu_size(cls, value: int) -> int:
        if 0 < value < 4096:
            raise ValueError(f"max_pdu_bytes must be 0 (unlimited) or at least 4096 (got {value})")
        return value

    def peer_allowed(self, ae_title: str, address: str) -> bool:
        """Whether a peer may associate: any entry matches, or the list is empty (accept all)."""
        return not self.allowed_peers or any(p.matches(ae_title, address) for p in self.allowed_peers)


# --------------------------------------------------------------------------- storage, timing


class StorageSettings(BaseModel):
    """Where state lives (``storage:``): the spool and the SQLite database under ``path``."""

    model_config = _FROZEN

    path: Path = Path("./var")
    min_free_mb: Annotated[int, Field(ge=0)] = 2048
    retention_hours: Annotated[float, Field(gt=0)] = 72.0

    def resolved_path(self) -> Path:
        """``path`` with ``~`` expanded, made absolute against the current working directory."""
        return self.path.expanduser().resolve()


class CompletionSettings(BaseModel):
    """When a series counts as complete (``completion:``)."""

    model_config = _FROZEN

    quiet_seconds: Seconds = 30.0
    tick_seconds: Seconds = 2.0


class SendSettings(BaseModel):
    """Retry policy of SEND jobs (``send:``): exponential backoff, then dead-letter."""

    model_config = _FROZEN

    max_attempts: Annotated[int, Field(ge=1)] = 20
    backoff_initial_s: Seconds = 10.0
    backoff_max_s: Seconds = 600.0

    @model_validator(mode="after")
    def _ordered(self) -> SendSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s ({self.backoff_initial_s})"
            )
        return self


class WorkersSettings(BaseModel):
    """Inference worker processes (``workers:``)."""

    model_config = _FROZEN

    infer: Annotated[int, Field(ge=1, le=64)] = 1
    infer_timeout_s: Seconds = 1800.0
    max_warm_models: Annotated[int, Field(ge=1, le=64)] = 4
    shutdown_grace_s: Seconds = 600.0


class HttpSettings(BaseModel):
    """Health, metrics and status page (``http:``)."""

    model_config = _FROZEN

    enabled: bool = True
    host: Host = "127.0.0.1"
    port: Port = 8080


class LoggingSettings(BaseModel):
    """Log level and journald format (``logging:``)."""

    model_config = _FROZEN

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    journald: bool = False

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value


# --------------------------------------------------------------------------- destinations


class DimseDestination(BaseModel):
    """A DICOM peer that receives results by C-STORE (``type: dimse``, the default)."""

    model_config = _FROZEN

    type: Literal["dimse"] = "dimse"
    ae_title: AETitle
    host: Host
    port: Port
    calling_ae_title: AETitle | None = None
    timeout_s: Seconds = 30.0

    def resolve_calling_ae(self, node_ae_title: str) -> str:
        """The Calling AE Title to use: ``calling_ae_title``, else the node's own AE title."""
        return self.calling_ae_title if self.calling_ae_title is not None else node_ae_title


def _type_of(default: str | None) -> Any:
    def discriminate(value: Any) -> str | None:
        if isinstance(value, Mapping):
            return value.get("type", default)  # type: ignore[no-any-return]
        return getattr(value, "type", None)

    return discriminate


Destination = Annotated[Union[Annotated[DimseDestination, Tag("dimse")]], Discriminator(_type_of("dimse"))]


# --------------------------------------------------------------------------- models


class CodeSettings(BaseModel):
    """A coded concept, e.g. SNOMED CT ``{value: "10200004", meaning: Liver}``."""

    model_config = _FROZEN

    value: Annotated[str, BeforeValidator(_text_or_int), Field(min_length=1, max_length=64)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]
    scheme: Annotated[str, Field(min_length=1, max_length=16)] = "SCT"


_Channel = Annotated[int, Field(ge=0, le=255)]


class LabelSettings(BaseModel):
    """One segment of a python segmentation model: label value, name, SNOMED CT codes, colour."""

    model_config = _FROZEN

    value: Annotated[int, Field(ge=1, le=65535)]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    snomed: CodeSettings
    category: CodeSettings = CodeSettings(value="123037004", meaning="Anatomical Structure")
    color: tuple[_Channel, _Channel, _Channel] = (255, 0, 0)


class BuiltinModel(BaseModel):
    """A model shipped with the node (``type: builtin``)."""

    model_config = _FROZEN

    type: Literal["builtin"]
    name: str
    device: str = "auto"

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BUILTIN_MODEL_NAMES:
            raise ValueError(f"unknown builtin model {value!r} (available: {', '.join(BUILTIN_MODEL_NAMES)})")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)


class PythonModel(BaseModel):
    """A model implemented by a Python callable (``type: python``).

    ``callable`` is ``"package.module:function"``; ``path`` is an optional
    directory prepended to ``sys.path`` before importing it.  Segmentation models
    declare ``labels``; classification models declare ``classes`` and ``threshold``.
    """

    model_config = _FROZEN

    type: Literal["python"]
    callable: str
    path: Path | None = None
    task: Literal["segmentation", "classification"] = "segmentation"
    version: Annotated[str, BeforeValidator(_text_or_int), Field(min_length=1, max_length=64)] = "1.0"
    labels: tuple[LabelSettings, ...] = ()
    classes: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = ()
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    device: str = "auto"

    @field_validator("callable")
    @classmethod
    def _callable(cls, value: str) -> str:
        if not _CALLABLE_RE.fullmatch(value.strip()):
            raise ValueError(f"callable must look like 'package.module:function' (got {value!r})")
        return value.strip()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)

    @model_validator(mode="after")
    def _outputs_declared(self) -> PythonModel:
        if self.task == "segmentation" and not self.labels:
            raise ValueError("a segmentation model needs at least one entry in labels")
        if self.task == "classification" and not self.classes:
            raise ValueError("a classification model needs at least one entry in classes")
        _no_duplicates("label value", [label.value for label in self.labels])
        _no_duplicates("label name", [label.name for label in self.labels])
        _no_duplicates("class", list(self.classes))
        return self


def _check_device(value: str) -> str:
    if not _DEVICE_RE.fullmatch(value):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (got {value!r})")
    return value


def _no_duplicates(what: str, values: Sequence[Any]) -> None:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


ModelSpec = Annotated[
    Union[Annotated[BuiltinModel, Tag("builtin")], Annotated[PythonModel, Tag("python")]],
    Discriminator(_type_of(None)),
]


# --------------------------------------------------------------------------- outputs


class OutputSeriesSettings(BaseModel):
    """Series number and description of one kind of result series.

    ``series_description`` may contain ``{model}``, replaced by the model's name.
    """

    model_config = _FROZEN

    series_number: Annotated[int, Field(ge=1, le=2**31 - 1)]
    series_description: Annotated[str, Field(min_length=1, max_length=64)]

    @field_validator("series_description")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"bad placeholder in {value!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
        if fields - {"model"}:
            raise ValueError(f"only the {{model}} placeholder is allowed (got {value!r})")
        return value

    def description_for(self, model: str) -> str:
        """The description with ``{model}`` filled in, cut to 64 characters (VR LO)."""
        return self.series_description.format(model=model)[:64]


class OutputsSettings(BaseModel):
    """How result objects are identified (``outputs:``)."""

    model_config = _FROZEN

    uid_root: str = "2.25."
    seg: OutputSeriesSettings = OutputSeriesSettings(series_number=9901, series_description="AI SEG")
    sr: OutputSeriesSettings = OutputSeriesSettings(series_number=9902, series_description="AI Report")

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str) -> str:
        value = value.strip()
        if len(value) > 40 or not _UID_PREFIX_RE.fullmatch(value):
            raise ValueError(
                f"uid_root must be a UID prefix of at most 40 characters: digits and dots, "
                f"no leading zeros in a component (got {value!r})"
            )
        return value if value.endswith(".") else value + "."

    @model_validator(mode="after")
    def _distinct(self) -> OutputsSettings:
        if self.seg.series_number == self.sr.series_number:
            raise ValueError(f"seg and sr must use different series numbers (both {self.seg.series_number})")
        return self


# --------------------------------------------------------------------------- rules


class Condition(BaseModel):
    """One condition of a rule's ``when``: operators, all of which must hold.

    In YAML a condition is written as a scalar (``Modality: CT``, short for
    ``{equals: CT}``), a list (``BodyPartExamined: [CHEST, LUNG]``, short for
    ``{in: [...]}``) or a mapping of operators: ``equals``, ``in``, ``regex``
    (compiled at load, applied with :func:`re.search`), ``min`` and ``max``
    (inclusive bounds).  See :mod:`dicom_node.rules.matcher` for the semantics.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    equals: Scalar | None = None
    in_: Annotated[tuple[Scalar, ...], Field(min_length=1)] | None = Field(default=None, alias="in")
    regex: re.Pattern[str] | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            if not value:
                raise ValueError(f"empty condition; use one or more of: {', '.join(OPERATORS)}")
            return value
        if value is None:
            raise ValueError("empty condition; write a value, a list of values or a mapping of operators")
        if isinstance(value, (list, tuple)):
            return {"in": value}
        return {"equals": value}

    @field_validator("min", "max", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"got the boolean {value}; expected a number")
        return value

    @field_validator("regex", mode="before")
    @classmethod
    def _compile(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _bounds(self) -> Condition:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class RuleSettings(BaseModel):
    """One rule: when a complete series fits ``when``, run ``run``, produce ``outputs``, send to ``send_to``.

    An empty ``send_to`` keeps results in the spool only.  An empty ``when``
    matches every series the PACS routes to the node.
    """

    model_config = _FROZEN

    name: Name
    when: dict[WhenKey, Condition]
    run: Annotated[tuple[Name, ...], Field(min_length=1)]
    outputs: Annotated[tuple[OutputKind, ...], Field(min_length=1)] = (OutputKind.SEG, OutputKind.SR)
    send_to: tuple[Name, ...] = ()

    @field_validator("run", "outputs", "send_to")
    @classmethod
    def _unique(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        _no_duplicates("entry", [str(v) for v in value])
        return value


# --------------------------------------------------------------------------- root


class Settings(BaseModel):
    """The whole configuration file.

    Cross references are checked after the sections themselves are valid: rule
    names are unique and every rule's ``run`` / ``send_to`` names an existing
    model / destination.  Such problems raise :class:`ConfigError` directly
    (not pydantic's ``ValidationError``), naming each key.
    """

    model_config = _FROZEN

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    completion: CompletionSettings = CompletionSettings()
    destinations: dict[Name, Destination] = {}
    models: dict[Name, ModelSpec] = {}
    outputs: OutputsSettings = OutputsSettings()
    send: SendSettings = SendSettings()
    workers: WorkersSettings = WorkersSettings()
    rules: tuple[RuleSettings, ...] = ()
    http: HttpSettings = HttpSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _references(self) -> Settings:
        problems = self.reference_problems()
        if problems:
            raise _ReferenceError(problems)
        return self

    def reference_problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Problems between sections, as ``(key path, reason)`` pairs (empty when consistent)."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        first_rule: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if rule.name in first_rule:
                problems.append(
                    (("rules", i, "name"), f"duplicate rule name {rule.name!r} (also rules[{first_rule[rule.name]}])")
                )
            first_rule.setdefault(rule.name, i)
            for j, model in enumerate(rule.run):
                if model not in self.models:
                    known = ", ".join(sorted(self.models)) or "none defined"
                    problems.append(
                        (("rules", i, "run", j), f"rule {rule.name!r} runs unknown model {model!r} (models: {known})")
                    )
            for j, dest in enumerate(rule.send_to):
                if dest not in self.destinations:
                    known = ", ".join(sorted(self.destinations)) or "none defined"
                    problems.append(
                        (
                            ("rules", i, "send_to", j),
                            f"rule {rule.name!r} sends to unknown destination {dest!r} (destinations: {known})",
                        )
                    )
        if self.http.enabled and self.http.port == self.node.port and (
            self.http.host == self.node.host or {"0.0.0.0", "::"} & {self.http.host, self.node.host}
        ):
            problems.append((("http", "port"), f"http.port {self.http.port} is the DICOM port node.port"))
        return problems

    def warnings(self) -> list[str]:
        """Valid but probably unintended settings, for ``check-config`` and start-up logs."""
        notes: list[str] = []
        if not self.node.allowed_peers:
            notes.append("node.allowed_peers is empty: associations from any peer are accepted")
        if not self.rules:
            notes.append("no rules: received series are stored but no model runs")
        for rule in self.rules:
            if not rule.send_to:
                notes.append(f"rule {rule.name!r} has no send_to: its results stay in the spool")
            if not rule.when:
                notes.append(f"rule {rule.name!r} has an empty 'when': it matches every series")
        used_models = {m for rule in self.rules for m in rule.run}
        used_dests = {d for rule in self.rules for d in rule.send_to}
        notes.extend(f"model {m!r} is not used by any rule" for m in self.models if m not in used_models)
        notes.extend(f"destination {d!r} is not used by any rule" for d in self.destinations if d not in used_dests)
        return notes


class _ReferenceError(ConfigError):
    """Cross-reference problems; propagates through pydantic because it is not a ``ValueError``."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        super().__init__("\n".join(f"{_dotted(loc)}: {msg}" for loc, msg in problems))
        self.problems = problems


# --------------------------------------------------------------------------- loading


def load_settings(path: Path) -> Settings:
    """Read and validate a configuration file.

    Parameters
    ----------
    path:
        The YAML file (UTF-8, a BOM is tolerated).

    Returns
    -------
    Settings
        The validated, frozen configuration.

    Raises
    ------
    ConfigError
        The file cannot be read, is not YAML, is empty, or has invalid keys or
        values; the message has one ``FILE:LINE: KEY.PATH: reason`` line per problem.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the configuration file is not UTF-8 text ({exc.reason})") from exc
    return load_settings_text(text, source=str(path))


def load_settings_text(text: str, source: str = "<string>") -> Settings:
    """Validate configuration given as YAML text.

    Parameters
    ----------
    text:
        The YAML document.
    source:
        Name used in error messages (usually the file path).

    Returns
    -------
    Settings
        The validated, frozen configuration.

    Raises
    ------
    ConfigError
        As :func:`load_settings`.
    """
    root, data = _parse_yaml(text, source)
    if root is None:
        raise ConfigError(f"{source}: the configuration is empty; start from config/node.example.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:{root.start_mark.line + 1}: the configuration must be a mapping of sections")
    duplicates = _duplicate_keys(root)
    if duplicates:
        raise ConfigError("\n".join(f"{source}:{line}: {msg}" for line, msg in duplicates))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(error, root, source) for error in exc.errors()]
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None
    except _ReferenceError as exc:
        lines = [_format_problem(root, source, loc, msg) for loc, msg in exc.problems]
        raise ConfigError("\n".join(lines)) from None
    logger.debug("Configuration %s: %d models, %d rules", source, len(settings.models), len(settings.rules))
    return settings


def default_config_text() -> str:
    """The embedded default configuration (``dicom_node/default_config.yaml``) as text."""
    return resources.files("dicom_node").joinpath("default_config.yaml").read_text(encoding="utf-8")


def default_settings() -> Settings:
    """The embedded default: AE ``DICOMNODE`` on port 11112, state in ``./var``, builtin models, example rule.

    Raises
    ------
    ConfigError
        Only if the packaged default is broken (a packaging bug).
    """
    return load_settings_text(default_config_text(), source="<embedded default_config.yaml>")


def _parse_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """Compose (for line numbers) and construct (for values) one YAML document."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        detail = f"{exc.problem} ({exc.context})" if exc.context else str(exc.problem)
        raise ConfigError(f"{where}: YAML syntax error: {detail}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: YAML syntax error: {exc}") from None
    finally:
        loader.dispose()
    return root, data


def _duplicate_keys(root: yaml.Node) -> list[tuple[int, str]]:
    """Keys given twice in one mapping (PyYAML would silently keep the last)."""
    found: list[tuple[int, str]] = []
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                line = key.start_mark.line + 1
                if isinstance(key, yaml.ScalarNode):
                    if key.value in first:
                        found.append((line, f"duplicate key {key.value!r} (first at line {first[key.value]})"))
                    first.setdefault(key.value, line)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return sorted(found)


def _locate(root: yaml.Node, loc: Sequence[str | int]) -> tuple[tuple[str | int, ...], int | None]:
    """Map a pydantic error location to the key path the user wrote and its YAML line.

    Pydantic adds union tags (``models.x.python.callable``) and ``[key]``
    markers, and conditions are normalised (``Modality: CT`` is validated as
    ``{equals: CT}``); such elements are dropped.  Keys that are missing from
    the document (``Field required``) are kept, at the line of their parent.
    """
    node: yaml.Node | None = root
    path: list[str | int] = []
    line: int | None = root.start_mark.line + 1
    for element in loc:
        if element == "[key]":
            continue
        if len(path) == 2 and path[0] in ("models", "destinations") and element in ("dimse", "builtin", "python"):
            continue  # discriminated-union tag
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(element):
                    path.append(element)
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                path.append(element)
                node = None
        elif isinstance(node, yaml.SequenceNode):
            if isinstance(element, int) and 0 <= element < len(node.value):
                node = node.value[element]
                path.append(element)
                line = node.start_mark.line + 1
            # a str element here is a normalisation artefact ({in: [...]} from a list)
        elif isinstance(node, yaml.ScalarNode):
            break  # the value itself is what is wrong
        else:
            path.append(element)  # below a missing key
    return tuple(path), line


def _dotted(path: Sequence[str | int]) -> str:
    text = ""
    for element in path:
        text += f"[{element}]" if isinstance(element, int) else (f".{element}" if text else str(element))
    return text or "(top level)"


def _format_problem(root: yaml.Node, source: str, loc: Sequence[str | int], msg: str) -> str:
    path, line = _locate(root, loc)
    where = f"{source}:{line}" if line is not None else source
    return f"{where}: {_dotted(path)}: {msg}"


def _describe(error: ErrorDetails, root: yaml.Node, source: str) -> str:
    """One line for one pydantic error, in the node's words."""
    kind = error["type"]
    loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    msg = error["msg"]
    if kind == "extra_forbidden":
        path, _ = _locate(root, loc)
        if len(path) == 5 and path[0] == "rules" and path[2] == "when":
            msg = f"unknown operator (allowed: {', '.join(OPERATORS)})"
        else:
            msg = "unknown key (check its spelling and indentation)"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "union_tag_invalid":
        msg = f"unknown type {ctx.get('tag')!r} (valid: {ctx.get('expected_tags')})"
        loc = (*loc, "type")
    elif kind == "union_tag_not_found":
        if isinstance(error.get("input"), Mapping):
            msg = "required key 'type' is missing (valid: 'builtin', 'python')"
        else:
            msg = "expected a mapping of settings"
    elif kind == "value_error":
        msg = str(ctx.get("error", msg))
    elif kind == "assertion_error":
        msg = msg.removeprefix("Assertion failed, ")
    else:
        value = error.get("input")
        if isinstance(value, (str, int, float)) and len(repr(value)) <= 80:
            msg = f"{msg} (got {value!r})"
    return _format_problem(root, source, loc, msg)
