"""One network call of the published architectures: sdedit_jax vs diffusers' UNet2DModel.

    python -m sdedit_jax.tools.bench_networks --networks=ddpm_church_256,ddpm_cifar10_32 \
        --batch=1 --timing_repeats=3 --results=runs/bench_networks.jsonl

Random weights saved by diffusers and loaded by sdedit_jax, sdedit_jax under several
XLA:CPU option sets vs PyTorch (eager, channels_last), FLOPs from XLA's cost analysis.
Results go to ``--results`` as they finish (a rerun resumes). Needs torch and diffusers.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from sdedit_jax import pretrained
from sdedit_jax.tools.timing import XLA_CPU_OPTIONS, cpu_model_name, timed

_NETWORKS = flags.DEFINE_list(
    "networks", ["ddpm_church_256", "ddpm_cifar10_32"], "keys of PUBLISHED_UNETS"
)
_BATCH = flags.DEFINE_integer("batch", 64, "images per network call")
_XLA_OPTIONS = flags.DEFINE_list(
    "xla_options",
    ["default", "no_ynnpack", "onednn_dot"],
    "keys of XLA_CPU_OPTIONS, timed side by side",
)
_REPEATS = flags.DEFINE_integer("timing_repeats", 3, "timed runs (best is reported)")
_RESULTS = flags.DEFINE_string(
    "results", "", "JSONL file; finished networks are skipped on a rerun"
)

_DDPM_COMMON = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "downsample_padding": 0,
    "attention_head_dim": None,
}
PUBLISHED_UNETS = {
    # google/ddpm-ema-{church,bedroom,celebahq}-256: 113.7M parameters.
    "ddpm_church_256": {
        **_DDPM_COMMON,
        "sample_size": 256,
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    },
    # google/ddpm-cifar10-32: 35.7M parameters, at the shipped model's 32 px.
    "ddpm_cifar10_32": {
        **_DDPM_COMMON,
        "sample_size": 32,
        "block_out_channels": (128, 256, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    },
    # google/ncsnpp-church-256 (score_sde's VE church run); its input is sigma.
    "ncsnpp_church_256": {
        "sample_size": 256,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 2,
        "block_out_channels": (128, 128, 256, 256, 256, 256, 256),
        "down_block_types": ("SkipDownBlock2D",) * 4
        + ("AttnSkipDownBlock2D",)
        + ("SkipDownBlock2D",) * 2,
        "up_block_types": ("SkipUpBlock2D",) * 2 + ("AttnSkipUpBlock2D",) + ("SkipUpBlock2D",) * 4,
        "time_embedding_type": "fourier",
        "center_input_sample": True,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_scale_factor": 1.41421356237,
        "norm_eps": 1e-6,
        "norm_num_groups": None,
        "downsample_padding": 1,
        "attention_head_dim": None,
    },
}


def _jax_network_fn(folder: str):
    """``(apply, state)``: sdedit_jax's network of a diffusers folder as a pure function."""
    net = pretrained.load_network(folder)
    return (lambda state, x, t: nnx.merge(net.graphdef, state)(x, t)), net.state


