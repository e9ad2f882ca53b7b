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
