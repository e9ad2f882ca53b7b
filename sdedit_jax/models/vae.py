"""Stable Diffusion's image autoencoder (diffusers' ``AutoencoderKL``), NNX, NHWC.

``vae.encode(x)`` maps pixels in [-1, 1] to the posterior's ``(mean, logvar)``
(``latent_dist.mean``/``.logvar``, unscaled); ``vae.decode(z)`` maps unscaled latents
back to pixels (``decode(z).sample``). The diffusion model works on
``mean * scaling_factor``: the caller scales (``decode(z / scaling_factor)``), so
the codec stays the reference's. Module names mirror diffusers' for the importer.
With ``compute_dtype="bfloat16"`` activations run in bfloat16; outputs are float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdedit_jax.models import initialise
from sdedit_jax.models.architecture import UnsupportedConfig
from sdedit_jax.models.ddpm_unet import COMPUTE_DTYPES
from sdedit_jax.models.sd_layers import Attention, Conv, GroupNorm, Resnet, attend, upsample_nearest
from sdedit_jax.util.config import frozen

Array = jax.Array
EPS = 1e-6  # diffusers' resnet_eps of the VAE's blocks and norms


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of :class:`AutoencoderKL` (frozen: static under jit).

    Attributes:
        sample_size: pixel side the autoencoder was trained at (fully convolutional).
        in_channels, out_channels: image channels.
        block_out_channels: encoder channels per level (the decoder mirrors them);
            the latents are ``2 ** (levels - 1)`` times smaller than the image.
        layers_per_block: resnets per encoder level (the decoder has one more).
        latent_channels: channels of the latents.
        norm_num_groups: GroupNorm groups.
        mid_attention: self-attention in the middle blocks.
        scaling_factor: the diffusion model's latents are ``mean * scaling_factor``.
        compute_dtype: "float32" or "bfloat16".
    """

    sample_size: int = 512
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_attention: bool = True
    scaling_factor: float = 0.18215
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise UnsupportedConfig(
                f"compute_dtype: must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise UnsupportedConfig(
                    f"block_out_channels: {c} is not divisible by norm_num_groups="
                    f"{self.norm_num_groups}"
                )

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (8 for the published VAEs)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | VAEConfig) -> VAEConfig:
        """From this class's own fields (as written to ``model_info.json``); strict."""
        return frozen(cls, config, "vae", error=UnsupportedConfig)

    def to_config(self) -> dict[str, Any]:
        """JSON-ready fields (:meth:`from_config` inverts it)."""
        return dataclasses.asdict(self)


class SpatialAttention(Attention):
    """One-head self-attention over all pixels with GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        super().__init__(channels, channels, 1, channels, qkv_bias=True, rngs=rngs)
        self.group_norm = GroupNorm(channels, groups, EPS)

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)
        out = self.to_out(attend(self.to_q(y), self.to_k(y), self.to_v(y), 1))
        return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """``UNetMidBlock2D`` without time embedding: resnet, (attention), resnet."""

    def __init__(self, channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        groups = cfg.norm_num_groups
        self.resnets = nnx.List(
            [Resnet(channels, channels, None, groups, EPS, rngs=rngs) for _ in range(2)]
        )
        self.attentions = nnx.List(
            [SpatialAttention(channels, groups, rngs=rngs)] if cfg.mid_attention else []
        )

    def __call__(self, x: Array) -> Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    """Stride-2 conv after padding right/bottom by one (diffusers' ``padding=0``)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(x, stride=2, pads=((0, 1), (0, 1)))


class Upsample(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = Conv(channels, channels, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(upsample_nearest(x, (2 * x.shape[1], 2 * x.shape[2])))


class Level(nnx.Module):
    """``DownEncoderBlock2D``/``UpDecoderBlock2D``: resnets, then an optional resampler."""

    def __init__(self, c_in: int, c_out: int, n: int, resampler: Any, cfg: VAEConfig, *, rngs):
        groups = cfg.norm_num_groups
        self.resnets = nnx.List(
            [
                Resnet(c_in if i == 0 else c_out, c_out, None, groups, EPS, rngs=rngs)
                for i in range(n)
            ]
        )
        self.resampler = resampler

    def __call__(self, x: Array) -> Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.resampler is None else self.resampler(x)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        chans = cfg.block_out_channels
        self.conv_in = Conv(cfg.in_channels, chans[0], rngs=rngs)
        blocks, c = [], chans[0]
        for level, c_out in enumerate(chans):
            down = Downsample(c_out, rngs=rngs) if level != len(chans) - 1 else None
            blocks.append(Level(c, c_out, cfg.layers_per_block, down, cfg, rngs=rngs))
            c = c_out
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(c, cfg, rngs=rngs)
        self.conv_norm_out = GroupNorm(c, cfg.norm_num_groups, EPS)
        self.conv_out = Conv(c, 2 * cfg.latent_channels, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        chans = tuple(reversed(cfg.block_out_channels))
        self.conv_in = Conv(cfg.latent_channels, chans[0], rngs=rngs)
        self.mid_block = MidBlock(chans[0], cfg, rngs=rngs)
        blocks, c = [], chans[0]
        for i, c_out in enumerate(chans):
            up = Upsample(c_out, rngs=rngs) if i != len(chans) - 1 else None
            blocks.append(Level(c, c_out, cfg.layers_per_block + 1, up, cfg, rngs=rngs))
            c = c_out
        self.up_blocks = nnx.List(blocks)  # lowest resolution first, as in diffusers
        self.conv_norm_out = GroupNorm(c, cfg.norm_num_groups, EPS)
        self.conv_out = Conv(c, cfg.out_channels, rngs=rngs)

    def __call__(self, z: Array) -> Array:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
    """``encode(x) -> (mean, logvar)`` and ``decode(z) -> x``, NHWC, unscaled latents."""

    def __init__(self, config: Mapping[str, Any] | VAEConfig, *, rngs: nnx.Rngs):
        cfg = VAEConfig.from_config(config)
        self.cfg = cfg
        latent = 2 * cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs)
        self.quant_conv = Conv(latent, latent, 1, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.post_quant_conv = Conv(cfg.latent_channels, cfg.latent_channels, 1, rngs=rngs)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """The posterior's mean and log-variance (clipped to [-30, 20] as diffusers does)."""
        moments = self.quant_conv(self.encoder(x.astype(jnp.dtype(self.cfg.compute_dtype))))
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        """Pixels (about [-1, 1], not clipped) of unscaled latents ``z``."""
        h = self.post_quant_conv(z.astype(jnp.dtype(self.cfg.compute_dtype)))
        return self.decoder(h).astype(jnp.float32)


def build(config: Mapping[str, Any] | VAEConfig, seed: int) -> AutoencoderKL:
    """A randomly initialised :class:`AutoencoderKL` (see :func:`initialise.build`)."""
    return initialise.build(AutoencoderKL, VAEConfig.from_config(config), seed)


def abstract(config: VAEConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only state of the autoencoder of ``config``."""
    return initialise.abstract(AutoencoderKL, config)
