"""Solver presets of the studio: a name for each sampler block a preview can use.

Each preset is a set of ``config.sampler`` fields, so a saved dataset runs with the
same sampler by passing them on ``sdedit_jax.main``'s command line.
"""

from __future__ import annotations

from typing import Any

from sdedit_jax.sampling.sampler import Sampler, sampler_config, sampler_from_config
from sdedit_jax.sampling.steps import StepRule

# The first is the default: few steps, so a preview comes back in seconds on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"predictor": "sde_dpm_solver_2m", "steps_per_unit_time": 20},
    "standard": {"predictor": "sde_dpm_solver_2m", "steps_per_unit_time": 100},
    "ddim": {"predictor": "ddim", "steps_per_unit_time": 20},
}
DEFAULT_PRESET = next(iter(PRESETS))


def check_preset(name: Any) -> str:
    """``name`` if it is a preset, else a ``ValueError`` naming the field and value."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return name


def sampler_for(name: str) -> tuple[Sampler, StepRule]:
    """The sampler and step rule the job builds from this preset's sampler block."""
    return sampler_from_config(sampler_config(**PRESETS[check_preset(name)]))


def command_flags(name: str) -> list[str]:
    """The job's ``--config.sampler.*`` flags that select this preset."""
    return [f"--config.sampler.{k}={v}" for k, v in PRESETS[check_preset(name)].items()]
