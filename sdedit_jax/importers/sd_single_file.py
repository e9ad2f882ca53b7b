"""Stable Diffusion 1.x/2.x single-file checkpoints in the original (CompVis ``ldm``) key layout.

One ``.safetensors`` or ``.ckpt`` holds the U-Net (``model.diffusion_model.*``), the VAE
(``first_stage_model.*``) and the text encoder: SD 1.x's transformers CLIP
(``cond_stage_model.transformer.*``) or SD 2.x's OpenCLIP (``cond_stage_model.model.*``,
fused ``in_proj`` query/key/value; its projection, logit scale and the one block past the
penultimate layer SD 2.x reads are not used).

The architecture comes from a diffusers config folder (``unet/``, ``vae/``,
``text_encoder/`` with their ``config.json``) or is read off the tensors' shapes. Each
expected diffusers key is given its original name here, so the file is checked once, in
the names a user sees in it (every missing, unexpected and mis-shaped tensor in one
error), and then renamed to the diffusers keys that
:mod:`sdedit_jax.importers.diffusers_sd` loads: the architecture mapping stays there.
``.ckpt`` files go through the allow-listed torch reader (a Lightning checkpoint's
``state_dict`` entry is taken). EMA weights (``model_ema.<key without dots>``) replace the
U-Net's when the file has them, unless ``ema=False``. SDXL's files (Stability's ``sgm``
layout) share these tables under other prefixes: :mod:`.sdxl_single_file`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from sdedit_jax.importers import diffusers, diffusers_sd, state_dict, torch_checkpoint
from sdedit_jax.models import clip_text, sd_unet, vae
from sdedit_jax.util import files

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")  # LitEma's, beside the weights
# Buffers of ldm's LatentDiffusion that are not weights of the three networks.
_IGNORED = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    *EMA_BUFFERS,
    f"{TEXT_PREFIX}text_model.embeddings.position_ids",
    f"{OPEN_CLIP_PREFIX}text_projection",
    f"{OPEN_CLIP_PREFIX}logit_scale",
}
COMPONENTS = ("unet", "vae", "text_encoder")

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's text_time embedding
    "add_embedding.linear_2": "label_emb.0.2",
}
_VAE_LINEAR = re.compile(
    r"first_stage_model\.(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight"
)
_TRANSPOSED = re.compile(r".+\.model\.text_projection")
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _resnet(rest: str) -> str:
    name, _, leaf = rest.partition(".")
    return f"{_RESNET[name]}.{leaf}"


def unet_key(key: str, config: sd_unet.SDUNetConfig) -> str:
    """The original name of one diffusers ``UNet2DConditionModel`` key."""
    per_level = config.layers_per_block + 1
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return UNET_PREFIX + old + key[len(new) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + level * per_level + layer
        inner = f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
    elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        block, inner = (int(m[1]) + 1) * per_level, f"0.op.{m[2]}"
    elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        if m[1] == "attentions":
            return f"{UNET_PREFIX}middle_block.1.{m[3]}"
        return f"{UNET_PREFIX}middle_block.{2 * int(m[2])}.{_resnet(m[3])}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = level * per_level + layer
        inner = f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
    elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        has_attention = tuple(reversed(config.up_cross_attention))[level]
        block = level * per_level + config.layers_per_block
        inner = f"{2 if has_attention else 1}.conv.{m[2]}"
    else:
        raise KeyError(f"no original name for U-Net key {key}")
    side = "input_blocks" if key.startswith("down") else "output_blocks"
    return f"{UNET_PREFIX}{side}.{block}.{inner}"


def vae_key(key: str, config: vae.VAEConfig) -> str:
    """The original name of one diffusers ``AutoencoderKL`` key."""
    levels = len(config.block_out_channels)
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{VAE_PREFIX}{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    key = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", key)
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key
    )
    key = re.sub(r"\.resnets\.(\d+)\.", r".block.\1.", key)
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    key = key.replace(".downsamplers.0.", ".downsample.").replace(".upsamplers.0.", ".upsample.")
    return VAE_PREFIX + key


def text_key(key: str, prefix: str = TEXT_PREFIX) -> str:
    """The original name of one transformers ``CLIPTextModel`` key (SD 1.x; SDXL's
    first encoder under another ``prefix``)."""
    return f"{prefix}text_model.{key}"


_OPEN_CLIP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",  # SDXL's pooled projection, transposed
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def open_clip_key(key: str, prefix: str = OPEN_CLIP_PREFIX) -> tuple[str, int]:
    """The OpenCLIP name of one ``CLIPTextModel`` key (SD 2.x; SDXL's second encoder under
    another ``prefix``), and the key's place in that tensor along its first axis (query,
    key and value share one ``in_proj``)."""
    if key in _OPEN_CLIP:
        return prefix + _OPEN_CLIP[key], 0
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m is None:
        raise KeyError(f"no OpenCLIP name for text encoder key {key}")
    block = f"{prefix}transformer.resblocks.{m[1]}"
    if m[2].startswith("self_attn.") and m[2].removeprefix("self_attn.") in _QKV:
        return f"{block}.attn.in_proj_{m[3]}", _QKV.index(m[2].removeprefix("self_attn."))
    return f"{block}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}", 0


def ema_key(key: str) -> str:
    """ldm's name for the EMA copy of a U-Net weight: its path without dots."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def _original_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """ldm's VAE attention uses 1 x 1 convolutions where diffusers has linear layers, and
    OpenCLIP multiplies by its projection from the right (transformers: from the left)."""
    if _VAE_LINEAR.fullmatch(key):
        return (*shape, 1, 1)
    return tuple(reversed(shape)) if _TRANSPOSED.fullmatch(key) else shape


Parts = tuple[tuple[str, tuple[int, ...]], ...]
Expected = dict[str, tuple[str, Parts, tuple[int, ...]]]
Rename = Callable[[str], tuple[str, int]]


def expected_tensors(configs: Mapping[str, Any], open_clip: bool = False) -> Expected:
    """Every original key with its component, the diffusers keys and shapes it holds
    (stacked along its first axis) and its own torch shape."""
    text = open_clip_key if open_clip else (lambda k: (text_key(k), 0))
    return expected_from(
        configs,
        {
            "unet": (sd_unet, lambda k: (unet_key(k, configs["unet"]), 0)),
            "vae": (vae, lambda k: (vae_key(k, configs["vae"]), 0)),
            "text_encoder": (clip_text, text),
        },
    )


def expected_from(
    configs: Mapping[str, Any], renames: Mapping[str, tuple[Any, Rename]]
) -> Expected:
    """:func:`expected_tensors` of any components: ``renames`` gives each one's network
    module and the original name (and place in a fused tensor) of each diffusers key."""
    expected = {}
    for component, (module, rename) in renames.items():
        grouped: dict[str, list[tuple[int, str, tuple[int, ...]]]] = {}
        for key, shape in diffusers_sd.expected_tensors(
            module.abstract(configs[component])[1]
        ).items():
            original, index = rename(key)
            grouped.setdefault(original, []).append((index, key, shape))
        for original, parts in grouped.items():
            parts.sort()
            rows = sum(shape[0] for _, _, shape in parts)
            shape = parts[0][2] if len(parts) == 1 else (rows, *parts[0][2][1:])
            held = tuple((key, part_shape) for _, key, part_shape in parts)
            expected[original] = (component, held, _original_shape(original, shape))
    return expected


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """The flat state dict of a ``.safetensors`` or ``.ckpt`` (its ``state_dict`` entry)."""
    if path.endswith(".safetensors"):  # read tensor by tensor as the state is filled
        return dict(diffusers.lazy_tensors(path))
    obj = torch_checkpoint.read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return torch_checkpoint.state_dict_from(obj, path)


def normalise(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Text encoders saved by old transformers lack the ``text_model.`` level; files
    converted from diffusers may keep the VAE attention's linear (2-d) weights."""
    out = {}
    for key, value in tensors.items():
        if key.startswith(TEXT_PREFIX) and not key.startswith(TEXT_PREFIX + "text_model."):
            key = f"{TEXT_PREFIX}text_model.{key[len(TEXT_PREFIX) :]}"
        if _VAE_LINEAR.fullmatch(key) and len(np.shape(value)) == 2:
            value = np.asarray(value).reshape(*np.shape(value), 1, 1)
        out[key] = value
    return out


