"""Stable Diffusion 1.5 at full size: sdedit_jax vs diffusers, one U-Net call and one edit.

    python -m sdedit_jax.tools.bench_sd --what=unet,edit --cache=/tmp/sd15_random
    python -m sdedit_jax.tools.bench_sd --what=gpu --cache=/tmp/sd15_random --batches=1,4,8

Random weights of the published architectures (U-Net 859.5M, VAE, CLIP ViT-L text
encoder) are saved once by diffusers/transformers into ``--cache`` as a pipeline folder
(a byte-level tokenizer without merges stands in for CLIP's vocabulary) and loaded by
both sides. ``unet``: one call at 64x64 latents, batch 2 (one CFG pair): sdedit_jax fp32
and bf16 compute vs torch fp32 and bf16 autocast. ``edit``: one whole 512 px edit
(encode, 20 steps with guidance 7.5, decode) vs ``StableDiffusionImg2ImgPipeline`` with
its SDE-DPM-Solver++(2M) at the same number of U-Net calls, both from the same text
states. ``gpu``: sdedit_jax alone, bf16, images/s and MFU per batch size. Medians of
``--repeats`` runs after a warm-up; FLOPs from XLA's cost analysis (an edit's summed from
its U-Net calls and VAE passes, since XLA counts a loop's body once). Needs torch and
diffusers (``unet``, ``edit``; ``gpu`` only for building the cache).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from sdedit_jax import engine, pretrained, rng
from sdedit_jax.latent import guidance
from sdedit_jax.models import sd_unet
from sdedit_jax.sampling.sampler import Sampler
from sdedit_jax.tools.published_sd import CLIP_VIT_L, SD15_UNET, SD_VAE
from sdedit_jax.tools.timing import cpu_model_name, timed


def define_flags() -> None:
    """The command line's flags (not at import: other tools import this module's parts)."""
    flags.DEFINE_list("what", ["unet", "edit"], "unet, edit and/or gpu")
    flags.DEFINE_string("cache", "/tmp/sd15_random", "pipeline folder (built if absent)")
    flags.DEFINE_integer("repeats", 3, "timed runs per contestant (median reported)")
    flags.DEFINE_integer("steps", 20, "edit: U-Net calls (each one CFG pair)")
    flags.DEFINE_float("strength", 0.5, "edit: t0 = diffusers' strength")
    flags.DEFINE_list("batches", ["1", "4", "8", "16"], "gpu: images per edit")
    flags.DEFINE_string("results_jsonl", "", "append each result as a JSON line here")


GUIDANCE = 7.5
# Dense bf16 peak FLOP/s by device kind (vendor data sheets), for MFU.
PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12, "TPU v5": 197e12}


def build_cache(folder: str) -> None:
    """A full-size SD 1.5 pipeline folder with random weights (seeded), saved by diffusers."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    token_dir = write_byte_tokenizer(os.path.join(folder, "_tokenizer"))
    text_fields = {k: v for k, v in CLIP_VIT_L.items() if k != "model_type"}
    pipe = StableDiffusionImg2ImgPipeline(
        unet=UNet2DConditionModel.from_config(SD15_UNET),
        vae=AutoencoderKL.from_config(SD_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_fields)),
        tokenizer=CLIPTokenizer(
            os.path.join(token_dir, "vocab.json"),
            os.path.join(token_dir, "merges.txt"),
            model_max_length=77,
        ),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def write_byte_tokenizer(folder: str) -> str:
    """A CLIP vocabulary of the 256 byte symbols (no merges) standing in for CLIP's own."""
    from tokenizers import pre_tokenizers

    os.makedirs(folder, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return folder


def _unet(graphdef, state, z, t, cond):
    cond = cond if isinstance(cond, dict) else {"text": cond}
    return nnx.merge(graphdef, state)(z, t, cond)


def _median(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def _edit_flops(model, batch: int, steps: int, size: int, text: dict) -> float:
    """The edit's FLOPs summed from its parts: XLA counts a loop's body once, not per step.

    ``steps`` guided U-Net calls (batch ``2 batch``: the CFG pair) plus one VAE encode and
    one decode of ``batch`` images; the solver's own arithmetic is negligible beside them.
    ``text``: one half of the guided cond (the network's cond of ``batch`` rows).
    """
    latent = size // model.size_multiple
    shape = jax.ShapeDtypeStruct
    z = shape((2 * batch, latent, latent, model.latent_channels), np.float32)
    t = shape((2 * batch,), np.float32)
    pair = {k: shape((2 * batch, *np.shape(v)[1:]), np.float32) for k, v in text.items()}
    graphdef, _ = sd_unet.abstract(model.unet.config)
    call = jax.jit(lambda state, z, t, c: _unet(graphdef, state, z, t, c))
    unet = _flops(call.lower(model.unet.state, z, t, pair).compile())
    codec = model.codec
    images = shape((batch, size, size, 3), np.float32)
    latents = shape((batch, latent, latent, model.latent_channels), np.float32)
    encode = _flops(jax.jit(lambda c, x: c.encode(None, x)).lower(codec, images).compile())
    decode = _flops(jax.jit(lambda c, z: c.decode(z)).lower(codec, latents).compile())
    return steps * unet + encode + decode


def bench_unet(folder: str, repeats: int) -> dict:
    """One U-Net call, batch 2 at 64x64 latents: sdedit_jax fp32/bf16 vs torch fp32/bf16."""
    import torch
    from diffusers import UNet2DConditionModel

    draw = np.random.default_rng(0)
    z = draw.standard_normal((2, 64, 64, 4)).astype(np.float32)
    h = draw.standard_normal((2, 77, 768)).astype(np.float32)
    t = np.array([801.0, 801.0], np.float32)
    seconds, compile_s, flops, outputs = {}, {}, {}, {}
    for dtype in ("float32", "bfloat16"):
        net = pretrained.load_network(folder, compute_dtype=dtype)
        call = jax.jit(lambda state, z, t, h, g=net.graphdef: _unet(g, state, z, t, h))
        lowered = call.lower(net.state, z, t, h)
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s[dtype] = time.perf_counter() - start
        flops[dtype] = _flops(compiled)
        outputs[f"jax_{dtype}"] = np.asarray(compiled(net.state, z, t, h))
        seconds[f"jax_{dtype}"] = _median(
            lambda c=compiled, s=net.state: c(s, z, t, h).block_until_ready(), repeats
        )
        del net, compiled, lowered
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
    tz = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
    th, tt = torch.from_numpy(h), torch.from_numpy(t)

    def torch_call(bf16: bool):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return unet(tz, tt, encoder_hidden_states=th).sample

    for name, bf16 in (("torch_float32", False), ("torch_bfloat16_autocast", True)):
        outputs[name] = torch_call(bf16).float().numpy().transpose(0, 2, 3, 1)
        seconds[name] = _median(lambda bf16=bf16: torch_call(bf16), repeats)
    reference = outputs["torch_float32"]
    scale = float(np.sqrt(np.mean(reference**2)))
    return {
        "bench": "sd15_unet_call",
        "cpu": cpu_model_name(),
        "platform": jax.devices()[0].platform,
        "batch": 2,
        "latent": 64,
        "params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
        "gflop_per_call (XLA, float32)": round(flops["float32"] / 1e9, 1),
        "compile_s": {k: round(v, 1) for k, v in compile_s.items()},
        "seconds_per_call (median)": {k: round(v, 3) for k, v in seconds.items()},
        "gflop_per_s": {k: round(flops["float32"] / v / 1e9, 1) for k, v in seconds.items()},
        "speedup_vs_torch_float32": {
            k: round(seconds["torch_float32"] / v, 2) for k, v in seconds.items()
        },
        "max_abs_diff_vs_torch_float32 / rms": {
            k: round(float(np.max(np.abs(v - reference))) / scale, 5)
            for k, v in outputs.items()
            if k != "torch_float32"
        },
    }


def _edit_inputs(batch: int, size: int = 512, width: int = 768):
    draw = np.random.default_rng(1)
    guides = draw.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    text = draw.standard_normal((batch, 77, width)).astype(np.float32)
    negative = draw.standard_normal((batch, 77, width)).astype(np.float32)
    return guides, text, negative


def _jax_edit(
    model,
    batch: int,
    steps: int,
    strength: float,
    size: int = 512,
    text_cond=None,
    scale: float = GUIDANCE,
):
    """``(run, flops)``: one compiled sdedit_jax edit of ``batch`` guides of ``size`` px.

    ``text_cond(model, batch, size) -> (text, negative)``, the two halves of the guided
    cond (default: random SD text states of the model's width).
    """
    guides, text, negative = (
        _edit_inputs(batch, size, model.text_encoder.config.hidden_size)
        if text_cond is None
        else (_edit_inputs(batch, size, 1)[0], *text_cond(model, batch, size))
    )
    cond = guidance.text_condition(text, negative, np.full(batch, scale, np.float32))
    text = text if isinstance(text, dict) else {"text": text}
    sampler = Sampler("sde_dpm_solver_2m", max_steps=steps)
    mesh = engine.data_mesh(jax.devices()[:1])
    editor = engine.Editor(model.sde, sampler, mesh=mesh, per_device_batch=batch)
    placed = editor.place_score(model.score_fn, model.codec)
    rows = engine.EditBatch(
        guides=guides,
        seeds=np.zeros(batch, np.int32),
        id_words=np.asarray(rng.ids_to_words(np.arange(batch))),
        t0=np.full(batch, strength, np.float32),
        n_steps=np.full(batch, steps, np.int32),
        cond=cond,
    )
    sharded = editor.shard(rows)
    editor.run_global(placed, sharded).block_until_ready()  # compiled here, not when timed
    flops = _edit_flops(model, batch, steps, size, text)
    # The editor's own call: its argument list is the engine's to keep (a hand-built one
    # missed per-example K).
    return (lambda: editor.run_global(placed, sharded).block_until_ready()), flops


def bench_edit(folder: str, repeats: int, steps: int, strength: float) -> dict:
    """One 512 px edit (encode, ``steps`` CFG calls, decode): sdedit_jax vs diffusers."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline

    model = pretrained.load_model(folder)
    run, flops = _jax_edit(model, 1, steps, strength)  # run once there: compiled, warm
    seconds = {"jax_float32": _median(run, repeats, warm_up=False)}
    del run
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2
    )
    pipe.set_progress_bar_config(disable=True)
    guides, text, negative = _edit_inputs(1)
    image = torch.from_numpy(guides.transpose(0, 3, 1, 2).copy())
    calls = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    inference_steps = round(steps / strength)

    def torch_edit(bf16: bool = False):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return pipe(
                prompt_embeds=torch.from_numpy(text),
                negative_prompt_embeds=torch.from_numpy(negative),
                image=image,
                strength=strength,
                num_inference_steps=inference_steps,
                guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images

    seconds["torch_float32"] = _median(torch_edit, repeats, warm_up=False)
    torch_calls = len(calls) // repeats
    seconds["torch_bfloat16_autocast"] = _median(lambda: torch_edit(True), repeats, warm_up=False)
    return {
        "bench": "sd15_edit_512",
        "cpu": cpu_model_name(),
        "platform": jax.devices()[0].platform,
        "unet_calls (each a CFG pair)": {"jax": steps, "torch": torch_calls},
        "strength": strength,
        "gflop_per_edit (XLA, float32: steps x U-Net + VAE)": round(flops / 1e9, 1),
        "seconds_per_edit (median)": {k: round(v, 2) for k, v in seconds.items()},
        "speedup_vs_torch_float32": {
            k: round(seconds["torch_float32"] / v, 2) for k, v in seconds.items()
        },
    }


def bench_gpu(
    folder: str,
    repeats: int,
    steps: int,
    strength: float,
    batches: list[int],
    size: int = 512,
    name: str = "sd15",
    **edit,
) -> list:
    """sdedit_jax alone in bf16: ``size`` px edits per second and MFU for each batch size
    (``edit``: :func:`_jax_edit`'s ``text_cond`` and ``scale`` for other models)."""
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if kind.startswith(k)), None)
    model = pretrained.load_model(folder, compute_dtype="bfloat16")
    results = []
    for batch in batches:
        run, flops = _jax_edit(model, batch, steps, strength, size, **edit)
        seconds = _median(run, repeats)
        results.append(
            {
                "bench": f"{name}_edit_{size}_bf16",
                "device": kind,
                "batch": batch,
                "steps": steps,
                "seconds_per_batch (median)": round(seconds, 3),
                "images_per_s": round(batch / seconds, 2),
                "tflop_per_s": round(flops / seconds / 1e12, 1),
                "mfu": None if peak is None else round(flops / seconds / peak, 3),
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(flags.FLAGS.what) - {"unet", "edit", "gpu"})
    if unknown:
        raise app.UsageError(f"--what: unknown {unknown}; choose from unet, edit, gpu")
    folder = flags.FLAGS.cache
    if not os.path.exists(os.path.join(folder, "model_index.json")):
        build_cache(folder)
    results = []
    if "unet" in flags.FLAGS.what:
        results.append(bench_unet(folder, flags.FLAGS.repeats))
        print(json.dumps(results[-1], indent=1), flush=True)
    if "edit" in flags.FLAGS.what:
        results.append(
            bench_edit(folder, flags.FLAGS.repeats, flags.FLAGS.steps, flags.FLAGS.strength)
        )
        print(json.dumps(results[-1], indent=1), flush=True)
    if "gpu" in flags.FLAGS.what:
        batches = [int(b) for b in flags.FLAGS.batches]
        results += bench_gpu(
            folder, flags.FLAGS.repeats, flags.FLAGS.steps, flags.FLAGS.strength, batches
        )
    if flags.FLAGS.results_jsonl:
        with open(flags.FLAGS.results_jsonl, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)


if __name__ == "__main__":
    define_flags()
    app.run(main)
