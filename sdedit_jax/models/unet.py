"""Score network of the NCSN++/DDPM++ family (Song et al., 2021), in Flax NNX.

A U-Net of time-conditioned residual blocks with self-attention at chosen
resolutions, called ``net(x, t, cond=None, *, train=False, rngs=None)``
(:mod:`~sdedit_jax.models.architecture`). The time input ``t`` depends on the time
embedding (:func:`condition`):

* ``"sinusoidal"`` (DDPM++): ``t`` is the diffusion time in [0, 1],
  scaled by 999 so the features match DDPM's integer timesteps.
* ``"fourier"`` (NCSN++): ``t`` is the noise scale ``sigma`` of the
  perturbation kernel; random Fourier features of ``log sigma`` are used,
  which spreads the geometric sigma range of VE SDEs evenly.

:func:`sdedit_jax.score.condition_value` maps the SDE's time to it, so the network
itself needs no SDE. The network is unconditional (``cond`` must be ``None``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sdedit_jax.models import initialise, layers
from sdedit_jax.models.architecture import Architecture, unconditional
from sdedit_jax.util.config import frozen

Array = jax.Array

TIME_EMBEDDINGS = ("fourier", "sinusoidal")
# The network's time input for each time embedding (:data:`sdedit_jax.score.CONDITIONS`).
TIME_INPUTS = {"fourier": "sigma", "sinusoidal": "t"}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`UNet` (frozen, so it is hashable and static).

    Attributes:
        image_size: height = width of the input.
        num_channels: image channels (3 for RGB).
        nf: base channel count; level ``i`` has ``nf * ch_mult[i]`` channels.
        ch_mult: channel multiplier per resolution level.
        num_res_blocks: residual blocks per level on the way down.
        attn_resolutions: resolutions (side length) with self-attention.
        dropout: dropout rate inside residual blocks (training only).
        time_embedding: ``"fourier"`` or ``"sinusoidal"`` (see module docstring).
        fourier_scale: std of the random Fourier frequencies.
        skip_rescale: scale residual sums by 1/sqrt(2) to keep variance fixed.
        fast_conv: use the matmul weight gradient of :func:`layers.conv2d`.
    """

    image_size: int = 32
    num_channels: int = 3
    nf: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.0
    time_embedding: str = "sinusoidal"
    fourier_scale: float = 16.0
    skip_rescale: bool = True
    fast_conv: bool = False

    def __post_init__(self):
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(
                f"model.time_embedding must be one of {TIME_EMBEDDINGS}, got "
                f"{self.time_embedding!r}"
            )
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(
                f"model.image_size={self.image_size} is not divisible by "
                f"2**(len(model.ch_mult)-1)={2 ** (len(self.ch_mult) - 1)}"
            )
        if self.nf % 4:
            raise ValueError(f"model.nf must be a multiple of 4 (GroupNorm), got {self.nf}")

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | UNetConfig) -> UNetConfig:
        """Builds from a ConfigDict, naming any unknown field instead of ignoring it."""
        return frozen(cls, config, "model")


def _residual_sum(a: Array, b: Array, rescale: bool) -> Array:
    s = a + b
    return s / jnp.sqrt(2.0) if rescale else s


