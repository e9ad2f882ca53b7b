"""diffusers' NCSN++ layout (``UNet2DModel`` with ``Skip*`` blocks) -> the NCSN++ port.

The published ``google/ncsnpp-{church,bedroom,celebahq,ffhq}-256`` folders use
``SkipDownBlock2D``/``AttnSkipDownBlock2D``/``SkipUpBlock2D``/``AttnSkipUpBlock2D``
and ``time_embedding_type="fourier"``. This module turns their ``config.json`` into an
:class:`~sdedit_jax.models.ncsnpp.NCSNppConfig` (refusing what the port does not
reproduce, by field and value) and their state dict (torch names, NCHW/OI layouts,
as numpy arrays) into the model's state, checking every key and shape first.
Both attention spellings are read: ``to_q/to_k/to_v/to_out.0`` (diffusers >= 0.14)
and ``query/key/value/proj_attn`` (older files).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from sdedit_jax.importers import state_dict
from sdedit_jax.models import ncsnpp
from sdedit_jax.models.ncsnpp import NCSNppConfig

_DOWN = ("SkipDownBlock2D", "AttnSkipDownBlock2D")
_UP = ("SkipUpBlock2D", "AttnSkipUpBlock2D")

# UNet2DModel arguments that the Skip-block network never reads (positional-embedding
# and plain-block options) or that only name the saved file.
_IRRELEVANT = {
    "flip_sin_to_cos",
    "freq_shift",
    "downsample_padding",
    "downsample_type",
    "upsample_type",
    "num_train_timesteps",
}
_EXPECTED = {
    "time_embedding_type": "fourier",
    "mid_block_type": "UNetMidBlock2D",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}
_KNOWN = (
    _IRRELEVANT
    | set(_EXPECTED)
    | {
        "sample_size",
        "in_channels",
        "out_channels",
        "center_input_sample",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "mid_block_scale_factor",
        "dropout",
        "act_fn",
        "attention_head_dim",
        "norm_num_groups",
        "attn_norm_num_groups",
        "norm_eps",
        "time_embedding_dim",
    }
)


def _unsupported(field: str, value: Any, why: str) -> ValueError:
    return ValueError(
        f"diffusers config: {field}={value!r} is not supported by the NCSN++ port ({why})"
    )


def config_from_diffusers(
    cfg: Mapping[str, Any], data_range: tuple[float, float] = (0.0, 1.0)
) -> NCSNppConfig:
    """An :class:`NCSNppConfig` reproducing the diffusers ``UNet2DModel`` config ``cfg``.

    Raises a one-line ``ValueError`` naming the first field the port cannot reproduce.
    """
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    unknown = sorted(set(cfg) - _KNOWN)
    if unknown:
        raise _unsupported(unknown[0], cfg[unknown[0]], "unknown UNet2DModel field")
    for field, expected in _EXPECTED.items():
        if field in cfg and cfg[field] != expected:
            raise _unsupported(field, cfg[field], f"needs {expected!r}")
    if "time_embedding_type" not in cfg:
        raise _unsupported("time_embedding_type", None, "needs 'fourier'")
    down, up = list(cfg.get("down_block_types", ())), list(cfg.get("up_block_types", ()))
    widths = [int(c) for c in cfg.get("block_out_channels", ())]
    if not widths or len(down) != len(widths) or len(up) != len(widths):
        raise _unsupported("block_out_channels", widths, "needs one width per down/up block")
    for field, blocks, allowed in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        bad = [b for b in blocks if b not in allowed]
        if bad:
            raise _unsupported(field, bad[0], f"block types must be in {allowed}")
    attn_down = [i for i, b in enumerate(down) if b.startswith("Attn")]
    attn_up = sorted(len(up) - 1 - i for i, b in enumerate(up) if b.startswith("Attn"))
    if attn_down != attn_up:
        raise _unsupported("up_block_types", up, "attention must mirror down_block_types")
    if cfg.get("in_channels", 3) != 3 or cfg.get("out_channels", 3) != 3:
        raise _unsupported("in_channels", cfg.get("in_channels"), "Skip blocks are RGB only")
    if cfg.get("act_fn", "silu") not in ("silu", "swish"):
        raise _unsupported("act_fn", cfg["act_fn"], "needs 'silu'")
    nf = widths[0]
    if any(w % nf for w in widths):
        raise _unsupported("block_out_channels", widths, "widths must be multiples of the first")
    if cfg.get("time_embedding_dim") not in (None, 4 * nf):
        raise _unsupported("time_embedding_dim", cfg["time_embedding_dim"], f"needs {4 * nf}")
    mid_scale = float(cfg.get("mid_block_scale_factor", 1.0))
    if abs(mid_scale - math.sqrt(2.0)) > 1e-6:
        raise _unsupported("mid_block_scale_factor", mid_scale, "Skip blocks rescale by sqrt(2)")
    size = cfg.get("sample_size")
    if not isinstance(size, int):
        raise _unsupported("sample_size", size, "needs one int side length")
    head_dim = cfg.get("attention_head_dim")
    config = NCSNppConfig(
        image_size=size,
        num_channels=3,
        nf=nf,
        ch_mult=tuple(w // nf for w in widths),
        num_res_blocks=int(cfg.get("layers_per_block", 2)),
        attn_resolutions=tuple(size // 2**i for i in attn_down),
        attention_head_dim=None if head_dim is None or head_dim == 0 else int(head_dim),
        dropout=float(cfg.get("dropout", 0.0)),
        fir_kernel=(1, 3, 3, 1),
        skip_rescale=True,
        fourier_scale=16.0,
        norm_eps=float(cfg.get("norm_eps", 1e-5)),
        center_input=bool(cfg.get("center_input_sample", False)),
        data_range=tuple(data_range),
        scale_by_sigma=True,
    )
    _check_group_counts(cfg, config)
    return config


def _check_group_counts(cfg: Mapping[str, Any], config: NCSNppConfig) -> None:
    """diffusers sizes a few GroupNorms differently from NCSN++'s ``min(C // 4, 32)``;
    they agree on the published networks, and anything else is refused."""
    groups = ncsnpp._groups
    widths = [config.nf * m for m in config.ch_mult]
    norm_groups = cfg.get("norm_num_groups")
    attn_groups = cfg.get("attn_norm_num_groups")
    mid = widths[-1]
    checks = [
        ("norm_num_groups", norm_groups, mid),
        ("attn_norm_num_groups", attn_groups if attn_groups is not None else norm_groups, mid),
        ("norm_num_groups", norm_groups, widths[0]),
    ]
    checks += [("block_out_channels", 32, widths[i]) for i in config.attn_levels()]
    skips = config.skip_channels()
    h = widths[-1]
    for level in reversed(range(config.num_levels)):
        for _ in range(config.num_res_blocks + 1):
            skip = skips.pop()
            if level in config.attn_levels():  # AttnSkipUpBlock2D: min(h + skip // 4, 32)
                checks.append(("block_out_channels", min(h + skip // 4, 32), h + skip))
            h = widths[level]
    for field, got, channels in checks:
        if got is not None and got != groups(channels):
            raise _unsupported(
                field,
                cfg.get(field),
                f"diffusers would use {got} GroupNorm groups "
                f"over {channels} channels where NCSN++ uses {groups(channels)}",
            )


def _conv(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO


def _linear(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)  # (out, in) -> (in, out)


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _source_shape(kind, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind is _conv:
        return (shape[3], shape[2], shape[0], shape[1])
    if kind is _linear:
        return (shape[1], shape[0])
    return shape


def _resnet(src: str, dst: str) -> dict[str, tuple[str, Any]]:
    out = {}
    for s, d, kind in (
        ("norm1", "norm1", None),
        ("conv1", "conv1", _conv),
        ("time_emb_proj", "temb_proj", _linear),
        ("norm2", "norm2", None),
        ("conv2", "conv2", _conv),
        ("conv_shortcut", "shortcut", _conv),
    ):
        out.update(_layer(f"{src}.{s}", f"{dst}/{d}", kind))
    return out


def _layer(src: str, dst: str, kind) -> dict[str, tuple[str, Any]]:
    if kind is None:  # GroupNorm
        return {f"{src}.weight": (f"{dst}/scale", _same), f"{src}.bias": (f"{dst}/bias", _same)}
    return {f"{src}.weight": (f"{dst}/kernel", kind), f"{src}.bias": (f"{dst}/bias", _same)}


_ATTN_NEW = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}
_ATTN_OLD = {"query": "q", "key": "k", "value": "v", "proj_attn": "out"}


def _attn(src: str, dst: str, names: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    out = _layer(f"{src}.group_norm", f"{dst}/norm", None)
    for s, d in names.items():
        out.update(_layer(f"{src}.{s}", f"{dst}/{d}", _linear))
    return out


_MID = {"mid_res0": "resnets.0", "mid_attn": "attentions.0", "mid_res1": "resnets.1"}
_BLOCK_PARTS = {
    "attns": "attentions",
    "attn": "attentions.0",
    "down": "resnet_down",
    "up": "resnet_up",
    "combine": "skip_conv",
}
_OUTPUT = {"skip_norm": "conv_norm_out", "skip_conv": "conv_out"}


def _diffusers_name(path: str, last: int) -> str:
    """diffusers' module name of the block at a state path of :func:`ncsnpp.block_paths`."""
    if path in _MID:
        return f"mid_block.{_MID[path]}"
    side, i, part, *j = path.split("/")
    if side == "up" and int(i) == last and part in _OUTPUT:  # the full-size level's output
        return _OUTPUT[part]
    return ".".join([f"{side}_blocks", i, _BLOCK_PARTS.get(part, part), *j])


