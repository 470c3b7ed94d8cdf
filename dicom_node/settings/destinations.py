"""``destinations:``: where results go, by C-STORE (``dimse``) or STOW-RS (``dicomweb``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, Discriminator, Field, Strict, Tag, model_validator

from dicom_node.domain import OutputKind
from dicom_node.errors import ConfigError
from dicom_node.settings.base import FROZEN, AETitle, Flag, Host, Port, Seconds, no_duplicates, type_of


def _unique_kinds(value: tuple[OutputKind, ...] | None) -> tuple[OutputKind, ...] | None:
    if value is not None:
        no_duplicates("output", [str(v) for v in value])
    return value


#: Output kinds a destination receives; ``None`` (the default) = what the rule produces.
DestinationOutputs = Annotated[
    Annotated[tuple[OutputKind, ...], Field(min_length=1)] | None, AfterValidator(_unique_kinds)
]


#: How the SR is written for a destination: ``viewer`` (every measurement group placed on an image, what OHIF
#: 3.x opens; classifications as the report's qualitative evaluations) or ``measurements`` (a TID 1501 group
#: per classification with its probability as a NUM, for consumers that read numbers from groups).
SrForm = Literal["viewer", "measurements"]


class DimseDestination(BaseModel):
    """A DICOM peer that receives results by C-STORE (``type: dimse``, the default).

    ``outputs`` replaces the rule's ``outputs`` for this destination (e.g.
    ``[sc, sr]`` for a PACS that cannot show SEG).  ``seg_fallback: sc`` (the
    default) sends the overlay series instead of the SEG when the destination
    does not accept the SEG SOP class in association negotiation; ``none``
    fails the send job instead.  ``sr_form`` chooses the SR's form for this
    destination (:data:`SrForm`).  ``associations`` (1-8) lets a job with
    many objects (an overlay series) go over that many associations at once.
    """

    model_config = FROZEN

    type: Literal["dimse"] = "dimse"
    ae_title: AETitle
    host: Host
    port: Port
    calling_ae_title: AETitle | None = None
    timeout_s: Seconds = 30.0
    outputs: DestinationOutputs = None
    sr_form: SrForm = "viewer"
    seg_fallback: Literal["sc", "none"] = "sc"
    associations: Annotated[int, Strict(), Field(ge=1, le=8)] = 1

    def resolve_calling_ae(self, node_ae_title: str) -> str:
        """The Calling AE Title to use: ``calling_ae_title``, else the node's own AE title."""
        return self.calling_ae_title if self.calling_ae_title is not None else node_ae_title


_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_env_name(value: str) -> str:
    if not _ENV_NAME_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not an environment variable name (letters, digits and '_')")
    return value


def _check_url(value: str) -> str:
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

    model_config = FROZEN

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

    model_config = FROZEN

    type: Literal["dicomweb"]
    url: Annotated[str, AfterValidator(_check_url)]
    auth: DicomwebAuth | None = None
    verify_tls: Flag = True
    ca_file: Path | None = None
    timeout_s: Seconds = 30.0
    outputs: DestinationOutputs = None
    sr_form: SrForm = "viewer"

    @model_validator(mode="after")
    def _tls(self) -> DicomwebDestination:
        if self.ca_file is not None and not self.verify_tls:
            raise ValueError("ca_file is set but verify_tls is false: drop one of them")
        return self




Destination = Annotated[
    Annotated[DimseDestination, Tag("dimse")] | Annotated[DicomwebDestination, Tag("dicomweb")],
    Discriminator(type_of("dimse")),
]
