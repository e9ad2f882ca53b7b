"""The DDPM U-Net of SDEdit/DDIM (Ho et al., 2020), in Flax NNX, for published weights.

This is the network of ermongroup/ddim ``models/diffusion.py`` (the one SDEdit
runs), which is numerically the same as diffusers' ``UNet2DModel`` built from
``DownBlock2D``/``AttnDownBlock2D``/``UpBlock2D``/``AttnUpBlock2D`` blocks. The
module tree mirrors diffusers' names (``down_blocks[i].resnets[j].conv1`` ...)
so an importer only renames leaves and transposes kernels
(:mod:`sdedit_jax.importers.diffusers_ddpm`). Layout is NHWC.

Inference only: a checkpoint's training dropout is not part of the network. With
``compute_dtype="bfloat16"`` weights and activations run in bfloat16 (group
norm statistics and softmax in float32); inputs and outputs stay float32. In
float32, convolutions and matmuls ask for full precision (no TF32 on GPUs), so the
port matches the reference on accelerators as on CPU.

``net(x, t)`` (:mod:`~sdedit_jax.models.architecture`'s protocol, unconditional)
takes DDPM's own timestep input (0..T-1, float allowed)
and returns the predicted noise, like ``UNet2DModel(x, t).sample``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdedit_jax.models import initialise, layers
from sdedit_jax.models.architecture import Architecture, UnsupportedConfig, unconditional
from sdedit_jax.util.config import frozen

Array = jax.Array

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DDPMUNetConfig:
    """Hyper-parameters of :class:`DDPMUNet` (frozen: hashable and static under jit).

    Attributes:
        image_size: side length the network was trained at (it is fully convolutional).
        in_channels, out_channels: image channels in and out.
        block_out_channels: channels per resolution level (level 0 = full size).
        layers_per_block: residual blocks per level on the way down (one more going up).
        down_attention, up_attention: per level, whether its blocks have self-attention.
        mid_attention: self-attention between the two middle residual blocks.
        attention_head_dim: channels per attention head; ``None`` = one head (DDPM).
        norm_num_groups, norm_eps: GroupNorm settings.
        flip_sin_to_cos, freq_shift: timestep embedding variant (DDPM: False, 1).
        downsample_padding: 0 = pad right/bottom by one before a stride-2 conv (DDPM),
            1 = symmetric padding.
        resamp_with_conv: convolutions in down/upsampling (False: average pool / nearest only).
        compute_dtype: "float32" or "bfloat16" (activations and weights).
    """

    image_size: int = 256
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512, 512)
    layers_per_block: int = 2
    down_attention: tuple[bool, ...] = (False, False, False, False, True, False)
    up_attention: tuple[bool, ...] = (False, False, False, False, True, False)
    mid_attention: bool = True
    attention_head_dim: int | None = None
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    downsample_padding: int = 0
    resamp_with_conv: bool = True
    compute_dtype: str = "float32"

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for name in ("down_attention", "up_attention"):
            if len(getattr(self, name)) != levels:
                raise UnsupportedConfig(
                    f"{name}: {len(getattr(self, name))} levels, block_out_channels has {levels}"
                )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise UnsupportedConfig(
                f"compute_dtype: must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}"
            )
        if self.downsample_padding not in (0, 1):
            raise UnsupportedConfig(
                f"downsample_padding: must be 0 or 1, got {self.downsample_padding!r}"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise UnsupportedConfig(
                    f"block_out_channels: {c} is not divisible by norm_num_groups="
                    f"{self.norm_num_groups}"
                )
            if self.attention_head_dim is not None and c % self.attention_head_dim:
                raise UnsupportedConfig(
                    f"attention_head_dim: {self.attention_head_dim} does not divide {c} channels"
                )
        if self.image_size % 2 ** (levels - 1):
            raise UnsupportedConfig(
                f"image_size: {self.image_size} is not divisible by 2**{levels - 1}"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | DDPMUNetConfig) -> DDPMUNetConfig:
        """From this class's own fields (as written to ``model_info.json``); strict.

        Model folders converted by earlier versions also record the checkpoint's
        training ``dropout``, which inference never used; it is accepted and dropped.
        """
        if not isinstance(config, cls):
            values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            config = {k: v for k, v in values.items() if k != "dropout"}
        return frozen(cls, config, "model", error=UnsupportedConfig)

    def to_config(self) -> dict[str, Any]:
        """JSON-ready fields (:meth:`from_config` inverts it)."""
        return dataclasses.asdict(self)


# --- layers (weights cast to the activation dtype) ------------------------------------------


def _bcast(v: Array, ndim: int) -> Array:
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _precision(dtype: Any) -> jax.lax.Precision:
    """float32 means float32 on accelerators too (no TF32), so parity holds everywhere;
    bfloat16 runs at the hardware's native precision."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


