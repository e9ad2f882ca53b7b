"""Song et al.'s one-step predictors and correctors as solvers (an adapter, same numbers).

The functions of :mod:`predictors` and :mod:`correctors` stay as they are;
:class:`PredictorSolver` gives a predictor the solver interface (its state is
just ``(x, x_mean)``) and :class:`Corrected` runs a corrector before any
solver's step. Keys are split exactly as the integrator always did: the
corrector uses ``fold_in(step_keys, 0)``, the predictor ``fold_in(step_keys, 1)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from sdedit_jax import rng
from sdedit_jax.sampling import predictors
from sdedit_jax.sampling.correctors import Corrector
from sdedit_jax.sampling.solver import Solver, SolverState


@dataclasses.dataclass(frozen=True)
class PredictorSolver:
    """A one-step predictor ``(sde, score_fn, keys, x, t, dt) -> (x, x_mean)``."""

    name: str
    nfe_per_step: int = 1
    order: int = 1
    stochastic: bool = True
    default_grid: str = "uniform"

    @property
    def predictor(self) -> Callable:
        return predictors.PREDICTORS[self.name]

    def init(self, x):
        return SolverState(x, x)

    def step(self, sde, score_fn, keys, state, t, t_next):
        x, x_mean = self.predictor(sde, score_fn, rng.fold_in(keys, 1), state.x, t, t - t_next)
        return SolverState(x, x_mean, state.history)


@dataclasses.dataclass(frozen=True)
class Corrected:
    """``corrector``'s moves at ``t``, then ``solver``'s step (PC sampling)."""

    solver: Solver
    corrector: Corrector

    @property
    def nfe_per_step(self) -> int:
        return self.solver.nfe_per_step + self.corrector.nfe_per_step

    @property
    def order(self) -> int:
        return self.solver.order

    @property
    def stochastic(self) -> bool:
        return True

    @property
    def default_grid(self) -> str:
        return self.solver.default_grid

    def init(self, x):
        return self.solver.init(x)

    def correct(self, sde, score_fn, keys, state, t, t_next):
        """The corrector's moves at ``t`` (score calls at ``t`` only)."""
        x, _ = self.corrector.correct(sde, score_fn, rng.fold_in(keys, 0), state.x, t, t - t_next)
        return state._replace(x=x)

    def step(self, sde, score_fn, keys, state, t, t_next):
        state = self.correct(sde, score_fn, keys, state, t, t_next)
        return self.solver.step(sde, score_fn, keys, state, t, t_next)


# Each predictor with what it declares: network calls per step, order, stochasticity.
SOLVERS: dict[str, Callable[..., Solver]] = {
    "euler_maruyama": functools.partial(PredictorSolver, "euler_maruyama"),
    "reverse_diffusion": functools.partial(PredictorSolver, "reverse_diffusion"),
    "ancestral": functools.partial(PredictorSolver, "ancestral"),
    "ode_euler": functools.partial(PredictorSolver, "ode_euler", stochastic=False),
    "ode_heun": functools.partial(
        PredictorSolver, "ode_heun", nfe_per_step=2, order=2, stochastic=False
    ),
    "none": functools.partial(PredictorSolver, "none", nfe_per_step=0, order=0, stochastic=False),
}
