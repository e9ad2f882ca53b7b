"""The default job config on converted model folders, through ``python -m sdedit_jax.main``.

A converted diffusers DDPM (``DiscreteVPSDE``, noise-free at t = 0) and a converted
NCSN++ (``VESDE``) folder, both tiny with random weights, run the default sampler
(SDE-DPM-Solver++(2M) on the log-SNR grid) with only the inputs and step counts made
small: every row is written, with finite, non-constant outputs.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import ddpm_reference as ref  # noqa: E402
import job_cli  # noqa: E402

from sdedit_jax import convert  # noqa: E402


def _ddpm_hub(path):
    config = {
        **ref.church_config(channels=(32, 64), sample_size=job_cli.SIZE),
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    }
    ref.diffusers_model(config, seed=3).save_pretrained(path)
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(path)


def _ncsnpp_hub(path):
    torch.manual_seed(0)
    diffusers.UNet2DModel(**job_cli.TINY_NCSNPP_DIFFUSERS).eval().save_pretrained(path)
    diffusers.ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0).save_pretrained(path)


@pytest.mark.parametrize("make_hub,sde_name", [(_ddpm_hub, "discrete_vp"), (_ncsnpp_hub, "ve")])
@pytest.mark.slow
def test_default_config_edits_every_row_of_a_converted_model(tmp_path, make_hub, sde_name):
    make_hub(str(tmp_path / "hub"))
    info = convert.convert(str(tmp_path / "hub"), str(tmp_path / "model"))
    assert info["sde"]["name"] == sde_name
    guides = tmp_path / "guides"
    for i in range(3):
        job_cli.save_png(str(guides / f"g{i}.png"), job_cli.random_guide(i))
    workdir = str(tmp_path / "work")
    cmd = job_cli.command(
        str(tmp_path / "model"),
        str(guides),
        workdir,
        "--config.output.npz=per_example",
        "--config.input.folder.mask_dir=",
        t0s="(0.5,)",
    )
    proc = job_cli.run(cmd, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["complete"] and summary["failures"] == 0, summary
    sub = os.path.join(workdir, "t0_0.50")
    rows = job_cli.rows(os.path.join(sub, "manifest.jsonl"))
    assert sorted(rows) == [f"g{i}.png" for i in range(3)]
    assert {r["nfe"] for r in rows.values()} == {5}  # ceil(10 * 0.5) steps, one call each
    for name in sorted(os.listdir(os.path.join(sub, "arrays"))):
        with np.load(os.path.join(sub, "arrays", name)) as arrays:
            image = arrays[arrays.files[0]]
        assert np.all(np.isfinite(image)) and np.ptp(image) > 0.05, (name, np.ptp(image))
