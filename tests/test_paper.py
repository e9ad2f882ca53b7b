"""configs/paper.py: the paper's settings resolve to the intended samplers."""

import os

import numpy as np
import pytest

from sdedit_jax import job
from sdedit_jax.data import guide_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "configs", "paper.py")
DDPM = ("church_ddpm", "bedroom_ddpm", "celebahq_ddpm")
NCSNPP = ("church_ncsnpp", "bedroom_ncsnpp", "celebahq_ncsnpp", "ffhq_ncsnpp")


@pytest.mark.parametrize("variant", DDPM + NCSNPP)
def test_every_variant_builds_its_sampler_and_input(variant):
    config = job.load_config(f"{PAPER}:{variant}")
    sampler, steps_for = job.sampler_from_config(config.sampler)
    dataset, network = variant.split("_")
    assert config.model_dir == f"models/{network}-{dataset}-256"
    if network == "ddpm":
        # SDEdit's command: --t 500 of the 1000 discrete steps, --sample_step 3.
        assert (sampler.predictor, sampler.corrector, config.repeats) == ("ancestral", "none", 3)
        assert sampler.score_evals_per_step == 1
        np.testing.assert_array_equal(steps_for(np.array(config.t0s)), [500])
    else:
        assert (sampler.predictor, sampler.corrector, config.repeats) == (
            "reverse_diffusion", "langevin", 1)
        assert (sampler.snr, sampler.corrector_steps) == (0.075, 1)
        np.testing.assert_array_equal(steps_for(np.array(config.t0s)), [1000])
    assert sampler.max_steps >= int(steps_for(np.array([1.0]))[0])
    input_config = guide_inputs.GuideInputConfig.from_mapping(
        dict(config.input.to_dict(), path=os.path.join(REPO, config.input.path)))
    assert input_config.image_size == (256, 256)
    assert len(guide_inputs.build_catalog(input_config)) == 10


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match=r"configs/paper.py: variant 'church' unknown"):
        job.load_config(f"{PAPER}:church")
    with pytest.raises(ValueError, match=r"configs/paper.py: variant None unknown"):
        job.load_config(PAPER)
