"""``rules:``: the rule schema, its ``when`` conditions and study rules.

The grammar of a ``when`` key (derived facts, keywords, tags, paths) belongs to
:mod:`dicom_node.rules.keys`; this module validates keys with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from typing_extensions import TypeAliasType

from dicom_node.domain import OutputKind
from dicom_node.rules.keys import DERIVED_FACTS, GROUP_KEYS, OPERATORS, parse_key
from dicom_node.settings.base import FROZEN, YAML_BOOL_HINT, Flag, Float, Name, Seconds, no_duplicates


def _check_when_key(key: str) -> str:
    """Accept a derived fact, a group key, or a DICOM keyword, tag or path (see :mod:`dicom_node.rules.keys`)."""
    if key in DERIVED_FACTS or key in GROUP_KEYS:
        return key
    parse_key(key)
    return key


def _check_scalar(value: Any) -> Any:
    """A condition value: text or a number (not a boolean, list or mapping)."""
    if isinstance(value, bool):
        raise ValueError(f"got the boolean {value}; {YAML_BOOL_HINT}")
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"expected text or a number (got {type(value).__name__} {value!r})")
    return value



Scalar = Annotated[str | int | float, BeforeValidator(_check_scalar)]
WhenKey = Annotated[str, AfterValidator(_check_when_key)]



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

    exists: Flag | None = None
    absent: Flag | None = None
    equals: Scalar | None = None
    iequals: Scalar | None = None
    in_: Annotated[tuple[Scalar, ...], Field(min_length=1)] | None = Field(default=None, alias="in")
    regex: re.Pattern[str] | None = None
    contains: Scalar | None = None
    min: Float | None = None
    max: Float | None = None
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
if TYPE_CHECKING:  # mypy cannot follow the recursive alias; to a type checker it is a mapping
    WhenMap = dict[str, Any]
else:
    WhenMap = TypeAliasType("WhenMap", Annotated[dict[WhenKey, "WhenValue"], BeforeValidator(_mark_groups)])
    WhenValue = TypeAliasType("WhenValue", Annotated[
        Annotated[Condition, Tag("~cond")]
        | Annotated[tuple[WhenMap, ...], BeforeValidator(_unmark_list), Tag("~list")]
        | Annotated[WhenMap, BeforeValidator(_unmark_map), Tag("~map")],
        Discriminator(_when_tag),
    ])

#: Model types that take several series of one study (``predict_study``), as study rules with several roles need
#: (any model that takes a tensor takes them as input channels, with ``channels``).
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

    model_config = FROZEN

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

    model_config = FROZEN

    name: Name
    when: WhenMap
    run: Annotated[tuple[Name, ...], Field(min_length=1)]
    outputs: Annotated[tuple[OutputKind, ...], Field(min_length=1)] = (OutputKind.SEG, OutputKind.SR)
    send_to: tuple[Name, ...] = ()
    mode: Literal["continue", "stop"] = "continue"
    default: Flag = False
    priority: Literal["stat", "normal", "low"] = "normal"
    quiet_seconds: Seconds | None = None
    study: StudyRuleSettings | None = None
    channels: tuple[Name, ...] = ()

    @field_validator("run", "outputs", "send_to")
    @classmethod
    def _unique(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        no_duplicates("entry", [str(v) for v in value])
        return value

    @model_validator(mode="after")
    def _study_rule(self) -> RuleSettings:
        if self.study is not None and (self.default or self.mode == "stop"):
            raise ValueError("a study rule cannot be a default rule or use mode: stop (they order series rules)")
        if self.channels:
            if self.study is None:
                raise ValueError("channels name the series of a study rule (study.series); this rule has no study")
            no_duplicates("channel", list(self.channels))
            unknown = [c for c in self.channels if c not in self.study.series]
            if unknown:
                raise ValueError(f"channels {unknown} are not series of this study rule "
                                 f"(study.series: {', '.join(self.study.series)})")
        return self

    @property
    def job_priority(self) -> int:
        """The ``jobs.priority`` of this rule's jobs (higher runs first)."""
        return PRIORITY_LEVELS[self.priority]
