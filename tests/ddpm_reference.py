"""The reference side of the DDPM U-Net tests: diffusers' UNet2DModel in torch.

Builds the block structure of ``google/ddpm-ema-church-256`` (optionally with
narrower channels and a smaller sample size), gives it random weights, and
renames its state dict to ermongroup/ddim's layout (``models/diffusion.py``:
``temb.dense``, ``down[i].block[j]``, ``down[i].attn[j]`` with 1x1-conv q/k/v,
``mid.block_1``, ``up[level]`` indexed by resolution level).
"""

from __future__ import annotations

import re

import numpy as np

# config.json of google/ddpm-ema-church-256 (as published on the hub).
CHURCH_256 = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": [
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": [
        "UpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
    ],
}


def church_config(channels=(32, 32, 64, 64, 64, 64), sample_size=32) -> dict:
    """The church-256 structure with narrower channels and a smaller sample size."""
    return {**CHURCH_256, "block_out_channels": list(channels), "sample_size": sample_size}


def diffusers_model(config: dict, seed: int = 0):
    """A UNet2DModel with random weights (every tensor perturbed, norms included)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def reference(model, x_nhwc: np.ndarray, timesteps) -> np.ndarray:
    """``model(x_nchw, timesteps).sample`` in NHWC."""
    import torch

    with torch.no_grad():
        t = torch.as_tensor(np.asarray(timesteps))
        out = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))), t)
    return out.sample.numpy().transpose(0, 2, 3, 1)


_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "time_emb_proj": "temb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ddim_state_dict(diffusers_state: dict, levels: int) -> dict:
    """diffusers ``UNet2DModel`` tensors renamed (and reshaped) to ddim's ``Model``."""
    out = {}
    for key, value in diffusers_state.items():
        value = value.clone() if hasattr(value, "clone") else value
        new = key.replace("time_embedding.linear_1", "temb.dense.0")
        new = new.replace("time_embedding.linear_2", "temb.dense.1")
        new = new.replace("conv_norm_out", "norm_out")
        new = re.sub(r"^mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        new = new.replace("mid_block.attentions.0", "mid.attn_1")
        new = re.sub(r"^up_blocks\.(\d+)", lambda m: f"up.{levels - 1 - int(m[1])}", new)
        new = re.sub(r"^down_blocks\.(\d+)", r"down.\1", new)
        new = new.replace(".resnets.", ".block.").replace(".attentions.", ".attn.")
        new = new.replace(".downsamplers.0.", ".downsample.")
        new = new.replace(".upsamplers.0.", ".upsample.")
        parts = new.split(".")
        for names in (_RESNET, _ATTENTION):
            for old, repl in names.items():
                tail = old.split(".")
                if parts[-1 - len(tail) : -1] == tail:
                    parts = parts[: -1 - len(tail)] + [repl, parts[-1]]
        new = ".".join(parts)
        if re.search(r"(attn(\.\d+|_1))\.(q|k|v|proj_out)\.weight$", new):
            value = value[:, :, None, None]  # ddim's attention projections are 1x1 convs
        out[new] = value
    return out
