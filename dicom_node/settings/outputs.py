"""``outputs:``: series numbers, descriptions and identity of the result objects."""

from __future__ import annotations

import string
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from dicom_node.settings.base import FROZEN, UID_PREFIX_RE, Float, Int


class OutputSeriesSettings(BaseModel):
    """Series number and description of one kind of result series.

    ``series_description`` may contain ``{model}``, replaced by the model's
    name, and ``{result}``, replaced by the result in a few words (a
    classifier's positive classes with their probabilities, or "negative"; a
    detector's count per class, or "none found"; nothing for segmentation),
    so that a viewer's or worklist's series list shows the verdict.
    """

    model_config = FROZEN

    series_number: Annotated[Int, Field(ge=1, le=2**31 - 1)]
    # LO: no backslash (the value separator) and no control characters.
    series_description: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\\\x00-\x1f\x7f]+$")]

    @field_validator("series_description")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"bad placeholder in {value!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
        if fields - {"model", "result"}:
            raise ValueError(f"only the {{model}} and {{result}} placeholders are allowed (got {value!r})")
        return value

    def description_for(self, model: str, result: str = "") -> str:
        """The description with ``{model}`` and ``{result}`` filled in, cut to 64 characters (VR LO).

        Runs of spaces left by an empty ``{result}`` are collapsed, and a
        separator it leaves at either end (``:``, ``-``, ``,``) is dropped.
        """
        text = " ".join(self.series_description.format(model=model, result=result).split())
        return (text.strip(" :-,;") or text)[:64]


class OutputsSettings(BaseModel):
    """How result objects are identified (``outputs:``)."""

    model_config = FROZEN

    uid_root: str = "2.25."
    seg: OutputSeriesSettings = OutputSeriesSettings(series_number=9901, series_description="AI SEG")
    sr: OutputSeriesSettings = OutputSeriesSettings(series_number=9902, series_description="{result} - AI Report")
    sc: OutputSeriesSettings = OutputSeriesSettings(series_number=9903, series_description="AI Overlay")
    pdf: OutputSeriesSettings = OutputSeriesSettings(series_number=9904, series_description="AI Summary")
    seg_type: Literal["binary", "labelmap"] = "binary"
    empty_segments: Literal["drop", "keep"] = "drop"
    banner: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x20-\x7e]+$")] = (
        "AI result - not for primary diagnosis"
    )
    fill_opacity: Annotated[Float, Field(ge=0.0, le=1.0)] = 0.35
    paper: Literal["a4", "letter"] = "a4"

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str) -> str:
        value = value.strip()
        if len(value) > 40 or not UID_PREFIX_RE.fullmatch(value):
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
