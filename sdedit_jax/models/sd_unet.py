"""Stable Diffusion 1.x/2.x's text-conditioned U-Net (diffusers' ``UNet2DConditionModel``), NNX.

The module tree mirrors diffusers' names (``down_blocks[i].attentions[j].transformer_blocks[k]
.attn2.to_q`` ...), so the importer (:mod:`sdedit_jax.importers.diffusers_sd`) only
renames leaves and transposes kernels. Layout is NHWC; inference only (no dropout).
With ``compute_dtype="bfloat16"`` weights and activations run in bfloat16 (norm
statistics and softmax in float32); inputs and outputs stay float32.

``net(z, t, cond)``: ``z`` latents ``[B, H, W, C]``; ``t`` diffusers' timestep (float,
0..T-1, scalar or ``[B]``); ``cond`` the conditioning pytree ``{"text": h}`` with ``h``
the text encoder's last hidden state ``[B, L, cross_attention_dim]`` (a bare array is
read as ``{"text": array}``). Returns ``UNet2DConditionModel(z, t, h).sample`` (the
noise, or v for v-prediction models), float32.

SD 1.x: cross-attention dim 768, 8 heads per level, 1x1-conv projections. SD 2.x: 1024,
heads per level (diffusers' config calls them ``attention_head_dim``), linear projections.
SDXL adds diffusers' ``text_time`` embedding to the timestep embedding: the pooled text
embedding and the sinusoidal features of the micro-conditioning ``time_ids`` (sizes,
crop, aesthetic score), read from ``cond["text_embeds"]`` ``[B, P]`` and
``cond["time_ids"]`` ``[B, K]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdedit_jax.models import initialise
from sdedit_jax.models.architecture import Architecture, UnsupportedConfig
from sdedit_jax.models.ddpm_unet import COMPUTE_DTYPES, TimestepEmbedding, timestep_features
from sdedit_jax.models.sd_layers import (
    Attention,
    Conv,
    GroupNorm,
    LayerNorm,
    Linear,
    Resnet,
    upsample_nearest,
)
from sdedit_jax.util.config import frozen

Array = jax.Array


def _per_level(name: str, value: tuple, levels: int) -> None:
    if len(value) != levels:
        raise UnsupportedConfig(f"{name}: {len(value)} levels, block_out_channels has {levels}")


@dataclasses.dataclass(frozen=True)
class SDUNetConfig:
    """Hyper-parameters of :class:`SDUNet` (frozen: hashable and static under jit).

    Attributes:
        sample_size: latent side the model was trained at (it is fully convolutional).
        in_channels, out_channels: latent channels in and out.
        block_out_channels: channels per level (level 0 = full size).
        down_cross_attention, up_cross_attention: per level, whether its blocks have
            transformers (``CrossAttn*Block2D``) or only resnets (``*Block2D``).
        layers_per_block: resnets per level on the way down (one more going up).
        attention_heads: heads per level (the middle block uses the last).
        transformer_layers_per_block: transformer blocks per attention, per level.
        cross_attention_dim: width of the text encoder's hidden states.
        use_linear_projection: linear (SD 2.x) instead of 1x1-conv (SD 1.x) proj_in/out.
        norm_num_groups, norm_eps: GroupNorm settings of the resnets.
        flip_sin_to_cos, freq_shift: timestep embedding variant (SD: True, 0).
        downsample_padding: padding of the stride-2 downsampling convs.
        addition_time_embed_dim: SDXL: sinusoidal features per ``time_ids`` value
            (None: no added embedding, SD 1.x/2.x).
        projection_class_embeddings_input_dim: SDXL: width of the added embedding's
            input, the pooled text embedding and every ``time_ids`` value's features.
        compute_dtype: "float32" or "bfloat16" (activations and weights).
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_cross_attention: tuple[bool, ...] = (True, True, True, False)
    up_cross_attention: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    compute_dtype: str = "float32"

    def __post_init__(self):
        if (self.addition_time_embed_dim is None) != (
            self.projection_class_embeddings_input_dim is None
        ):
            raise UnsupportedConfig(
                "addition_time_embed_dim, projection_class_embeddings_input_dim: the text_time "
                "embedding needs both (or neither)"
            )
        levels = len(self.block_out_channels)
        for name in (
            "down_cross_attention",
            "up_cross_attention",
            "attention_heads",
            "transformer_layers_per_block",
        ):
            _per_level(name, getattr(self, name), levels)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise UnsupportedConfig(
                f"compute_dtype: must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}"
            )
        for c, heads in zip(self.block_out_channels, self.attention_heads, strict=True):
            if c % self.norm_num_groups:
                raise UnsupportedConfig(
                    f"block_out_channels: {c} is not divisible by norm_num_groups="
                    f"{self.norm_num_groups}"
                )
            if heads < 1 or c % heads:
                raise UnsupportedConfig(
                    f"attention_heads: {heads} heads do not divide {c} channels"
                )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | SDUNetConfig) -> SDUNetConfig:
        """From this class's own fields (as written to ``model_info.json``); strict."""
        return frozen(cls, config, "model", error=UnsupportedConfig)

    def to_config(self) -> dict[str, Any]:
        """JSON-ready fields (:meth:`from_config` inverts it)."""
        return dataclasses.asdict(self)


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-LayerNorm."""

    def __init__(self, dim: int, heads: int, context_dim: int, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, 1e-5)
        self.attn1 = Attention(dim, dim, heads, dim // heads, qkv_bias=False, rngs=rngs)
        self.norm2 = LayerNorm(dim, 1e-5)
        self.attn2 = Attention(dim, context_dim, heads, dim // heads, qkv_bias=False, rngs=rngs)
        self.norm3 = LayerNorm(dim, 1e-5)
        self.ff = FeedForward(dim, rngs=rngs)

    def __call__(self, x: Array, context: Array) -> Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class FeedForward(nnx.Module):
    """GEGLU: ``proj`` to twice the inner width, ``value * gelu(gate)``, ``out`` back."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.proj = Linear(dim, 2 * 4 * dim, rngs=rngs)
        self.out = Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        gelu = jax.nn.gelu(gate.astype(jnp.float32), approximate=False).astype(x.dtype)
        return self.out(value * gelu)


