"""NCSN++ port against diffusers' ``UNet2DModel`` (PyTorch) and score_sde's checkpoint layout.

The reference network has the block structure of google/ncsnpp-church-256 (seven
levels, Skip blocks, attention at the 1/16 level, two res blocks per level) with
narrower channels and 64 px inputs for CPU time. Every weight is randomised, saved
with diffusers' own ``save_pretrained`` and read back from the files.
"""

import collections
import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization

from sdedit_jax.importers import diffusers_ncsnpp, score_sde
from sdedit_jax.models import fir, ncsnpp

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

# The network of google/ncsnpp-church-256's config.json (score_sde's church run:
# nf=128, ch_mult=(1,1,2,2,2,2,2), attention at 16 px; input centred as data.centered=False).
CHURCH_256 = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 256, 256, 256],
    "center_input_sample": True,
    "down_block_types": ["SkipDownBlock2D"] * 4 + ["AttnSkipDownBlock2D"] + ["SkipDownBlock2D"] * 2,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1.41421356237,
    "norm_eps": 1e-06,
    "norm_num_groups": None,
    "out_channels": 3,
    "sample_size": 256,
    "time_embedding_type": "fourier",
    "up_block_types": ["SkipUpBlock2D"] * 2 + ["AttnSkipUpBlock2D"] + ["SkipUpBlock2D"] * 4,
}
# The same structure, narrower and at 64 px (attention then sits at 4x4).
CHURCH_SMALL = {
    **CHURCH_256,
    "sample_size": 64,
    "block_out_channels": [32, 32, 64, 64, 128, 128, 128],
}
SMALL_SCORE_SDE = {
    "model": {
        **score_sde.PRESETS["church"]["model"],
        "nf": 32,
        "ch_mult": [1, 1, 2, 2, 4, 4, 4],
        "attn_resolutions": [4],
    },
    "data": {"image_size": 64, "num_channels": 3, "centered": False},
}
# Two levels, the narrowest widths diffusers' Skip blocks size their GroupNorms alike for.
TINY = {
    **CHURCH_256,
    "sample_size": 16,
    "block_out_channels": [32, 128],
    "layers_per_block": 1,
    "down_block_types": ["SkipDownBlock2D", "AttnSkipDownBlock2D"],
    "up_block_types": ["AttnSkipUpBlock2D", "SkipUpBlock2D"],
}