class GaussianFourierFeatures(nnx.Module):
    """Fixed random Fourier features ``[sin(2 pi w x), cos(2 pi w x)]`` (not trained)."""

    def __init__(self, dim: int, scale: float, *, rngs: nnx.Rngs):
        freqs = scale * jax.random.normal(rngs.params(), (dim // 2,))
        # Rounded to bf16-representable values so that bf16 weight files hold them exactly:
        # these frequencies are never trained, and rounding them later would change the model.
        self.freqs = nnx.Variable(freqs.astype(jnp.bfloat16).astype(jnp.float32))

    def __call__(self, x: Array) -> Array:
        angles = 2.0 * jnp.pi * x[:, None] * self.freqs[...][None, :]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


class ResBlock(nnx.Module):
    """DDPM residual block: GN-SiLU-conv, add time projection, GN-SiLU-dropout-conv."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.norm1 = layers.group_norm(c_in, rngs)
        self.conv1 = layers.Conv(c_in, c_out, fast=cfg.fast_conv, rngs=rngs)
        self.temb_proj = layers.Dense(temb_dim, c_out, rngs=rngs)
        self.norm2 = layers.group_norm(c_out, rngs)
        self.dropout = nnx.Dropout(cfg.dropout)
        # Zero-ish init of the last conv makes each block start as the identity.
        self.conv2 = layers.Conv(c_out, c_out, init_scale=0.0, fast=cfg.fast_conv, rngs=rngs)
        self.skip = (
            layers.Conv(c_in, c_out, 1, fast=cfg.fast_conv, rngs=rngs) if c_in != c_out else None
        )
        self.skip_rescale = cfg.skip_rescale

    def __call__(self, x: Array, temb: Array, train: bool, rngs: nnx.Rngs | None) -> Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = h + self.temb_proj(nnx.silu(temb))[:, None, None, :]
        h = nnx.silu(self.norm2(h))
        h = self.dropout(h, deterministic=not train, rngs=rngs)
        h = self.conv2(h)
        shortcut = self.skip(x) if self.skip is not None else x
        return _residual_sum(shortcut, h, self.skip_rescale)


class AttnBlock(nnx.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.norm = layers.group_norm(channels, rngs)
        self.qkv = layers.Dense(channels, 3 * channels, rngs=rngs)
        self.out = layers.Dense(channels, channels, init_scale=0.0, rngs=rngs)
        self.skip_rescale = cfg.skip_rescale

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b, h * w, 3 * c), 3, axis=-1)
        weights = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) / jnp.sqrt(c), axis=-1)
        attended = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c)
        return _residual_sum(x, self.out(attended), self.skip_rescale)


class Downsample(nnx.Module):
    """2x average pooling followed by a 3x3 conv (cheaper than a strided conv)."""

    def __init__(self, channels: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.conv = layers.Conv(channels, channels, fast=cfg.fast_conv, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(layers.avg_pool2(x))


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.conv = layers.Conv(channels, channels, fast=cfg.fast_conv, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(layers.upsample_nearest2(x))


class UNet(nnx.Module):
    """DDPM++/NCSN++-style U-Net; the output has the input's shape.

    The raw output is interpreted by :mod:`sdedit_jax.score` according to the
    chosen parameterisation (score, noise or sigma-scaled score).
    """

    def __init__(self, config: ml_collections.ConfigDict | UNetConfig, *, rngs: nnx.Rngs):
        cfg = UNetConfig.from_config(config)
        self.cfg = cfg
        nf = cfg.nf
        temb_dim = 4 * nf
        if cfg.time_embedding == "fourier":
            self.fourier = GaussianFourierFeatures(nf, cfg.fourier_scale, rngs=rngs)
        self.temb_in = layers.Dense(nf, temb_dim, rngs=rngs)
        self.temb_hidden = layers.Dense(temb_dim, temb_dim, rngs=rngs)

        self.conv_in = layers.Conv(cfg.num_channels, nf, fast=cfg.fast_conv, rngs=rngs)
        skip_channels = [nf]
        channels = nf
        resolution = cfg.image_size
        down: list[nnx.Module] = []
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                down.append(ResBlock(channels, nf * mult, temb_dim, cfg, rngs=rngs))
                channels = nf * mult
                if resolution in cfg.attn_resolutions:
                    down.append(AttnBlock(channels, cfg, rngs=rngs))
                skip_channels.append(channels)
            if level != len(cfg.ch_mult) - 1:
                down.append(Downsample(channels, cfg, rngs=rngs))
                resolution //= 2
                skip_channels.append(channels)
        self.down = nnx.List(down)

        self.mid_res1 = ResBlock(channels, channels, temb_dim, cfg, rngs=rngs)
        self.mid_attn = AttnBlock(channels, cfg, rngs=rngs)
        self.mid_res2 = ResBlock(channels, channels, temb_dim, cfg, rngs=rngs)

        up: list[nnx.Module] = []
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                c_skip = skip_channels.pop()
                up.append(ResBlock(channels + c_skip, nf * mult, temb_dim, cfg, rngs=rngs))
                channels = nf * mult
                if resolution in cfg.attn_resolutions:
                    up.append(AttnBlock(channels, cfg, rngs=rngs))
            if level != 0:
                up.append(Upsample(channels, cfg, rngs=rngs))
                resolution *= 2
        self.up = nnx.List(up)

        self.norm_out = layers.group_norm(channels, rngs)
        self.conv_out = layers.Conv(
            channels, cfg.num_channels, init_scale=0.0, fast=cfg.fast_conv, rngs=rngs
        )

    def _time_embedding(self, t: Array) -> Array:
        if self.cfg.time_embedding == "fourier":
            features = self.fourier(jnp.log(t))
        else:
            features = layers.sinusoidal_embedding(999.0 * t, self.cfg.nf)
        return self.temb_hidden(nnx.silu(self.temb_in(features)))

    def __call__(
        self,
        x: Array,
        t: Array,
        cond: None = None,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> Array:
        """Applies the network.

        Args:
            x: images ``[B, H, W, C]``.
            t: per-example time input ``[B]`` (``t`` or ``sigma``, see module doc).
            cond: must be ``None`` (the network is unconditional).
            train: enables dropout.
            rngs: needs a ``dropout`` stream when ``train`` and ``dropout > 0``.
        """
        unconditional(cond, "unet")
        if x.ndim != 4 or t.shape != x.shape[:1]:
            raise ValueError(f"expected x [B,H,W,C] and t [B], got {x.shape} and {t.shape}")
        temb = self._time_embedding(t)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = _apply(block, h, temb, train, rngs)
            if not isinstance(block, AttnBlock):
                skips.append(h)
        h = self.mid_res1(h, temb, train, rngs)
        h = self.mid_attn(h)
        h = self.mid_res2(h, temb, train, rngs)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = _apply(block, h, temb, train, rngs)
        return self.conv_out(nnx.silu(self.norm_out(h)))


def _apply(block: nnx.Module, h: Array, temb: Array, train: bool, rngs: nnx.Rngs | None) -> Array:
    if isinstance(block, ResBlock):
        return block(h, temb, train, rngs)
    return block(h)


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def build(config: ml_collections.ConfigDict | UNetConfig, seed: int) -> UNet:
    """A randomly initialised :class:`UNet` (see :func:`initialise.build`)."""
    return initialise.build(UNet, UNetConfig.from_config(config), seed)


def abstract(config: UNetConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only state of the network of ``config`` (no weights computed)."""
    return initialise.abstract(UNet, config)


def condition(config: UNetConfig) -> str:
    """The time input the config asks for: ``"sigma"`` for Fourier features, else ``"t"``."""
    return TIME_INPUTS[config.time_embedding]


ARCHITECTURE = Architecture(
    name="unet",
    config_class=UNetConfig,
    build=build,
    abstract=abstract,
    image_shape=lambda config: (config.image_size, config.num_channels),
    # Trained here on [-1, 1] images; the config decides the time input.
    fixed_usage=lambda config: {"condition": condition(config), "data_range": "-1_1"},
)
