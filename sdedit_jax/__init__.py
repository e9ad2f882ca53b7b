"""sdedit_jax: SDEdit guided image synthesis and editing as device-parallel JAX jobs."""

from sdedit_jax.sde import SDE, SubVPSDE, VESDE, VPSDE

__all__ = ["SDE", "SubVPSDE", "VESDE", "VPSDE"]
