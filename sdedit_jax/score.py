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

from sdedit_jax.sde import SDE, VESDE

Array = jax.Array

PARAMETERIZATIONS = ("score", "noise", "scaled")
CONDITIONS = ("t", "timestep", "sigma")


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


# --- imported networks: explicit conditioning input and data range ----------------------


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


@dataclasses.dataclass(frozen=True)
class NetworkScoreApply:
    """Static half of the score function of an imported network (see :func:`make_network_score_fn`).

    ``sde`` is the network's own SDE (in its data range); the function takes and
    returns images and scores in [-1, 1] units.
    """

    graphdef: nnx.GraphDef
    sde: SDE
    parameterization: str
    condition: str
    data_range: str = "-1_1"

    def __call__(self, state: nnx.State, x: Array, t: Array) -> Array:
        scale, shift = _affine(self.data_range)
        model = nnx.merge(self.graphdef, state)
        out = model(x * scale + shift, condition_value(self.sde, t, self.condition))
        # d/dx log p(scale x + shift) = scale * (network-space score).
        return scale * output_to_score(out, self.sde.marginal_std(t), self.parameterization)


def make_network_score_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    sde: SDE,
    parameterization: str,
    condition: str,
    data_range: str = "-1_1",
) -> jax.tree_util.Partial:
    """``score_fn(x, t)`` for images ``x`` in [-1, 1] of a network called as ``net(x, cond)``.

    Pair it with ``sde_for_range(sde, data_range)``, the same process in [-1, 1] units.
    """
    check_parameterization(parameterization)
    check_condition(condition, sde)
    check_data_range(data_range)
    apply = NetworkScoreApply(graphdef, sde, parameterization, condition, data_range)
    return jax.tree_util.Partial(apply, state)
