"""The Sampler: solver options live on the solvers; one description feeds fingerprint and manifest.

Truth for the description is the formula of the releases before the options moved
(every field written out by hand in the job), so old workdirs keep resuming; a
solver written here, with one option and registered by one entry, shows that a
new solver reaches the Sampler, ``sdedit``, the config block and the description
without another file.
"""

import dataclasses
import functools
import itertools
import json
import os

import numpy as np
import pytest

import sdedit_jax as sj
from sdedit_jax.jobs import run as job
from sdedit_jax.sampling import sampler as sampling
from sdedit_jax.sampling.solver import SolverState, option
from sdedit_jax.tools.gaussian_reference import GaussianScore
from sdedit_jax.util import config as config_files
from tests import job_cli


def _earlier_fingerprint(sampler, eta=0.0, snr=0.16, corrector_steps=1) -> dict:
    """The ``sampler`` block the job recorded before the options moved onto the solvers."""
    return {
        "predictor": sampler.predictor,
        "corrector": sampler.corrector,
        "snr": snr,
        "corrector_steps": corrector_steps,
        "denoise": sampler.denoise,
        "max_steps": sampler.max_steps,
        "eta": eta,
        "time_grid": sampler.grid_name,
    }


def _earlier_manifest(sampler, eta=0.0) -> dict:
    """The sampler's manifest columns before the options moved onto the solvers."""
    return {
        "predictor": sampler.predictor,
        "corrector": sampler.corrector,
        "max_steps": sampler.max_steps,
        "eta": eta,
        "time_grid": sampler.grid_name,
        "nfe_per_step": sampler.nfe_per_step,
    }


def _settings():
    """Every predictor x corrector, with and without options of their own."""
    for predictor, corrector in itertools.product(sj.PREDICTORS, sj.CORRECTORS):
        yield predictor, corrector, {}
        options = {"eta": 0.4} if predictor == "ddim" else {}
        if corrector == "langevin":
            options.update(snr=0.07, corrector_steps=3)
        if options:
            yield predictor, corrector, options


@pytest.mark.parametrize("predictor,corrector,options", list(_settings()))
def test_description_keeps_the_earlier_fields_and_values(predictor, corrector, options):
    sampler = sj.Sampler(predictor, corrector, max_steps=8, **options)
    assert sampler.description() == _earlier_fingerprint(sampler, **options)
    manifest_options = {k: v for k, v in options.items() if k == "eta"}
    assert sampler.manifest_fields() == _earlier_manifest(sampler, **manifest_options)


def test_no_corrector_keeps_corrector_options_as_given_and_checks_them():
    """As before: with corrector "none" the Langevin options are checked, unused, recorded."""
    sampler = sj.Sampler("ode_euler", "none", max_steps=4, snr=0.05)
    assert sampler.description()["snr"] == 0.05
    assert sampler.nfe_per_step == 1
    with pytest.raises(ValueError, match="snr: must be > 0, got -1"):
        sj.Sampler("ode_euler", "none", snr=-1)
    with pytest.raises(ValueError, match="corrector_steps: must be a positive int, got 0"):
        sj.Sampler(corrector="langevin", corrector_steps=0)
    with pytest.raises(ValueError, match="gamma: no predictor or corrector takes it"):
        sj.Sampler(gamma=1.0)


