"""From network output to the score ``grad_x log p_t(x)``.

Four parameterisations of the network output ``out`` are supported, with
``x_t = m(t) x_0 + s(t) z`` the SDE's perturbation kernel:

* ``"score"``: ``out`` is the score itself.
* ``"noise"``: ``out`` predicts the noise ``z`` in ``x_t = m x_0 + s z``;
  since ``grad log p(x_t | x_0) = -z / s``, the score is ``-out / s``.
* ``"scaled"``: NCSN++'s "scale by sigma": ``score = out / s``, which keeps the
  network output O(1) over the huge sigma range of VE SDEs.
* ``"velocity"``: ``out`` predicts ``v = m z - s x_0`` (diffusers' ``v_prediction``,
  Stable Diffusion 2.x at 768 px); on a VP process (``m^2 + s^2 = 1``) the noise is
  ``z = m v + s x_t``, so the score is ``-(m / s) out - x_t``.

The network's time input (``condition``) is the SDE's ``t``, DDPM's timestep
``t * T - 1`` or ``sigma = s(t)``; a network trained on [0, 1] pixels (``data_range``)
sees ``x`` mapped there. :func:`make_score_fn`, the one wrapper of every network,
packages one as a ``jax.tree_util.Partial`` whose leaves are the weights and whose
static part is hashable, so a jitted sampler that takes it as an argument traces the
weights and never recompiles for new weights of the same architecture. The score
function is ``score_fn(x, t, cond=None)``: ``cond`` is the network's per-example
conditioning (:mod:`sdedit_jax.models.architecture`); the edit program passes it only
when the batch has one, so unconditional score functions may take ``(x, t)`` alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdedit_jax.sde import SDE, VESDE

Array = jax.Array

PARAMETERIZATIONS = ("score", "noise", "scaled", "velocity")
CONDITIONS = ("t", "timestep", "sigma")


def check_parameterization(parameterization: str, sde: SDE | None = None) -> None:
    """Raises ``ValueError`` for an unknown name, or "velocity" on a non-VP ``sde``."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}"
        )
    if parameterization == "velocity" and sde is not None and not sde.variance_preserving:
        raise ValueError(
            f"parameterization 'velocity' needs a variance-preserving SDE, got {type(sde).__name__}"
        )


def output_to_score(
    out: Array, x: Array, mean_coeff: Array, std: Array, parameterization: str
) -> Array:
    """Network output at ``x`` as a score; ``mean_coeff``, ``std``: ``m(t)``, ``s(t)``, ``[B]``."""
    check_parameterization(parameterization)
    if parameterization == "score":
        return out
    inv_std = jnp.reshape(1.0 / std, std.shape + (1,) * (out.ndim - 1))
    if parameterization == "velocity":
        ratio = jnp.reshape(mean_coeff, inv_std.shape) * inv_std
        return -ratio * out - x
    return -out * inv_std if parameterization == "noise" else out * inv_std


# --- the network's time input and data range ---------------------------------------------


def check_condition(condition: str, sde: SDE) -> None:
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    if condition == "timestep" and not hasattr(sde, "timestep"):
        raise ValueError(
            f"condition 'timestep' (DDPM's t*T-1) needs the discrete_vp SDE, got {sde!r}"
        )


def condition_value(sde: SDE, t: Array, condition: str) -> Array:
    """The network input for time ``t``: ``t``, DDPM's ``t*T - 1``, or ``sigma = s(t)``."""
    if condition == "timestep":
        return sde.timestep(t)
    return sde.marginal_std(t) if condition == "sigma" else t


DATA_RANGES = {"-1_1": (-1.0, 1.0), "0_1": (0.0, 1.0)}


def check_data_range(data_range: str) -> None:
    if data_range not in DATA_RANGES:
        raise ValueError(f"data_range must be one of {sorted(DATA_RANGES)}, got {data_range!r}")


def _affine(data_range: str) -> tuple[float, float]:
    """``(scale, shift)`` with ``x_network = scale * x + shift`` for ``x`` in [-1, 1]."""
    lo, hi = DATA_RANGES[data_range]
    return (hi - lo) / 2.0, (hi + lo) / 2.0