def _randomised(config: dict, seed: int) -> "diffusers.UNet2DModel":
    """A diffusers model with every parameter drawn at random (norm scales around 1)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name == "time_proj.weight":
                p.copy_(16.0 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model


def _numpy_state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _score_sde_tree(sd: dict[str, np.ndarray], config: dict, old_norm: bool) -> dict:
    """score_sde's ``params_ema`` tree from a diffusers state dict, independently of the
    importer: modules in score_sde's creation order (the order diffusers' conversion
    script reads them), named as flax linen names them (``<Class>_<count>``)."""
    tree, counts = {}, collections.Counter()

    def name(cls):
        counts[cls] += 1
        return f"{cls}_{counts[cls] - 1}"

    def conv(p):
        return {"kernel": sd[f"{p}.weight"].transpose(2, 3, 1, 0), "bias": sd[f"{p}.bias"]}

    def dense(p):
        return {"kernel": sd[f"{p}.weight"].T, "bias": sd[f"{p}.bias"]}

    def norm(p):
        shape = (1, 1, 1, -1) if old_norm else (-1,)
        return {"scale": sd[f"{p}.weight"].reshape(shape), "bias": sd[f"{p}.bias"].reshape(shape)}

    def resnet(p):
        block = {
            "GroupNorm_0": norm(f"{p}.norm1"),
            "Conv_0": conv(f"{p}.conv1"),
            "Dense_0": dense(f"{p}.time_emb_proj"),
            "GroupNorm_1": norm(f"{p}.norm2"),
            "Conv_1": conv(f"{p}.conv2"),
        }
        if f"{p}.conv_shortcut.weight" in sd:
            block["Conv_2"] = conv(f"{p}.conv_shortcut")
        tree[name("ResnetBlockBigGANpp")] = block

    def attn(p):
        block = {"GroupNorm_0": norm(f"{p}.group_norm")}
        for i, s in enumerate(("to_q", "to_k", "to_v", "to_out.0")):
            block[f"NIN_{i}"] = {"W": sd[f"{p}.{s}.weight"].T, "b": sd[f"{p}.{s}.bias"]}
        tree[name("AttnBlockpp")] = block

    tree[name("GaussianFourierProjection")] = {"W": sd["time_proj.weight"]}
    tree[name("Dense")] = dense("time_embedding.linear_1")
    tree[name("Dense")] = dense("time_embedding.linear_2")
    tree[name("Conv")] = conv("conv_in")
    layers = config["layers_per_block"]
    for i, block in enumerate(config["down_block_types"]):
        for j in range(layers):
            resnet(f"down_blocks.{i}.resnets.{j}")
            if block.startswith("Attn"):
                attn(f"down_blocks.{i}.attentions.{j}")
        if f"down_blocks.{i}.skip_conv.weight" in sd:
            resnet(f"down_blocks.{i}.resnet_down")
            tree[name("Combine")] = {"Conv_0": conv(f"down_blocks.{i}.skip_conv")}
    resnet("mid_block.resnets.0")
    attn("mid_block.attentions.0")
    resnet("mid_block.resnets.1")
    for i, block in enumerate(config["up_block_types"]):
        for j in range(layers + 1):
            resnet(f"up_blocks.{i}.resnets.{j}")
        if block.startswith("Attn"):
            attn(f"up_blocks.{i}.attentions.0")
        if f"up_blocks.{i}.skip_norm.weight" in sd:
            tree[name("GroupNorm")] = norm(f"up_blocks.{i}.skip_norm")
            tree[name("Conv")] = conv(f"up_blocks.{i}.skip_conv")
            resnet(f"up_blocks.{i}.resnet_up")
        else:
            tree[name("GroupNorm")] = norm("conv_norm_out")
            tree[name("Conv")] = conv("conv_out")
    return tree


def _write_score_sde_checkpoint(path, params: dict) -> None:
    """A score_sde ``State`` as flax's ``save_checkpoint`` writes it (msgpack)."""
    state = {
        "step": 48,
        "optimizer": {"target": params, "state": {"step": 48}},
        "lr": 2e-4,
        "model_state": {},
        "ema_rate": 0.999,
        "params_ema": params,
        "rng": np.array([0, 42], np.uint32),
    }
    path.write_bytes(serialization.msgpack_serialize(state))


@nnx.jit
def _forward(net, x, sigma):
    return net(x, sigma)


def _reference(model, x_nhwc: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)), torch.from_numpy(sigma))
    return out.sample.numpy().transpose(0, 2, 3, 1)


def _assert_close(got, ref, rel=1e-4):
    for b in range(ref.shape[0]):  # per example: the output scale is 1/sigma
        scale = np.abs(ref[b]).max()
        err = np.abs(np.asarray(got[b]) - ref[b]).max()
        assert err <= rel * scale, f"example {b}: max |diff| {err:.3g} vs scale {scale:.3g}"


def _net(config, state):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ncsnpp.build(config, 0)))
    return nnx.merge(graphdef, state)


def _inputs(seed, batch, size, sigmas):
    x = np.random.default_rng(seed).uniform(size=(batch, size, size, 3)).astype(np.float32)
    sigma = np.asarray(sigmas, np.float32)
    return x + sigma[:, None, None, None] * np.random.default_rng(seed + 1).normal(
        size=x.shape
    ).astype(np.float32), sigma


@pytest.fixture(scope="module")
def church(tmp_path_factory):
    """The small church-structured diffusers model, saved in both weight formats."""
    model = _randomised(CHURCH_SMALL, seed=0)
    folders = {}
    for fmt, safe in (("safetensors", True), ("bin", False)):
        folders[fmt] = tmp_path_factory.mktemp(fmt)
        model.save_pretrained(folders[fmt], safe_serialization=safe)
    return model, folders


