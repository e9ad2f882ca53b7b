"""The one network protocol: how every architecture is called, built and described.

Every network is called ``net(x, t, cond=None, *, train=False)``:

* ``x``: ``[B, H, W, C]`` (NHWC) images or latents, float32.
* ``t``: the network's own time input, ``[B]`` or a scalar: DDPM's discrete timestep
  (``ddpm_unet``, ``sd_unet``), the noise scale sigma (``ncsnpp``), or the diffusion
  time t or sigma (``unet``, by its ``time_embedding``). The model folder's
  ``condition`` field (or :attr:`Architecture.fixed_usage`) says which; the score
  wrapper (:func:`sdedit_jax.score.make_score_fn`) maps the SDE's time onto it.
* ``cond``: an optional per-example pytree of conditioning only, never time, each leaf
  with the leading batch axis ``B`` (e.g. ``{"text": h}`` for ``sd_unet``). An
  unconditional network requires ``None`` (:func:`unconditional`), so a conditioning
  input is never dropped without a word.
* ``train``: enables dropout. Networks with dropout take the dropout randomness as one
  further keyword, ``rngs`` (an ``nnx.Rngs`` with a ``dropout`` stream); callers that
  only evaluate never pass it.

Each architecture module exports one :class:`Architecture`, ``ARCHITECTURE``; the list
of them is :data:`sdedit_jax.models.architectures.ARCHITECTURES`.

Latent and class- or text-conditional models plug in here unchanged: ``x`` is then the
latent ``z`` (an autoencoder maps guides to latents and edits back, outside the score),
and the conditioning rides in ``cond`` (``sd_unet``: ``{"text": h}``), which the edit
carries per example (:class:`sdedit_jax.engine.EditBatch`); so diffusers'
``unet(z, t, h)`` is ``pretrained.load_network(...)(z, t, h)``, i.e. ``net(z, t, cond)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
from flax import nnx


class UnsupportedConfig(ValueError):
    """A config (the project's or a checkpoint's) asks for a network no port here implements."""


class Network(Protocol):
    """What every architecture's module is, called (see the module docstring)."""

    def __call__(
        self, x: jax.Array, t: jax.Array, cond: Any = None, *, train: bool = False
    ) -> jax.Array: ...


def _nothing_fixed(config: Any) -> Mapping[str, str]:
    return {}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A network family as the rest of the package sees it.

    Attributes:
        name: the model folder's ``architecture`` value.
        config_class: its frozen config dataclass (``from_config(mapping)`` builds it,
            naming unknown fields; the model folder's ``model`` holds its fields).
        build: ``build(config, seed)``, a randomly initialised :class:`Network`.
        abstract: ``abstract(config)``, the graph and shape-only state (no weights
            computed), what weight files are read into.
        image_shape: ``image_shape(config) -> (side, channels)`` of ``x``.
        fixed_usage: the score-model fields (``condition``, ``data_range``) the config
            itself decides; a model folder records only the others (``unet``'s folders
            have neither: its ``time_embedding`` decides the condition).
    """

    name: str
    config_class: type
    build: Callable[[Any, int], nnx.Module]
    abstract: Callable[[Any], tuple[nnx.GraphDef, nnx.State]]
    image_shape: Callable[[Any], tuple[int, int]]
    fixed_usage: Callable[[Any], Mapping[str, str]] = _nothing_fixed


def unconditional(cond: Any, name: str) -> None:
    """Raises ``ValueError`` unless ``cond`` is ``None`` (for networks without conditioning)."""
    if cond is not None:
        raise ValueError(
            f"cond: the {name} network takes no conditioning input, got {type(cond).__name__}"
        )
