"""The host side of a job's text: each batch's prompts tokenized, and whether they were cut.

Why on the host: tokenizing is string work (BPE), which a compiled program cannot do;
the batch then carries token ids to the device, where the text encoder runs once per
batch. A prompt longer than the tokenizer's length (77 tokens for CLIP) is truncated
as diffusers does, and the row records it (``prompt_truncated``), so a user learns
which edits did not see their whole prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from sdedit_jax.jobs import checks

# texts -> (ids [B, L] int, truncated [B] bool): a text model's ``tokenize_with_flags``.
Tokenizer = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]


def _texts(column: np.ndarray) -> list[str]:
    return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in column.tolist()]


def tokenized(tokenize: Tokenizer, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Token ids and truncation flags of a batch's ``prompt`` and ``negative_prompt``.

    Returns ``prompt_ids``, ``negative_prompt_ids`` (int32 ``[B, L]``) and
    ``prompt_truncated``, ``negative_prompt_truncated`` (bool ``[B]``).
    """
    out = {}
    for field in ("prompt", "negative_prompt"):
        texts = _texts(np.asarray(batch[field]))
        ids, truncated = tokenize(texts)
        ids, truncated = np.asarray(ids), np.asarray(truncated)
        if ids.ndim != 2 or ids.shape[0] != len(texts) or truncated.shape != (len(texts),):
            raise ValueError(
                f"tokenize_with_flags: expected ids [{len(texts)}, L] and flags "
                f"[{len(texts)}], got {ids.shape} and {truncated.shape}"
            )
        out[f"{field}_ids"] = ids.astype(np.int32)
        out[f"{field}_truncated"] = truncated.astype(bool)
    return out


@dataclasses.dataclass(frozen=True)
class Conditioner:
    """A text model's per-batch ``cond`` (:func:`sdedit_jax.latent.guidance.text_condition`).

    Attributes:
        tokenize: the model's ``tokenize_with_flags``.
        encode_text: the model's ``encode_text`` (``ids [B, L] -> [B, L, D]``, jitted).
        with_negative: whether the job has a row with ``guidance_scale > 1``: then every
            batch carries the negative half, so a row's output never depends on its
            batch-mates' guidance (the program's batch shape would otherwise change).
    """

    tokenize: Tokenizer
    encode_text: Callable[[np.ndarray], Any]
    with_negative: bool

    def columns(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's token ids and truncation flags (recorded by the sink)."""
        return tokenized(self.tokenize, batch)

    def cond(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This host's rows of ``cond``: text states (and negative ones) and guidance scales."""
        cond = {
            "text": np.asarray(self.encode_text(batch["prompt_ids"]), np.float32),
            "guidance": np.asarray(batch["guidance_scale"], np.float32),
        }
        if self.with_negative:
            negative = self.encode_text(batch["negative_prompt_ids"])
            cond["negative"] = {"text": np.asarray(negative, np.float32)}
        return cond


@dataclasses.dataclass(frozen=True)
class XLConditioner:
    """An SDXL model's per-batch ``cond``: both towers' text states, the pooled projection
    and the micro-conditioning ``time_ids``, for the prompts and (``with_negative``) the
    negative prompts. As the pipelines do with ``force_zeros_for_empty_prompt`` and no
    negative prompt, an empty negative prompt is zeros, not the encoded empty string.

    Each row's ``time_ids`` come from its own micro-conditioning columns (the batch's
    ``original_size`` ... ``negative_aesthetic_score``, :mod:`sdedit_jax.data.guide_inputs.micro`):
    values, not shapes, so every row's own conditioning runs in the one compiled program.

    Attributes:
        model: the :class:`~sdedit_jax.latent.sdxl.SDXLModel`.
        with_negative: as :class:`Conditioner`'s.
    """

    model: Any
    with_negative: bool

    def columns(self, batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Each tower's token ids (dicts) and the rows' truncation flags."""
        out = {}
        for field in ("prompt", "negative_prompt"):
            ids, truncated = self.model.tokenize_with_flags(_texts(np.asarray(batch[field])))
            out[f"{field}_ids"], out[f"{field}_truncated"] = ids, np.asarray(truncated, bool)
        return out

    def time_ids(self, batch: Mapping[str, Any], score: str) -> np.ndarray:
        """``[B, K]`` of the rows' micro-conditioning; ``score``: the aesthetic score column
        of this half (the refiner's; the base reads none, and the refiner no target size)."""
        return self.model.time_ids(
            np.asarray(batch["original_size"]),
            np.asarray(batch["crops_coords_top_left"]),
            batch.get("target_size"),
            batch.get(score),
        )

    def cond(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """This host's rows of ``cond`` (:func:`sdedit_jax.latent.guidance.text_condition`)."""

        def half(ids: Any, time_ids: np.ndarray, zero: np.ndarray | None = None) -> dict:
            text, pooled = (np.asarray(v, np.float32) for v in self.model.encode_text(ids))
            if zero is not None:
                text = np.where(zero[:, None, None], 0.0, text).astype(np.float32)
                pooled = np.where(zero[:, None], 0.0, pooled).astype(np.float32)
            return self.model.condition(text, pooled, time_ids)

        cond = {
            **half(batch["prompt_ids"], self.time_ids(batch, "aesthetic_score")),
            "guidance": np.asarray(batch["guidance_scale"], np.float32),
        }
        if self.with_negative:
            empty = np.array([t == "" for t in _texts(np.asarray(batch["negative_prompt"]))])
            zero = empty & self.model.force_zeros_for_empty_prompt
            negative_ids = self.time_ids(batch, "negative_aesthetic_score")
            cond["negative"] = half(batch["negative_prompt_ids"], negative_ids, zero)
        return cond


def conditioner_for(model: Any, *, with_negative: bool) -> Conditioner | XLConditioner:
    """The conditioner of a text model, as a job builds it (the studio reuses it, so a
    preview's conditioning is the job's)."""
    if checks.takes_micro_conditioning(model):  # SDXL: pooled text and micro-conditioning too
        return XLConditioner(model, with_negative)
    return Conditioner(model.tokenize_with_flags, model.encode_text, with_negative)
