"""sdedit_jax: SDEdit guided image synthesis and editing as device-parallel JAX jobs.

What the README's Python API uses: the SDEs, ``sdedit`` (and ``Editor`` for repeated
batches), the ``Sampler`` with its predictor, corrector and time-grid names, the paper's
step rule, and the model loaders.
"""

from sdedit_jax import pretrained
from sdedit_jax.edit import sdedit_batch
from sdedit_jax.engine import Editor, data_mesh, sdedit
from sdedit_jax.pretrained import LoadedModel, load_model, load_network
from sdedit_jax.sampling.correctors import CORRECTORS as _CORRECTORS
from sdedit_jax.sampling.grids import GRIDS as _GRIDS
from sdedit_jax.sampling.integrate import integrate, sample_prior
from sdedit_jax.sampling.sampler import SOLVERS as _SOLVERS
from sdedit_jax.sampling.sampler import Sampler
from sdedit_jax.sampling.steps import StepRule, paper_steps, step_bucket
from sdedit_jax.sde import SDE, VESDE, VPSDE, DiscreteVPSDE, SubVPSDE

PREDICTORS: tuple[str, ...] = tuple(_SOLVERS)  # Sampler(predictor=...)
CORRECTORS: tuple[str, ...] = tuple(_CORRECTORS)  # Sampler(corrector=...)
TIME_GRIDS: tuple[str, ...] = tuple(_GRIDS)  # Sampler(time_grid=...); "" = the solver's own

__all__ = [
    "CORRECTORS",
    "PREDICTORS",
    "SDE",
    "TIME_GRIDS",
    "DiscreteVPSDE",
    "Editor",
    "LoadedModel",
    "Sampler",
    "StepRule",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "data_mesh",
    "integrate",
    "load_model",
    "load_network",
    "paper_steps",
    "pretrained",
    "sample_prior",
    "sdedit",
    "sdedit_batch",
    "step_bucket",
]
