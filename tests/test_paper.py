"""configs/paper.py: the paper's settings, and a job with them over converted networks."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdedit_jax.data import guide_inputs, image_grid
from sdedit_jax.sampling.sampler import sampler_from_config
from sdedit_jax.tools.bench_networks import PUBLISHED_UNETS
from sdedit_jax.util.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "configs", "paper.py")
DDPM = ("church_ddpm", "bedroom_ddpm", "celebahq_ddpm")
NCSNPP = ("church_ncsnpp", "bedroom_ncsnpp", "celebahq_ncsnpp", "ffhq_ncsnpp")


@pytest.mark.parametrize("variant", DDPM + NCSNPP)
def test_every_variant_builds_its_sampler_and_input(variant):
    config = load_config(f"{PAPER}:{variant}")
    sampler, step_rule = sampler_from_config(config.sampler)
    dataset, network = variant.split("_")
    assert config.model_dir == f"models/{network}-{dataset}-256"
    if network == "ddpm":
        # SDEdit's command: --t 500 of the 1000 discrete steps, --sample_step 3.
        assert (sampler.predictor, sampler.corrector, config.repeats) == ("ancestral", "none", 3)
        assert sampler.nfe_per_step == 1
        np.testing.assert_array_equal(step_rule.steps_for(np.array(config.t0s)), [500])
    else:
        assert (sampler.predictor, sampler.corrector, config.repeats) == (
            "reverse_diffusion",
            "langevin",
            1,
        )
        described = sampler.description()
        assert (described["snr"], described["corrector_steps"]) == (0.075, 1)
        np.testing.assert_array_equal(step_rule.steps_for(np.array(config.t0s)), [1000])
    assert sampler.max_steps >= int(step_rule.steps_for(np.array([1.0]))[0])
    input_config = guide_inputs.GuideInputConfig.from_mapping(
        dict(config.input.to_dict(), path=os.path.join(REPO, config.input.path))
    )
    assert input_config.image_size == (256, 256)
    assert len(guide_inputs.build_catalog(input_config)) == 10


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match=r"configs/paper.py: variant 'church' unknown"):
        load_config(f"{PAPER}:church")
    with pytest.raises(ValueError, match=r"configs/paper.py: variant None unknown"):
        load_config(PAPER)


# --- end to end: converted random-weight networks of the published structures -------------------

# The published church block structures (the benchmark's configs), narrower: the widths
# only change the cost.
DDPM_CHURCH_NARROW = {
    **PUBLISHED_UNETS["ddpm_church_256"],
    "block_out_channels": (32, 32, 64, 64, 64, 64),
}
NCSNPP_CHURCH_NARROW = {
    **PUBLISHED_UNETS["ncsnpp_church_256"],
    "block_out_channels": (32, 32, 64, 64, 128, 128, 128),
    "act_fn": "silu",
}
E2E_GUIDES = ("edit_coffee", "paint_astronaut")


def _run(*args, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _random_diffusers_folder(folder, config, scheduler):
    """A random-weight UNet2DModel and its scheduler, saved by diffusers as on the hub."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.UNet2DModel(**config).save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
@pytest.mark.parametrize("network", ["ddpm", "ncsnpp"])
def test_paper_job_with_converted_networks(tmp_path, network):
    diffusers = pytest.importorskip("diffusers")
    if network == "ddpm":
        config, variant = DDPM_CHURCH_NARROW, "church_ddpm"
        scheduler = diffusers.DDPMScheduler(
            num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
        )
    else:
        config, variant = NCSNPP_CHURCH_NARROW, "church_ncsnpp"
        scheduler = diffusers.ScoreSdeVeScheduler(
            num_train_timesteps=2000, snr=0.075, sigma_min=0.01, sigma_max=380.0
        )
    source = tmp_path / "hub"
    _random_diffusers_folder(source, config, scheduler)
    model_dir = tmp_path / "model"
    _run("sdedit_jax.convert", "--source", str(source), "--out", str(model_dir))
    guides = tmp_path / "guides"
    (guides / "masks").mkdir(parents=True)
    bundled = os.path.join(REPO, "sdedit_jax", "assets", "photos_256")
    for name in E2E_GUIDES:
        shutil.copy(os.path.join(bundled, name + ".png"), guides)
        shutil.copy(os.path.join(bundled, "masks", name + ".png"), guides / "masks")
    workdir = tmp_path / "run"
    # The paper's variant, with 2 steps instead of N * t0 (the point is the path).
    _run(
        "sdedit_jax.main",
        "--config",
        f"configs/paper.py:{variant}",
        f"--config.model_dir={model_dir}",
        f"--config.input.path={guides}",
        "--config.sampler.steps_per_unit_time=0",
        "--config.sampler.n_steps=2",
        "--config.per_device_batch=2",
        f"--workdir={workdir}",
    )

    summary = json.loads((workdir / "summary.json").read_text())
    info = json.loads((model_dir / "model_info.json").read_text())
    assert summary["failures"] == 0
    assert summary["model_sha256"] in info["sha256"].values()
    [sub_job] = summary["sub_jobs"]
    assert (sub_job["t0"], sub_job["edited"], sub_job["failed"], sub_job["remaining"]) == (
        0.5,
        2,
        0,
        0,
    )
    rows = [json.loads(line) for line in (workdir / "t0_0.50" / "manifest.jsonl").open()]
    assert sorted(r["id"] for r in rows) == sorted(n + ".png" for n in E2E_GUIDES)
    outputs = {r["id"]: _pixels(workdir / "t0_0.50" / r["output"]) for r in rows}
    for name in E2E_GUIDES:
        out, guide = outputs[name + ".png"], _pixels(guides / (name + ".png"))
        assert out.shape == (256, 256, 3)
        assert np.any(out != guide)
    # Masked editing keeps every pixel outside the stroke mask exactly.
    keep = _pixels(guides / "masks" / "edit_coffee.png")[..., 0] < 128
    np.testing.assert_array_equal(
        outputs["edit_coffee.png"][keep], _pixels(guides / "edit_coffee.png")[keep]
    )
    # guide | mask | output, one row per guide.
    layout = image_grid.contact_sheet([[None] * 3] * 2, ["guide", "mask", "t0=0.5"], ["a", "b"])
    assert Image.open(workdir / summary["contact_sheet"]).size == layout.size