def bench_network(name: str, rows: int, scratch: str, xla_options: list[str], repeats: int) -> dict:
    """One call of a published architecture: sdedit_jax (per XLA option set) vs diffusers.

    A randomly initialised diffusers ``UNet2DModel`` is saved with
    ``save_pretrained`` and loaded by ``pretrained.load_network``, so both sides
    hold the same weights; the outputs are compared on the timed batch. Calls
    are interleaved and the best of ``--timing_repeats`` counts, so load from
    other processes hits every contestant alike.
    """
    import torch
    from diffusers import UNet2DModel

    config = PUBLISHED_UNETS[name]
    load = [os.getloadavg()[0]]
    torch.manual_seed(0)
    reference = UNet2DModel(**config).eval()
    folder = os.path.join(scratch, name)
    reference.save_pretrained(folder)
    apply, state = _jax_network_fn(folder)
    size = config["sample_size"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, size, size, 3)).astype(np.float32)
    if config.get("time_embedding_type") == "fourier":  # sigma input
        t = np.geomspace(0.5, 300.0, rows).astype(np.float32)
    else:  # DDPM timestep input
        t = np.linspace(50.0, 950.0, rows).astype(np.float32)
    jx, jt = jnp.asarray(x), jnp.asarray(t)
    lowered = jax.jit(apply).lower(state, jx, jt)
    compile_s, compiled = {}, {}
    for option in xla_options:
        start = time.perf_counter()
        compiled[option] = lowered.compile(compiler_options=XLA_CPU_OPTIONS[option])
        compile_s[option] = time.perf_counter() - start
    analysis = compiled[xla_options[0]].cost_analysis()
    flops = float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])

    channels_last = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    tx_last = tx.contiguous(memory_format=torch.channels_last)
    tt = torch.from_numpy(t)

    threads = torch.get_num_threads()

    def torch_call(model, inputs, num_threads):
        torch.set_num_threads(num_threads)
        with torch.inference_mode():
            return model(inputs, tt).sample

    runs = {
        f"jax_{o}": functools.partial(lambda c: c(state, jx, jt).block_until_ready(), c)
        for o, c in compiled.items()
    }
    runs["torch_eager"] = functools.partial(torch_call, reference, tx, threads)
    runs["torch_channels_last"] = functools.partial(torch_call, channels_last, tx_last, threads)
    if threads > 1:  # OpenMP threads contend badly when other processes load the CPU
        runs["torch_channels_last_1thread"] = functools.partial(
            torch_call, channels_last, tx_last, 1
        )
    outputs = {k: np.asarray(run()) for k, run in runs.items()}  # also warms up
    torch_out = outputs["torch_eager"].transpose(0, 2, 3, 1)
    scale = float(np.max(np.abs(torch_out)))
    diffs = {
        k: float(np.max(np.abs(v - torch_out))) for k, v in outputs.items() if k.startswith("jax_")
    }
    best_s = {k: float("inf") for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            best_s[k] = min(best_s[k], timed(run))
    torch.set_num_threads(threads)
    load.append(os.getloadavg()[0])
    fastest_torch = min((k for k in runs if k.startswith("torch")), key=best_s.get)
    return {
        "network": name,
        "params_M": round(sum(p.numel() for p in reference.parameters()) / 1e6, 2),
        "image_size": size,
        "batch": rows,
        "cpu": cpu_model_name(),
        "platform": jax.devices()[0].platform,
        "torch_version": torch.__version__,
        "torch_threads": threads,
        "timing_repeats": repeats,
        "load_average_1min (start, end)": load,
        "gflop_per_call (XLA cost analysis)": round(flops / 1e9, 2),
        "max_abs_diff_jax_vs_torch": diffs,
        "torch_output_max_abs": scale,
        "compile_s": {k: round(v, 1) for k, v in compile_s.items()},
        "seconds_per_call": {k: round(v, 4) for k, v in best_s.items()},
        "images_per_s": {k: round(rows / v, 3) for k, v in best_s.items()},
        "gflop_per_s": {k: round(flops / v / 1e9, 1) for k, v in best_s.items()},
        "speedup_over_fastest_torch": {
            k: round(best_s[fastest_torch] / v, 2)
            for k, v in best_s.items()
            if k.startswith("jax_")
        },
    }


def bench_networks(
    names: list[str], rows: int, xla_options: list[str], repeats: int, results_path: str = ""
) -> list[dict]:
    """``bench_network`` for every name, appended to ``results_path`` (JSONL) as it ends;
    names already there (at this batch) are skipped, so a rerun resumes."""
    unknown = sorted(set(names) - set(PUBLISHED_UNETS))
    if unknown:
        raise ValueError(f"--networks: unknown {unknown}; known {sorted(PUBLISHED_UNETS)}")
    unknown = sorted(set(xla_options) - set(XLA_CPU_OPTIONS))
    if unknown:
        raise ValueError(f"--xla_options: unknown {unknown}; known {sorted(XLA_CPU_OPTIONS)}")
    done = []
    if results_path and os.path.exists(results_path):
        with open(results_path) as f:
            done = [json.loads(line) for line in f if line.strip()]
    finished = {(r["network"], r["batch"]) for r in done}
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            if (name, rows) in finished:
                continue
            result = bench_network(name, rows, scratch, xla_options, repeats)
            print(json.dumps(result), flush=True)
            results.append(result)
            if results_path:
                os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
                with open(results_path, "a") as f:
                    f.write(json.dumps(result) + "\n")
    return done + results


def main(argv: list[str]) -> None:
    del argv
    bench_networks(
        _NETWORKS.value, _BATCH.value, _XLA_OPTIONS.value, _REPEATS.value, _RESULTS.value
    )


if __name__ == "__main__":
    app.run(main)