def split_tensors(
    source: str, tensors: Mapping[str, Any], configs: Mapping[str, Any], ema: bool = True
) -> dict[str, dict[str, Any]]:
    """Each component's diffusers state dict, after one check of every key of the file."""
    tensors = normalise(tensors)
    open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in tensors)
    skipped = set(_IGNORED)
    if open_clip:  # SD 2.x reads the penultimate layer: the next block is not used
        past = (
            f"{OPEN_CLIP_PREFIX}transformer.resblocks.{configs['text_encoder'].num_hidden_layers}."
        )
        skipped |= {k for k in tensors if k.startswith(past)}
    return split_checked(source, tensors, expected_tensors(configs, open_clip), skipped, ema)


def split_checked(
    source: str,
    tensors: Mapping[str, Any],
    expected: Expected,
    skipped: set[str],
    ema: bool = True,
) -> dict[str, dict[str, Any]]:
    """:func:`split_tensors` against any table of :func:`expected_from`: the keys of
    ``skipped`` are not weights; the U-Net is read from its EMA copy where ``ema`` and the
    file has one (the training weights are then not read, nor the copy without ``ema``)."""
    use_ema = ema and any(k.startswith(EMA_PREFIX) and k not in skipped for k in tensors)
    stored = {}  # the key each expected weight is read from
    for key in expected:
        stored[key] = ema_key(key) if use_ema and key.startswith(UNET_PREFIX) else key
    skipped = set(skipped)
    if use_ema:
        skipped |= {k for k in tensors if k.startswith(UNET_PREFIX)}
    elif not ema:
        skipped |= {k for k in tensors if k.startswith(EMA_PREFIX)}
    found = {k: v for k, v in tensors.items() if k not in skipped}
    state_dict.check_tensors(
        source, found, {stored[k]: shape for k, (_, _, shape) in expected.items()}
    )
    split: dict[str, dict[str, Any]] = {c: {} for c, _, _ in expected.values()}
    for key, (component, parts, _) in expected.items():
        transposed = bool(_TRANSPOSED.fullmatch(key))
        for index, (new_key, shape) in enumerate(parts):
            piece = Piece(tensors[stored[key]], transposed, index, len(parts), tuple(shape))
            split[component][new_key] = piece
    return split