class Transformer2D(nnx.Module):
    """diffusers' ``Transformer2DModel`` on continuous inputs, with a residual."""

    def __init__(self, channels: int, heads: int, depth: int, cfg: SDUNetConfig, *, rngs: nnx.Rngs):
        self.norm = GroupNorm(channels, cfg.norm_num_groups, 1e-6)
        self.linear = cfg.use_linear_projection
        proj = Linear if self.linear else functools.partial(Conv, size=1)
        self.proj_in = proj(channels, channels, rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(channels, heads, cfg.cross_attention_dim, rngs=rngs)
                for _ in range(depth)
            ]
        )
        self.proj_out = proj(channels, channels, rngs=rngs)

    def __call__(self, x: Array, context: Array) -> Array:
        b, height, width, c = x.shape
        h = self.norm(x)
        # A 1x1 conv and a linear layer over NHWC channels are the same product.
        h = self.proj_in(h.reshape(b, height * width, c) if self.linear else h)
        h = h.reshape(b, height * width, c)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h if self.linear else h.reshape(b, height, width, c)
        return x + self.proj_out(h).reshape(b, height, width, c)


class Downsample(nnx.Module):
    def __init__(self, channels: int, padding: int, *, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, rngs=rngs)
        self.pads = ((padding, padding),) * 2

    def __call__(self, x: Array) -> Array:
        return self.conv(x, stride=2, pads=self.pads)


class Upsample(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, rngs=rngs)

    def __call__(self, x: Array, size: tuple[int, int]) -> Array:
        return self.conv(upsample_nearest(x, size))


class Block(nnx.Module):
    """One level: resnets, each followed by a transformer when ``attention``, then a resampler."""

    def __init__(
        self,
        c_ins: list[int],
        c_out: int,
        temb_dim: int,
        level: int,
        attention: bool,
        resampler: Downsample | Upsample | None,
        cfg: SDUNetConfig,
        *,
        rngs: nnx.Rngs,
    ):
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List([Resnet(c, c_out, temb_dim, groups, eps, rngs=rngs) for c in c_ins])
        heads, depth = cfg.attention_heads[level], cfg.transformer_layers_per_block[level]
        self.attentions = nnx.List(
            [Transformer2D(c_out, heads, depth, cfg, rngs=rngs) for _ in c_ins] if attention else []
        )
        self.resampler = resampler


