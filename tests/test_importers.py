"""Importers: diffusers folders and ddim/SDEdit torch checkpoints, good and bad.

One random diffusers UNet2DModel with the church-256 block structure is the
truth. Its weights, written by diffusers (safetensors, .bin), renamed to ddim's
layout by the test's own renaming (tests/ddpm_reference.py) and written by
``torch.save`` in every container ddim/SDEdit use, must all import to exactly
the same weights; one of them is run against the torch model.
"""

import os
import pickle

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import ddpm_reference as ref  # noqa: E402

from sdedit_jax import importers, pretrained  # noqa: E402
from sdedit_jax.importers import state_dict  # noqa: E402
from sdedit_jax.importers.torch_checkpoint import CheckpointError  # noqa: E402

LEVELS = 6


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """The torch model, its folders (safetensors and .bin) and its imported weights."""
    model = ref.diffusers_model(ref.church_config(), seed=11)
    root = tmp_path_factory.mktemp("truth")
    model.save_pretrained(root / "safetensors")
    model.save_pretrained(root / "bin", safe_serialization=False)
    imported = importers.load(str(root / "safetensors"))
    return model, root, imported


def _same_state(a, b) -> bool:
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    return [p for p, _ in la] == [p for p, _ in lb] and all(
        np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb, strict=True)
    )


def _ddim_tensors(model):
    return ref.ddim_state_dict(dict(model.state_dict()), LEVELS)


def test_bin_folder_imports_the_same_weights(truth):
    model, root, imported = truth
    from_bin = importers.load(str(root / "bin"))
    assert os.path.exists(root / "bin" / "diffusion_pytorch_model.bin")
    assert _same_state(from_bin.state, imported.state)
    assert (
        from_bin.architecture,
        from_bin.condition,
        from_bin.parameterization,
        from_bin.data_range,
    ) == ("ddpm_unet", "timestep", "noise", "-1_1")
    assert from_bin.sde == {
        "name": "discrete_vp",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "num_timesteps": 1000,
    }


def test_old_attention_key_spelling(truth, tmp_path):
    model, root, imported = truth
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in safetensors_numpy.load_file(
        root / "safetensors" / "diffusion_pytorch_model.safetensors"
    ).items():
        for new, old in old_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        tensors[key] = value
    assert any(".proj_attn." in k for k in tensors)
    safetensors_numpy.save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((root / "safetensors" / "config.json").read_text())
    assert _same_state(importers.load(str(tmp_path)).state, imported.state)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    "container", ["plain", "module_prefix", "training_list", "training_list_without_ema"]
)
@pytest.mark.slow
def test_ddim_checkpoints_import_the_same_weights(truth, tmp_path, container, legacy):
    model, _, imported = truth
    weights = _ddim_tensors(model)
    prefixed = {f"module.{k}": v for k, v in weights.items()}
    if container == "plain":
        obj = weights
    elif container == "module_prefix":
        obj = prefixed
    else:
        # ddim's runner saves [model.state_dict(), optimizer.state_dict(), epoch, step,
        # ema_helper.state_dict()] with the model wrapped in DataParallel.
        other = ref.diffusers_model(ref.church_config(), seed=12)
        optimizer = torch.optim.Adam(other.parameters(), lr=1e-4)
        other(torch.zeros(1, 3, 32, 32), torch.tensor([1])).sample.sum().backward()
        optimizer.step()
        if container == "training_list":
            raw = {f"module.{k}": v for k, v in _ddim_tensors(other).items()}
            obj = [raw, optimizer.state_dict(), 3, 1000, weights]
        else:
            obj = [prefixed, optimizer.state_dict(), 3, 1000]
    path = tmp_path / "model.ckpt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert importers.detect_format(str(path)) == "ddim"
    got = importers.load(str(path), image_size=32)
    assert got.config == imported.config
    assert _same_state(got.state, imported.state)
    entry = "ema_shadow" if container == "training_list" else "state_dict"
    assert got.source["entry"] == entry and got.source["format"] == "ddim"


@pytest.mark.slow
def test_ddim_checkpoint_runs_like_the_torch_model(truth, tmp_path):
    model, _, _ = truth
    path = tmp_path / "church_outdoor.ckpt"
    torch.save(_ddim_tensors(model), path)
    net = pretrained.load_network(str(path), image_size=32)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3), np.float32)
    t = np.array([12.0, 873.5], np.float32)
    expected = ref.reference(model, x, t)
    assert np.abs(np.asarray(net(x, t)) - expected).max() <= 1e-4 * np.abs(expected).max()


def test_ddim_image_size_only_sets_the_recorded_size(truth, tmp_path):
    model, _, _ = truth
    path = tmp_path / "m.pth"
    torch.save(_ddim_tensors(model), path)
    assert importers.load(str(path)).config.image_size == 256  # SDEdit's default
    assert importers.load(str(path), image_size=64).config.image_size == 64


