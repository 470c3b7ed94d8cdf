"""Pure rule matching: which rules apply to a series, and why the others do not.

Semantics of one condition (``when: {KEY: condition}``), all of which must hold
for a rule to match:

- The value is ``summary.get(KEY)``: a derived fact (``instance_count``...) or the
  attribute of the series' first instance.  A missing (``None``) or empty
  (``""``, ``[]``) value fails every condition on it.
- ``equals``: text is compared exactly (case-sensitive) after stripping
  surrounding spaces.  When either side is a number, both are compared as
  numbers (``SeriesNumber: 3`` matches ``"3"`` and ``3.0``); a value that is not a
  number then does not match.
- ``in``: ``equals`` against any of the listed values.
- ``regex``: :func:`re.search` on the stripped text of the value, so the pattern
  may match anywhere (anchor it with ``^...$`` for a whole-value match;
  ``(?i)`` makes it case-insensitive).
- ``min`` / ``max``: inclusive bounds; the value must be a number (or text that
  reads as one), otherwise the condition fails and says so.
- Multi-valued attributes (lists, e.g. ImageType): ``equals`` / ``in`` /
  ``regex`` hold when ANY value matches; ``min`` / ``max`` when EVERY value is
  within bounds.

Operators of one condition are checked in the order equals, in, regex, min, max;
conditions in the order the rule lists them; the first failure is the reason.
An empty rule list matches nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dicom_node.domain import RuleMatch, RuleVerdict, SeriesSummary
from dicom_node.settings import Condition, RuleSettings

__all__ = ["check_condition", "explain", "match"]

_MAX_SHOWN = 80


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
        failing condition with the actual value, e.g. ``"SliceThickness 5.0 > max 3.0"``.
    """
    verdicts: list[RuleVerdict] = []
    for rule in rules:
        reason = _first_failure(rule, summary)
        verdicts.append(RuleVerdict(rule=rule.name, matched=reason is None, reason=reason or ""))
    return verdicts


def match(rules: Sequence[RuleSettings], summary: SeriesSummary) -> list[RuleMatch]:
    """Every rule that matches ``summary``, in rule order (none for an empty rule list).

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
        RuleMatch(rule=rule.name, models=tuple(rule.run), outputs=tuple(rule.outputs), destinations=tuple(rule.send_to))
        for rule in rules
        if _first_failure(rule, summary) is None
    ]


def check_condition(key: str, condition: Condition, value: Any) -> str | None:
    """Check one condition against one value.

    Parameters
    ----------
    key:
        The keyword or fact name, used in the reason.
    condition:
        The condition's operators.
    value:
        The actual value (``None`` when absent).

    Returns
    -------
    str | None
        ``None`` when the condition holds, else why not, e.g. ``"Modality missing"``.
    """
    if value is None:
        return f"{key} missing"
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or all(isinstance(v, str) and not v.strip() for v in values):
        return f"{key} is empty"
    shown = _show(value)
    if condition.equals is not None and not any(_equal(v, condition.equals) for v in values):
        return f"{key} {shown} != {_show(condition.equals)}"
    if condition.in_ is not None and not any(_equal(v, e) for v in values for e in condition.in_):
        return f"{key} {shown} not in [{', '.join(str(e) for e in condition.in_)}]"
    if condition.regex is not None and not any(condition.regex.search(_as_text(v)) for v in values):
        return f"{key} {shown} does not match regex {condition.regex.pattern!r}"
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
    return None


def _first_failure(rule: RuleSettings, summary: SeriesSummary) -> str | None:
    for key, condition in rule.when.items():
        reason = check_condition(key, condition, summary.get(key))
        if reason is not None:
            return reason
    return None


def _equal(actual: Any, expected: str | int | float) -> bool:
    if _is_number(actual) or _is_number(expected):
        a, e = _as_number(actual), _as_number(expected)
        return a is not None and e is not None and a == e
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


def _show(value: Any) -> str:
    """A value as it appears in reasons: text quoted, numbers bare, lists bracketed; cut when long."""
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    elif isinstance(value, str):
        text = repr(value.strip())
    else:
        text = str(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."