def sde_for_range(sde: SDE, data_range: str) -> SDE:
    """The network's SDE expressed for images in [-1, 1] (the project's one data range).

    A network trained on ``[lo, hi]`` sees ``x_net = scale * x + shift``. Under a VE
    SDE (no drift) that affine map keeps the process VE with every sigma divided by
    ``scale``; drifting SDEs would also move the mean, so they need [-1, 1] data.
    """
    check_data_range(data_range)
    scale, shift = _affine(data_range)
    if (scale, shift) == (1.0, 0.0):
        return sde
    if isinstance(sde, VESDE):
        return VESDE(sigma_min=sde.sigma_min / scale, sigma_max=sde.sigma_max / scale, eps=sde.eps)
    raise ValueError(
        f"data_range {data_range!r} needs a VE SDE; {type(sde).__name__} models must use -1_1"
    )


def apply_score(
    net: nnx.Module,
    sde: SDE,
    parameterization: str,
    condition: str,
    x: Array,
    t: Array,
    cond: Any = None,
    *,
    data_range: str = "-1_1",
    train: bool = False,
    rngs: nnx.Rngs | None = None,
) -> Array:
    """The score at ``(x, t)`` of ``net`` called ``net(x, t_net, cond, train=...)``.

    ``x`` and the score are in [-1, 1] units; ``sde`` is the network's own SDE (in its
    data range) and ``t_net = condition_value(sde, t, condition)``. ``rngs`` (dropout)
    is passed only when given, so networks without dropout need not take it. Shared by
    the training loss and :class:`ScoreApply`.
    """
    check_parameterization(parameterization, sde)
    scale, shift = _affine(data_range)
    identity = (scale, shift) == (1.0, 0.0)
    x_net = x if identity else x * scale + shift
    extra = {} if rngs is None else {"rngs": rngs}
    out = net(x_net, condition_value(sde, t, condition), cond, train=train, **extra)
    mean_coeff = jnp.exp(sde.log_mean_coeff(t))
    score = output_to_score(out, x_net, mean_coeff, sde.marginal_std(t), parameterization)
    # d/dx log p(scale x + shift) = scale * (network-space score).
    return score if identity else scale * score


@dataclasses.dataclass(frozen=True)
class ScoreApply:
    """Static half of a score function (see :func:`make_score_fn`).

    Frozen and built only from hashable parts, so two instances made from the same
    graphdef/SDE/parameterisation/condition/data range are equal and hash alike.
    """

    graphdef: nnx.GraphDef
    sde: SDE
    parameterization: str
    condition: str
    data_range: str = "-1_1"

    def __call__(self, state: nnx.State, x: Array, t: Array, cond: Any = None) -> Array:
        """Eval-mode (no dropout) score of the merged network at ``(x, t)`` given ``cond``."""
        net = nnx.merge(self.graphdef, state)
        return apply_score(
            net,
            self.sde,
            self.parameterization,
            self.condition,
            x,
            t,
            cond,
            data_range=self.data_range,
        )


def make_score_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    sde: SDE,
    parameterization: str,
    condition: str,
    data_range: str = "-1_1",
) -> jax.tree_util.Partial:
    """``score_fn(x[B,H,W,C], t[B], cond=None) -> score``, a pytree over ``state``.

    The one score wrapper of every network (:mod:`sdedit_jax.models.architecture`).

    Args:
        graphdef, state: from ``nnx.split(net)`` (all variables, one state).
        sde: the forward SDE the network was trained with, in its data range; pair
            the function with ``sde_for_range(sde, data_range)``, the same process in
            [-1, 1] units, which the score function takes and returns.
        parameterization: one of :data:`PARAMETERIZATIONS`.
        condition: the network's time input, one of :data:`CONDITIONS`.
        data_range: the pixels the network was trained on, a key of :data:`DATA_RANGES`.
    """
    check_parameterization(parameterization, sde)
    check_condition(condition, sde)
    check_data_range(data_range)
    apply = ScoreApply(graphdef, sde, parameterization, condition, data_range)
    return jax.tree_util.Partial(apply, state)