def _read_folder(folder, fmt):
    config = json.loads((folder / "config.json").read_text())
    path = folder / f"diffusion_pytorch_model.{fmt}"
    if fmt == "safetensors":
        sd = safetensors_numpy.load_file(str(path))
    else:
        sd = {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    return config, sd


@pytest.mark.slow
def test_diffusers_parity_church_structure(church):
    model, folders = church
    config_st, sd_st = _read_folder(folders["safetensors"], "safetensors")
    config_bin, sd_bin = _read_folder(folders["bin"], "bin")
    cfg = diffusers_ncsnpp.config_from_diffusers(config_st)
    assert cfg == diffusers_ncsnpp.config_from_diffusers(config_bin)
    assert cfg.ch_mult == (1, 1, 2, 2, 4, 4, 4) and cfg.attn_resolutions == (4,)
    state_st = diffusers_ncsnpp.params_from_diffusers(sd_st, cfg)
    state_bin = diffusers_ncsnpp.params_from_diffusers(sd_bin, cfg)
    for a, b in zip(nnx.to_flat_state(state_st), nnx.to_flat_state(state_bin), strict=True):
        np.testing.assert_array_equal(a[1][...], b[1][...])
    net = _net(cfg, state_st)
    assert ncsnpp.count_params(net) == sum(p.numel() for p in model.parameters())
    x, sigma = _inputs(3, 4, 64, [0.01, 1.0, 7.5, 380.0])
    _assert_close(_forward(net, jnp.asarray(x), jnp.asarray(sigma)), _reference(model, x, sigma))


@pytest.mark.slow
def test_score_sde_checkpoint_loads_to_the_diffusers_network(church, tmp_path):
    """The same weights as a score_sde State (old GroupNorm shapes) give diffusers' outputs."""
    model, _ = church
    sd = _numpy_state_dict(model)
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    _write_score_sde_checkpoint(
        ckpt_dir / "checkpoint_48", _score_sde_tree(sd, CHURCH_SMALL, old_norm=True)
    )
    (tmp_path / "score_sde_config.json").write_text(json.dumps(SMALL_SCORE_SDE))
    imported = score_sde.load(str(ckpt_dir))  # newest checkpoint, config one folder up
    assert imported.config == diffusers_ncsnpp.config_from_diffusers(CHURCH_SMALL)
    assert imported.sde == {"name": "ve", "sigma_min": 0.01, "sigma_max": 380.0}
    assert (imported.condition, imported.parameterization, imported.data_range) == (
        "sigma",
        "score",
        "0_1",
    )
    net = _net(imported.config, imported.state)
    x, sigma = _inputs(5, 3, 64, [0.02, 3.0, 300.0])
    _assert_close(_forward(net, jnp.asarray(x), jnp.asarray(sigma)), _reference(model, x, sigma))


@pytest.mark.slow
def test_full_size_church_256_parity():
    """The real church-256 network (65.6M parameters) on a 256 px batch (about a minute)."""
    model = _randomised(CHURCH_256, seed=1)
    cfg = diffusers_ncsnpp.config_from_diffusers(CHURCH_256)
    net = _net(cfg, diffusers_ncsnpp.params_from_diffusers(_numpy_state_dict(model), cfg))
    assert ncsnpp.count_params(net) == sum(p.numel() for p in model.parameters()) == 65_574_549
    x, sigma = _inputs(11, 2, 256, [0.01, 380.0])
    _assert_close(_forward(net, jnp.asarray(x), jnp.asarray(sigma)), _reference(model, x, sigma))


@pytest.fixture(scope="module")
def tiny():
    model = _randomised(TINY, seed=3)
    return model, diffusers_ncsnpp.config_from_diffusers(TINY), _numpy_state_dict(model)


@pytest.mark.slow
def test_tiny_parity_and_old_attention_names(tiny):
    model, cfg, sd = tiny
    old = {
        k.replace("to_q", "query")
        .replace("to_k", "key")
        .replace("to_v", "value")
        .replace("to_out.0", "proj_attn"): v
        for k, v in sd.items()
    }
    assert old.keys() != sd.keys()
    for batch, sigmas in ((2, [0.05, 50.0]), (1, [3.0])):
        x, sigma = _inputs(7, batch, 16, sigmas)
        ref = _reference(model, x, sigma)
        for state_dict in (sd, old):
            net = _net(cfg, diffusers_ncsnpp.params_from_diffusers(state_dict, cfg))
            _assert_close(_forward(net, jnp.asarray(x), jnp.asarray(sigma)), ref)


@pytest.mark.slow
def test_bfloat16_compute_stays_close(tiny):
    _, cfg, sd = tiny
    x, sigma = _inputs(9, 2, 16, [0.1, 10.0])
    outs = {}
    for dtype in ("float32", "bfloat16"):
        c = dataclasses.replace(cfg, compute_dtype=dtype)
        outs[dtype] = np.asarray(
            _forward(
                _net(c, diffusers_ncsnpp.params_from_diffusers(sd, c)),
                jnp.asarray(x),
                jnp.asarray(sigma),
            )
        )
    assert outs["bfloat16"].dtype == np.float32
    for b in range(2):
        scale = np.abs(outs["float32"][b]).max()
        assert 0 < np.abs(outs["bfloat16"][b] - outs["float32"][b]).max() <= 0.05 * scale


def test_old_groupnorm_shapes_load_identically(tiny):
    _, cfg, sd = tiny
    states = [
        score_sde.params_from_score_sde(_score_sde_tree(sd, TINY, old_norm=old), cfg)
        for old in (False, True)
    ]
    from_diffusers = diffusers_ncsnpp.params_from_diffusers(sd, cfg)
    for s in states:
        for a, b in zip(nnx.to_flat_state(s), nnx.to_flat_state(from_diffusers), strict=True):
            assert a[0] == b[0]
            np.testing.assert_array_equal(a[1][...], b[1][...])


def test_diffusers_bad_keys_are_all_reported(tiny):
    _, cfg, sd = tiny
    bad = dict(sd)
    del bad["down_blocks.0.resnets.0.conv1.weight"]
    bad["mid_block.extra.weight"] = np.zeros(3, np.float32)
    bad["conv_out.weight"] = np.zeros((3, 32, 1, 1), np.float32)
    pattern = (
        r"1 missing: down_blocks\.0\.resnets\.0\.conv1\.weight \(32,32,3,3\); "
        r"1 unexpected: mid_block\.extra\.weight \(3\); "
        r"1 mis-shaped: conv_out\.weight expected \(3,32,3,3\) found \(3,32,1,1\)"
    )
    with pytest.raises(ValueError, match=pattern):
        diffusers_ncsnpp.params_from_diffusers(bad, cfg)


def test_score_sde_bad_keys_are_all_reported(tiny):
    _, cfg, sd = tiny
    tree = _score_sde_tree(sd, TINY, old_norm=False)
    del tree["AttnBlockpp_0"]["NIN_3"]
    tree["Conv_0"]["kernel"] = tree["Conv_0"]["kernel"][:, :, :, :8]
    tree["Extra_0"] = {"kernel": np.zeros(2)}
    pattern = (
        r"2 missing: AttnBlockpp_0/NIN_3/W \(128,128\), AttnBlockpp_0/NIN_3/b \(128\); "
        r"1 unexpected: Extra_0/kernel \(2\); "
        r"1 mis-shaped: Conv_0/kernel expected \(3,3,3,32\) found \(3,3,3,8\)"
    )
    with pytest.raises(ValueError, match=pattern):
        score_sde.params_from_score_sde(tree, cfg)


@pytest.mark.slow
def test_full_church_key_layout_matches_diffusers():
    """Every tensor of the real church-256 network maps, with its shape (no forward)."""
    with torch.device("meta"):
        model = diffusers.UNet2DModel(**CHURCH_256)
    sd_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cfg = diffusers_ncsnpp.config_from_diffusers(CHURCH_256)
    assert cfg == score_sde.config_from_score_sde(score_sde.PRESETS["church"])
    shapes = ncsnpp.abstract_params(cfg)
    mapping = diffusers_ncsnpp.key_map(cfg)
    assert mapping.keys() == sd_shapes.keys()
    assert sorted(dst for dst, _ in mapping.values()) == sorted(shapes)
    for key, (dst, kind) in mapping.items():
        assert diffusers_ncsnpp._source_shape(kind, shapes[dst]) == sd_shapes[key], key
    assert sum(math.prod(s) for s in shapes.values()) == sum(
        math.prod(s) for s in sd_shapes.values()
    )


def test_block_paths_own_every_weight_once():
    """The importers' one walk: every weight of the body lies in exactly one block."""
    config = ncsnpp.NCSNppConfig(
        image_size=32, nf=16, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(32, 8)
    )
    blocks = [path for _, path in ncsnpp.block_paths(config)]
    assert len(set(blocks)) == len(blocks)
    owners = collections.Counter()
    for key in ncsnpp.abstract_params(config):
        mine = [
            b for b in [*blocks, "fourier", "temb0", "temb1", "conv_in"] if key.startswith(b + "/")
        ]
        assert len(mine) == 1, (key, mine)
        owners[mine[0]] += 1
    assert set(blocks) <= set(owners)


@pytest.mark.parametrize("kernel", [(1, 3, 3, 1), (1, 2, 1), (2, 5, 1, 3)])
@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
@pytest.mark.slow
def test_fir_resampling_matches_diffusers(kernel, size):
    from diffusers.models.downsampling import downsample_2d
    from diffusers.models.upsampling import upsample_2d

    x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    for ours, theirs in ((fir.upsample_2d, upsample_2d), (fir.downsample_2d, downsample_2d)):
        ref = theirs(xt, kernel=kernel).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(ours(jnp.asarray(x), kernel), ref, atol=1e-6)


def test_config_round_trips_through_json():
    cfg = score_sde.config_from_score_sde(score_sde.PRESETS["celebahq_256"])
    assert ncsnpp.NCSNppConfig.from_config(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    with pytest.raises(ValueError, match="model.nf_typo: unknown field, got 3"):
        ncsnpp.NCSNppConfig.from_config({**dataclasses.asdict(cfg), "nf_typo": 3})
    with pytest.raises(ValueError, match=r"model\.compute_dtype='float16'"):
        dataclasses.replace(cfg, compute_dtype="float16")


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("resnet_time_scale_shift", "scale_shift", r"resnet_time_scale_shift='scale_shift'"),
        ("down_block_types", ["DownBlock2D"] * 7, r"down_block_types='DownBlock2D'"),
        ("mid_block_scale_factor", 1.0, r"mid_block_scale_factor=1\.0"),
        (
            "norm_num_groups",
            32,
            r"norm_num_groups=32 .*32 GroupNorm groups over 32 channels where NCSN\+\+ uses 8",
        ),
        (
            "block_out_channels",
            [32, 32, 64, 64, 64, 64, 64],
            r"block_out_channels=\[32, 32, 64, 64, 64, 64, 64\] "
            r".*64 channels where NCSN\+\+ uses 16",
        ),
        ("some_new_option", 1, r"some_new_option=1 .*unknown UNet2DModel field"),
    ],
)
def test_unsupported_diffusers_configs_name_field_and_value(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        diffusers_ncsnpp.config_from_diffusers({**CHURCH_SMALL, field: value})


@pytest.mark.parametrize(
    "field,value",
    [
        ("progressive", "residual"),
        ("resblock_type", "ddpm"),
        ("embedding_type", "positional"),
        ("fir", False),
        ("progressive_combine", "cat"),
    ],
)
def test_unsupported_score_sde_configs_name_field_and_value(field, value):
    cfg = score_sde.load_config("church")
    cfg["model"][field] = value
    with pytest.raises(ValueError, match=rf"model\.{field}={value!r}"):
        score_sde.config_from_score_sde(cfg)


def test_presets_record_the_published_sdes():
    sigma_max = {
        name: score_sde.sde_config(score_sde.load_config(name))["sigma_max"]
        for name in score_sde.PRESETS
    }
    assert sigma_max == {
        "church": 380.0,
        "bedroom": 378.0,
        "celebahq_256": 348.0,
        "ffhq_256": 348.0,
    }
    cfg = score_sde.config_from_score_sde(score_sde.load_config("church"))
    assert (cfg.center_input, cfg.data_range) == (True, (0.0, 1.0))  # data.centered=False


def test_not_a_checkpoint_or_truncated(tmp_path, tiny):
    _, _, sd = tiny
    junk = tmp_path / "checkpoint_1"
    junk.write_bytes(b"PK\x03\x04 not msgpack at all")
    with pytest.raises(ValueError, match=r"checkpoint_1: not a score_sde checkpoint"):
        score_sde.read_score_sde_checkpoint(str(junk))
    good = tmp_path / "checkpoint_2"
    _write_score_sde_checkpoint(good, _score_sde_tree(sd, TINY, old_norm=False))
    cut = tmp_path / "checkpoint_3"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"checkpoint_3: not a score_sde checkpoint"):
        score_sde.read_score_sde_checkpoint(str(cut))
    other = tmp_path / "checkpoint_4"
    other.write_bytes(serialization.msgpack_serialize({"params": {"w": np.zeros(2)}}))
    with pytest.raises(ValueError, match=r"no 'params_ema' among \['params'\]"):
        score_sde.read_score_sde_checkpoint(str(other))
    with pytest.raises(ValueError, match=r"the score_sde config is not in the checkpoint"):
        score_sde.load(str(good))


