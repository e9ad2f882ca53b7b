"""sdedit_jax: SDEdit guided image synthesis and editing as device-parallel JAX jobs."""

from sdedit_jax import pretrained
from sdedit_jax.edit import sdedit_batch
from sdedit_jax.engine import Editor, data_mesh, sdedit
from sdedit_jax.sampling.integrate import Sampler, integrate, sample_prior
from sdedit_jax.sde import SDE, VESDE, VPSDE, DiscreteVPSDE, SubVPSDE

__all__ = [
    "SDE",
    "DiscreteVPSDE",
    "Editor",
    "Sampler",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "data_mesh",
    "integrate",
    "pretrained",
    "sample_prior",
    "sdedit",
    "sdedit_batch",
]
