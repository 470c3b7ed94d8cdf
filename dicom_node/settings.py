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

import ipaddress
import logging
import os
import re
import string
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

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
from typing_extensions import TypeAliasType

from dicom_node.domain import OutputKind
from dicom_node.errors import ConfigError
from dicom_node.settings_yaml import describe, dotted, duplicate_keys, format_problem, parse_yaml

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_MODEL_NAMES",
    "DERIVED_FACTS",
    "OPERATORS",
    "GROUP_KEYS",
    "PRIORITY_LEVELS",
    "BuiltinModel",
    "CFindPeerSettings",
    "ChainModel",
    "CodeSettings",
    "CompletionSettings",
    "Condition",
    "DicomwebAuth",
    "DicomwebDestination",
    "DimseDestination",
    "HttpSettings",
    "LabelSettings",
    "LoggingSettings",
    "MonaiBundleModel",
    "NodeSettings",
    "OutputSeriesSettings",
    "OutputsSettings",
    "PeerSettings",
    "PreprocessingSettings",
    "PythonModel",
    "RuleSettings",
    "SendSettings",
    "Settings",
    "StorageSettings",
    "StudyRuleSettings",
    "TlsSettings",
    "TorchscriptModel",
    "WorkersSettings",
    "default_config_text",
    "default_settings",
    "load_settings",
    "load_settings_text",
]

#: Names accepted by ``models.<name>: {type: builtin, name: ...}``.
BUILTIN_MODEL_NAMES: tuple[str, ...] = ("lungs-ct",)

#: Keys of a rule's ``when`` that are facts about the series, not DICOM keywords.
DERIVED_FACTS: frozenset[str] = frozenset({
    "instance_count", "calling_ae", "called_ae", "source_host",  # from the association and the store
    "slice_spacing", "orientation", "image_type", "frames",  # from the headers of every instance
})

#: Keys of a rule's ``when`` that group conditions: ``all``/``any`` take a list of mappings, ``not`` one.
GROUP_KEYS: frozenset[str] = frozenset({"all", "any", "not"})

#: Operator keys of a condition mapping, in the order the matcher checks them.
OPERATORS: tuple[str, ...] = ("exists", "absent", "equals", "iequals", "in", "regex", "contains", "min", "max", "not")

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")
_UID_PREFIX_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
_CALLABLE_RE = re.compile(rf"{_DOTTED}:{_DOTTED}")
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
    """Accept a derived fact, a group key, or a DICOM keyword, tag or path (see :mod:`dicom_node.rules.keys`)."""
    if key in DERIVED_FACTS or key in GROUP_KEYS:
        return key
    from dicom_node.rules.keys import parse_key  # here: dicom_node.rules imports this module

    parse_key(key)
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


class TlsSettings(BaseModel):
    """DICOM TLS on the listening port (``node.tls``; PS3.15 Annex B secure transport).

    ``certificate`` and ``private_key`` are PEM files of the node's server
    certificate.  With ``require_client_certificate`` a peer must present a
    certificate signed by one of ``ca_certificates`` (PEM bundle), else the TLS
    handshake fails before any DICOM is exchanged.
    """

    model_config = _FROZEN

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TlsSettings:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates (the CA(s) that sign client certificates)")
        return self


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
    # Listener processes sharing the port: "auto" = one per CPU core, at most 4.
    receivers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 10
    max_pdu_bytes: Annotated[int, Field(ge=0, le=2**32 - 1)] = 16382
    acse_timeout_s: Seconds = 30.0
    dimse_timeout_s: Seconds = 60.0
    network_timeout_s: Seconds = 120.0
    tls: TlsSettings | None = None

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
    # Below this much free space, finished work is removed before retention_hours
    # (oldest first); None = twice min_free_mb.
    cleanup_free_mb: Annotated[int, Field(ge=0)] | None = None
    cleanup_interval_s: Seconds = 300.0

    @model_validator(mode="after")
    def _cleanup_above_intake(self) -> StorageSettings:
        if self.cleanup_free_mb is not None and self.cleanup_free_mb < self.min_free_mb:
            raise ValueError(f"cleanup_free_mb ({self.cleanup_free_mb}) must be >= min_free_mb "
                             f"({self.min_free_mb}): clean up before intake stops")
        return self

    def cleanup_threshold_mb(self) -> int:
        """Free MiB below which finished work is removed early."""
        return self.cleanup_free_mb if self.cleanup_free_mb is not None else 2 * self.min_free_mb

    def resolved_path(self) -> Path:
        """``path`` with ``~`` expanded, made absolute against the current working directory."""
        return self.path.expanduser().resolve()


