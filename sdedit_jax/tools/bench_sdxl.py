"""SDXL base at full size: one U-Net call vs diffusers, the full-size check, GPU edits.

    python -m sdedit_jax.tools.bench_sdxl --what=unet --cache=/tmp/sdxl_random
    python -m sdedit_jax.tools.bench_sdxl --what=check --cache=/tmp/sdxl_random
    python -m sdedit_jax.tools.bench_sdxl --what=gpu --cache=/tmp/sdxl_random --batches=1,2,4

Random weights of the published architecture (U-Net 2.57B parameters, VAE, CLIP ViT-L
and OpenCLIP ViT-bigG with its projection) are saved once, in bfloat16, by diffusers
and transformers into ``--cache`` as a pipeline folder (about 7 GB). Every big step runs
in its own process, one after the other, so no two copies of the model are alive:

* ``unet``: one call at 128x128 latents (1024 px), batch 2 (one CFG pair), sdedit_jax
  float32 and bfloat16 compute vs diffusers float32 and bfloat16 autocast, both sides
  on the same (bfloat16-rounded) weights, medians of ``--repeats`` after a warm-up.
* ``check``: ``convert --bf16`` and a job's startup with their peak host memory
  (:mod:`sdedit_jax.tools.peak_memory`), every tensor of the reference folder found in
  the converted one with its shape and dtype, and one bfloat16 forward at 64x64
  latents that must be finite.
* ``gpu``: sdedit_jax alone in bfloat16: 1024 px edits per second and MFU per batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from sdedit_jax import pretrained
from sdedit_jax.tools import bench_sd
from sdedit_jax.tools.published_sd import CLIP_VIT_L, OPENCLIP_BIGG, SDXL_UNET, SDXL_VAE
from sdedit_jax.tools.timing import cpu_model_name

_WHAT = flags.DEFINE_enum(
    "what", "unet", ["unet", "check", "gpu", "unet_jax", "unet_torch", "forward"], "what to run"
)
_CACHE = flags.DEFINE_string("cache", "/tmp/sdxl_random", "pipeline folder (built if absent)")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed runs per contestant (median reported)")
_BATCHES = flags.DEFINE_list("batches", ["1", "2", "4"], "gpu: images per edit")
_STEPS = flags.DEFINE_integer("steps", 20, "gpu: U-Net calls per edit (each one CFG pair)")
_RESULTS = flags.DEFINE_string("results_jsonl", "", "append each result as a JSON line here")
_REFERENCE = flags.DEFINE_string("reference", "", "forward: the reference pipeline folder")

LATENT, BATCH, TOKENS = 128, 2, 77
TEXT_WIDTH, POOLED = 2048, 1280
GUIDANCE = 5.0


def build_cache(folder: str) -> None:
    """A full-size SDXL base pipeline folder with random weights (seeded), in bfloat16."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16: 5 GB, not 10, for the U-Net
    token_dir = bench_sd.write_byte_tokenizer(os.path.join(folder, "_tokenizer"))

    def tokenizer(pad: str) -> CLIPTokenizer:
        vocab, merges = (os.path.join(token_dir, n) for n in ("vocab.json", "merges.txt"))
        return CLIPTokenizer(vocab, merges, model_max_length=TOKENS, pad_token=pad)

    def text_config(fields: dict) -> CLIPTextConfig:
        return CLIPTextConfig(**{k: v for k, v in fields.items() if k != "model_type"})

    pipe = StableDiffusionXLImg2ImgPipeline(
        unet=UNet2DConditionModel.from_config(SDXL_UNET),
        vae=AutoencoderKL.from_config(SDXL_VAE),
        text_encoder=CLIPTextModel(text_config(CLIP_VIT_L)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(OPENCLIP_BIGG)),
        tokenizer=tokenizer("<|endoftext|>"),
        tokenizer_2=tokenizer("!"),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        ),
    )
    pipe.save_pretrained(folder)


def _inputs(latent: int = LATENT, batch: int = BATCH, width: int = TEXT_WIDTH, pooled=POOLED):
    draw = np.random.default_rng(0)
    z = draw.standard_normal((batch, latent, latent, 4)).astype(np.float32)
    h = draw.standard_normal((batch, TOKENS, width)).astype(np.float32)
    pooled = draw.standard_normal((batch, pooled)).astype(np.float32)
    side = 8 * latent
    time_ids = np.tile(np.array([side, side, 0, 0, side, side], np.float32), (batch, 1))
    return z, np.full(batch, 801.0, np.float32), h, pooled, time_ids


