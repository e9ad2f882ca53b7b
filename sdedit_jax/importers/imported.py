"""What every importer returns: a network read from a foreign checkpoint, and how to use it."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Imported:
    """A network read from a foreign checkpoint, with how to use it as a score model.

    Attributes:
        architecture: a key of :data:`sdedit_jax.pretrained.ARCHITECTURES`.
        config: that architecture's frozen config.
        state: the network's weights (``nnx.State``, float32).
        condition: the network's conditioning input: ``"t"`` (diffusion time),
            ``"timestep"`` (DDPM's ``t * T - 1``) or ``"sigma"`` (noise std).
        parameterization: ``"noise"``, ``"score"`` or ``"scaled"`` (see :mod:`sdedit_jax.score`).
        data_range: pixel range the network was trained on, a key of :data:`DATA_RANGES`.
        sde: the SDE it was trained with, as ``sde_from_config`` reads it; ``None``
            when the checkpoint does not record it (the user must then name it).
        source: ``{"path", "format", "sha256"}`` of the file the weights came from.
    """

    architecture: str
    config: Any
    state: nnx.State
    condition: str
    parameterization: str
    data_range: str
    sde: dict | None
    source: dict