class CFindPeerSettings(BaseModel):
    """A sending PACS that the node asks by C-FIND how many instances a series has (``completion.cfind``).

    A receiving series whose Calling AE Title is ``ae_title`` is complete as
    soon as the peer's NumberOfSeriesRelatedInstances (0020,1209) equals the
    number received; otherwise the quiet timer still completes it.
    """

    model_config = _FROZEN

    ae_title: AETitle
    host: Host
    port: Port
    calling_ae_title: AETitle | None = None
    after_seconds: Seconds = 2.0
    interval_seconds: Seconds = 10.0
    timeout_s: Seconds = 10.0


class CompletionSettings(BaseModel):
    """When a series counts as complete (``completion:``)."""

    model_config = _FROZEN

    quiet_seconds: Seconds = 30.0
    tick_seconds: Seconds = 2.0
    cfind: tuple[CFindPeerSettings, ...] = ()

    @field_validator("cfind")
    @classmethod
    def _one_per_ae(cls, value: tuple[CFindPeerSettings, ...]) -> tuple[CFindPeerSettings, ...]:
        _no_duplicates("cfind ae_title", [p.ae_title for p in value])
        return value

    def cfind_peer(self, calling_ae: str) -> CFindPeerSettings | None:
        """The C-FIND peer for series sent by ``calling_ae``, if any."""
        return next((p for p in self.cfind if p.ae_title == calling_ae.strip()), None)
    reprocess_late_arrivals: bool = True


class SendSettings(BaseModel):
    """Retry policy of SEND jobs (``send:``): exponential backoff, then dead-letter.

    A job is dead after ``max_attempts`` attempts or once it is older than
    ``max_age_hours`` (whichever comes first).  Every ``health_check_s`` seconds
    the destinations with jobs waiting for a retry are probed (C-ECHO, or an
    HTTP GET for DICOMweb); one that answers gets its waiting jobs at once.
    """

    model_config = _FROZEN

    max_attempts: Annotated[int, Field(ge=1)] = 20
    max_age_hours: Annotated[float, Field(gt=0)] = 72.0
    backoff_initial_s: Seconds = 10.0
    backoff_max_s: Seconds = 600.0
    health_check_s: Seconds = 30.0

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

    # "auto": one worker per visible GPU (one on a machine without GPU).
    infer: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    infer_timeout_s: Seconds = 1800.0
    max_warm_models: Annotated[int, Field(ge=1, le=64)] = 4
    shutdown_grace_s: Seconds = 600.0


