"""The ``Sampler``: which solvers with which options, how it is described and configured.

A sampler is a predictor (a solver of one of the families listed in :data:`SOLVERS`),
a corrector (:data:`correctors.CORRECTORS`), the step bucket ``max_steps``, ``denoise``
and the time grid, plus the chosen solvers' own options (DDIM's ``eta``, Langevin's
``snr`` and ``corrector_steps``). Each solver declares its options as its own fields
(:func:`solver.option`: default, meaning, checks), and everything else derives from
those declarations: the keyword arguments of ``Sampler`` and ``sdedit``, the config
block ``sampler.*`` with its help (:func:`sampler_config`, :func:`sampler_docs`),
:func:`sampler_from_config`, and :meth:`Sampler.description`, the one account of a
sampler that a job's fingerprint records and its manifest columns are cut from. A
solver with an option of its own is thus one new family file and its entry in
:data:`SOLVERS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from sdedit_jax.sampling import classic, correctors, ddim, dpm_solver, grids
from sdedit_jax.sampling.solver import Solver, option_docs, options_of
from sdedit_jax.sampling.steps import StepRule

# Predictor name -> solver factory, one table per solver family (module): the one list
# a new family joins.
SOLVERS: dict[str, Callable[..., Solver]] = {
    **classic.SOLVERS,
    **ddim.SOLVERS,
    **dpm_solver.SOLVERS,
}

# The options the first releases recorded for every sampler, whichever its solvers: their
# workdirs' fingerprints hold them, so every description does (at the defaults where the
# chosen solvers lack them). Options of later solvers are described where they are chosen.
_ALWAYS_DESCRIBED = (ddim.DDIM, correctors.Langevin)
# Description fields that manifest rows have never carried (rows of earlier releases).
_NOT_IN_MANIFEST = ("snr", "corrector_steps", "denoise")


def _registries() -> dict[str, Mapping[str, Callable[..., Any]]]:
    return {"predictor": SOLVERS, "corrector": correctors.CORRECTORS}


def all_options() -> dict[str, tuple[Any, str]]:
    """Every option of every registered solver: ``name -> (default, meaning)``, correctors first."""
    found: dict[str, tuple[Any, str]] = {}
    for make in [*correctors.CORRECTORS.values(), *SOLVERS.values()]:
        solver = make()
        for name, doc in option_docs(solver).items():
            found.setdefault(name, (getattr(solver, name), doc))
    return found


# The cross-solver fields of a config's ``sampler`` block: default and meaning.
_FIELDS: dict[str, tuple[Any, str]] = {
    "predictor": (
        "euler_maruyama",
        "the reverse-SDE/ODE solver (sdedit_jax.PREDICTORS), e.g. ancestral, ddim",
    ),
    "corrector": ("none", "none | langevin (a Langevin MCMC step after each predictor step)"),
    "steps_per_unit_time": (100, "the paper's N: ceil(N * t0) steps per edit; 0 -> n_steps"),
    "n_steps": (0, "a fixed number of steps for every t0 (when steps_per_unit_time is 0)"),
    "max_steps": (0, "the compiled step bucket; 0 -> derived from the step counts"),
}
_LAST_FIELDS: dict[str, tuple[Any, str]] = {
    "denoise": (True, "return the noise-free mean of the last step (score_sde's noise_removal)"),
    "time_grid": ("", "uniform | logsnr | karras; '' = the predictor's default"),
}


def _config_fields() -> dict[str, tuple[Any, str]]:
    return {**_FIELDS, **all_options(), **_LAST_FIELDS}


def sampler_docs() -> dict[str, str]:
    """One line per field of a config's ``sampler`` block (what ``--help`` prints)."""
    return {name: doc for name, (_, doc) in _config_fields().items()}


def sampler_config(**changes: Any) -> ml_collections.ConfigDict:
    """A config's ``sampler`` block: every field :func:`sampler_from_config` reads.

    The solvers' own options (eta, snr, ...) come with their defaults from the solvers.
    """
    fields = {name: default for name, (default, _) in _config_fields().items()}
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ValueError(f"sampler: no field {unknown[0]!r} (known: {', '.join(fields)})")
    return ml_collections.ConfigDict({**fields, **changes})


def _build(make: Callable[..., Any], options: Mapping[str, Any]) -> Any:
    """The solver ``make`` builds with those of ``options`` it takes (its checks run here)."""
    return make(**{k: options[k] for k in option_docs(make()) if k in options})


def _check_untaken(name: str, value: Any, chosen: dict[str, str]) -> None:
    """An option the chosen solvers do not take: refused unless it keeps its default.

    The corrector ``"none"`` ignores corrector options, as it always has (they are
    still checked by the corrector that takes them).
    """
    takers = {
        slot: [n for n, make in registry.items() if name in option_docs(make())]
        for slot, registry in _registries().items()
    }
    if not any(takers.values()):
        raise ValueError(
            f"{name}: no predictor or corrector takes it; options: {sorted(all_options())}"
        )
    if chosen["corrector"] == "none" and takers["corrector"]:
        correctors.CORRECTORS[takers["corrector"][0]](**{name: value})
        return
    slot = "predictor" if takers["predictor"] else "corrector"
    default = getattr(_registries()[slot][takers[slot][0]](), name)
    if value != default:
        raise ValueError(
            f"{name}: {slot} {chosen[slot]!r} takes no {name} "
            f"(only {', '.join(takers[slot])}), got {value!r}"
        )


