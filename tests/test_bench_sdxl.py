"""bench_sdxl on a tiny SDXL pipeline: its GPU mode runs and counts each step's guided call,
and its full-size check's forward step checks every tensor of the converted folder. The
full-size run itself is gated: ``SDEDIT_FULL_SIZE_SDXL=<cache folder>`` (about 7 GB of
random bf16 weights, built when absent; 20 GB of memory; about 10 minutes on 2 cores)."""

import os

import jax
import numpy as np
import pytest

from sdedit_jax import convert, pretrained
from sdedit_jax.latent import guidance
from sdedit_jax.tools import bench_sd, bench_sdxl

pytest.importorskip("torch", reason="the tiny pipeline is saved by diffusers (torch)")
pytest.importorskip("diffusers", reason="the tiny pipeline is saved by diffusers")
pytest.importorskip("transformers", reason="the tiny text encoders are saved by transformers")

from tests import sd_reference  # noqa: E402

FULL_SIZE = os.environ.get("SDEDIT_FULL_SIZE_SDXL")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sdxl_pipe"))
    sd_reference.save_xl_pipeline(path)
    return path


def test_gpu_mode_runs_and_counts_each_step_as_one_guided_call(folder):
    (result,) = bench_sdxl.bench_gpu(folder, 1, 2, [2], size=32)
    assert result["bench"] == "sdxl_edit_32_bf16" and result["images_per_s"] > 0
    model = pretrained.load_model(folder)
    text, negative = bench_sdxl.xl_text(model, 2, 32)
    assert text["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # the guides' size
    flops = [bench_sd._edit_flops(model, 2, steps, 32, text) for steps in (2, 1)]
    cond = guidance.text_condition(text, negative, np.full(2, 5.0, np.float32))
    latent = 32 // model.size_multiple
    z = np.zeros((2, latent, latent, model.latent_channels), np.float32)
    t = np.full(2, 0.5, np.float32)
    guided = bench_sd._flops(jax.jit(model.score_fn).lower(z, t, cond).compile())
    assert guided * 0.95 < flops[0] - flops[1] <= guided


def test_the_forward_check_reads_every_tensor_of_a_converted_folder(folder, tmp_path):
    out = str(tmp_path / "bf16")
    convert.convert(folder, out, with_bf16=True)
    result = bench_sdxl.forward(out, folder)
    model = pretrained.load_model(folder)
    parts = [model.unet, model.vae] + [tower.part for tower in model.towers.values()]
    leaves = [leaf for part in parts for leaf in jax.tree.leaves(part.state)]
    assert result["tensors_checked"] == len(leaves)
    assert result["params"] == sum(leaf.size for leaf in leaves)
    assert result["forward_finite"] and result["forward_rms"] > 0


@pytest.mark.skipif(not FULL_SIZE, reason="full size: set SDEDIT_FULL_SIZE_SDXL=<cache folder>")
def test_full_size_sdxl_converts_and_starts_within_the_memory_bound():
    if not os.path.exists(os.path.join(FULL_SIZE, "model_index.json")):
        bench_sdxl.build_cache(FULL_SIZE)
    result = bench_sdxl.check(FULL_SIZE)
    print(result)
    assert result["unet_params"] == 2_567_463_684
    assert result["dtypes (reference and converted files, weights in memory)"] == ["bfloat16"]
    assert result["convert_peak_memory"]["ratio"] <= 1.3
    assert result["startup_peak_memory"]["ratio"] <= 1.3
    assert result["forward_finite"]
