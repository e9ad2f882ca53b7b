"""From network output to the score ``grad_x log p_t(x)``.

Three parameterisations of the network output ``out`` are supported, with
``s(t)`` the std of the SDE's perturbation kernel:

* ``"score"``: ``out`` is the score itself.
* ``"noise"``: ``out`` predicts the noise ``z`` in ``x_t = m x_0 + s z``;
  since ``grad log p(x_t | x_0) = -z / s``, the score is ``-out / s``.
* ``"scaled"``: NCSN++'s "scale by sigma": ``score = out / s``, which keeps the
  network output O(1) over the huge sigma range of VE SDEs.

:func:`make_score_fn` packages a model as a ``jax.tree_util.Partial`` whose
leaves are the weights and whose static part is hashable, so a jitted sampler
that takes it as an argument traces the weights and never recompiles for new
weights of the same architecture.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sdedit_jax.sde import SDE

Array = jax.Array

PARAMETERIZATIONS = ("score", "noise", "scaled")


def check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
        )


def model_condition(sde: SDE, t: Array, time_embedding: str) -> Array:
    """The network's conditioning input: ``sigma = s(t)`` for Fourier, else ``t``."""
    return sde.marginal_std(t) if time_embedding == "fourier" else t


def output_to_score(out: Array, std: Array, parameterization: str) -> Array:
    """Converts network output to a score; ``std`` is ``s(t)`` as ``[B]``."""
    check_parameterization(parameterization)
    if parameterization == "score":
        return out
    inv_std = jnp.reshape(1.0 / std, std.shape + (1,) * (out.ndim - 1))
    return -out * inv_std if parameterization == "noise" else out * inv_std


def apply_score(
    model: nnx.Module,
    sde: SDE,
    parameterization: str,
    x: Array,
    t: Array,
    *,
    train: bool,
    rngs: nnx.Rngs | None = None,
) -> Array:
    """Score of ``model`` at ``(x, t)``; shared by the loss and :class:`ScoreApply`."""
    cond = model_condition(sde, t, model.cfg.time_embedding)
    out = model(x, cond, train=train, rngs=rngs)
    return output_to_score(out, sde.marginal_std(t), parameterization)


@dataclasses.dataclass(frozen=True)
class ScoreApply:
    """Static half of a score function: architecture, SDE and parameterisation.

    Frozen and built only from hashable parts, so two instances made from the
    same graphdef/SDE/parameterisation are equal and hash alike.
    """

    graphdef: nnx.GraphDef
    sde: SDE
    parameterization: str

    def __call__(self, state: nnx.State, x: Array, t: Array) -> Array:
        """Eval-mode (no dropout) score of the merged model at ``(x, t)``."""
        model = nnx.merge(self.graphdef, state)
        return apply_score(model, self.sde, self.parameterization, x, t, train=False)


def make_score_fn(
    graphdef: nnx.GraphDef, state: nnx.State, sde: SDE, parameterization: str
) -> jax.tree_util.Partial:
    """Returns ``score_fn(x[B,H,W,C], t[B]) -> score``, a pytree over ``state``.

    Args:
        graphdef, state: from ``nnx.split(model)`` (all variables, one state).
        sde: the forward SDE the model was trained with.
        parameterization: one of :data:`PARAMETERIZATIONS`.
    """
    check_parameterization(parameterization)
    return jax.tree_util.Partial(ScoreApply(graphdef, sde, parameterization), state)
