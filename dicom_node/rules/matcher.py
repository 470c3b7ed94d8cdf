"""Pure rule matching: which rules apply to a series, and why the others do not.

Semantics of one condition (``KEY: condition``):

- The value is a derived fact (``instance_count``, ``orientation``...) or the
  attribute of the series' first instance named by keyword, tag ``(gggg,eeee)``
  or path (``Sequence.Keyword``, ``Sequence[0].Keyword``; through a sequence the
  values of every item are collected).  A missing (``None``) or empty (``""``,
  ``[]``) value fails every operator except ``absent`` and ``not``.
- ``exists: true``: present and not empty; ``absent: true``: missing or empty.
- ``equals``: text is compared exactly (case-sensitive) after stripping
  surrounding spaces; ``iequals`` ignores case.  When either side is a number,
  both are compared as numbers (``SeriesNumber: 3`` matches ``"3"`` and
  ``3.0``); a value that is not a number then does not match.
- ``in``: ``equals`` against any of the listed values.
- ``regex``: :func:`re.search` on the stripped text of the value, so the pattern
  may match anywhere (anchor it with ``^...$``; ``(?i)`` ignores case).
- ``contains``: the text is a substring of the value (case-sensitive).
- ``min`` / ``max``: inclusive bounds; the value must be a number (or text that
  reads as one), otherwise the condition fails and says so.
- ``not``: a nested condition that must fail.
- Multi-valued values (lists, e.g. ImageType): ``equals`` / ``iequals`` / ``in``
  / ``regex`` / ``contains`` hold when ANY value matches; ``min`` / ``max`` when
  EVERY value is within bounds.

Operators of one condition are checked in the order of
:data:`dicom_node.rules.keys.OPERATORS`; conditions in the order the rule lists
them; the first failure is the reason.  Groups: ``all: [..]`` (every mapping
holds), ``any: [..]`` (at least one holds), ``not: {..}`` (the mapping does not
hold); a mapping holds when every entry holds.

Semantics of a rule list (:func:`explain`, :func:`match`): rules are evaluated
in order, and every matching rule applies unless an earlier matching rule has
``mode: stop``; ``default`` rules are evaluated after the others, only when none
of them matched.  A study rule (``study:``) "matches" a series that fits its
``when`` and one of its required series; the scheduler runs it once the study
has them all.  An empty rule list matches nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dicom_node.domain import RuleMatch, RuleVerdict, SeriesSummary
from dicom_node.rules.keys import DERIVED_FACTS, GEOMETRY_FACTS, GROUP_KEYS, parse_key, resolve
from dicom_node.settings import Condition, RuleSettings

__all__ = ["check_condition", "explain", "first_failure", "keys_used", "match", "needs_every_header", "quiet_seconds_for",
           "study_roles", "value_of"]

_MAX_SHOWN = 80


@dataclass(frozen=True)
class _Verdict:
    rule: RuleSettings
    matched: bool
    reason: str
    roles: tuple[str, ...] = ()


def explain(rules: Sequence[RuleSettings], summary: SeriesSummary) -> list[RuleVerdict]:
    """The verdict of every rule on ``summary``, in rule order.

    Parameters
    ----------
    rules:
        The configured rules.
    summary:
        The complete series.

    Returns
    -------
    list[RuleVerdict]
        One verdict per rule; when it did not match, ``reason`` is the first
        failing condition with the actual value, e.g. ``"SliceThickness 5.0 > max 3.0"``,
        or why it was not evaluated.  A matching study rule says which required
        series this one is.
    """
    return [RuleVerdict(rule=v.rule.name, matched=v.matched, reason=v.reason) for v in _evaluate(rules, summary)]


def match(rules: Sequence[RuleSettings], summary: SeriesSummary) -> list[RuleMatch]:
    """The series rules that apply to ``summary``, in rule order (none for an empty rule list).

    Study rules are not included (see :func:`study_roles`).

    Parameters
    ----------
    rules:
        The configured rules.
    summary:
        The complete series.

    Returns
    -------
    list[RuleMatch]
        What each matching rule asks for: models, outputs, destinations.
    """
    return [
        RuleMatch(rule=v.rule.name, models=tuple(v.rule.run), outputs=tuple(v.rule.outputs),
                  destinations=tuple(v.rule.send_to))
        for v in _evaluate(rules, summary)
        if v.matched and v.rule.study is None
    ]


def study_roles(rules: Sequence[RuleSettings], summary: SeriesSummary) -> dict[str, tuple[str, ...]]:
    """For each study rule that ``summary`` takes part in, the required series (roles) it fits.

    Parameters
    ----------
    rules:
        The configured rules.
    summary:
        A complete series.

    Returns
    -------
    dict[str, tuple[str, ...]]
        Rule name -> role names, in the rule's order; rules it does not fit are left out.
    """
    return {v.rule.name: v.roles for v in _evaluate(rules, summary) if v.matched and v.rule.study is not None}


def quiet_seconds_for(rules: Sequence[RuleSettings], summary: SeriesSummary, default: float) -> float:
    """How long ``summary``'s series must be quiet before it is complete.

    The longest ``quiet_seconds`` of the rules that apply (``default`` for a
    rule without one), so that every applicable rule sees the series as it
    wanted; ``default`` when no rule applies.

    Parameters
    ----------
    rules:
        The configured rules.
    summary:
        The series so far.
    default:
        ``completion.quiet_seconds``.

    Returns
    -------
    float
        Seconds.
    """
    waits = [v.rule.quiet_seconds or default for v in _evaluate(rules, summary) if v.matched]
    return max(waits) if waits else default


def keys_used(rules: Sequence[RuleSettings]) -> set[str]:
    """Every key the rules' conditions look at: their ``when`` and their study rules' series selectors."""
    keys: set[str] = set()

    def walk(when: Mapping[str, Any]) -> None:
        for key, value in when.items():
            if key in GROUP_KEYS:  # all / any: a list of mappings; not: one mapping
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(item, Mapping):
                        walk(item)
            else:
                keys.add(key)

    for rule in rules:
        walk(rule.when)
        if rule.study is not None:
            for selector in rule.study.series.values():
                walk(selector)
    return keys


def needs_every_header(rules: Sequence[RuleSettings]) -> bool:
    """Whether a rule uses a fact of :data:`~dicom_node.rules.keys.GEOMETRY_FACTS` (read from every instance).

    Without one, a series' summary needs its first instance's header only:
    every other condition is on the first instance's attributes or on facts
    of the series' row (``instance_count``, ``calling_ae``...).
    """
    return bool(keys_used(rules) & GEOMETRY_FACTS)


def value_of(summary: SeriesSummary, key: str) -> Any:
    """The value a condition on ``key`` sees: a derived fact, or an attribute by keyword, tag or path."""
    if key in summary.facts:
        return summary.facts[key]
    if key in DERIVED_FACTS:
        return None  # a fact this summary does not know (e.g. calling_ae of files on disk)
    return resolve(summary.attributes, parse_key(key))


def first_failure(when: Mapping[str, Any], summary: SeriesSummary) -> str | None:
    """The first condition of a ``when`` mapping that fails on ``summary``, or ``None`` when all hold.

    Parameters
    ----------
    when:
        A rule's ``when`` (or a study rule's series selector).
    summary:
        The series.

    Returns
    -------
    str | None
        The reason, with the actual value.
    """
    for key, value in when.items():
        if key == "all":
            for sub in value:
                reason = first_failure(sub, summary)
                if reason is not None:
                    return reason
        elif key == "any":
            reasons = []
            for sub in value:
                reason = first_failure(sub, summary)
                if reason is None:
                    break
                reasons.append(reason)
            else:
                return "any: none holds (" + "; ".join(reasons) + ")"
        elif key == "not":
            if first_failure(value, summary) is None:
                shown = ", ".join(f"{k} {_show(value_of(summary, k))}" for k in value if k not in ("all", "any", "not"))
                return f"not {{{_describe_when(value)}}} holds" + (f" ({shown})" if shown else "")
        else:
            reason = check_condition(key, value, value_of(summary, key))
            if reason is not None:
                return reason
    return None


def check_condition(key: str, condition: Condition, value: Any) -> str | None:
    """Check one condition against one value.

    Parameters
    ----------
    key:
        The key as written in the rule, used in the reason.
    condition:
        The condition's operators.
    value:
        The actual value (``None`` when absent).

    Returns
    -------
    str | None
        ``None`` when the condition holds, else why not, e.g. ``"Modality missing"``.
    """
    values = list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]
    empty = not values or all((isinstance(v, str) and not v.strip()) or v is None for v in values)
    shown = _show(value)
    if condition.absent:
        return None if empty else f"{key} {shown} is present (absent required)"
    needs_value = any(getattr(condition, op) is not None for op in
                      ("exists", "equals", "iequals", "in_", "regex", "contains", "min", "max"))
    if needs_value and empty:
        return f"{key} missing" if value is None else f"{key} is empty"
    if condition.equals is not None and not any(_equal(v, condition.equals) for v in values):
        return f"{key} {shown} != {_show(condition.equals)}"
    if condition.iequals is not None and not any(_equal(v, condition.iequals, fold=True) for v in values):
        return f"{key} {shown} != {_show(condition.iequals)} (ignoring case)"
    if condition.in_ is not None and not any(_equal(v, e) for v in values for e in condition.in_):
        return f"{key} {shown} not in [{', '.join(str(e) for e in condition.in_)}]"
    if condition.regex is not None and not any(condition.regex.search(_as_text(v)) for v in values):
        return f"{key} {shown} does not match regex {condition.regex.pattern!r}"
    if condition.contains is not None and not any(_as_text(condition.contains) in _as_text(v) for v in values):
        return f"{key} {shown} does not contain {_show(condition.contains)}"
    for bound, limit in (("min", condition.min), ("max", condition.max)):
        if limit is None:
            continue
        numbers = [_as_number(v) for v in values]
        if any(n is None for n in numbers):
            return f"{key} {shown} is not a number ({bound} {_show(limit)})"
        if bound == "min" and any(n < limit for n in numbers if n is not None):
            return f"{key} {shown} < min {_show(limit)}"
        if bound == "max" and any(n > limit for n in numbers if n is not None):
            return f"{key} {shown} > max {_show(limit)}"
    if condition.not_ is not None and check_condition(key, condition.not_, value) is None:
        return f"{key} {shown} matches not {{{_describe(condition.not_)}}}"
    return None


# --------------------------------------------------------------------------- rule lists


def _evaluate(rules: Sequence[RuleSettings], summary: SeriesSummary) -> list[_Verdict]:
    verdicts: dict[int, _Verdict] = {}
    stopped_by: str | None = None
    first_match: str | None = None
    for pass_defaults in (False, True):
        for i, rule in enumerate(rules):
            if rule.default != pass_defaults:
                continue
            if stopped_by is not None:
                verdicts[i] = _Verdict(rule, False, f"not evaluated: rule {stopped_by!r} matched with mode: stop")
                continue
            if pass_defaults and first_match is not None:
                verdicts[i] = _Verdict(rule, False, f"default rule not needed: rule {first_match!r} matched")
                continue
            verdict = _study_verdict(rule, summary) if rule.study is not None else _series_verdict(rule, summary)
            verdicts[i] = verdict
            if verdict.matched:
                first_match = first_match or rule.name
                if rule.mode == "stop":
                    stopped_by = rule.name
    return [verdicts[i] for i in range(len(rules))]


def _series_verdict(rule: RuleSettings, summary: SeriesSummary) -> _Verdict:
    reason = first_failure(rule.when, summary)
    return _Verdict(rule, reason is None, reason or "")


def _study_verdict(rule: RuleSettings, summary: SeriesSummary) -> _Verdict:
    assert rule.study is not None
    reason = first_failure(rule.when, summary)
    if reason is not None:
        return _Verdict(rule, False, reason)
    failures = {role: first_failure(when, summary) for role, when in rule.study.series.items()}
    roles = tuple(role for role, why in failures.items() if why is None)
    if not roles:
        return _Verdict(rule, False, "fits no required series of the study rule: "
                        + "; ".join(f"{role}: {why}" for role, why in failures.items()))
    return _Verdict(rule, True, f"study rule: this is series {' / '.join(roles)} of "
                    f"{', '.join(rule.study.series)}; runs when the study has them all", roles)


# --------------------------------------------------------------------------- values


def _equal(actual: Any, expected: str | int | float, *, fold: bool = False) -> bool:
    if _is_number(actual) or _is_number(expected):
        a, e = _as_number(actual), _as_number(expected)
        return a is not None and e is not None and a == e
    if fold:
        return _as_text(actual).casefold() == _as_text(expected).casefold()
    return _as_text(actual) == _as_text(expected)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _as_text(value: Any) -> str:
    return str(value).strip()


def _describe(condition: Condition) -> str:
    """A condition as it is written in YAML, e.g. ``contains: 'LOCALIZER'``."""
    parts = []
    for op, attr in (("exists", "exists"), ("absent", "absent"), ("equals", "equals"), ("iequals", "iequals"),
                     ("in", "in_"), ("regex", "regex"), ("contains", "contains"), ("min", "min"), ("max", "max")):
        value = getattr(condition, attr)
        if value is None:
            continue
        if op == "regex":
            value = value.pattern
        parts.append(f"{op}: {_show(list(value) if isinstance(value, tuple) else value)}")
    if condition.not_ is not None:
        parts.append(f"not: {{{_describe(condition.not_)}}}")
    return ", ".join(parts)


def _describe_when(when: Mapping[str, Any]) -> str:
    parts = []
    for key, value in when.items():
        if key in ("all", "any"):
            parts.append(f"{key}: [" + ", ".join("{" + _describe_when(v) + "}" for v in value) + "]")
        elif key == "not":
            parts.append(f"not: {{{_describe_when(value)}}}")
        else:
            parts.append(f"{key}: {{{_describe(value)}}}")
    return ", ".join(parts)


def _show(value: Any) -> str:
    """A value as it appears in reasons: text quoted, numbers bare, lists bracketed; cut when long."""
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    elif isinstance(value, str):
        text = repr(value.strip())
    elif isinstance(value, dict):
        text = "{...}"
    else:
        text = str(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."