def key_map(config: NCSNppConfig, old_attention: bool = False) -> dict[str, tuple[str, Any]]:
    """diffusers key -> (model state path, layout transform), for every weight."""
    names = _ATTN_OLD if old_attention else _ATTN_NEW
    m = {"time_proj.weight": ("fourier/W", _same)}
    m.update(_layer("time_embedding.linear_1", "temb0", _linear))
    m.update(_layer("time_embedding.linear_2", "temb1", _linear))
    m.update(_layer("conv_in", "conv_in", _conv))
    last = config.num_levels - 1
    for kind, path in ncsnpp.block_paths(config):
        src = _diffusers_name(path, last)
        if kind == "resnet":
            m.update(_resnet(src, path))
        elif kind == "attn":
            m.update(_attn(src, path, names))
        else:  # one conv ("combine", "conv") or GroupNorm ("norm")
            m.update(_layer(src, path, None if kind == "norm" else _conv))
    shapes = ncsnpp.abstract_params(config)
    return {k: v for k, v in m.items() if v[0] in shapes}  # drops absent conv_shortcuts


def _normalise_keys(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
    """Accepts the old attention spelling, and ``time_proj.W`` (an alias of
    ``time_proj.weight`` in early files) when it equals ``time_proj.weight``."""
    sd = dict(tensors)
    old = any(k.endswith((".query.weight", ".proj_attn.weight")) for k in sd)
    if "time_proj.W" in sd:
        w = sd.pop("time_proj.W")
        if "time_proj.weight" in sd and not np.array_equal(np.asarray(sd["time_proj.weight"]), w):
            raise ValueError("diffusers state dict: time_proj.W differs from time_proj.weight")
        sd.setdefault("time_proj.weight", w)
    return sd, old


def params_from_diffusers(
    tensors: Mapping[str, np.ndarray], config: NCSNppConfig, source: str = "state dict"
) -> nnx.State:
    """The model state from a diffusers NCSN++ state dict (numpy arrays, torch layouts).

    Every key and shape is checked before anything is built; all offending keys are
    reported in one error (``source`` names the file in it).
    """
    sd, old = _normalise_keys(tensors)
    mapping = key_map(config, old_attention=old)
    shapes = ncsnpp.abstract_params(config)
    expected = {k: _source_shape(kind, shapes[dst]) for k, (dst, kind) in mapping.items()}
    state_dict.check_tensors(source, sd, expected)
    flat = {dst: kind(np.asarray(sd[k], np.float32)) for k, (dst, kind) in mapping.items()}
    return state_from_flat(config, flat)


def state_from_flat(config: NCSNppConfig, flat: Mapping[str, np.ndarray]) -> nnx.State:
    """The network's state holding ``flat`` (keys as in :func:`ncsnpp.abstract_params`).

    Importers check the source's tensors first, in the source's own names; filling
    checks every built shape again (see :func:`state_dict.fill_state`).
    """
    return state_dict.fill_state(
        ncsnpp.abstract(config)[1], lambda path, _: flat["/".join(map(str, path))]
    )