class MidBlock(nnx.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    def __init__(self, channels: int, temb_dim: int, cfg: SDUNetConfig, *, rngs: nnx.Rngs):
        groups, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List(
            [Resnet(channels, channels, temb_dim, groups, eps, rngs=rngs) for _ in range(2)]
        )
        heads, depth = cfg.attention_heads[-1], cfg.transformer_layers_per_block[-1]
        self.attentions = nnx.List([Transformer2D(channels, heads, depth, cfg, rngs=rngs)])

    def __call__(self, x: Array, temb: Array, context: Array) -> Array:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


def added_condition(cond: Any, batch: int, cfg: SDUNetConfig) -> tuple[Array, Array]:
    """``cond["text_embeds"]`` ``[B, P]`` and ``cond["time_ids"]`` ``[B, K]``, checked
    against the batch and against the added embedding's input width."""
    parts = [
        cond.get(k) if isinstance(cond, Mapping) else None for k in ("text_embeds", "time_ids")
    ]
    if parts[0] is None or parts[1] is None:
        raise ValueError("cond: an SDXL U-Net needs cond['text_embeds'] and cond['time_ids']")
    pooled, time_ids = parts
    if pooled.ndim != 2 or time_ids.ndim != 2 or {pooled.shape[0], time_ids.shape[0]} != {batch}:
        raise ValueError(
            f"cond['text_embeds'], cond['time_ids']: shapes {tuple(pooled.shape)}, "
            f"{tuple(time_ids.shape)}, expected ({batch}, P) and ({batch}, K)"
        )
    width = pooled.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
        raise ValueError(
            f"cond['text_embeds'], cond['time_ids']: {pooled.shape[1]} + {time_ids.shape[1]} x "
            f"{cfg.addition_time_embed_dim} features, the added embedding takes "
            f"{cfg.projection_class_embeddings_input_dim}"
        )
    return pooled, time_ids


def text_condition(cond: Any, batch: int, dim: int) -> Array:
    """``cond["text"]`` (or ``cond`` itself when it is an array), checked against the batch."""
    text = cond.get("text") if isinstance(cond, Mapping) else cond
    if text is None:
        raise ValueError("cond: needs the text encoder's hidden states as cond['text']")
    if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != dim:
        raise ValueError(
            f"cond['text']: shape {tuple(text.shape)}, expected ({batch}, tokens, {dim})"
        )
    return text


class SDUNet(nnx.Module):
    """``net(z[B,H,W,C], t, cond={"text": h}) -> [B,H,W,C]``, diffusers' module names."""

    def __init__(self, config: Mapping[str, Any] | SDUNetConfig, *, rngs: nnx.Rngs):
        cfg = SDUNetConfig.from_config(config)
        self.cfg = cfg
        chans = cfg.block_out_channels
        temb_dim = 4 * chans[0]
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim, rngs=rngs)
        if cfg.projection_class_embeddings_input_dim is not None:
            width = cfg.projection_class_embeddings_input_dim
            self.add_embedding = TimestepEmbedding(width, temb_dim, rngs=rngs)
        self.conv_in = Conv(cfg.in_channels, chans[0], rngs=rngs)
        last = len(chans) - 1
        skips, c = [chans[0]], chans[0]
        down = []
        for level, c_out in enumerate(chans):
            c_ins = [c] + [c_out] * (cfg.layers_per_block - 1)
            resampler = (
                Downsample(c_out, cfg.downsample_padding, rngs=rngs) if level != last else None
            )
            attention = cfg.down_cross_attention[level]
            down.append(Block(c_ins, c_out, temb_dim, level, attention, resampler, cfg, rngs=rngs))
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
            resampler = Upsample(c_out, rngs=rngs) if level != 0 else None
            attention = cfg.up_cross_attention[level]
            up.append(Block(c_ins, c_out, temb_dim, level, attention, resampler, cfg, rngs=rngs))
        self.up_blocks = nnx.List(up)  # lowest resolution first, as in diffusers
        self.conv_norm_out = GroupNorm(c, cfg.norm_num_groups, cfg.norm_eps)
        self.conv_out = Conv(c, cfg.out_channels, rngs=rngs)

    def __call__(self, x: Array, t: Array, cond: Any = None, *, train: bool = False) -> Array:
        """The network's output, float32; ``train`` changes nothing (no dropout)."""
        del train
        cfg = self.cfg
        dtype = jnp.dtype(cfg.compute_dtype)
        context = text_condition(cond, x.shape[0], cfg.cross_attention_dim).astype(dtype)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
        features = timestep_features(
            t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift
        )
        temb = self.time_embedding(features.astype(dtype))
        if cfg.addition_time_embed_dim is not None:
            temb = temb + self._added_embedding(cond, x.shape[0], dtype)
        h = self.conv_in(x.astype(dtype))
        skips = [h]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(h, temb)
                if block.attentions:
                    h = block.attentions[i](h, context)
                skips.append(h)
            if block.resampler is not None:
                h = block.resampler(h)
                skips.append(h)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = resnet(jnp.concatenate([h, skips.pop()], axis=-1), temb)
                if block.attentions:
                    h = block.attentions[i](h, context)
            if block.resampler is not None:
                h = block.resampler(h, skips[-1].shape[1:3])
        h = self.conv_out(nnx.silu(self.conv_norm_out(h)))
        return h.astype(jnp.float32)

    def _added_embedding(self, cond: Any, batch: int, dtype: Any) -> Array:
        """SDXL's ``text_time`` embedding: pooled text and ``time_ids`` features, embedded."""
        cfg = self.cfg
        pooled, time_ids = added_condition(cond, batch, cfg)
        features = timestep_features(
            jnp.asarray(time_ids, jnp.float32).reshape(-1),
            cfg.addition_time_embed_dim,
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        ).reshape(batch, -1)
        inputs = jnp.concatenate([jnp.asarray(pooled, jnp.float32), features], axis=-1)
        return self.add_embedding(inputs.astype(dtype))


def build(config: Mapping[str, Any] | SDUNetConfig, seed: int) -> SDUNet:
    """A randomly initialised :class:`SDUNet` (see :func:`initialise.build`)."""
    return initialise.build(SDUNet, SDUNetConfig.from_config(config), seed)


def abstract(config: SDUNetConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only state of the network of ``config`` (no weights computed)."""
    return initialise.abstract(SDUNet, config)


ARCHITECTURE = Architecture(
    name="sd_unet",
    config_class=SDUNetConfig,
    build=build,
    abstract=abstract,
    image_shape=lambda config: (config.sample_size, config.in_channels),
)