@dataclasses.dataclass(frozen=True)
class Piece:
    """One diffusers tensor of a file's tensor (transposed, or one of its fused q/k/v
    thirds), read only when the state is filled (``np.asarray``), so a file of several
    GB is never all in memory."""

    tensor: Any
    transposed: bool
    index: int
    count: int
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(getattr(self.tensor, "dtype", np.float32))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        value = np.asarray(self.tensor)
        value = value.T if self.transposed else value
        part = np.split(value, self.count)[self.index].reshape(self.shape)
        return np.array(part, dtype)  # a copy: a view would keep the whole fused tensor


def configs_from(folder: str) -> dict[str, Any]:
    """The three components' frozen configs from a diffusers folder's config.json files."""
    readers = {
        "unet": diffusers_sd.unet_config,
        "vae": diffusers_sd.vae_config,
        "text_encoder": diffusers_sd.text_encoder_config,
    }
    configs = {}
    for component, reader in readers.items():
        path = files.join(folder, component, diffusers_sd.CONFIG_FILE)
        try:
            configs[component] = reader(diffusers.read_json(path))
        except ValueError as err:
            message = str(err)
            raise type(err)(message if path in message else f"{path}: {err}") from None
    return configs


def load(
    path: str,
    config_folder: str | None = None,
    ema: bool = True,
    tensors: Mapping[str, Any] | None = None,
    dtype: Any = None,
) -> dict[str, diffusers_sd.Component]:
    """The U-Net, VAE and text encoder of a single-file checkpoint, with the architecture
    of ``config_folder`` (a diffusers SD folder, or one with only the three config.json),
    or inferred from the tensors (:func:`infer_configs`) without one; ``tensors``: the
    file's state dict where already read; weights in ``dtype`` (default float32)."""
    configs = configs_from(config_folder) if config_folder is not None else None
    tensors = read_tensors(path) if tensors is None else tensors
    if configs is None:
        configs = infer_configs(tensors, path)
    split = split_tensors(path, tensors, configs, ema)
    states = {
        "unet": diffusers_sd.unet_state,
        "vae": diffusers_sd.vae_state,
        "text_encoder": diffusers_sd.text_encoder_state,
    }
    return {
        c: diffusers_sd.Component(configs[c], states[c](split[c], configs[c], path, dtype), path)
        for c in COMPONENTS
    }


# --- architecture from the tensors ----------------------------------------------------------


def _count(tensors: Mapping[str, Any], pattern: str) -> int:
    """How many distinct indices the ``(\\d+)`` of ``pattern`` takes among the keys."""
    regex = re.compile(pattern)
    return len({m[1] for k in tensors if (m := regex.match(k))})


def dims(tensors: Mapping[str, Any], key: str) -> tuple[int, ...]:
    """The shape of the tensor ``key``, which the architecture is inferred from."""
    if key not in tensors:
        raise state_dict.StateDictError(f"cannot infer the architecture: no tensor {key}")
    return tuple(int(n) for n in np.shape(tensors[key]))