class HttpSettings(BaseModel):
    """Health, metrics and status page (``http:``)."""

    model_config = _FROZEN

    enabled: bool = True
    host: Host = "127.0.0.1"
    port: Port = 8080
    # Every endpoint but /healthz requires it (Bearer, or Basic with it as password) when set.
    token: Annotated[str, Field(min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$")] | None = None
    # Patient name, ID, birth date, study date and descriptions on the status page.
    show_phi: bool = False
    # Studies listed on the status page.
    status_studies: Annotated[int, Field(ge=1, le=1000)] = 50


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


def _unique_kinds(value: tuple[OutputKind, ...] | None) -> tuple[OutputKind, ...] | None:
    if value is not None:
        _no_duplicates("output", [str(v) for v in value])
    return value


#: Output kinds a destination receives; ``None`` (the default) = what the rule produces.
DestinationOutputs = Annotated[
    Annotated[tuple[OutputKind, ...], Field(min_length=1)] | None, AfterValidator(_unique_kinds)
]


class DimseDestination(BaseModel):
    """A DICOM peer that receives results by C-STORE (``type: dimse``, the default).

    ``outputs`` replaces the rule's ``outputs`` for this destination (e.g.
    ``[sc, sr]`` for a PACS that cannot show SEG).  ``seg_fallback: sc`` (the
    default) sends the overlay series instead of the SEG when the destination
    does not accept the SEG SOP class in association negotiation; ``none``
    fails the send job instead.
    """

    model_config = _FROZEN

    type: Literal["dimse"] = "dimse"
    ae_title: AETitle
    host: Host
    port: Port
    calling_ae_title: AETitle | None = None
    timeout_s: Seconds = 30.0
    outputs: DestinationOutputs = None
    seg_fallback: Literal["sc", "none"] = "sc"

    def resolve_calling_ae(self, node_ae_title: str) -> str:
        """The Calling AE Title to use: ``calling_ae_title``, else the node's own AE title."""
        return self.calling_ae_title if self.calling_ae_title is not None else node_ae_title


_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_env_name(value: str) -> str:
    if not _ENV_NAME_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not an environment variable name (letters, digits and '_')")
    return value


def _check_url(value: str) -> str:
    from urllib.parse import urlsplit

    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must be an http:// or https:// URL with a host (got {value!r})")
    if parts.username or parts.password:
        raise ValueError("url must not contain credentials; use auth with password_env or password_file")
    if parts.query or parts.fragment:
        raise ValueError(f"url must be the DICOMweb base URL, without query or fragment (got {value!r})")
    return value.rstrip("/")


EnvName = Annotated[str, AfterValidator(_check_env_name)]


class DicomwebAuth(BaseModel):
    """Credentials of a DICOMweb destination (``destinations.<name>.auth``).

    The secret itself is never written in the configuration: it is read, at
    every send, from an environment variable (``token_env`` / ``password_env``,
    e.g. set by systemd's ``EnvironmentFile=``) or from a file (``token_file`` /
    ``password_file``, e.g. under systemd's ``$CREDENTIALS_DIRECTORY``;
    surrounding whitespace is removed).  ``type: bearer`` sends
    ``Authorization: Bearer <token>``; ``type: basic`` sends ``username`` and the
    password as HTTP basic authentication.
    """

    model_config = _FROZEN

    type: Literal["bearer", "basic"]
    token_env: EnvName | None = None
    token_file: Path | None = None
    username: Annotated[str, Field(min_length=1)] | None = None
    password_env: EnvName | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> DicomwebAuth:
        if self.type == "bearer":
            if self.username is not None or self.password_env is not None or self.password_file is not None:
                raise ValueError("bearer auth takes token_env or token_file (username/password are for type: basic)")
            if (self.token_env is None) == (self.token_file is None):
                raise ValueError("bearer auth needs exactly one of token_env or token_file")
        else:
            if self.token_env is not None or self.token_file is not None:
                raise ValueError("basic auth takes username with password_env or password_file "
                                 "(tokens are for type: bearer)")
            if self.username is None:
                raise ValueError("basic auth needs username")
            if (self.password_env is None) == (self.password_file is None):
                raise ValueError("basic auth needs exactly one of password_env or password_file")
        return self

    def secret(self) -> str:
        """The token (bearer) or password (basic), read now from its environment variable or file.

        Returns
        -------
        str
            The secret, without surrounding whitespace.

        Raises
        ------
        ConfigError
            The variable is unset or empty, or the file cannot be read or is
            empty; the message names the variable or file, never the secret.
        """
        env = self.token_env if self.type == "bearer" else self.password_env
        path = self.token_file if self.type == "bearer" else self.password_file
        what = "token" if self.type == "bearer" else "password"
        if env is not None:
            value = os.environ.get(env, "").strip()
            if not value:
                raise ConfigError(f"the DICOMweb {what} environment variable {env} is not set or empty")
            return value
        if path is None:  # excluded by _one_secret
            raise ConfigError(f"no DICOMweb {what} source configured")
        try:
            value = path.expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the DICOMweb {what} file {path}: {exc}") from None
        if not value:
            raise ConfigError(f"the DICOMweb {what} file {path} is empty")
        return value


class DicomwebDestination(BaseModel):
    """A DICOMweb service that receives results by STOW-RS (``type: dicomweb``).

    ``url`` is the service's base URL, the one ``/studies`` is appended to
    (e.g. ``https://pacs.example.org/dicom-web``).  ``verify_tls: false`` turns
    certificate checks off (test systems only); ``ca_file`` trusts an in-house CA.
    """

    model_config = _FROZEN

    type: Literal["dicomweb"]
    url: Annotated[str, AfterValidator(_check_url)]
    auth: DicomwebAuth | None = None
    verify_tls: bool = True
    ca_file: Path | None = None
    timeout_s: Seconds = 30.0
    outputs: DestinationOutputs = None

    @model_validator(mode="after")
    def _tls(self) -> DicomwebDestination:
        if self.ca_file is not None and not self.verify_tls:
            raise ValueError("ca_file is set but verify_tls is false: drop one of them")
        return self


def _type_of(default: str | None) -> Any:
    def discriminate(value: Any) -> str | None:
        if isinstance(value, Mapping):
            return value.get("type", default)  # type: ignore[no-any-return]
        return getattr(value, "type", None)

    return discriminate


Destination = Annotated[
    Union[Annotated[DimseDestination, Tag("dimse")], Annotated[DicomwebDestination, Tag("dicomweb")]],
    Discriminator(_type_of("dimse")),
]


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


def _check_modality(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Z]{0,16}", value.strip().upper()):
        raise ValueError(f"modality must be a DICOM Modality such as CT or MR, or empty for any (got {value!r})")
    return value.strip().upper()


#: Input modality a model accepts ("" = any); the job fails on any other.
Modality = Annotated[str, BeforeValidator(_check_modality)]


class BuiltinModel(BaseModel):
    """A model shipped with the node (``type: builtin``)."""

    model_config = _FROZEN

    type: Literal["builtin"]
    name: str
    device: str = "auto"
    timeout_s: Seconds | None = None

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
    timeout_s: Seconds | None = None
    modality: Modality = ""
    intended_use: Annotated[str, Field(max_length=1024)] = ""

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


_Positive = Annotated[float, Field(gt=0)]
_Size = Annotated[int, Field(ge=1, le=4096)]


def _check_axcodes(value: Any) -> Any:
    if value is None:
        return None
    text = str(value).strip().upper()
    axes = {"L": "x", "R": "x", "P": "y", "A": "y", "I": "z", "S": "z"}
    if len(text) != 3 or any(c not in axes for c in text) or len({axes[c] for c in text}) != 3:
        raise ValueError(f"orientation must be three letters, one of L/R, A/P and S/I each, e.g. RAS (got {value!r})")
    return text


class PreprocessingSettings(BaseModel):
    """Declared preprocessing of a ``torchscript`` model (MONAI transforms, then the network).

    ``spacing`` is in mm along the model's array axes after ``orientation``
    (MONAI's ``pixdim``); ``window`` maps ``[low, high]`` (modality units, HU
    for CT) linearly to ``[0, 1]`` and clips; ``normalize: zscore`` scales to
    zero mean and unit variance.  ``roi_size`` enables sliding-window inference
    with ``overlap`` and ``sw_batch_size``; ``spatial_size`` resizes the whole
    volume (classifiers that take a fixed input size).
    """

    model_config = _FROZEN

    orientation: Annotated[str | None, BeforeValidator(_check_axcodes)] = "RAS"
    spacing: tuple[_Positive, _Positive, _Positive] | None = None
    window: tuple[float, float] | None = None
    normalize: Literal["none", "zscore"] = "none"
    roi_size: tuple[_Size, _Size, _Size] | None = None
    spatial_size: tuple[_Size, _Size, _Size] | None = None
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.25
    sw_batch_size: Annotated[int, Field(ge=1, le=256)] = 4

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessingSettings:
        if self.window is not None and self.window[0] >= self.window[1]:
            raise ValueError(f"window must be [low, high] with low < high (got {list(self.window)})")
        if self.roi_size is not None and self.spatial_size is not None:
            raise ValueError("use roi_size (sliding window) or spatial_size (resize), not both")
        return self


class _NetworkModel(BaseModel):
    """Fields shared by models that run a neural network (``torchscript``, ``monai_bundle``)."""

    model_config = _FROZEN

    task: Literal["segmentation", "classification"] = "segmentation"
    labels: tuple[LabelSettings, ...] = ()
    classes: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = ()
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    intended_use: Annotated[str, Field(max_length=1024)] = ""
    modality: Modality = ""
    device: str = "auto"
    amp: bool = True
    timeout_s: Seconds | None = None
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return _check_device(value)

    @model_validator(mode="after")
    def _unique_outputs(self) -> _NetworkModel:
        _no_duplicates("label value", [label.value for label in self.labels])
        _no_duplicates("label name", [label.name for label in self.labels])
        _no_duplicates("class", list(self.classes))
        return self


class TorchscriptModel(_NetworkModel):
    """A TorchScript network file plus declared preprocessing (``type: torchscript``).

    Segmentation output channels are classes (channel 0 background, argmax),
    or with ``activation: sigmoid`` (or one channel) each channel ``c`` is
    label ``c + 1`` where its probability is at least 0.5; classification
    output is one score per class in ``classes`` order, turned into
    probabilities by ``activation`` (``none``: already probabilities).
    """

    type: Literal["torchscript"]
    path: Path
    version: Annotated[str, BeforeValidator(_text_or_int), Field(min_length=1, max_length=64)] = "1.0"
    preprocessing: PreprocessingSettings = PreprocessingSettings()

    @model_validator(mode="after")
    def _outputs_declared(self) -> TorchscriptModel:
        if self.task == "segmentation" and not self.labels:
            raise ValueError("a segmentation model needs at least one entry in labels")
        if self.task == "classification" and not self.classes:
            raise ValueError("a classification model needs at least one entry in classes")
        return self


class MonaiBundleModel(_NetworkModel):
    """A MONAI bundle directory (``type: monai_bundle``).

    The bundle's ``network_def``, ``preprocessing``, ``inferer`` and
    ``postprocessing`` are used; the node supplies the image in place of the
    bundle's ``LoadImaged``.  ``version``, ``intended_use``, ``modality`` and
    the labels / classes default to the bundle's ``metadata.json``.  For
    segmentation the bundle's postprocessing decides the labels;
    ``activation`` applies to classification scores only.
    """

    type: Literal["monai_bundle"]
    path: Path
    config_file: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    version: Annotated[str, BeforeValidator(_text_or_int), Field(min_length=1, max_length=64)] | None = None
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None
    sw_batch_size: Annotated[int, Field(ge=1, le=256)] | None = None


class ChainModel(BaseModel):
    """A segmentation model whose regions are each handed to a second model (``type: chain``).

    ``first`` and ``then`` name other (non-chain) models; ``first`` must be a
    segmentation model.  ``regions`` are label values of ``first`` (empty: all);
    each region's bounding box grown by ``margin_mm`` is cropped and given to
    ``then``.
    """

    model_config = _FROZEN

    type: Literal["chain"]
    first: Name
    then: Name
    regions: tuple[Annotated[int, Field(ge=1, le=65535)], ...] = ()
    margin_mm: Annotated[float, Field(ge=0.0, le=500.0)] = 10.0
    version: Annotated[str, BeforeValidator(_text_or_int), Field(min_length=1, max_length=64)] = "1.0"
    intended_use: Annotated[str, Field(max_length=1024)] = ""
    timeout_s: Seconds | None = None

    @model_validator(mode="after")
    def _distinct(self) -> ChainModel:
        if self.first == self.then:
            raise ValueError(f"first and then must be different models (both {self.first!r})")
        _no_duplicates("region", list(self.regions))
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
    Union[
        Annotated[BuiltinModel, Tag("builtin")],
        Annotated[PythonModel, Tag("python")],
        Annotated[MonaiBundleModel, Tag("monai_bundle")],
        Annotated[TorchscriptModel, Tag("torchscript")],
        Annotated[ChainModel, Tag("chain")],
    ],
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
    sc: OutputSeriesSettings = OutputSeriesSettings(series_number=9903, series_description="AI Overlay")
    pdf: OutputSeriesSettings = OutputSeriesSettings(series_number=9904, series_description="AI Summary")
    seg_type: Literal["binary", "labelmap"] = "binary"
    empty_segments: Literal["drop", "keep"] = "drop"
    banner: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x20-\x7e]+$")] = (
        "AI result - not for primary diagnosis"
    )
    fill_opacity: Annotated[float, Field(ge=0.0, le=1.0)] = 0.35

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
        numbers = {"seg": self.seg.series_number, "sr": self.sr.series_number,
                    "sc": self.sc.series_number, "pdf": self.pdf.series_number}
        for kind, number in numbers.items():
            same = [other for other, n in numbers.items() if n == number and other != kind]
            if same:
                raise ValueError(f"{kind} and {same[0]} must use different series numbers (both {number})")
        return self


