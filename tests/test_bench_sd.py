"""bench_sd's GPU mode on a tiny pipeline: it runs as the prepared script runs it, and its
FLOPs count every step's guided U-Net call (XLA's cost analysis counts a loop body once)."""

import jax
import numpy as np
import pytest

from sdedit_jax import pretrained
from sdedit_jax.latent import guidance
from sdedit_jax.tools import bench_sd

pytest.importorskip("torch", reason="the tiny pipeline is saved by diffusers (torch)")
pytest.importorskip("diffusers", reason="the tiny pipeline is saved by diffusers")
pytest.importorskip("transformers", reason="the tiny text encoder is saved by transformers")

from tests import sd_reference  # noqa: E402


def _guided_call_flops(model, batch: int, size: int) -> float:
    """FLOPs of one guided score call on ``batch`` latents, compiled through ``score_fn``."""
    latent = size // model.size_multiple
    width = model.text_encoder.config.hidden_size
    text = np.zeros((batch, 77, width), np.float32)
    cond = guidance.text_condition(text, text, np.full(batch, 7.5, np.float32))
    z = np.zeros((batch, latent, latent, model.latent_channels), np.float32)
    t = np.full(batch, 0.5, np.float32)
    return bench_sd._flops(jax.jit(model.score_fn).lower(z, t, cond).compile())


def test_gpu_mode_runs_and_counts_each_step_as_one_guided_call(tmp_path):
    folder = str(tmp_path / "pipe")
    sd_reference.save_pipeline(folder, "sd1")
    (result,) = bench_sd.bench_gpu(folder, 1, 2, 0.5, [2], size=32)
    assert result["bench"] == "sd15_edit_32_bf16" and result["images_per_s"] > 0
    model = pretrained.load_model(folder)
    text = {"text": np.zeros((2, 77, model.text_encoder.config.hidden_size), np.float32)}
    flops = [bench_sd._edit_flops(model, 2, steps, 32, text) for steps in (2, 1)]
    per_step = flops[0] - flops[1]
    guided = _guided_call_flops(model, 2, 32)
    # The guided call adds the CFG combination and the score conversion to the U-Net pair.
    assert guided * 0.95 < per_step <= guided
