"""``python -m sdedit_jax.convert`` and the model folders it writes, as ``pretrained`` reads them.

Checks: the model_info.json schema, that a converted folder, the diffusers folder
and the ddim checkpoint give the same network and score function, the score
function against its closed form from the network (DDPM: ``-eps / sqrt(1 -
alpha_bar)`` at timestep ``t T - 1``), the [0, 1]-data convention against a
Gaussian's exact score, and the command's exit status and one-line errors.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import ddpm_reference as ref  # noqa: E402
import job_cli  # noqa: E402

from sdedit_jax import convert, importers, pretrained  # noqa: E402
from sdedit_jax.score import make_score_fn, sde_for_range  # noqa: E402
from sdedit_jax.sde import VESDE, DiscreteVPSDE  # noqa: E402
from sdedit_jax.util import files  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    **ref.church_config(channels=(32, 64), sample_size=16),
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = ref.diffusers_model(TINY, seed=21)
    root = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(root / "hub")
    torch.save(ref.ddim_state_dict(dict(model.state_dict()), 2), root / "tiny.ckpt")
    info = convert.convert(str(root / "hub"), str(root / "model"))
    return model, root, info


def test_model_info_schema(tiny):
    _, root, info = tiny
    weights = root / "hub" / "diffusion_pytorch_model.safetensors"
    assert info["architecture"] == "ddpm_unet"
    assert info["condition"] == "timestep"
    assert info["parameterization"] == "noise"
    assert info["data_range"] == "-1_1"
    assert info["sde"] == {
        "name": "discrete_vp",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "num_timesteps": 1000,
    }
    assert info["source"] == {
        "path": str(weights),
        "format": "diffusers",
        "sha256": files.sha256(str(weights)),
    }
    assert info["model"]["block_out_channels"] == [32, 64]
    assert info["sha256"]["ema_params_fp32.msgpack"] == files.sha256(
        str(root / "model" / "ema_params_fp32.msgpack")
    )


@pytest.mark.slow
def test_folder_checkpoint_and_converted_folder_are_one_network(tiny):
    model, root, _ = tiny
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3), np.float32)
    t = np.array([5.0, 640.0], np.float32)
    outs = [
        np.asarray(pretrained.load_network(str(p), image_size=16)(x, t))
        for p in (root / "hub", root / "tiny.ckpt", root / "model")
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    expected = ref.reference(model, x, t)
    assert np.abs(outs[0] - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.slow
def test_score_function_is_the_ddpm_noise_prediction_rescaled(tiny):
    _, root, _ = tiny
    loaded = pretrained.load_model(str(root / "model"))
    assert loaded.sde == DiscreteVPSDE() and loaded.image_size == 16
    assert loaded.architecture == "ddpm_unet" and loaded.num_channels == 3
    direct = pretrained.load_model(str(root / "hub"))
    assert direct.sde == loaded.sde
    net = pretrained.load_network(str(root / "model"))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    n = np.array([0, 731])
    t = jnp.asarray((n + 1) / 1000, jnp.float32)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[n]
    expected = -np.asarray(net(x, n.astype(np.float32))) / np.sqrt(1 - abar)[:, None, None, None]
    for m in (loaded, direct):
        np.testing.assert_allclose(
            np.asarray(jax.jit(m.score_fn)(x, t)),
            expected,
            rtol=1e-4,
            atol=1e-4 * np.abs(expected).max(),
        )


def test_scheduler_config_sets_the_schedule(tiny, tmp_path):
    _, root, _ = tiny
    hub = tmp_path / "hub"
    os.makedirs(hub)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (hub / name).write_bytes((root / "hub" / name).read_bytes())
    (hub / "scheduler_config.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMScheduler",
                "beta_start": 0.0002,
                "beta_end": 0.01,
                "beta_schedule": "linear",
                "num_train_timesteps": 500,
            }
        )
    )
    info = convert.convert(str(hub), str(tmp_path / "model"))
    assert info["sde"] == {
        "name": "discrete_vp",
        "beta_start": 0.0002,
        "beta_end": 0.01,
        "num_timesteps": 500,
    }
    (hub / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "squaredcos_cap_v2"}))
    with pytest.raises(ValueError, match="beta_schedule: 'squaredcos_cap_v2' is not supported"):
        convert.convert(str(hub), str(tmp_path / "model2"))
    assert not os.path.exists(tmp_path / "model2")


def test_bad_sde_is_refused_before_anything_is_written(tiny, tmp_path):
    _, root, _ = tiny
    with pytest.raises(ValueError, match="condition 'timestep'.*needs the discrete_vp SDE"):
        convert.convert(str(root / "hub"), str(tmp_path / "out"), sde={"name": "vp"})
    assert not os.path.exists(tmp_path / "out")


class _GaussianScore(nnx.Module):
    """Exact score of N(mu, s^2 I) data in [0, 1] under VE noise of std sigma."""

    def __init__(self, mu: float, s: float):
        self.mu, self.s2 = nnx.Param(jnp.asarray(mu)), nnx.Param(jnp.asarray(s * s))

    def __call__(self, x, sigma, cond=None, *, train=False):
        return -(x - self.mu[...]) / (self.s2[...] + sigma.reshape(-1, 1, 1, 1) ** 2)


def test_networks_on_0_1_data_are_used_in_minus1_1_units():
    mu, s = 0.6, 0.1
    net_sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    graphdef, state = nnx.split(_GaussianScore(mu, s))
    score_fn = make_score_fn(graphdef, state, net_sde, "score", "sigma", "0_1")
    sde = sde_for_range(net_sde, "0_1")
    assert sde == VESDE(sigma_min=0.02, sigma_max=100.0, eps=net_sde.eps)
    y = jax.random.uniform(jax.random.key(1), (3, 4, 4, 3), minval=-1, maxval=1)
    t = jnp.array([0.1, 0.5, 0.9])
    # In [-1, 1] units the data is N(2 mu - 1, (2 s)^2) and the noise std is sde's.
    var = (2 * s) ** 2 + sde.marginal_std(t)[:, None, None, None] ** 2
    expected = -(y - (2 * mu - 1)) / var
    np.testing.assert_allclose(
        np.asarray(score_fn(y, t)),
        np.asarray(expected),
        rtol=1e-5,
        atol=1e-6 * float(jnp.abs(expected).max()),
    )
    with pytest.raises(ValueError, match="data_range '0_1' needs a VE SDE"):
        sde_for_range(DiscreteVPSDE(), "0_1")


@pytest.mark.slow
def test_ncsnpp_diffusers_folder_through_load_model(tmp_path):
    """Dispatch to the NCSN++ port, and its [0, 1] data and sigma input seen from [-1, 1]."""
    pytest.importorskip("sdedit_jax.models.ncsnpp")
    from diffusers import UNet2DModel

    config = job_cli.TINY_NCSNPP_DIFFUSERS
    torch.manual_seed(0)
    model = UNet2DModel(**config).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01, "sigma_max": 380.0})
    )
    loaded = pretrained.load_model(str(tmp_path))
    assert loaded.architecture == "ncsnpp"
    assert loaded.sde == VESDE(sigma_min=0.02, sigma_max=760.0)
    y = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    t = np.array([0.2, 0.8], np.float32)
    sigma = 0.01 * (380.0 / 0.01) ** t  # the network's own sigma, in [0, 1] units
    with torch.no_grad():
        out = (
            model(torch.from_numpy(((y + 1) / 2).transpose(0, 3, 1, 2)), torch.from_numpy(sigma))
            .sample.numpy()
            .transpose(0, 2, 3, 1)
        )
    got = np.asarray(loaded.score_fn(jnp.asarray(y), jnp.asarray(t)))
    np.testing.assert_allclose(got, 0.5 * out, rtol=1e-3, atol=1e-4 * np.abs(out).max())


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sdedit_jax.convert", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_command_line(tiny, tmp_path):
    _, root, _ = tiny
    ok = _cli(
        "--source",
        str(root / "tiny.ckpt"),
        "--out",
        str(tmp_path / "m"),
        "--image_size",
        "16",
        "--format",
        "ddim",
    )
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["architecture"] == "ddpm_unet" and summary["source"]["format"] == "ddim"
    assert pretrained.load_model(str(tmp_path / "m")).image_size == 16

    (tmp_path / "notes.txt").write_text("hello")
    for args, message in [
        (("--source", str(tmp_path / "notes.txt")), "notes.txt: not a checkpoint"),
        (("--source", str(root / "tiny.ckpt"), "--sde", "{oops"), "--sde: not valid JSON"),
        (
            ("--source", str(root / "tiny.ckpt"), "--sde", '{"name": "cosine"}'),
            "--sde: sde.name: must be one of",
        ),
    ]:
        bad = _cli(*args, "--out", str(tmp_path / "never"))
        assert bad.returncode == 2
        assert "Traceback" not in bad.stderr
        lines = [line for line in bad.stderr.splitlines() if line.startswith("convert:")]
        assert len(lines) == 1 and message in lines[0], bad.stderr
        assert not os.path.exists(tmp_path / "never")
    again = _cli("--source", str(root / "tiny.ckpt"), "--out", str(tmp_path / "m"))
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "m: already exists; pass --overwrite to replace it" in again.stderr


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_converting_onto_a_folder_is_refused_or_replaces_it_whole(tiny, tmp_path):
    _, root, _ = tiny
    out = tmp_path / "m"
    convert.convert(str(root / "hub"), str(out), with_bf16=True)
    assert _listing(out) == [
        "ema_params_bf16.msgpack",
        "ema_params_fp32.msgpack",
        "model_info.json",
    ]
    with pytest.raises(FileExistsError, match="m: already exists"):
        convert.convert(str(root / "tiny.ckpt"), str(out), image_size=16)
    info = convert.convert(str(root / "tiny.ckpt"), str(out), image_size=16, overwrite=True)
    assert info["source"]["format"] == "ddim"
    # No bf16 weights of the previous model remain to be loaded; no temporaries beside it.
    assert _listing(out) == ["ema_params_fp32.msgpack", "model_info.json"]
    assert _listing(tmp_path) == ["m"]
    assert pretrained.load_model(str(out)).checksum == info["sha256"]["ema_params_fp32.msgpack"]


def test_of_two_converts_into_one_new_folder_the_one_finishing_second_fails(tiny, tmp_path):
    _, root, _ = tiny
    out = str(tmp_path / "m")
    with pytest.raises(FileExistsError, match="another publication finished first"):
        with files.publish_folder(out) as slow:  # a convert that started first ...
            convert.convert(str(root / "tiny.ckpt"), out, image_size=16)  # ... one that ended first
            pretrained.save_imported(slow, importers.load(str(root / "hub")))
    info = json.load(open(os.path.join(out, pretrained.INFO_FILE)))
    assert info["source"]["format"] == "ddim"  # the folder is all of the one that succeeded
    assert info["sha256"]["ema_params_fp32.msgpack"] == pretrained.load_model(out).checksum
    assert _listing(tmp_path) == ["m"]


# Kills the convert at its first fsync: the full-size weights are written, not yet renamed.
_KILLED_CONVERT = (
    "import os, signal, sys\n"
    "from sdedit_jax import convert\n"
    "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
    "convert.convert(sys.argv[1], sys.argv[2])\n"
)


@pytest.mark.slow
def test_the_next_convert_removes_what_a_killed_one_left(tiny, tmp_path):
    _, root, _ = tiny
    out = tmp_path / "m"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_CONVERT, str(root / "hub"), str(out)],
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    (left,) = os.listdir(tmp_path)
    assert left.startswith(".m" + files.TEMP_MARKER) and not out.exists()
    weights = [e for e in os.scandir(tmp_path / left) if "ema_params_fp32" in e.name]
    expected = os.path.getsize(root / "model" / "ema_params_fp32.msgpack")
    assert [e.stat().st_size for e in weights] == [expected]  # a full-size temporary
    convert.convert(str(root / "hub"), str(out))
    assert _listing(tmp_path) == ["m"]