@pytest.mark.slow
def test_fingerprint_and_manifest_columns_are_the_description(tiny_model_dir, tmp_path):
    """A real job: its fingerprint's sampler block and its rows' columns are cut from one dict."""
    job_cli.save_png(str(tmp_path / "guides" / "a.png"), job_cli.random_guide(0))
    config = config_files.load_config("configs/default.py")
    config.model_dir = tiny_model_dir
    config.input.path = str(tmp_path / "guides")
    config.input.image_size = (job_cli.SIZE, job_cli.SIZE)
    config.t0s = (0.4,)
    config.sampler.update(
        predictor="ddim", corrector="langevin", eta=0.3, snr=0.2, corrector_steps=2
    )
    config.sampler.steps_per_unit_time = 3
    config.per_device_batch = 1
    config.contact_sheet = False
    workdir = str(tmp_path / "work")
    assert job.run_job(config, workdir)["edited"] == 1
    sampler, _ = sampling.sampler_from_config(config.sampler)
    with open(os.path.join(workdir, "job_fingerprint.json")) as f:
        recorded = json.load(f)["sampler"]
    assert recorded == sampler.description()
    assert recorded == _earlier_fingerprint(sampler, eta=0.3, snr=0.2, corrector_steps=2)
    (row,) = job_cli.rows(os.path.join(workdir, "t0_0.40", "manifest.jsonl")).values()
    columns = sampler.manifest_fields()
    assert {k: row[k] for k in columns} == columns == _earlier_manifest(sampler, eta=0.3)
    assert columns["nfe_per_step"] == 3 and row["nfe"] == 2 * 3


@dataclasses.dataclass(frozen=True)
class Shrink:
    """A test solver with one option: every step multiplies the state by ``factor``."""

    factor: float = option(1.0, "what each step multiplies the state by")
    nfe_per_step: int = 0
    order: int = 0
    stochastic: bool = False
    default_grid: str = "uniform"

    def __post_init__(self):
        if not 0 < self.factor <= 1:
            raise ValueError(f"factor: must lie in (0, 1], got {self.factor!r}")

    def init(self, x):
        return SolverState(x, x)

    def step(self, sde, score_fn, keys, state, t, t_next):
        del sde, score_fn, keys, t, t_next
        return SolverState(state.x * self.factor, state.x * self.factor)


def test_a_solver_with_one_option_is_one_registry_entry(monkeypatch):
    monkeypatch.setitem(sampling.SOLVERS, "shrink", Shrink)

    # The Sampler takes the option, the solver checks it, and others refuse it.
    assert sj.Sampler("shrink", factor=0.5).solver == Shrink(0.5)
    with pytest.raises(ValueError, match=r"factor: must lie in \(0, 1\], got 2"):
        sj.Sampler("shrink", factor=2)
    with pytest.raises(ValueError, match=r"factor: predictor 'ddim' takes no factor \(only shrink"):
        sj.Sampler("ddim", factor=0.5)

    # Described where chosen (at its default too); never for other solvers (old workdirs).
    assert sj.Sampler("shrink", max_steps=4).description()["factor"] == 1.0
    assert sj.Sampler("shrink", max_steps=4, factor=0.5).manifest_fields()["factor"] == 0.5
    assert "factor" not in sj.Sampler("ddim").description()

    # The config block and its help derive from the solver's own field.
    assert sampling.all_options()["factor"] == (1.0, "what each step multiplies the state by")
    assert sampling.sampler_config()["factor"] == 1.0
    assert sampling.sampler_docs()["factor"] == "what each step multiplies the state by"
    block = sampling.sampler_config(predictor="shrink")
    block.factor = 0.25
    assert sampling.sampler_from_config(block)[0] == sj.Sampler(
        "shrink", max_steps=128, factor=0.25
    )
    block.predictor = "ddim"  # a config carries every option: at its default it is fine
    block.factor = 1.0
    assert "factor" not in sampling.sampler_from_config(block)[0].description()


@pytest.mark.slow
def test_sdedit_passes_a_new_solvers_option_to_it(monkeypatch):
    """n steps of ``Shrink`` multiply the perturbed guide by factor^n (same seed and ids)."""
    monkeypatch.setitem(sampling.SOLVERS, "shrink", Shrink)
    sde = sj.VPSDE()
    guides = np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 1)).astype(np.float32)
    run = functools.partial(
        sj.sdedit, GaussianScore(sde, 0.0, 1.0), sde, guides, t0=0.5, predictor="shrink"
    )
    steps = np.asarray([1, 2, 3])
    plain = np.asarray(run(n_steps=steps, factor=1.0))
    shrunk = np.asarray(run(n_steps=steps, factor=0.5))
    np.testing.assert_allclose(shrunk, plain * 0.5 ** steps[:, None, None, None], rtol=1e-6)
    assert np.abs(plain).max() > 0.1