def unet_jax(folder: str, repeats: int) -> dict:
    """sdedit_jax's call, float32 and bfloat16 compute, on the file's bfloat16 weights as
    they are (float32 compute widens them in the program: the numbers torch's float32
    copy gives, at half the memory)."""
    from sdedit_jax.importers import diffusers_sd
    from sdedit_jax.models import sd_unet

    z, t, h, pooled, time_ids = _inputs()
    cond = {"text": h, "text_embeds": pooled, "time_ids": time_ids}
    unet = diffusers_sd.load_unet(os.path.join(folder, "unet"), dtype="bfloat16")
    results = {}
    for dtype in ("float32", "bfloat16"):
        graphdef, _ = sd_unet.abstract(dataclasses.replace(unet.config, compute_dtype=dtype))
        call = jax.jit(lambda s, z, t, c, g=graphdef: bench_sd._unet(g, s, z, t, c))
        start = time.perf_counter()
        compiled = call.lower(unet.state, z, t, cond).compile()
        compile_s = time.perf_counter() - start
        output = np.asarray(compiled(unet.state, z, t, cond))
        seconds = bench_sd._median(
            lambda c=compiled: c(unet.state, z, t, cond).block_until_ready(), repeats, False
        )
        results[f"jax_{dtype}"] = {
            "seconds": seconds,
            "compile_s": compile_s,
            "gflop": bench_sd._flops(compiled) / 1e9,
        }
        np.save(os.path.join(folder, f"_out_jax_{dtype}.npy"), output)
        del compiled
    return results


def unet_torch(folder: str, repeats: int) -> dict:
    """diffusers' call, float32 and bfloat16 autocast (weights widened to float32)."""
    import torch
    from diffusers import UNet2DConditionModel

    z, t, h, pooled, time_ids = _inputs()
    unet = UNet2DConditionModel.from_pretrained(
        os.path.join(folder, "unet"), torch_dtype=torch.float32
    ).eval()
    args = (torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t))
    kwargs = {
        "encoder_hidden_states": torch.from_numpy(h),
        "added_cond_kwargs": {
            "text_embeds": torch.from_numpy(pooled),
            "time_ids": torch.from_numpy(time_ids),
        },
    }
    results = {}
    for name, bf16 in (("torch_float32", False), ("torch_bfloat16_autocast", True)):

        def call(bf16=bf16):
            with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                return unet(*args, **kwargs).sample

        output = call().float().numpy().transpose(0, 2, 3, 1)
        results[name] = {"seconds": bench_sd._median(call, repeats, False)}
        np.save(os.path.join(folder, f"_out_{name}.npy"), output)
    results["params"] = sum(p.numel() for p in unet.parameters())
    return results


def _run(module: str, **flags_: object) -> dict:
    """``python -m module --flag=value ...`` in a fresh process; the JSON it prints last."""
    command = [sys.executable, "-m", module, *(f"--{k}={v}" for k, v in flags_.items())]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _own_process(what: str, folder: str, repeats: int) -> dict:
    """Runs ``--what`` of this tool in a fresh process."""
    return _run("sdedit_jax.tools.bench_sdxl", what=what, cache=folder, repeats=repeats)


def bench_unet(folder: str, repeats: int) -> dict:
    """One SDXL U-Net call, 128x128 latents, batch 2: the two sides one after the other."""
    jax_side = _own_process("unet_jax", folder, repeats)
    torch_side = _own_process("unet_torch", folder, repeats)
    params = torch_side.pop("params")
    sides = {**jax_side, **torch_side}
    seconds = {k: v["seconds"] for k, v in sides.items()}
    reference = np.load(os.path.join(folder, "_out_torch_float32.npy"))
    scale = float(np.sqrt(np.mean(reference**2)))
    gflop = jax_side["jax_float32"]["gflop"]
    return {
        "bench": "sdxl_unet_call",
        "cpu": cpu_model_name(),
        "platform": jax.devices()[0].platform,
        "batch": BATCH,
        "latent": LATENT,
        "params_M": round(params / 1e6, 1),
        "gflop_per_call (XLA, float32)": round(gflop, 1),
        "compile_s": {k: round(v["compile_s"], 1) for k, v in jax_side.items()},
        "seconds_per_call (median)": {k: round(v, 2) for k, v in seconds.items()},
        "gflop_per_s": {k: round(gflop / v, 1) for k, v in seconds.items()},
        "speedup_vs_torch_float32": {
            k: round(seconds["torch_float32"] / v, 2) for k, v in seconds.items()
        },
        "max_abs_diff_vs_torch_float32 / rms": {
            k: round(
                float(np.max(np.abs(np.load(os.path.join(folder, f"_out_{k}.npy")) - reference)))
                / scale,
                5,
            )
            for k in seconds
            if k != "torch_float32"
        },
    }


def _reference_tensors(folder: str, name: str) -> tuple[str, dict]:
    """A reference component's tensors, lazily, in the names :mod:`.diffusers_sd` reads."""
    from sdedit_jax.importers import diffusers, diffusers_sd

    file = next(
        f for f in sorted(os.listdir(os.path.join(folder, name))) if f.endswith("safetensors")
    )
    path = os.path.join(folder, name, file)
    tensors = dict(diffusers.lazy_tensors(path))
    if name.startswith("text_encoder"):
        tensors = diffusers_sd.text_encoder_tensors(tensors)
    return path, tensors


