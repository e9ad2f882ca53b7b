"""Per-row text inputs of models that take prompts: prompt, negative prompt, guidance scale.

Where a row's text comes from (the first that gives it):

* ``prompt``: the manifest row's ``prompt`` field; a folder guide's sidecar
  caption ``<name>.txt`` (UTF-8, the usual training-set convention; leading and
  trailing whitespace, such as the final newline, is not part of it); else
  ``config.prompt``. The row's own text wins over the job's, as a row's own
  ``t0`` does. A row that gets none (no field, no caption, ``config.prompt``
  unset) fails; an empty prompt ``""`` is valid (in a CSV manifest an empty cell
  counts as absent: use JSONL, or ``config.prompt=""``, for empty prompts).
* ``negative_prompt``: the manifest field, else ``config.negative_prompt`` (``""``).
* ``guidance_scale``: the manifest field, else ``config.guidance_scale``; a
  number >= 0 (NaN, infinities and negative values fail the row).

A model that takes no text (a pixel model) gets none: a row naming any of these
fields, or a caption beside a folder guide, fails by name instead of being
edited without it. Sources give what rows name (catalog columns ``prompt`` and
``negative_prompt``, None where a row names none, and ``guidance_scale``, NaN where
it names none); :func:`resolve` fills in the job's defaults.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from sdedit_jax.data.guide_inputs.catalog import Catalog, _objects, _shown, _utf8

FIELDS = ("prompt", "negative_prompt", "guidance_scale")
CAPTION_EXTENSION = ".txt"


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (holds no lone surrogate)."""
    return _utf8(text)


@dataclasses.dataclass(frozen=True)
class TextInputs:
    """The text settings of a job whose model takes prompts (the rows' defaults).

    Attributes:
        prompt: rows naming no prompt use it; None: such rows fail.
        negative_prompt: rows naming none use it.
        guidance_scale: classifier-free guidance weight of rows naming none
            (w <= 1: the conditional prediction alone).
    """

    prompt: str | None = None
    negative_prompt: str = ""
    guidance_scale: float = 7.5

    def __post_init__(self):
        if self.prompt is not None and not (_is_text(self.prompt) and _utf8(self.prompt)):
            raise ValueError(f"prompt: expected a string or None, got {_shown(self.prompt)}")
        if not (_is_text(self.negative_prompt) and _utf8(self.negative_prompt)):
            raise ValueError(
                f"negative_prompt: expected a string, got {_shown(self.negative_prompt)}"
            )
        object.__setattr__(self, "guidance_scale", parse_guidance(self.guidance_scale))


def parse_guidance(value: Any) -> float:
    """A guidance scale: a finite number >= 0 (a CSV cell's text too); else ``ValueError``."""
    allowed = "a finite number >= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float, str, np.number)):
        raise ValueError(f"expected {allowed}, got {_shown(value)}")
    try:
        scale = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"expected {allowed}, got {_shown(value)}") from None
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"expected {allowed}, got {_shown(value)}")
    return scale


def named_fields(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Per row, the first text field it names ("" for none)."""
    named = np.full(len(columns["id"]), "", object)
    for name in reversed(FIELDS):
        column = columns.get(name)
        if column is None:
            continue
        given = ~np.isnan(column) if name == "guidance_scale" else column != None  # noqa: E711
        named[given] = name
    return named


def resolve(catalog: Catalog, text: TextInputs | None) -> Catalog:
    """The catalog with every row's text settled (see the module docstring).

    With ``text`` None (the model takes no text) rows that name a text field
    fail and the text columns are dropped, so such a job's rows, digests and
    batches are those of a job without text. Otherwise every row gets a
    ``prompt``, ``negative_prompt`` (str) and ``guidance_scale`` (float32);
    a row with no prompt, or a prompt that is not valid UTF-8, fails.
    """
    columns = dict(catalog.columns)
    n = len(columns["id"])
    errors = columns["error"].copy()
    if text is None:
        named = named_fields(columns)
        for i in np.flatnonzero((named != "") & (errors == "")):
            field = named[i]
            errors[i] = (
                f"{field} ({columns['source'][i]}): got {_shown(_value(columns, field, i))}, but "
                "the model takes no text (a pixel model); remove the text fields or use a "
                "text-to-image model (config.model_dir)"
            )
        for name in FIELDS:
            columns.pop(name, None)
        return dataclasses.replace(catalog, columns={**columns, "error": errors})
    prompts = columns.get("prompt", _objects([None] * n)).copy()
    negatives = columns.get("negative_prompt", _objects([None] * n)).copy()
    scales = np.asarray(columns.get("guidance_scale", np.full(n, np.nan, np.float32)), np.float32)
    missing = prompts == None  # noqa: E711
    if text.prompt is None:
        for i in np.flatnonzero(missing & (errors == "")):
            errors[i] = (
                f"prompt ({columns['source'][i]}): none given; give the row a prompt (a "
                f"manifest field, or a <name>{CAPTION_EXTENSION} caption beside a folder "
                'guide; "" is a valid empty prompt) or set config.prompt'
            )
    prompts[missing] = text.prompt or ""
    negatives[negatives == None] = text.negative_prompt  # noqa: E711
    scales = np.where(np.isnan(scales), np.float32(text.guidance_scale), scales)
    for column, field in ((prompts, "prompt"), (negatives, "negative_prompt")):
        suspects = ~np.fromiter(map(str.isascii, column), bool, n)
        for i in np.flatnonzero(suspects):
            if not _utf8(column[i]):
                if not errors[i]:
                    errors[i] = (
                        f"{field} ({columns['source'][i]}): {_shown(column[i])} is not valid "
                        "UTF-8 (a lone surrogate)"
                    )
                column[i] = ""  # such text cannot enter the pipeline
    columns.update(prompt=prompts, negative_prompt=negatives, guidance_scale=scales, error=errors)
    return dataclasses.replace(catalog, columns=columns)


def _value(columns: dict[str, np.ndarray], field: str, i: int) -> Any:
    value = columns[field][i]
    return float(value) if field == "guidance_scale" else value