BASE_PY = """import ml_collections
import os

os.makedirs(os.path.join(os.environ["MARKER_DIR"], "executed"))


def get_default_configs():
  config = ml_collections.ConfigDict()
  config.data = data = ml_collections.ConfigDict()
  data.image_size = 256
  data.centered = False
  config.model = model = ml_collections.ConfigDict()
  model.sigma_min = 0.01
  model.sigma_max = 378
  model.dropout = 0.
  config.seed = 42
  return config
"""
RUN_PY = """from configs.default_lsun_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.sampling.snr = 0.075
  model = config.model
  model.sigma_max = 380
  {fields}
  return config
"""


def test_score_sde_py_config_is_read_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MARKER_DIR", str(tmp_path))
    (tmp_path / "configs" / "ve").mkdir(parents=True)
    (tmp_path / "configs" / "default_lsun_configs.py").write_text(BASE_PY)
    church = score_sde.PRESETS["church"]["model"]
    fields = "\n  ".join(
        f"model.{k} = {v!r}"
        for k, v in church.items()
        if k not in ("sigma_min", "sigma_max", "dropout")
    )
    run = tmp_path / "configs" / "ve" / "church_ncsnpp_continuous.py"
    run.write_text(RUN_PY.format(fields=fields))
    cfg = score_sde.load_config(str(run))
    assert not (tmp_path / "executed").exists()
    assert cfg["model"] == {**church, "sigma_max": 380, "dropout": 0.0}
    assert (cfg["data"], cfg["sampling"], cfg["seed"]) == (
        {"image_size": 256, "centered": False},
        {"snr": 0.075},
        42,
    )
    assert score_sde.sde_config(cfg)["sigma_max"] == 380
    assert score_sde.config_from_score_sde(cfg) == (
        score_sde.config_from_score_sde(score_sde.PRESETS["church"])
    )
    run.write_text(RUN_PY.format(fields="model.nf = int('128')"))
    with pytest.raises(ValueError, match=r"church_ncsnpp_continuous\.py:\d+: model\.nf is not"):
        score_sde.load_config(str(run))


def test_score_sde_json_config_and_bad_names(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(SMALL_SCORE_SDE))
    assert score_sde.load_config(str(path)) == SMALL_SCORE_SDE
    with pytest.raises(ValueError, match=r"'nowhere': neither a preset \['bedroom'"):
        score_sde.load_config("nowhere")
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"cfg\.json: not a JSON score_sde config"):
        score_sde.load_config(str(path))