def _heads(width: int) -> int:
    """ldm's 64 channels per head (at least one head in a narrower layer)."""
    return max(1, width // 64)


def infer_unet(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config.json from ldm's U-Net tensors. Head counts are not
    in the tensors: ldm's SD 1.x config has 8 heads, SD 2.x's (linear projections) 64
    channels per head; the native size is taken as 64 latents (SD 2.x 768 px: 96)."""
    p = UNET_PREFIX
    levels = _count(tensors, rf"{re.escape(p)}input_blocks\.(\d+)\.0\.op\.weight") + 1
    blocks = _count(tensors, rf"{re.escape(p)}input_blocks\.(\d+)\.")
    layers = blocks // levels - 1
    first = [1 + level * (layers + 1) for level in range(levels)]
    channels = [dims(tensors, f"{p}input_blocks.{i}.0.out_layers.3.weight")[0] for i in first]
    down = [f"{p}input_blocks.{i}.1." for i in first]
    up = [f"{p}output_blocks.{level * (layers + 1)}.1." for level in range(levels)]
    down_attn = [f"{b}proj_in.weight" in tensors for b in down]
    up_attn = [f"{b}proj_in.weight" in tensors for b in up]
    attention = next((b for b, a in zip(down + up, down_attn + up_attn, strict=True) if a), None)
    if attention is None:
        raise state_dict.StateDictError("cannot infer the architecture: no attention blocks")
    linear = len(dims(tensors, f"{attention}proj_in.weight")) == 2
    depth = [
        _count(tensors, rf"{re.escape(b)}transformer_blocks\.(\d+)\.") if a else 1
        for b, a in zip(down, down_attn, strict=True)
    ]
    return {
        "in_channels": dims(tensors, f"{p}input_blocks.0.0.weight")[1],
        "out_channels": dims(tensors, f"{p}out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "cross_attention_dim": dims(tensors, f"{attention}transformer_blocks.0.attn2.to_k.weight")[
            1
        ],
        "attention_head_dim": [_heads(c) for c in channels] if linear else 8,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth,
    }


def infer_vae(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """An ``AutoencoderKL`` config.json from ldm's VAE tensors (scaling factor 0.18215, SD's)."""
    p = VAE_PREFIX
    levels = _count(tensors, rf"{re.escape(p)}encoder\.down\.(\d+)\.")
    channels = [
        dims(tensors, f"{p}encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)
    ]
    return {
        "in_channels": dims(tensors, f"{p}encoder.conv_in.weight")[1],
        "out_channels": dims(tensors, f"{p}decoder.conv_out.weight")[0],
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": _count(tensors, rf"{re.escape(p)}encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": dims(tensors, f"{p}post_quant_conv.weight")[1],
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def infer_clip(tensors: Mapping[str, Any], prefix: str = TEXT_PREFIX) -> dict[str, Any]:
    """A ``CLIPTextModel`` config.json of transformers' CLIP under ``prefix`` (SD 1.x's,
    SDXL's first encoder): quick-GELU, 64 channels per head."""
    p = f"{prefix}text_model."
    vocab, hidden = dims(tensors, f"{p}embeddings.token_embedding.weight")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": dims(tensors, f"{p}encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": _count(tensors, rf"{re.escape(p)}encoder\.layers\.(\d+)\."),
        "num_attention_heads": _heads(hidden),
        "max_position_embeddings": dims(tensors, f"{p}embeddings.position_embedding.weight")[0],
        "hidden_act": "quick_gelu",
    }


def infer_open_clip(
    tensors: Mapping[str, Any], prefix: str = OPEN_CLIP_PREFIX, unread_blocks: int = 1
) -> dict[str, Any]:
    """A ``CLIPTextModel`` config.json of OpenCLIP under ``prefix``: GELU, 64 channels per
    head, the last ``unread_blocks`` blocks left out (SD 2.x reads the penultimate layer)."""
    vocab, hidden = dims(tensors, f"{prefix}token_embedding.weight")
    blocks = _count(tensors, rf"{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": dims(tensors, f"{prefix}transformer.resblocks.0.mlp.c_fc.weight")[0],
        "num_hidden_layers": blocks - unread_blocks,
        "num_attention_heads": _heads(hidden),
        "max_position_embeddings": dims(tensors, f"{prefix}positional_embedding")[0],
        "hidden_act": "gelu",
    }


def infer_text_encoder(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """SD 1.x's CLIP or SD 2.x's OpenCLIP, whichever the file holds."""
    if f"{OPEN_CLIP_PREFIX}token_embedding.weight" in tensors:
        return infer_open_clip(tensors)
    return infer_clip(tensors)


def infer_configs(tensors: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """The three components' frozen configs, read off a single file's tensors."""
    tensors = normalise(tensors)
    try:
        return {
            "unet": diffusers_sd.unet_config(infer_unet(tensors)),
            "vae": diffusers_sd.vae_config(infer_vae(tensors)),
            "text_encoder": diffusers_sd.text_encoder_config(infer_text_encoder(tensors)),
        }
    except ValueError as err:
        raise type(err)(f"{source}: {err}" if source else str(err)) from None