# --------------------------------------------------------------------------- rules


_Flag = Annotated[bool, Field(strict=True)]


class Condition(BaseModel):
    """One condition of a rule's ``when``: operators, all of which must hold.

    In YAML a condition is written as a scalar (``Modality: CT``, short for
    ``{equals: CT}``), a list (``BodyPartExamined: [CHEST, LUNG]``, short for
    ``{in: [...]}``) or a mapping of operators: ``exists`` / ``absent``
    (``true``), ``equals``, ``iequals`` (case-insensitive), ``in``, ``regex``
    (compiled at load, applied with :func:`re.search`), ``contains`` (substring),
    ``min`` and ``max`` (inclusive bounds) and ``not`` (a nested condition that
    must fail).  See :mod:`dicom_node.rules.matcher` for the semantics.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    exists: _Flag | None = None
    absent: _Flag | None = None
    equals: Scalar | None = None
    iequals: Scalar | None = None
    in_: Annotated[tuple[Scalar, ...], Field(min_length=1)] | None = Field(default=None, alias="in")
    regex: re.Pattern[str] | None = None
    contains: Scalar | None = None
    min: float | None = None
    max: float | None = None
    not_: Condition | None = Field(default=None, alias="not")

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
        if self.exists is False or self.absent is False:
            raise ValueError("write 'exists: true' or 'absent: true' (false is not accepted: use the other one)")
        if self.absent and any(
            v is not None for v in (self.exists, self.equals, self.iequals, self.in_, self.regex,
                                    self.contains, self.min, self.max)
        ):
            raise ValueError("'absent' cannot be combined with operators that need a value")
        return self


class _Group:
    """The value of a group key (``all``/``any``/``not``), marked so that its key, not its shape, picks the type."""

    __slots__ = ("key", "value")

    def __init__(self, key: str, value: Any) -> None:
        self.key, self.value = key, value


def _mark_groups(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _Group(k, v) if k in GROUP_KEYS else v for k, v in value.items()}
    return value


def _when_tag(value: Any) -> str:
    if isinstance(value, _Group):
        return "~map" if value.key == "not" else "~list"
    if isinstance(value, tuple) and value and all(isinstance(v, Mapping) for v in value):
        return "~list"  # already validated (a model built in Python)
    return "~cond"


def _unmark_list(value: Any) -> Any:
    if isinstance(value, _Group):
        if not isinstance(value.value, (list, tuple)) or not value.value:
            raise ValueError(f"'{value.key}' takes a non-empty list of condition mappings, "
                             f"e.g. {value.key}: [{{Modality: CT}}, {{Modality: MR}}]")
        return value.value
    return value


def _unmark_map(value: Any) -> Any:
    if isinstance(value, _Group):
        if not isinstance(value.value, Mapping) or set(value.value) <= set(OPERATORS):
            raise ValueError("'not' takes a mapping of conditions, e.g. not: {ImageType: {contains: LOCALIZER}}; "
                             "to negate one condition write KEY: {not: {...}}")
        return value.value
    return value


# A ``when`` mapping: KEY -> condition, all/any -> list of mappings, not -> mapping.  The union
# tags ("~cond"...) appear in pydantic error locations only; _locate drops them.
WhenMap = TypeAliasType("WhenMap", Annotated[dict[WhenKey, "WhenValue"], BeforeValidator(_mark_groups)])
WhenValue = TypeAliasType("WhenValue", Annotated[
    Union[
        Annotated[Condition, Tag("~cond")],
        Annotated[tuple[WhenMap, ...], BeforeValidator(_unmark_list), Tag("~list")],
        Annotated[WhenMap, BeforeValidator(_unmark_map), Tag("~map")],
    ],
    Discriminator(_when_tag),
])

#: Model types that take several series of one study (``predict_study``), as study rules with several roles need.
MULTI_INPUT_MODEL_TYPES = ("python",)

#: Job priority (``jobs.priority``, higher runs first) of each rule ``priority``.
PRIORITY_LEVELS: dict[str, int] = {"stat": 10, "normal": 0, "low": -10}


class StudyRuleSettings(BaseModel):
    """``study:`` of a rule that needs several series of one study (e.g. arterial and venous phase).

    ``series`` names each required series (a role) with the conditions that
    select it; the rule runs once every role has a complete series and the
    study has been quiet for ``quiet_seconds``.  When a role is still missing
    ``max_wait_seconds`` after the first selected series arrived, the rule
    gives up and records which series never came.
    """

    model_config = _FROZEN

    series: Annotated[dict[Name, WhenMap], Field(min_length=1)]
    quiet_seconds: Seconds = 60.0
    max_wait_seconds: Seconds = 1800.0

    @model_validator(mode="after")
    def _waits(self) -> StudyRuleSettings:
        if self.max_wait_seconds < self.quiet_seconds:
            raise ValueError(
                f"max_wait_seconds ({self.max_wait_seconds}) must be >= quiet_seconds ({self.quiet_seconds})"
            )
        return self


class RuleSettings(BaseModel):
    """One rule: when a complete series fits ``when``, run ``run``, produce ``outputs``, send to ``send_to``.

    An empty ``send_to`` keeps results in the spool only.  An empty ``when``
    matches every series the PACS routes to the node.  Rules are evaluated in
    order; a matching rule with ``mode: stop`` ends the evaluation; ``default``
    rules apply only when no other rule matched; ``priority`` orders the job
    queue; ``quiet_seconds`` overrides ``completion.quiet_seconds`` for the
    series this rule matches; ``study`` makes it a study-level rule.
    """

    model_config = _FROZEN

    name: Name
    when: WhenMap
    run: Annotated[tuple[Name, ...], Field(min_length=1)]
    outputs: Annotated[tuple[OutputKind, ...], Field(min_length=1)] = (OutputKind.SEG, OutputKind.SR)
    send_to: tuple[Name, ...] = ()
    mode: Literal["continue", "stop"] = "continue"
    default: bool = False
    priority: Literal["stat", "normal", "low"] = "normal"
    quiet_seconds: Seconds | None = None
    study: StudyRuleSettings | None = None

    @field_validator("run", "outputs", "send_to")
    @classmethod
    def _unique(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        _no_duplicates("entry", [str(v) for v in value])
        return value

    @model_validator(mode="after")
    def _study_rule(self) -> RuleSettings:
        if self.study is not None and (self.default or self.mode == "stop"):
            raise ValueError("a study rule cannot be a default rule or use mode: stop (they order series rules)")
        return self

    @property
    def job_priority(self) -> int:
        """The ``jobs.priority`` of this rule's jobs (higher runs first)."""
        return PRIORITY_LEVELS[self.priority]


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
                elif rule.study is not None and len(rule.study.series) > 1 and \
                        self.models[model].type not in MULTI_INPUT_MODEL_TYPES:
                    problems.append((("rules", i, "run", j), f"study rule {rule.name!r} gives model {model!r} "
                                     f"{len(rule.study.series)} series ({', '.join(rule.study.series)}) but a "
                                     f"{self.models[model].type} model takes one series; use a type: python model"))
            for j, dest in enumerate(rule.send_to):
                if dest not in self.destinations:
                    known = ", ".join(sorted(self.destinations)) or "none defined"
                    problems.append(
                        (
                            ("rules", i, "send_to", j),
                            f"rule {rule.name!r} sends to unknown destination {dest!r} (destinations: {known})",
                        )
                    )
        for name, spec in self.models.items():
            if spec.type != "chain":
                continue
            for key in ("first", "then"):
                target = self.models.get(getattr(spec, key))
                if target is None:
                    problems.append((("models", name, key), f"chain {name!r} uses unknown model "
                                     f"{getattr(spec, key)!r} (models: {', '.join(sorted(self.models))})"))
                elif target.type == "chain":
                    problems.append((("models", name, key), f"chain {name!r}: {getattr(spec, key)!r} is itself "
                                     "a chain; chains take plain models"))
                elif key == "first" and getattr(target, "task", "segmentation") != "segmentation":
                    problems.append((("models", name, key), f"chain {name!r}: first model {spec.first!r} must "
                                     "be a segmentation model"))
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
            if not rule.when and not rule.default and rule.study is None:
                notes.append(f"rule {rule.name!r} has an empty 'when': it matches every series")
        used_models = {m for rule in self.rules for m in rule.run}
        used_dests = {d for rule in self.rules for d in rule.send_to}
        notes.extend(f"model {m!r} is not used by any rule" for m in self.models if m not in used_models)
        notes.extend(f"destination {d!r} is not used by any rule" for d in self.destinations if d not in used_dests)
        notes.extend(f"destination {d!r} sends credentials over plain http: use https" for d, dest in
                     self.destinations.items() if dest.type == "dicomweb" and dest.auth and dest.url.startswith("http:"))
        notes.extend(f"destination {d!r} does not verify the server's TLS certificate (verify_tls: false)" for d, dest
                     in self.destinations.items() if dest.type == "dicomweb" and not dest.verify_tls)
        return notes


class _ReferenceError(ConfigError):
    """Cross-reference problems; propagates through pydantic because it is not a ``ValueError``."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        super().__init__("\n".join(f"{dotted(loc)}: {msg}" for loc, msg in problems))
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
    root, data = parse_yaml(text, source)
    if root is None:
        raise ConfigError(f"{source}: the configuration is empty; start from config/node.example.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:{root.start_mark.line + 1}: the configuration must be a mapping of sections")
    duplicates = duplicate_keys(root)
    if duplicates:
        raise ConfigError("\n".join(f"{source}:{line}: {msg}" for line, msg in duplicates))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = [describe(error, root, source, OPERATORS) for error in exc.errors()]
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None
    except _ReferenceError as exc:
        lines = [format_problem(root, source, loc, msg) for loc, msg in exc.problems]
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