# --- bad input --------------------------------------------------------------------------


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("these are not weights\n")
    with pytest.raises(importers.UnknownFormat, match="notes.ckpt: not a checkpoint"):
        importers.load(str(path))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        importers.load(str(tmp_path / "missing.ckpt"))
    with pytest.raises(importers.UnknownFormat, match="folder has no model_info.json"):
        importers.load(str(tmp_path))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_torch_file(truth, tmp_path, legacy):
    model, _, _ = truth
    path = tmp_path / "m.ckpt"
    torch.save(_ddim_tensors(model), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.ckpt: .*(truncated|corrupt)"):
        importers.load(str(path))


def test_truncated_safetensors(truth, tmp_path):
    _, root, _ = truth
    src = root / "safetensors"
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    data = (src / "diffusion_pytorch_model.safetensors").read_bytes()
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        importers.load(str(tmp_path))


def test_folder_without_weights(truth, tmp_path):
    _, root, _ = truth
    (tmp_path / "config.json").write_text((root / "safetensors" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="none of the weight files"):
        importers.load(str(tmp_path))


def _damage(tensors: dict, key_missing: str, key_reshaped: str, zeros) -> dict:
    damaged = {k: v for k, v in tensors.items() if k != key_missing}
    damaged[key_reshaped] = damaged[key_reshaped][:, :16]
    damaged["extra.weight"] = zeros((2, 3))
    return damaged


def test_mismatched_tensors_in_a_diffusers_folder_are_all_reported(truth, tmp_path):
    _, root, _ = truth
    src = root / "safetensors"
    tensors = safetensors_numpy.load_file(src / "diffusion_pytorch_model.safetensors")
    damaged = _damage(
        tensors,
        "mid_block.attentions.0.to_k.bias",
        "up_blocks.0.resnets.2.conv1.weight",
        lambda s: np.zeros(s, np.float32),
    )
    safetensors_numpy.save_file(damaged, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(state_dict.StateDictError, match="tensors do not match the network") as err:
        importers.load(str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert "1 missing: mid_block.attentions.0.to_k.bias (64)" in message
    assert "1 unexpected: extra.weight (2,3)" in message
    assert (
        "1 mis-shaped: up_blocks.0.resnets.2.conv1.weight expected (64,128,3,3) found (64,16,3,3)"
    ) in message


def test_mismatched_tensors_in_a_ddim_checkpoint_are_all_reported(truth, tmp_path):
    model, _, _ = truth
    damaged = _damage(
        _ddim_tensors(model), "mid.attn_1.k.bias", "up.5.block.2.conv1.weight", torch.zeros
    )
    path = tmp_path / "bad.ckpt"
    torch.save(damaged, path)
    with pytest.raises(
        state_dict.StateDictError,
        match=r"bad\.ckpt: tensors do not match the network: 1 missing: "
        r"mid_block\.attentions\.0\.to_k\.bias \(64\); 1 unexpected: "
        r"extra\.weight \(2,3\); 1 mis-shaped: up_blocks\.0\.resnets\.2\."
        r"conv1\.weight expected \(64,128,3,3\) found \(64,16,3,3\)",
    ):
        importers.load(str(path))


def test_unsupported_config_in_a_folder_names_file_field_and_value(truth, tmp_path):
    _, root, _ = truth
    config = (root / "safetensors" / "config.json").read_text()
    (tmp_path / "config.json").write_text(
        config.replace('"AttnDownBlock2D"', '"CrossAttnDownBlock2D"')
    )
    with pytest.raises(
        ValueError,
        match=r"config\.json: down_block_types: block type "
        r"'CrossAttnDownBlock2D' is not supported",
    ):
        importers.load(str(tmp_path))


class _Hostile:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_never_run(tmp_path):
    path = tmp_path / "hostile.ckpt"
    torch.save({"conv_in.weight": torch.zeros(1), "payload": _Hostile()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load global '(posix|os)\.system'"):
        importers.load(str(path))


def test_a_list_that_is_not_ddims(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=r"a list that is not ddim's \[state_dict, \.\.\.\]"):
        importers.load(str(path))
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(importers.UnknownFormat, match="not a checkpoint"):
        importers.load(str(path))


def test_a_diffusers_weight_file_alone_points_to_its_folder(truth):
    _, root, _ = truth
    with pytest.raises(CheckpointError, match="holds diffusers' key names; convert the diffusers"):
        importers.load(str(root / "bin" / "diffusion_pytorch_model.bin"))


def test_format_override_and_unknown_format(truth, tmp_path):
    _, root, _ = truth
    with pytest.raises(importers.UnknownFormat, match="format: must be one of"):
        importers.load(str(root / "safetensors"), format="onnx")
    assert importers.detect_format(str(root / "safetensors")) == "diffusers"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_checkpoints_on_object_storage_import_like_local_ones(truth, tmp_path, legacy):
    """A diffusers folder and a ddim .ckpt read from ram:// give the local weights."""
    import uuid

    import tensorflow as tf

    model, root, imported = truth
    remote = f"ram://importers-{uuid.uuid4().hex}"
    ckpt = tmp_path / "model.ckpt"
    torch.save(_ddim_tensors(model), ckpt, _use_new_zipfile_serialization=not legacy)
    tf.io.gfile.makedirs(f"{remote}/unet")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        tf.io.gfile.copy(str(root / "safetensors" / name), f"{remote}/unet/{name}")
    tf.io.gfile.copy(str(ckpt), f"{remote}/model.ckpt")

    from_folder = importers.load(f"{remote}/unet")
    from_ckpt = importers.load(f"{remote}/model.ckpt", image_size=32)
    assert _same_state(from_folder.state, imported.state)
    assert _same_state(from_ckpt.state, imported.state)
    assert importers.detect_format(f"{remote}/model.ckpt") == "ddim"
    assert from_ckpt.source["sha256"] == importers.load(str(ckpt), image_size=32).source["sha256"]
