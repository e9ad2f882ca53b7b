"""Linear forward SDEs of score-based models (Song et al., 2021).

Every SDE here has a Gaussian perturbation kernel of the form
``x_t = m(t) * x_0 + s(t) * z``. Subclasses define only ``m``, ``s`` and the
diffusion ``g(t)``; everything the samplers need (drift, exact one-step
transitions, the reverse SDE, the probability-flow ODE) follows from those in
this base class, so adding an SDE means touching one class.

Times are arrays of shape ``[B]`` (one time per example) so a batch can mix
different SDEdit start times ``t0`` inside one compiled program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sdedit_jax.rng import example_noise

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def batch_bcast(v: Array, x: Array) -> Array:
    """Reshapes a per-example ``[B]`` array to broadcast against ``x[B, ...]``."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


class SDE:
    """Base class: ``dx = f(x, t) dt + g(t) dw`` with a linear Gaussian kernel.

    Attributes:
        T: final time of the forward process (always 1 here).
        eps: smallest time integrated to; avoids the singular score at t=0.
    """

    T: float = 1.0
    eps: float = 1e-3

    # --- defined by subclasses -------------------------------------------------
    def log_mean_coeff(self, t: Array) -> Array:
        """``log m(t)`` for the kernel mean ``m(t) x_0``."""
        raise NotImplementedError

    def marginal_var(self, t: Array) -> Array:
        """``s(t)^2``, the kernel variance."""
        raise NotImplementedError

    def diffusion(self, t: Array) -> Array:
        """``g(t)``."""
        raise NotImplementedError

    def drift_coeff(self, t: Array) -> Array:
        """``d log m / dt``: the drift is linear, ``f(x, t) = drift_coeff(t) * x``."""
        raise NotImplementedError

    @property
    def prior_std(self) -> float:
        """Standard deviation of the N(0, prior_std^2 I) prior at t=T."""
        raise NotImplementedError

    # --- derived ----------------------------------------------------------------
    def marginal_std(self, t: Array) -> Array:
        """``s(t)``, the kernel standard deviation."""
        return jnp.sqrt(self.marginal_var(t))

    def drift(self, x: Array, t: Array) -> Array:
        return batch_bcast(self.drift_coeff(t), x) * x

    def marginal(self, x0: Array, t: Array) -> tuple[Array, Array]:
        """Mean and std of ``p_t(x_t | x_0)``; the std is broadcast like x0."""
        mean = batch_bcast(jnp.exp(self.log_mean_coeff(t)), x0) * x0
        return mean, batch_bcast(self.marginal_std(t), x0)

    def perturb(self, keys: Array, x0: Array, t: Array) -> Array:
        """Samples ``x_t ~ p_t(x_t | x_0)`` with one key per example (``keys[B]``)."""
        mean, std = self.marginal(x0, t)
        return mean + std * example_noise(keys, x0)

    def prior_sample(self, key: Array, shape: tuple[int, ...]) -> Array:
        return self.prior_std * jax.random.normal(key, shape)

    def transition(self, t: Array, s: Array) -> tuple[Array, Array]:
        """Exact kernel from time ``s`` to ``t > s``: ``x_t = a x_s + sqrt(v) z``.

        Follows from the marginals: ``a = m(t)/m(s)`` and, because the added
        noise is independent, ``v = s(t)^2 - a^2 s(s)^2``.
        """
        a = jnp.exp(self.log_mean_coeff(t) - self.log_mean_coeff(s))
        v = self.marginal_var(t) - a**2 * self.marginal_var(s)
        return a, jnp.maximum(v, 0.0)

    def discretize(self, x: Array, t: Array, dt: Array) -> tuple[Array, Array]:
        """One-step discretisation ``x_t = x_{t-dt} + f + G z`` (exact kernel).

        For VP this is DDPM's ``f = (sqrt(1-beta)-1) x, G = sqrt(beta)``; for VE
        SMLD's ``f = 0, G = sqrt(sigma_t^2 - sigma_{t-dt}^2)``.
        """
        a, v = self.transition(t, t - dt)
        return (batch_bcast(a, x) - 1.0) * x, batch_bcast(jnp.sqrt(v), x)

    def reverse_drift(self, x: Array, t: Array, score: Array, ode: bool = False) -> Array:
        """Drift of the reverse-time SDE ``f - g^2 score`` (or the ODE ``f - g^2/2 score``)."""
        g2 = batch_bcast(self.diffusion(t) ** 2, x)
        return self.drift(x, t) - (0.5 if ode else 1.0) * g2 * score


@dataclasses.dataclass(frozen=True)
class _LinearBetaSDE(SDE):
    """The drift shared by VP and sub-VP: ``f = -beta(t)/2 x``, beta linear in t."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-3

    def beta(self, t: Array) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def beta_integral(self, t: Array) -> Array:
        """``int_0^t beta(s) ds``."""
        return 0.5 * t**2 * (self.beta_max - self.beta_min) + t * self.beta_min

    def log_mean_coeff(self, t):
        return -0.5 * self.beta_integral(t)

    def drift_coeff(self, t):
        return -0.5 * self.beta(t)

    @property
    def prior_std(self):
        return 1.0


@dataclasses.dataclass(frozen=True)
class VPSDE(_LinearBetaSDE):
    """Variance-preserving SDE (DDPM in the continuous limit)."""

    def marginal_var(self, t):
        return -jnp.expm1(2.0 * self.log_mean_coeff(t))

    def diffusion(self, t):
        return jnp.sqrt(self.beta(t))


@dataclasses.dataclass(frozen=True)
class SubVPSDE(_LinearBetaSDE):
    """Sub-VP SDE: VP's drift with a smaller diffusion, variance ``(1 - m^2)^2``."""

    def marginal_var(self, t):
        return jnp.square(jnp.expm1(2.0 * self.log_mean_coeff(t)))

    def marginal_std(self, t):
        return -jnp.expm1(2.0 * self.log_mean_coeff(t))

    def diffusion(self, t):
        discount = -jnp.expm1(-2.0 * self.beta_integral(t))
        return jnp.sqrt(self.beta(t) * discount)


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
    """Variance-exploding SDE (SMLD / NCSN in the continuous limit)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    eps: float = 1e-5

    def log_mean_coeff(self, t):
        return jnp.zeros_like(t)

    def marginal_var(self, t):
        return jnp.square(self.marginal_std(t))

    def marginal_std(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def diffusion(self, t):
        log_ratio = jnp.log(self.sigma_max / self.sigma_min)
        return self.marginal_std(t) * jnp.sqrt(2.0 * log_ratio)

    def drift_coeff(self, t):
        return jnp.zeros_like(t)

    @property
    def prior_std(self):
        return self.sigma_max


SDES: dict[str, type[SDE]] = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def sde_from_config(config) -> SDE:
    """``{"name": "vp", **fields}`` (a dict or ConfigDict) -> an SDE; bad names are errors."""
    fields = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    name = fields.pop("name", None)
    if name not in SDES:
        raise ValueError(f"sde.name: must be one of {sorted(SDES)}, got {name!r}")
    known = {f.name for f in dataclasses.fields(SDES[name])}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"sde: unknown field(s) {unknown} for {name!r}; known {sorted(known)}")
    return SDES[name](**fields)
