"""Model folders, importer files and workdir fingerprints that are wrong, hostile or stale.

Principles under test: a workdir holds the outputs of one network (its whole
description is fingerprinted; older workdirs still resume); a file the loaders
read is bounded before it is read (FIFOs, devices, zip bombs, stride-0 tensors,
false size fields, deep JSON are refused in one line, fast, with bounded memory);
every bad value is one ``ValueError`` naming the file and the field, the same
from ``load_model`` and ``load_network``, and exit 2 through the command line.
"""

import collections
import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import sys
import time
import tracemalloc
import types
import zipfile

import ddpm_reference as ref
import jax
import numpy as np
import pytest

from sdedit_jax import importers, pretrained
from sdedit_jax.importers import torch_pickle
from sdedit_jax.jobs import checks, fingerprint
from sdedit_jax.jobs import run as job
from sdedit_jax.util import files
from sdedit_jax.util.config import load_config
from tests import job_cli

SIZE = job_cli.SIZE
CONFIG_FILE = os.path.join(job_cli.REPO, "configs", "default.py")
TINY_DDPM = {
    **ref.church_config(channels=(32, 64), sample_size=16),
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
# The fields of a fingerprint written by the release before fingerprint versions.
VERSION_1_FIELDS = {
    "model_sha256",
    "sde",
    "sampler",
    "step_rule",
    "repeats",
    "seed_rule",
    "t0s",
    "t0_rule",
    "image_size",
    "channels",
    "guides",
    "output",
}


@contextlib.contextmanager
def deadline(seconds: int):
    """Fails (instead of hanging) when the body blocks longer than ``seconds``."""

    def expired(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _one_line_naming(err: BaseException, *parts: str) -> str:
    text = str(err)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, (part, text)
    return text


# --- the workdir fingerprint --------------------------------------------------------------


def _config(model_dir: str, guides: str, **changes):
    config = load_config(CONFIG_FILE)
    config.model_dir = model_dir
    config.input.path = guides
    config.input.image_size = (SIZE, SIZE)
    config.t0s = (0.4,)
    config.sampler.steps_per_unit_time = 10
    config.per_device_batch = 1
    config.output.writer_threads = 1
    config.contact_sheet = False
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _edit_info(model_dir: str, edit) -> None:
    path = os.path.join(model_dir, pretrained.INFO_FILE)
    info = json.load(open(path))
    edit(info)
    with open(path, "w") as f:
        json.dump(info, f)


@pytest.mark.slow
def test_the_whole_model_is_fingerprinted_and_older_workdirs_resume(tiny_model_dir, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, model)
    guides = str(tmp_path / "guides")
    for i in range(2):
        job_cli.save_png(os.path.join(guides, f"g{i}.png"), job_cli.random_guide(i))
    workdir = str(tmp_path / "work")
    assert job.run_job(_config(model, guides), workdir)["edited"] == 2
    path = os.path.join(workdir, fingerprint.FILE)
    recorded = json.load(open(path))
    assert recorded["version"] == fingerprint.VERSION == 2
    # Defaults filled in: model_info.json says only {"name": "vp"}.
    assert recorded["model"]["sde"] == {
        "name": "vp",
        "beta_min": 0.1,
        "beta_max": 20.0,
        "eps": 1e-3,
    }
    assert recorded["model"]["config"] == json.loads(json.dumps(job_cli.TINY_MODEL))

    # The same network spelt with its defaults resumes.
    _edit_info(model, lambda i: i["sde"].update(beta_min=0.1, beta_max=20.0))
    assert job.run_job(_config(model, guides), workdir)["this_run"]["sub_jobs"][0]["edited"] == 0

    # The same weights as another network are refused, naming the field.
    for edit, field in [
        (lambda i: i.update(parameterization="score"), 'model.parameterization "noise" -> "score"'),
        (
            lambda i: i["model"].update(skip_rescale=False),
            "model.config.skip_rescale true -> false",
        ),
        (lambda i: i["sde"].update(beta_max=10.0), "model.sde.beta_max 20.0 -> 10.0"),
    ]:
        original = open(os.path.join(model, pretrained.INFO_FILE)).read()
        _edit_info(model, edit)
        with pytest.raises(job.ConfigError, match="another configuration") as err:
            job.run_job(_config(model, guides), workdir)
        _one_line_naming(err.value, field)
        with open(os.path.join(model, pretrained.INFO_FILE), "w") as f:
            f.write(original)

    # A fingerprint as the release before versions wrote it resumes and is upgraded ...
    old = {k: v for k, v in recorded.items() if k not in ("version", "model")}
    assert set(old) == VERSION_1_FIELDS
    with open(path, "w") as f:
        json.dump(old, f)
    assert job.run_job(_config(model, guides), workdir)["this_run"]["sub_jobs"][0]["edited"] == 0
    assert json.load(open(path)) == recorded
    # ... while a version-1 fingerprint of another configuration is refused on its own fields.
    with open(path, "w") as f:
        json.dump(old, f)
    with pytest.raises(job.ConfigError, match=r"seed_rule\.seed 0 -> 5\)") as err:
        job.run_job(_config(model, guides, seed=5), workdir)
    assert "model." not in str(err.value)


def _workdir(tmp_path, manifest_rows: int) -> str:
    """A workdir recorded for seed 0 holding one failure and ``manifest_rows`` outputs."""
    workdir = tmp_path / "work"
    sub = workdir / "t0_0.40"
    fingerprint.check_or_record(str(workdir), _print(0))
    sub.mkdir(parents=True)
    (sub / "failures.jsonl").write_text(json.dumps({"id": "a.png", "reason": "bad"}) + "\n")
    rows = [
        json.dumps({"id": f"{i}.png", "output": f"images/{i}.png"}) for i in range(manifest_rows)
    ]
    (sub / "manifest.jsonl").write_text("".join(r + "\n" for r in rows))
    return str(workdir)


def _print(seed: int) -> dict:
    return {"version": fingerprint.VERSION, "seed_rule": {"seed": seed}, "model": None}


def test_a_workdir_of_failures_only_takes_a_corrected_run(tmp_path):
    workdir = _workdir(tmp_path, manifest_rows=0)
    fingerprint.check_or_record(workdir, _print(0))  # the same configuration keeps its failures
    fingerprint.check_or_record(workdir, _print(1), record=False)  # other processes: no change
    assert os.path.exists(os.path.join(workdir, "t0_0.40", "failures.jsonl"))
    fingerprint.check_or_record(workdir, _print(1))
    assert json.load(open(os.path.join(workdir, fingerprint.FILE)))["seed_rule"]["seed"] == 1
    assert not os.path.exists(os.path.join(workdir, "t0_0.40"))  # the old failures are gone

    with_outputs = _workdir(tmp_path / "b", manifest_rows=1)
    with pytest.raises(fingerprint.FingerprintMismatch, match=r"seed_rule\.seed 0 -> 1"):
        fingerprint.check_or_record(with_outputs, _print(1))


def test_an_unreadable_fingerprint_is_one_line_and_overwrite_starts_over(tmp_path):
    workdir = _workdir(tmp_path, manifest_rows=1)
    path = os.path.join(workdir, fingerprint.FILE)
    text = open(path).read()
    for bad, what in [(text[: len(text) // 2], "truncated"), ("null", "expected a JSON object")]:
        with open(path, "w") as f:
            f.write(bad)
        with pytest.raises(ValueError) as err:
            fingerprint.check_or_record(workdir, _print(0))
        _one_line_naming(err.value, fingerprint.FILE, what, "--config.overwrite=True")
    fingerprint.check_or_record(workdir, _print(0), overwrite=True)
    assert json.load(open(path)) == _print(0)
    assert not os.path.exists(os.path.join(workdir, "t0_0.40"))


# --- files that could block or never end ----------------------------------------------------


def _ddpm_folder(path, config=None, scheduler=None) -> str:
    """A diffusers folder of the tiny DDPM U-Net (no weights: each case fails before them)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config if isinstance(config, str) else json.dumps({**TINY_DDPM, **(config or {})}))
    if scheduler is not None:
        with open(os.path.join(path, "scheduler_config.json"), "w") as f:
            json.dump(scheduler, f)
    return str(path)


def _special(path: str, kind: str) -> None:
    if os.path.lexists(path):
        os.remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
@pytest.mark.parametrize("name", ["model_info.json", "ema_params_fp32.msgpack", "config.json"])
def test_fifos_and_devices_are_refused_without_blocking(tiny_model_dir, tmp_path, kind, name):
    if name == "config.json":
        folder = _ddpm_folder(tmp_path / "hub")
    else:
        folder = str(tmp_path / "model")
        shutil.copytree(tiny_model_dir, folder)
    _special(os.path.join(folder, name), kind)
    for load in (pretrained.load_model, pretrained.load_network):
        with deadline(10), pytest.raises(files.NotRegularFile) as err:
            load(folder)
        _one_line_naming(err.value, name, "not a regular file")


def test_weights_that_are_a_fifo_are_refused_after_a_good_config(tmp_path):
    folder = _ddpm_folder(tmp_path / "hub")
    _special(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "fifo")
    with deadline(10), pytest.raises(files.NotRegularFile, match="is a FIFO"):
        importers.load(folder)


@pytest.mark.parametrize("depth", [500, 100_000])
def test_deeply_nested_json_is_refused_quickly(tmp_path, depth):
    nested = "[" * depth + "]" * depth
    folder = _ddpm_folder(tmp_path / "hub", config=f'{{"block_out_channels": {nested}}}')
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        pretrained.load_model(folder)
    assert time.perf_counter() - start < 2
    _one_line_naming(err.value, "config.json", f"nested {depth + 1} levels deep", "at most 32")


# --- torch files whose headers promise more than the file holds ------------------------------


class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage, shape, strides):
        self.args = (storage, 0, shape, strides)

    def __reduce__(self):
        return _rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


def _rebuild_tensor_v2(*args):
    raise AssertionError("only pickled, never called")


_rebuild_tensor_v2.__module__ = "torch._utils"
_rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"


@pytest.fixture
def fake_torch(monkeypatch):
    """Stand-in torch modules, so that pickle can name torch's globals without torch."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    torch.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def _pickle(obj, torch, legacy: bool) -> bytes:
    class Pickler(pickle.Pickler):
        def persistent_id(self, value):
            if isinstance(value, _Storage):
                pid = ("storage", torch.FloatStorage, value.key, "cpu", value.numel)
                return pid + (None,) if legacy else pid
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _zip_checkpoint(path, obj, torch, data: dict[str, bytes], deflate=False) -> str:
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        archive.writestr("m/data.pkl", _pickle(obj, torch, legacy=False))
        archive.writestr("m/byteorder", "little")
        for key, raw in data.items():
            archive.writestr(f"m/data/{key}", raw)
    return str(path)


def _legacy_checkpoint(path, obj, torch, numel_field: int, payload: bytes) -> str:
    with open(path, "wb") as f:
        for header in (torch_pickle.LEGACY_MAGIC, torch_pickle.LEGACY_PROTOCOL):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True}, f, protocol=2)
        f.write(_pickle(obj, torch, legacy=True))
        pickle.dump(["0"], f, protocol=2)
        f.write(np.int64(numel_field).tobytes() + payload)
    return str(path)


def _refused_fast(path: str, *parts: str) -> None:
    """One line naming the file, in < 2 s, allocating < 8 MB (whatever the header promises)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(torch_pickle.CheckpointError) as err:
            importers.load(path, format="ddim")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2 and peak < 8 << 20, (time.perf_counter() - start, peak)
    _one_line_naming(err.value, os.path.basename(path), *parts)


def test_a_zip_storage_that_inflates_beyond_the_file_is_refused_before_reading(
    tmp_path, fake_torch
):
    n = 16 << 20  # 64 MB of float32 zeros, deflated to ~64 kB
    obj = {"w": _Tensor(_Storage("0", n), (n,), (1,))}
    path = _zip_checkpoint(
        tmp_path / "bomb.ckpt", obj, fake_torch, {"0": bytes(4 * n)}, deflate=True
    )
    assert os.path.getsize(path) < 1 << 20
    _refused_fast(path, f"storages need {4 * n} bytes, more than the file's")


def test_a_false_zip_entry_size_is_refused(tmp_path, fake_torch):
    obj = {"w": _Tensor(_Storage("0", 4), (4,), (1,))}
    path = _zip_checkpoint(tmp_path / "short.ckpt", obj, fake_torch, {"0": bytes(8)})
    _refused_fast(path, "m/data/0 declares 8 bytes, its storage needs 16")


@pytest.mark.parametrize(
    "shape, strides",
    [((100_000, 100_000), (0, 0)), ((2**62, 4), (1, 2**62)), ((2**70,), (1,))],
    ids=["stride_0", "overflow", "huge"],
)
def test_tensors_bigger_than_their_storage_are_refused(tmp_path, fake_torch, shape, strides):
    obj = {"w": _Tensor(_Storage("0", 1), shape, strides)}
    path = _zip_checkpoint(tmp_path / "t.ckpt", obj, fake_torch, {"0": bytes(4)})
    _refused_fast(path, f"a tensor of shape {shape}", "its storage 0 holds 1")


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_a_storage_size_of_2_to_the_40_is_refused(tmp_path, fake_torch, legacy):
    obj = {"w": _Tensor(_Storage("0", 2**40), (4,), (1,))}
    if legacy:
        path = _legacy_checkpoint(tmp_path / "big.ckpt", obj, fake_torch, 2**40, bytes(16))
    else:
        path = _zip_checkpoint(tmp_path / "big.ckpt", obj, fake_torch, {"0": bytes(16)})
    _refused_fast(path, f"storages need {4 * 2**40} bytes, more than the file's")


def test_a_well_formed_checkpoint_still_loads_with_shared_storage(tmp_path, fake_torch):
    shared = _Storage("0", 6)
    tensor = _Tensor(shared, (2, 3), (3, 1))
    obj = {"a": tensor, "b": tensor, "c": _Tensor(shared, (3,), (2,))}
    data = np.arange(6, dtype=np.float32).tobytes()
    loaded = torch_pickle.load_checkpoint(
        _zip_checkpoint(tmp_path / "ok.ckpt", obj, fake_torch, {"0": data})
    )
    np.testing.assert_array_equal(loaded["a"], np.arange(6).reshape(2, 3))
    assert loaded["a"] is loaded["b"]  # one tensor under two names is one array
    np.testing.assert_array_equal(loaded["c"], [0, 2, 4])


# --- one line for every bad value ------------------------------------------------------------


DIFFUSERS_CASES = {
    "block_out_channels_str": (
        {"block_out_channels": "abc"},
        None,
        "block_out_channels: got 'abc'",
    ),
    "norm_num_groups_0": ({"norm_num_groups": 0}, None, "norm_num_groups: got 0"),
    "attention_head_dim_0": ({"attention_head_dim": 0}, None, "attention_head_dim: got 0"),
    "layers_per_block_str": ({"layers_per_block": "2"}, None, "layers_per_block: got '2'"),
    "norm_eps_str": ({"norm_eps": "x"}, None, "norm_eps: got 'x'"),
    "sample_size_negative": ({"sample_size": -16}, None, "sample_size: got -16"),
    "flip_sin_to_cos_str": ({"flip_sin_to_cos": "yes"}, None, "flip_sin_to_cos: got 'yes'"),
    "down_block_types_int": ({"down_block_types": 5}, None, "down_block_types: got 5"),
    "timesteps_0": (
        {},
        {"num_train_timesteps": 0},
        "num_train_timesteps: got 0; expected an int >= 2",
    ),
    "beta_start_str": ({}, {"beta_start": "abc"}, "beta_start: got 'abc'"),
    "beta_end_1": ({}, {"beta_end": 1.5}, "beta_end: got 1.5; expected a number in (0, 1)"),
}


@pytest.mark.parametrize("case", sorted(DIFFUSERS_CASES))
def test_bad_diffusers_config_values_are_one_value_error(tmp_path, case):
    config, scheduler, message = DIFFUSERS_CASES[case]
    folder = _ddpm_folder(tmp_path / "hub", config, scheduler)
    name = "scheduler_config.json" if scheduler else "config.json"
    texts = set()
    for load in (pretrained.load_model, pretrained.load_network):
        with pytest.raises(ValueError) as err:
            load(folder)
        texts.add(_one_line_naming(err.value, os.path.join(folder, name), message))
    assert len(texts) == 1


INFO_CASES = {
    "null": ("null", "model_info.json: expected a JSON object, got null"),
    "truncated": (lambda text: text[: len(text) // 2], "model_info.json: truncated"),
    "sha256_str": ({"sha256": "abc"}, "sha256: got 'abc'; expected an object mapping"),
    "sha256_short": ({"sha256": {"ema_params_fp32.msgpack": "00"}}, "sha256: got {'ema_params"),
    "sha256_wrong": ({"sha256": {"ema_params_fp32.msgpack": "0" * 64}}, "sha256 "),
    "nf_str": (
        {"model": {**job_cli.TINY_MODEL, "nf": "8"}},
        "model.nf: got '8'; expected an int >= 1",
    ),
    "ch_mult_0": (
        {"model": {**job_cli.TINY_MODEL, "ch_mult": [1, 0]}},
        "model.ch_mult: got [1, 0]",
    ),
    "sde_str": ({"sde": {"name": "vp", "beta_max": "x"}}, "sde.beta_max: got 'x'"),
    "sigma_0": ({"sde": {"name": "ve", "sigma_min": 0.0}}, "sde.sigma_min: got 0.0; expected 0 <"),
    "model_list": ({"model": [1]}, "model: got [1]; expected an object"),
}


@pytest.mark.parametrize("case", sorted(INFO_CASES))
def test_bad_model_info_is_one_value_error(tiny_model_dir, tmp_path, case):
    folder = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, folder)
    change, message = INFO_CASES[case]
    path = os.path.join(folder, pretrained.INFO_FILE)
    text = open(path).read()
    if isinstance(change, dict):
        change = json.dumps({**json.loads(text), **change})
    with open(path, "w") as f:
        f.write(change if isinstance(change, str) else change(text))
    # The bare network has no SDE.
    sde_case = case.startswith(("sde", "sigma"))
    loaders = [pretrained.load_model] + [pretrained.load_network] * (not sde_case)
    texts = set()
    for load in loaders:
        with pytest.raises(ValueError) as err:
            load(folder)
        texts.add(_one_line_naming(err.value, folder, message))
    assert len(texts) == 1


def test_a_weight_file_the_info_does_not_list_is_never_loaded(tiny_model_dir, tmp_path):
    folder = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, folder)
    weights = os.path.join(folder, pretrained.WEIGHT_FILES[0])
    os.rename(weights, os.path.join(folder, pretrained.WEIGHT_FILES[1]))  # unlisted now
    with pytest.raises(
        FileNotFoundError,
        match=r"none of the weight files \['ema_params_fp32.msgpack'\] that model_info.json lists",
    ):
        pretrained.load_model(folder)


# --- the batch rule ------------------------------------------------------------------------


def test_per_device_batch_must_fit_in_device_memory(tiny_model_dir):
    model = pretrained.load_model(tiny_model_dir)
    memory, _ = checks.device_memory(jax.local_devices()[0])
    row = checks.ARRAYS_PER_ROW * SIZE * SIZE * 3 * 4
    checks.check_batch(memory // row, model)  # the largest batch the rule allows
    for batch in (memory // row + 1, 10**9):
        with pytest.raises(job.ConfigError) as err:
            checks.check_batch(batch, model)
        _one_line_naming(
            err.value, f"config.per_device_batch: got {batch}", f"at most {memory // row}"
        )


# --- the command lines --------------------------------------------------------------------


@pytest.mark.slow
def test_command_line_refuses_bad_model_files_and_batches_with_exit_2(tiny_model_dir, tmp_path):
    guides = str(tmp_path / "guides")
    job_cli.save_png(os.path.join(guides, "g.png"), job_cli.random_guide(0))
    cases = [
        (
            _ddpm_folder(tmp_path / "abc", {"block_out_channels": "abc"}),
            (),
            "block_out_channels: got",
        ),
        (tiny_model_dir, ("--config.per_device_batch=1000000000",), "config.per_device_batch: got"),
    ]
    for model, extra, message in cases:
        cmd = job_cli.command(model, guides, str(tmp_path / "work"), *extra, t0s="(0.4,)")
        done = job_cli.run(cmd, devices=1, timeout=120)
        lines = job_cli.error_lines(done.stderr)
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert not os.path.exists(tmp_path / "work")


@pytest.mark.parametrize("name", ["m.ckpt", "checkpoint_7"])
def test_a_checkpoint_file_that_is_a_fifo_is_refused_without_blocking(tmp_path, name):
    os.mkfifo(tmp_path / name)
    with deadline(10), pytest.raises(files.NotRegularFile, match=f"{name}: is a FIFO"):
        pretrained.load_model(str(tmp_path / name))


def test_a_corrupt_weight_file_with_its_listed_sha256_is_one_value_error(tiny_model_dir, tmp_path):
    folder = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, folder)
    weights = os.path.join(folder, pretrained.WEIGHT_FILES[0])
    with open(weights, "wb") as f:
        f.write(b"\xc1 not msgpack")
    _edit_info(
        folder, lambda i: i.update(sha256={pretrained.WEIGHT_FILES[0]: files.sha256(weights)})
    )
    with pytest.raises(ValueError) as err:
        pretrained.load_network(folder)
    _one_line_naming(err.value, weights, "not a weight file")
