"""Per-row SDXL micro-conditioning: the ``original_size`` ... ``negative_aesthetic_score`` columns.

Why per row: SDXL's U-Net is told each image's original size, crop and target size
(base) or aesthetic score (refiner); a manifest of images of many origins wants
each row's own. A manifest row may name any of :data:`FIELDS` (sizes and the crop
as ``"H,W"`` text, a CSV cell's form, or a JSON list ``[H, W]``; scores as numbers);
a row naming none uses the job's ``config.sdxl`` (sizes None: the guides' size).

Only the fields the model reads are columns (:attr:`MicroInputs.fields`: the base
reads no aesthetic score, the refiner no target size), so a row naming one the
model ignores fails by name, as a row naming any of them does for a model that is
not SDXL: it would otherwise be edited without it. Sources give what rows name
(float32 columns, NaN where a row names none); :func:`resolve` fills in the job's
values and marks the rows whose values differ from them (``micro_own``): only those
add their values to the row's input digest, so a workdir made before these columns
existed resumes unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdedit_jax.data.guide_inputs.catalog import Catalog, _shown

PAIRS = ("original_size", "crops_coords_top_left", "target_size")
SCORES = ("aesthetic_score", "negative_aesthetic_score")
FIELDS = PAIRS + SCORES
# The fields each SDXL model reads (its time_ids layout): the base's and the refiner's.
BASE_READS = ("original_size", "crops_coords_top_left", "target_size")
REFINER_READS = ("original_size", "crops_coords_top_left", *SCORES)
OWN = "micro_own"  # catalog column: the row's values differ from the job's
_PAIR_RULE = 'two numbers >= 0 as "H,W" or [H, W]'


@dataclasses.dataclass(frozen=True)
class MicroInputs:
    """The job's micro-conditioning (the rows' defaults) and the fields its model reads.

    Attributes:
        values: every field of :data:`FIELDS` -> its value (pairs as ``(a, b)`` floats,
            sizes already the guides' size where ``config.sdxl`` has None).
        fields: the fields the model reads, in :data:`FIELDS` order.
    """

    values: Mapping[str, Any]
    fields: tuple[str, ...]

    def default(self, field: str) -> np.ndarray:
        """The job's value of ``field`` as float32 (``[2]`` for pairs, ``[]`` for scores)."""
        return np.asarray(self.values[field], np.float32)


def parse_pair(value: Any) -> tuple[float, float]:
    """``"H,W"`` or ``[H, W]`` of two finite numbers >= 0; else ``ValueError``."""
    items = value
    if isinstance(value, str):
        text = value.strip()
        try:
            items = json.loads(text) if text.startswith("[") else text.split(",")
        except ValueError:
            items = None
    if not isinstance(items, (list, tuple)) or len(items) != 2:
        raise ValueError(f"expected {_PAIR_RULE}, got {_shown(value)}")
    out = []
    for item in items:
        number = _number(item)
        if number is None or number < 0:
            raise ValueError(f"expected {_PAIR_RULE}, got {_shown(value)}")
        out.append(number)
    return out[0], out[1]


def parse_score(value: Any) -> float:
    """A finite number (a CSV cell's text too); else ``ValueError``."""
    number = _number(value)
    if number is None:
        raise ValueError(f"expected a finite number, got {_shown(value)}")
    return number


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def parse(field: str, value: Any) -> Any:
    """The parsed value of a row's ``field`` (raises ``ValueError`` naming the rule)."""
    return parse_pair(value) if field in PAIRS else parse_score(value)


def empty_column(field: str, n: int) -> np.ndarray:
    """A column of ``n`` rows naming no value (NaN)."""
    return np.full((n, 2) if field in PAIRS else (n,), np.nan, np.float32)


def column(field: str, values: list) -> np.ndarray:
    """The float32 column of parsed values (None where a row names none)."""
    out = empty_column(field, len(values))
    for i, value in enumerate(values):
        if value is not None:
            out[i] = value
    return out


def _named(columns: Mapping[str, np.ndarray], field: str) -> np.ndarray:
    values = columns.get(field)
    if values is None:
        return np.zeros(len(columns["id"]), bool)
    given = ~np.isnan(values)
    return given.any(axis=1) if given.ndim == 2 else given


def _refusal(micro: MicroInputs | None) -> str:
    if micro is None:
        return (
            "the model is not an SDXL model, which alone takes micro-conditioning; remove "
            "the column or use an SDXL model (config.model_dir)"
        )
    return (
        f"the SDXL model reads only {', '.join(micro.fields)} (the base no aesthetic score, "
        "the refiner no target size); remove the column"
    )


def resolve(catalog: Catalog, micro: MicroInputs | None) -> Catalog:
    """The catalog with every row's micro-conditioning settled (see the module docstring).

    With ``micro`` None (not an SDXL model) rows naming a field fail and the columns
    are dropped, as are the fields the model does not read; otherwise each field the
    model reads is a float32 column of the row's value or the job's, beside
    :data:`OWN` (bool).
    """
    columns = dict(catalog.columns)
    n = len(columns["id"])
    errors = columns["error"].copy()
    used = () if micro is None else micro.fields
    for field in FIELDS:
        if field in used:
            continue
        for i in np.flatnonzero(_named(columns, field) & (errors == "")):
            errors[i] = (
                f"{field} ({columns['source'][i]}): got {_shown(_shown_value(columns[field][i]))}"
                f", but {_refusal(micro)}"
            )
        columns.pop(field, None)
    own = np.zeros(n, bool)
    for field in used:
        default = micro.default(field)
        values = columns.get(field, empty_column(field, n))
        named = ~np.isnan(values)
        filled = np.where(named, values, default).astype(np.float32)
        differs = filled != default
        own |= differs.any(axis=1) if differs.ndim == 2 else differs
        columns[field] = filled
    if micro is not None:
        columns[OWN] = own
    columns["error"] = errors
    return dataclasses.replace(catalog, columns=columns)


def _shown_value(value: np.ndarray) -> Any:
    value = np.asarray(value, np.float64)
    return value.tolist() if value.ndim else float(value)


def digest_part(columns: Mapping[str, np.ndarray], i: int) -> str:
    """Row ``i``'s values for its input digest; ``""`` where they are the job's."""
    if OWN not in columns or not columns[OWN][i]:
        return ""
    return ";".join(
        f"{field}={row_value(columns, field, i)!r}" for field in FIELDS if field in columns
    )


def row_value(columns: Mapping[str, np.ndarray], field: str, i: int) -> Any:
    """Row ``i``'s ``field`` as JSON-ready numbers (a list for pairs), float32-exact."""
    value = np.asarray(columns[field][i], np.float32)
    if value.ndim:
        return [float(f"{float(v):.7g}") for v in value]
    return float(f"{float(value):.7g}")
