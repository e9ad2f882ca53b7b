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
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdedit_jax.rng import example_noise
from sdedit_jax.util.config import frozen

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
            Where ``eps`` itself is noise-free (``marginal_std(eps) == 0``, an
            infinite log-SNR), :attr:`last_noisy_time` says where the time grids
            end instead (see :func:`sdedit_jax.sampling.integrate.integrate`).
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

    @property
    def last_noisy_time(self) -> float:
        """The smallest time with noise (a finite log-SNR), where the time grids end.

        ``eps`` when it has noise (the continuous SDEs). An SDE whose ``eps`` is
        noise-free returns the last time before it with noise (a discrete
        schedule's first step, ``1 / T``); the integrator's final step goes from
        there to ``eps`` as one data prediction, with no score call at sigma = 0.
        """
        return self.eps

    @property
    def variance_preserving(self) -> bool:
        """Whether ``m(t)^2 + s(t)^2 = 1`` (what a velocity-predicting network assumes)."""
        return False

    @property
    def noise_free_end(self) -> bool:
        """Whether integrating to ``eps`` ends with that final data-prediction step."""
        return self.last_noisy_time > self.eps

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

    variance_preserving = True

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


# How the betas run from beta_start to beta_end: DDPM's linear steps, or Stable
# Diffusion's ``scaled_linear`` (linear in sqrt(beta), diffusers' name).
BETA_SCHEDULES = ("linear", "scaled_linear")


def _betas(beta_start: float, beta_end: float, num_timesteps: int, schedule: str) -> np.ndarray:
    if schedule == "scaled_linear":
        roots = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64)
        return roots**2
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


@functools.lru_cache(maxsize=8)
def _log_alpha_bar_knots(
    beta_start: float, beta_end: float, num_timesteps: int, schedule: str = "linear"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``log alpha_bar`` at ``t = k / T`` (k = 0..T) as float32 hi + lo parts, and the
    per-step increments ``log(1 - beta_k)``; the table itself is float64, like DDPM's."""
    betas = _betas(beta_start, beta_end, num_timesteps, schedule)
    increments = np.log1p(-betas)
    knots = np.concatenate([[0.0], np.cumsum(increments)])  # == log((1 - betas).cumprod())
    hi = knots.astype(np.float32)
    lo = (knots - hi.astype(np.float64)).astype(np.float32)
    return hi, lo, increments.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DiscreteVPSDE(SDE):
    """DDPM's discrete beta schedule as a VP SDE (the SDE of SDEdit's DDPM networks, and with
    ``beta_schedule="scaled_linear"``, 0.00085..0.012, of Stable Diffusion's).

    Grid time ``t = (n + 1) / T`` is DDPM step ``n``: its marginal is exactly
    ``alpha_bar[n] = prod_{i<=n} (1 - beta_i)`` (computed in float64 as DDPM does), and
    the network's timestep input there is ``n = t T - 1``. Between grid times
    ``log alpha_bar`` is linear in ``t``, i.e. a VP SDE with a piecewise-constant
    ``beta(t) = -T log(1 - beta_n)`` on ``((n) / T, (n + 1) / T]``, so drift and diffusion
    agree with the marginals and every predictor applies. One ``ancestral`` step of
    ``1 / T`` from a grid time is DDPM's ancestral step (mean with ``beta_n``, variance
    ``beta_tilde_n``); ``eps = 0`` makes the last step end at the data (DDPM's ``x_0``):
    the log-SNR is infinite there, so the time grids end at :attr:`last_noisy_time`
    ``= 1 / T`` (DDPM's step 0) and the last step is the data prediction from there.
    Times within 1e-3 of a step of a grid time are taken as that grid time, so the
    float32 time grids of the samplers land on DDPM's steps exactly.
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    num_timesteps: int = 1000
    eps: float = 0.0
    beta_schedule: str = "linear"
    variance_preserving = True

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"beta_schedule: must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}"
            )
        if not (isinstance(self.num_timesteps, int) and self.num_timesteps >= 2):
            raise ValueError(f"num_timesteps: must be an int >= 2, got {self.num_timesteps!r}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"beta_start, beta_end: need 0 < beta_start <= beta_end < 1, got "
                f"{self.beta_start!r}, {self.beta_end!r}"
            )

    def _tables(self) -> tuple[Array, Array, Array]:
        hi, lo, inc = _log_alpha_bar_knots(
            self.beta_start, self.beta_end, self.num_timesteps, self.beta_schedule
        )
        return jnp.asarray(hi), jnp.asarray(lo), jnp.asarray(inc)

    def _steps(self, t: Array) -> Array:
        """``t * T``, snapped to the nearest integer within 1e-3."""
        u = jnp.asarray(t, jnp.float32) * self.num_timesteps
        nearest = jnp.round(u)
        return jnp.where(jnp.abs(u - nearest) <= 1e-3, nearest, u)

    def _segment(self, u: Array) -> Array:
        """Index ``n`` of the step whose interval ``(n, n + 1]`` (in units of 1/T) holds ``u``."""
        return jnp.clip(jnp.ceil(u).astype(jnp.int32) - 1, 0, self.num_timesteps - 1)

    def _log_alpha_bar(self, u: Array) -> tuple[Array, Array, Array]:
        """``log alpha_bar`` at ``u = t T`` as the nearest knot's (hi, lo) and the offset."""
        hi, lo, inc = self._tables()
        knot = jnp.clip(jnp.round(u), 0, self.num_timesteps).astype(jnp.int32)
        return hi[knot], lo[knot], (u - knot) * inc[self._segment(u)]

    @property
    def last_noisy_time(self) -> float:
        return 1.0 / self.num_timesteps

    def timestep(self, t: Array) -> Array:
        """The DDPM network's timestep input at time ``t``: ``t T - 1`` (float)."""
        return self._steps(t) - 1.0

    def log_mean_coeff(self, t):
        hi, lo, offset = self._log_alpha_bar(self._steps(t))
        return 0.5 * (hi + (lo + offset))

    def marginal_var(self, t):
        return -jnp.expm1(2.0 * self.log_mean_coeff(t))

    def drift_coeff(self, t):
        _, _, inc = self._tables()
        return 0.5 * self.num_timesteps * inc[self._segment(self._steps(t))]

    def diffusion(self, t):
        return jnp.sqrt(-2.0 * self.drift_coeff(t))

    def transition(self, t: Array, s: Array) -> tuple[Array, Array]:
        """As the base class, with ``v = 1 - a^2`` (exact for VP) from the difference of
        ``log alpha_bar`` taken knot to knot, so ``a^2 = 1 - beta_n`` and ``v = beta_n``
        keep float32 precision even where ``alpha_bar`` is tiny."""
        hi_t, lo_t, off_t = self._log_alpha_bar(self._steps(t))
        hi_s, lo_s, off_s = self._log_alpha_bar(self._steps(s))
        log_a2 = (hi_t - hi_s) + ((lo_t - lo_s) + (off_t - off_s))
        return jnp.exp(0.5 * log_a2), -jnp.expm1(log_a2)

    @property
    def prior_std(self):
        return 1.0


SDES: dict[str, type[SDE]] = {
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "ve": VESDE,
    "discrete_vp": DiscreteVPSDE,
}


def sde_from_config(config) -> SDE:
    """``{"name": "vp", **fields}`` (a dict or ConfigDict) -> an SDE; bad names are errors."""
    fields = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    name = fields.pop("name", None)
    if name not in SDES:
        raise ValueError(f"sde.name: must be one of {sorted(SDES)}, got {name!r}")
    return frozen(SDES[name], fields, "sde")