def forward(converted: str, reference: str) -> dict:
    """Every reference tensor in the converted folder (name, shape, bfloat16 on both sides),
    then one bfloat16 forward at 64x64 latents."""
    from sdedit_jax.importers import diffusers_sd, state_dict
    from sdedit_jax.util import safetensors_files, weights

    model = pretrained.load_model(converted)
    parts = {"unet": model.unet, "vae": model.vae}
    parts.update({name: tower.part for name, tower in model.towers.items()})
    tensors, params, dtypes = 0, 0, set()
    for name, part in parts.items():
        path, ref = _reference_tensors(reference, name)
        state_dict.check_tensors(path, ref, diffusers_sd.expected_tensors(part.state))
        ours = safetensors_files.lazy_tensors(os.path.join(converted, f"{name}.safetensors"))
        leaves = weights.named_leaves(part.state)
        assert ours.keys() == leaves.keys(), name
        for key, leaf in leaves.items():
            assert ours[key].shape == leaf.shape and ours[key].dtype == leaf.dtype, key
        dtypes |= {str(t.dtype) for t in ref.values()} | {str(t.dtype) for t in ours.values()}
        tensors += len(leaves)
        params += sum(int(np.prod(leaf.shape)) for leaf in leaves.values())
    width = model.unet.config.cross_attention_dim
    pooled_width = model.towers["text_encoder_2"].part.config.projection_dim
    unet_params = sum(
        int(np.prod(v.shape)) for v in weights.named_leaves(model.unet.state).values()
    )
    del model, parts, part, leaves  # one copy at a time
    net = pretrained.load_network(converted, compute_dtype="bfloat16")
    z, t, h, pooled, time_ids = _inputs(64, 1, width, pooled_width)
    start = time.perf_counter()
    out = np.asarray(net(z, t, h, added_cond={"text_embeds": pooled, "time_ids": time_ids}))
    return {
        "tensors_checked": tensors,
        "params": params,
        "dtypes (reference and converted files, weights in memory)": sorted(dtypes),
        "unet_params": unet_params,
        "forward_64x64_bf16_s (compile included)": round(time.perf_counter() - start, 1),
        "forward_finite": bool(np.all(np.isfinite(out))),
        "forward_rms": round(float(np.sqrt(np.mean(out.astype(np.float64) ** 2))), 4),
    }


def check(folder: str) -> dict:
    """The full-size check (see the module docstring), each step in its own process."""
    import shutil

    converted = folder.rstrip("/") + "_converted_bf16"
    shutil.rmtree(converted, ignore_errors=True)
    peak = "sdedit_jax.tools.peak_memory"
    convert_memory = _run(peak, what="convert", source=folder, out=converted, bf16="true")
    startup_memory = _run(peak, what="startup", model_dir=converted)
    checked = _run("sdedit_jax.tools.bench_sdxl", what="forward", cache=converted, reference=folder)
    return {
        "bench": "sdxl_full_size_check",
        "cpu": cpu_model_name(),
        "convert_peak_memory": convert_memory,
        "startup_peak_memory": startup_memory,
        **checked,
    }


def xl_text(model, batch: int, size: int) -> tuple[dict, dict]:
    """Random text states and pooled projections of ``model``'s widths, with its real
    micro-conditioning for ``size`` px guides: the two halves of the guided cond."""
    draw = np.random.default_rng(2)
    width = model.unet.config.cross_attention_dim
    pooled = model.towers["text_encoder_2"].part.config.projection_dim
    time_ids = np.asarray(model.time_ids([(size, size)] * batch), np.float32)

    def half() -> dict:
        text = draw.standard_normal((batch, TOKENS, width)).astype(np.float32)
        embeds = draw.standard_normal((batch, pooled)).astype(np.float32)
        return model.condition(text, embeds, time_ids)

    return half(), half()


def bench_gpu(folder: str, repeats: int, steps: int, batches: list[int], size: int = 1024):
    """sdedit_jax alone in bf16: SDXL edits (t0 0.6, guidance 5) per second and MFU."""
    return bench_sd.bench_gpu(
        folder, repeats, steps, 0.6, batches, size, "sdxl", text_cond=xl_text, scale=GUIDANCE
    )


def main(argv: list[str]) -> None:
    del argv
    folder, what = _CACHE.value, _WHAT.value
    if what in ("unet", "check", "gpu") and not os.path.exists(
        os.path.join(folder, "model_index.json")
    ):
        build_cache(folder)
    if what == "unet_jax":
        result = unet_jax(folder, _REPEATS.value)
    elif what == "unet_torch":
        result = unet_torch(folder, _REPEATS.value)
    elif what == "forward":
        result = forward(folder, _REFERENCE.value)
    elif what == "unet":
        result = bench_unet(folder, _REPEATS.value)
    elif what == "check":
        result = check(folder)
    else:
        batches = [int(b) for b in _BATCHES.value]
        result = bench_gpu(folder, _REPEATS.value, _STEPS.value, batches)
    print(json.dumps(result, default=float), flush=True)
    if _RESULTS.value and what in ("unet", "check", "gpu"):
        with open(_RESULTS.value, "a") as f:
            f.writelines(
                json.dumps(r) + "\n" for r in (result if isinstance(result, list) else [result])
            )


if __name__ == "__main__":
    app.run(main)
