"""Building blocks of every settings section: strict scalar types, value checks, shared helpers.

Numbers and flags are strict: YAML reads an unquoted ``yes``/``no``/``on``/``off``
as a boolean, and a boolean is never accepted where a number is meant (``port:
yes`` is not port 1), nor a number or a string where a flag is meant; a quoted
number is not a number.  Text fields accept text only, except where
:func:`text_or_int` says otherwise.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict

#: Every settings model: immutable, unknown keys are errors.
FROZEN = ConfigDict(frozen=True, extra="forbid")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")
UID_PREFIX_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?")
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
CALLABLE_RE = re.compile(rf"{_DOTTED}:{_DOTTED}")
YAML_BOOL_HINT = "YAML reads unquoted yes/no/on/off/true/false as a boolean; quote the value"


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


def check_network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address or CIDR network (e.g. 10.0.0.7 or 10.0.0.0/24); "
            "host names are not accepted"
        ) from None



def text_or_int(value: Any) -> Any:
    """Accept ``1`` for ``"1"`` (YAML numbers), but not floats: ``1.10`` would become ``"1.1"``."""
    if isinstance(value, bool):
        raise ValueError(f"got the boolean {value}; {YAML_BOOL_HINT}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        raise ValueError(f"got the number {value}; quote the value (YAML reads 1.10 as 1.1)")
    return value


AETitle = Annotated[str, BeforeValidator(_check_ae_title)]
Name = Annotated[str, AfterValidator(_check_name)]
Host = Annotated[str, AfterValidator(_check_host)]
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]
Seconds = Annotated[float, Strict(), Field(gt=0)]

#: A whole number; a boolean or a quoted number is refused.
Int = Annotated[int, Strict()]
#: A number (a whole number is accepted); a boolean or a quoted number is refused.
Float = Annotated[float, Strict()]
#: ``true`` or ``false``; ``1``, ``"yes"`` and other look-alikes are refused.
Flag = Annotated[bool, Strict()]


def check_device(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not _DEVICE_RE.fullmatch(value):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (got {value!r})")
    return value


#: A model's ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
Device = Annotated[str, AfterValidator(check_device)]


def no_duplicates(what: str, values: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming the first value given twice."""
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)


def type_of(default: str | None) -> Any:
    """A discriminator for a union tagged by the mapping's ``type`` key (``default`` when absent)."""
    def discriminate(value: Any) -> str | None:
        if isinstance(value, Mapping):
            return value.get("type", default)  # type: ignore[no-any-return]
        return getattr(value, "type", None)

    return discriminate