class Conv(layers.ConvParams):
    """NHWC conv with bias in the activations' dtype: SAME, or strided with explicit pads."""

    def __call__(
        self, x: Array, stride: int = 1, pads: tuple[tuple[int, int], ...] | None = None
    ) -> Array:
        half = self.kernel.shape[0] // 2
        y = jax.lax.conv_general_dilated(
            x,
            self.kernel[...].astype(x.dtype),
            (stride,) * 2,
            ((half, half),) * 2 if pads is None else pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=_precision(x.dtype),
        )
        return y + _bcast(self.bias[...].astype(x.dtype), y.ndim)


class Linear(nnx.Module):
    def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs):
        self.kernel, self.bias = layers.kernel_and_bias((c_in, c_out), 1.0, rngs)

    def __call__(self, x: Array) -> Array:
        y = jnp.matmul(x, self.kernel[...].astype(x.dtype), precision=_precision(x.dtype))
        return y + _bcast(self.bias[...].astype(x.dtype), x.ndim)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over NHWC; statistics in float32 whatever the activation dtype."""

    def __init__(self, channels: int, groups: int, eps: float):
        self.scale = nnx.Param(jnp.ones((channels,)))
        self.bias = nnx.Param(jnp.zeros((channels,)))
        self.groups, self.eps = groups, eps

    def __call__(self, x: Array) -> Array:
        y = layers.group_norm_float32(x, self.scale[...], self.bias[...], self.groups, self.eps)
        return y.astype(x.dtype)


class ResnetBlock(nnx.Module):
    """GN-SiLU-conv, plus projected time embedding, GN-SiLU-conv, plus (1x1-conv) shortcut."""

    def __init__(
        self, c_in: int, c_out: int, temb_dim: int, cfg: DDPMUNetConfig, *, rngs: nnx.Rngs
    ):
        self.norm1 = GroupNorm(c_in, cfg.norm_num_groups, cfg.norm_eps)
        self.conv1 = Conv(c_in, c_out, rngs=rngs)
        self.time_emb_proj = Linear(temb_dim, c_out, rngs=rngs)
        self.norm2 = GroupNorm(c_out, cfg.norm_num_groups, cfg.norm_eps)
        self.conv2 = Conv(c_out, c_out, rngs=rngs)
        self.conv_shortcut = Conv(c_in, c_out, 1, rngs=rngs) if c_in != c_out else None

    def __call__(self, x: Array, temb: Array) -> Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
    """Self-attention over all pixels with a residual (diffusers' ``Attention`` of UNet2D)."""

    def __init__(self, channels: int, cfg: DDPMUNetConfig, *, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(channels, cfg.norm_num_groups, cfg.norm_eps)
        self.to_q = Linear(channels, channels, rngs=rngs)
        self.to_k = Linear(channels, channels, rngs=rngs)
        self.to_v = Linear(channels, channels, rngs=rngs)
        self.to_out = Linear(channels, channels, rngs=rngs)
        self.heads = 1 if cfg.attention_head_dim is None else channels // cfg.attention_head_dim

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        d = c // self.heads
        y = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = (
            proj(y).reshape(b, h * w, self.heads, d) for proj in (self.to_q, self.to_k, self.to_v)
        )
        precision = _precision(x.dtype)
        logits = jnp.einsum(
            "bihd,bjhd->bhij", q, k, preferred_element_type=jnp.float32, precision=precision
        )
        weights = jax.nn.softmax(logits * (1.0 / math.sqrt(d)), axis=-1).astype(x.dtype)
        out = jnp.einsum("bhij,bjhd->bihd", weights, v, precision=precision)
        out = out.reshape(b, h * w, c)
        return x + self.to_out(out).reshape(b, h, w, c)


class Downsample(nnx.Module):
    def __init__(self, channels: int, cfg: DDPMUNetConfig, *, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, rngs=rngs) if cfg.resamp_with_conv else None
        # A stride-2 conv; downsample_padding=0 is DDPM's: pad only right/bottom by one.
        self.pads = ((cfg.downsample_padding, 1),) * 2

    def __call__(self, x: Array) -> Array:
        if self.conv is None:
            return layers.avg_pool2(x)
        return self.conv(x, stride=2, pads=self.pads)


class Upsample(nnx.Module):
    def __init__(self, channels: int, cfg: DDPMUNetConfig, *, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, rngs=rngs) if cfg.resamp_with_conv else None

    def __call__(self, x: Array) -> Array:
        x = layers.upsample_nearest2(x)
        return x if self.conv is None else self.conv(x)


class Block(nnx.Module):
    """One resolution level: residual blocks, optional attention after each, resampler."""

    def __init__(
        self,
        c_ins: list[int],
        c_out: int,
        temb_dim: int,
        attention: bool,
        resample: type[Downsample] | type[Upsample] | None,
        cfg: DDPMUNetConfig,
        *,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List([ResnetBlock(c, c_out, temb_dim, cfg, rngs=rngs) for c in c_ins])
        self.attentions = nnx.List(
            [Attention(c_out, cfg, rngs=rngs) for _ in c_ins] if attention else []
        )
        self.resampler = None if resample is None else resample(c_out, cfg, rngs=rngs)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, temb_dim: int, cfg: DDPMUNetConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List(
            [ResnetBlock(channels, channels, temb_dim, cfg, rngs=rngs) for _ in range(2)]
        )
        self.attentions = nnx.List(
            [Attention(channels, cfg, rngs=rngs)] if cfg.mid_attention else []
        )

    def __call__(self, x: Array, temb: Array) -> Array:
        x = self.resnets[0](x, temb)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x, temb)


class TimestepEmbedding(nnx.Module):
    def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs):
        self.linear_1 = Linear(c_in, c_out, rngs=rngs)
        self.linear_2 = Linear(c_out, c_out, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.linear_2(nnx.silu(self.linear_1(x)))


def timestep_features(t: Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Array:
    """DDPM's sinusoidal features of a ``[B]`` timestep (float32, ``[B, dim]``)."""
    half = dim // 2
    exponent = -math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    parts = [jnp.sin(angles), jnp.cos(angles)]
    features = jnp.concatenate(parts[::-1] if flip_sin_to_cos else parts, axis=1)
    return jnp.pad(features, ((0, 0), (0, dim % 2)))


class DDPMUNet(nnx.Module):
    """``net(x[B,H,W,C], t[B]) -> eps[B,H,W,C]``, diffusers' module names."""

    def __init__(self, config: Mapping[str, Any] | DDPMUNetConfig, *, rngs: nnx.Rngs):
        cfg = DDPMUNetConfig.from_config(config)
        self.cfg = cfg
        chans = cfg.block_out_channels
        temb_dim = 4 * chans[0]
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim, rngs=rngs)
        self.conv_in = Conv(cfg.in_channels, chans[0], rngs=rngs)
        last = len(chans) - 1
        skips, c = [chans[0]], chans[0]
        down = []
        for level, c_out in enumerate(chans):
            c_ins = [c] + [c_out] * (cfg.layers_per_block - 1)
            resample = Downsample if level != last else None
            down.append(
                Block(c_ins, c_out, temb_dim, cfg.down_attention[level], resample, cfg, rngs=rngs)
            )
            c = c_out
            skips += [c_out] * (cfg.layers_per_block + (level != last))
        self.down_blocks = nnx.List(down)
        self.mid_block = MidBlock(c, temb_dim, cfg, rngs=rngs)
        up = []
        for level in reversed(range(len(chans))):
            c_out, c_ins = chans[level], []
            for _ in range(cfg.layers_per_block + 1):
                c_ins.append(c + skips.pop())
                c = c_out
            resample = Upsample if level != 0 else None
            up.append(
                Block(c_ins, c_out, temb_dim, cfg.up_attention[level], resample, cfg, rngs=rngs)
            )
        self.up_blocks = nnx.List(up)  # lowest resolution first, as in diffusers
        self.conv_norm_out = GroupNorm(c, cfg.norm_num_groups, cfg.norm_eps)
        self.conv_out = Conv(c, cfg.out_channels, rngs=rngs)

    def __call__(self, x: Array, t: Array, cond: None = None, *, train: bool = False) -> Array:
        """Predicted noise, float32. ``t`` is the timestep, ``[B]`` (or a scalar for all).

        ``cond`` must be ``None`` (unconditional); ``train`` changes nothing (no dropout).
        """
        del train
        unconditional(cond, "ddpm_unet")
        cfg = self.cfg
        timesteps = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        dtype = jnp.dtype(cfg.compute_dtype)
        features = timestep_features(
            timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
        )
        temb = self.time_embedding(features.astype(dtype))
        h = self.conv_in(x.astype(dtype))
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(h, temb)
                if block.attentions:
                    h = block.attentions[i](h)
                skips.append(h)
            if block.resampler is not None:
                h = block.resampler(h)
                skips.append(h)
        h = self.mid_block(h, temb)
        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(jnp.concatenate([h, skips.pop()], axis=-1), temb)
                if block.attentions:
                    h = block.attentions[i](h)
            if block.resampler is not None:
                h = block.resampler(h)
        h = self.conv_out(nnx.silu(self.conv_norm_out(h)))
        return h.astype(jnp.float32)


def count_params(state: nnx.State | nnx.Module) -> int:
    """Number of weights (scalars)."""
    state = nnx.state(state) if isinstance(state, nnx.Module) else state
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state))


def build(config: Mapping[str, Any] | DDPMUNetConfig, seed: int) -> DDPMUNet:
    """A randomly initialised :class:`DDPMUNet` (see :func:`initialise.build`)."""
    return initialise.build(DDPMUNet, DDPMUNetConfig.from_config(config), seed)


def abstract(config: DDPMUNetConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only state of the network of ``config`` (no weights computed)."""
    return initialise.abstract(DDPMUNet, config)


ARCHITECTURE = Architecture(
    name="ddpm_unet",
    config_class=DDPMUNetConfig,
    build=build,
    abstract=abstract,
    image_shape=lambda config: (config.image_size, config.in_channels),
)