def _described_options(predictor: str, corrector: str, given: Mapping[str, Any]) -> dict:
    """The options a sampler records: checked, with the defaults of those not given."""
    chosen = {"predictor": predictor, "corrector": corrector}
    makes = [registry[chosen[slot]] for slot, registry in _registries().items()]
    taken = {name for make in makes for name in option_docs(make())}
    for name, value in given.items():
        if name not in taken:
            _check_untaken(name, value, chosen)
    described = {k: v for cls in _ALWAYS_DESCRIBED for k, v in options_of(cls()).items()}
    for make in makes:
        described.update(options_of(_build(make, given)))
    described.update({k: v for k, v in given.items() if k in described})
    return described


@dataclasses.dataclass(frozen=True, init=False)
class Sampler:
    """The static description of a sampler; one compiled program per value.

    ``Sampler(predictor, corrector, max_steps, denoise, time_grid, **options)``;
    each option goes to the chosen solver that declares it (e.g. ``eta=0.5`` to
    ``ddim``, ``snr=0.1, corrector_steps=2`` to ``langevin``) and is checked there.

    Attributes:
        predictor: a key of ``SOLVERS``: Song et al.'s predictors
            ("euler_maruyama", "reverse_diffusion", "ancestral", "ode_euler",
            "ode_heun", "none") or the few-step solvers "ddim",
            "dpm_solver_2m", "sde_dpm_solver_2m", "sde_dpm_solver_3m".
        corrector: a key of ``correctors.CORRECTORS`` ("langevin" or "none").
        max_steps: the largest step count a program accepts (its bucket);
            per-example step counts are traced values in ``[1, max_steps]``.
        denoise: return the noise-free mean of the last step (Song et al.'s
            "noise removal"); the state at ``t_end`` otherwise.
        time_grid: "uniform", "logsnr" or "karras" (see :mod:`grids`); ""
            takes the solver's measured default (uniform for Song et al.'s
            predictors, karras for DDIM, logsnr for DPM-Solver++).
        options: ``(name, value)`` of the solver options it records (see
            :meth:`description`), the chosen solvers' with their defaults filled in.
    """

    predictor: str
    corrector: str
    max_steps: int
    denoise: bool
    time_grid: str
    options: tuple[tuple[str, Any], ...]

    def __init__(
        self,
        predictor: str = "euler_maruyama",
        corrector: str = "none",
        max_steps: int = 256,
        denoise: bool = True,
        time_grid: str = "",
        **options: Any,
    ):
        if predictor not in SOLVERS:
            raise ValueError(
                f"predictor: unknown name {predictor!r}; choose from {sorted(SOLVERS)}"
            )
        if corrector not in correctors.CORRECTORS:
            raise ValueError(
                f"corrector: unknown name {corrector!r}; "
                f"choose from {sorted(correctors.CORRECTORS)}"
            )
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps: must be a positive int, got {max_steps!r}")
        described = _described_options(predictor, corrector, options)
        if time_grid:
            grids.grid_from_name(time_grid)
        fields = dict(
            predictor=predictor,
            corrector=corrector,
            max_steps=max_steps,
            denoise=denoise,
            time_grid=time_grid,
            options=tuple(described.items()),
        )
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    @property
    def solver(self) -> Solver:
        """The predictor's solver, wrapped with the corrector when there is one."""
        options = dict(self.options)
        solver = _build(SOLVERS[self.predictor], options)
        if self.corrector == "none":
            return solver
        return classic.Corrected(solver, _build(correctors.CORRECTORS[self.corrector], options))

    @property
    def grid(self) -> grids.UniformGrid | grids.LogSNRGrid | grids.KarrasGrid:
        return grids.grid_from_name(self.grid_name)

    @property
    def grid_name(self) -> str:
        return self.time_grid or self.solver.default_grid

    @property
    def nfe_per_step(self) -> int:
        """Score-model calls per time step, as the solver declares them."""
        return self.solver.nfe_per_step

    def network_calls(self, n_steps, noise_free_end: bool):
        """Score-model calls of ``n_steps`` steps (an int or array), final step included.

        The final step to a noise-free end (``sde.noise_free_end``) is one data
        prediction after the corrector's moves, whatever the solver's per-step count.
        """
        if not noise_free_end:
            return n_steps * self.nfe_per_step
        corrector = _build(correctors.CORRECTORS[self.corrector], dict(self.options))
        return (n_steps - 1) * self.nfe_per_step + 1 + corrector.nfe_per_step

    def description(self) -> dict[str, Any]:
        """What the sampler is: the job fingerprint's ``sampler`` (manifest columns: a part).

        The names and values of every earlier release, so their workdirs resume: the
        solver options (see ``_ALWAYS_DESCRIBED``) and ``time_grid``, the grid used.
        """
        return {
            "predictor": self.predictor,
            "corrector": self.corrector,
            **dict(self.options),
            "denoise": self.denoise,
            "max_steps": self.max_steps,
            "time_grid": self.grid_name,
        }

    def manifest_fields(self) -> dict[str, Any]:
        """The sampler's columns of every manifest row: its description, and calls per step."""
        described = self.description()
        return {
            **{k: v for k, v in described.items() if k not in _NOT_IN_MANIFEST},
            "nfe_per_step": self.nfe_per_step,
        }


def sampler_from_config(config: ml_collections.ConfigDict) -> tuple[Sampler, StepRule]:
    """The static sampler and the per-example step rule of a ``config.sampler`` block."""
    rule = StepRule(
        steps_per_unit_time=config.steps_per_unit_time,
        n_steps=config.n_steps,
        max_steps=config.max_steps,
    )
    sampler = Sampler(
        config.predictor,
        config.corrector,
        rule.max_steps,
        denoise=config.denoise,
        time_grid=config.get("time_grid", ""),
        **{name: config[name] for name in all_options() if name in config},
    )
    return sampler, rule
