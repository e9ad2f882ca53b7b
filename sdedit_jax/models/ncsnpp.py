"""NCSN++ (Song et al., ICLR 2021), the VE score network of score_sde, in Flax NNX.

An exact port of the published 256 px networks (``church``, ``bedroom``,
``celebahq_256``, ``ffhq_256``) in both of their layouts: score_sde's Flax
``NCSNpp`` and diffusers' ``UNet2DModel`` with ``Skip*`` blocks and
``time_embedding_type="fourier"``. The architecture:

* noise conditioning by random Fourier features of ``log sigma`` and a 2-layer MLP;
* BigGAN residual blocks, resampling inside the block with a FIR filter;
* progressive input ("input_skip"): the image itself is FIR-downsampled next to the
  features and added in by a 1x1 conv after every downsampling block;
* progressive output ("output_skip"): every level adds a 3x3 conv of its features to a
  FIR-upsampled RGB pyramid, whose finest level is the output;
* residual sums scaled by 1/sqrt(2) ("skip_rescale"); output divided by sigma.

``net(x, sigma)`` (:mod:`~sdedit_jax.models.architecture`'s protocol, ``t = sigma``,
unconditional) takes NHWC images in the model's own data range
(:attr:`NCSNppConfig.data_range`) and the noise scale ``sigma`` ``[B]``, and returns
the score (``scale_by_sigma``: the network output divided by sigma).
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

from sdedit_jax.models import fir, initialise, layers
from sdedit_jax.models.architecture import Architecture, unconditional
from sdedit_jax.util.config import frozen

Array = jax.Array

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_RSQRT2 = 1.0 / math.sqrt(2.0)


def _groups(channels: int) -> int:
    """NCSN++'s GroupNorm size: up to 32 groups of at least 4 channels."""
    return min(channels // 4, 32)


@dataclasses.dataclass(frozen=True)
class NCSNppConfig:
    """Hyper-parameters of :class:`NCSNpp` (frozen: hashable, usable as a static argument).

    Attributes:
        architecture: always ``"ncsnpp"`` (lets a model folder name its network).
        image_size: side length the network was built for (attention placement).
        num_channels: image channels (input = output).
        nf: base width; level ``i`` has ``nf * ch_mult[i]`` channels.
        ch_mult: channel multiplier per level (one 2x downsampling between levels).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: side lengths (relative to ``image_size``) with self-attention.
        attention_head_dim: channels per attention head; None is one head (score_sde).
        dropout: dropout rate inside residual blocks (training only).
        fir_kernel: 1-D FIR resampling filter.
        skip_rescale: divide residual sums by sqrt(2).
        fourier_scale: std of the Fourier frequencies at initialisation.
        init_scale: scale of the initialisation of the last conv of each block (0: ~zero).
        norm_eps: GroupNorm epsilon.
        center_input: the network first maps its input ``x`` to ``2x - 1`` (score_sde's
            ``data.centered=False``, diffusers' ``center_input_sample``).
        data_range: (low, high) of clean images in the units the network was trained on;
            the SDE's sigmas are in these units too.
        scale_by_sigma: divide the output by sigma (the output is then the score).
        compute_dtype: "float32", or "bfloat16" for activations and weights
            (GroupNorm statistics, softmax, the embedding and the output stay float32).
    """

    architecture: str = "ncsnpp"
    image_size: int = 256
    num_channels: int = 3
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    attention_head_dim: int | None = None
    dropout: float = 0.0
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    norm_eps: float = 1e-6
    center_input: bool = True
    data_range: tuple[float, float] = (0.0, 1.0)
    scale_by_sigma: bool = True
    compute_dtype: str = "float32"

    def __post_init__(self):
        def bad(field: str, value: Any, why: str) -> ValueError:
            return ValueError(f"model.{field}={value!r}: {why}")

        if self.architecture != "ncsnpp":
            raise bad("architecture", self.architecture, "must be 'ncsnpp'")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise bad("compute_dtype", self.compute_dtype, f"must be one of {list(COMPUTE_DTYPES)}")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise bad("ch_mult", self.ch_mult, "needs positive multipliers")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise bad("image_size", self.image_size, f"not divisible by 2**{len(self.ch_mult) - 1}")
        if self.num_res_blocks < 1:
            raise bad("num_res_blocks", self.num_res_blocks, "must be >= 1")
        if len(self.data_range) != 2 or not self.data_range[0] < self.data_range[1]:
            raise bad("data_range", self.data_range, "must be (low, high) with low < high")
        try:
            fir.normalized_taps(self.fir_kernel, 1.0)
        except ValueError:
            raise bad("fir_kernel", self.fir_kernel, "needs a 1-D nonzero-sum kernel") from None
        for channels in self.norm_channels():
            if channels < 4 or channels % _groups(channels):
                raise bad(
                    "nf",
                    self.nf,
                    f"GroupNorm over {channels} channels needs "
                    f"{_groups(channels)} groups that divide it",
                )
        for level in (*self.attn_levels(), self.num_levels - 1):  # the middle has attention
            width = self.nf * self.ch_mult[level]
            if self.attention_head_dim is not None and width % self.attention_head_dim:
                raise bad(
                    "attention_head_dim",
                    self.attention_head_dim,
                    f"does not divide the {width} channels at level {level}",
                )

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    def attn_levels(self) -> tuple[int, ...]:
        """Levels (0 = full resolution) whose blocks have self-attention."""
        return tuple(
            i for i in range(self.num_levels) if self.image_size // 2**i in self.attn_resolutions
        )

    def skip_channels(self) -> list[int]:
        """Channels of the skip activations saved on the way down, in push order."""
        chans = [self.nf]
        for i, mult in enumerate(self.ch_mult):
            chans += [self.nf * mult] * self.num_res_blocks
            if i != self.num_levels - 1:
                chans.append(self.nf * mult)
        return chans

    def norm_channels(self) -> set[int]:
        """Every channel count a GroupNorm sees (all must split into groups)."""
        chans = {self.nf * m for m in self.ch_mult}
        skips = self.skip_channels()
        h = self.nf * self.ch_mult[-1]
        for i in reversed(range(self.num_levels)):
            for _ in range(self.num_res_blocks + 1):
                chans.add(h + skips.pop())
                h = self.nf * self.ch_mult[i]
        return chans

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | NCSNppConfig) -> NCSNppConfig:
        """From the ``"model"`` dict of a model folder (``dataclasses.asdict`` round-trips).

        Unknown fields are errors, never ignored.
        """
        return frozen(cls, config, "model")


class Conv(layers.ConvParams):
    """Stride-1 SAME convolution (odd kernel, HWIO) with bias, in the compute dtype.

    ``dtype`` follows the size; other arguments as :class:`~layers.ConvParams`.
    """

    def __init__(self, c_in: int, c_out: int, size: int, dtype: Any, **kwargs: Any):
        super().__init__(c_in, c_out, size, **kwargs)
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        w = self.kernel[...].astype(self.dtype)
        if w.shape[0] == 1:
            y = jnp.einsum("bhwc,cd->bhwd", x, w[0, 0])
        else:
            pad = w.shape[0] // 2
            y = jax.lax.conv_general_dilated(
                x, w, (1, 1), [(pad, pad), (pad, pad)], dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return y + self.bias[...].astype(self.dtype).reshape(1, 1, 1, -1)


class Dense(nnx.Module):
    """Linear map over the last axis, in the compute dtype."""

    def __init__(
        self, c_in: int, c_out: int, dtype: Any, *, init_scale: float = 1.0, rngs: nnx.Rngs
    ):
        self.kernel, self.bias = layers.kernel_and_bias((c_in, c_out), init_scale, rngs)
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        y = x @ self.kernel[...].astype(self.dtype)
        return y + self.bias[...].astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,))


class GroupNorm(nnx.Module):
    """GroupNorm with ``min(C // 4, 32)`` groups; statistics in float32."""

    def __init__(self, channels: int, eps: float, dtype: Any):
        self.scale = nnx.Param(jnp.ones((channels,)))
        self.bias = nnx.Param(jnp.zeros((channels,)))
        self.groups = _groups(channels)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        y = layers.group_norm_float32(x, self.scale[...], self.bias[...], self.groups, self.eps)
        return y.astype(self.dtype)


def _residual(a: Array, b: Array, rescale: bool) -> Array:
    return (a + b) * _RSQRT2 if rescale else a + b


class ResnetBlock(nnx.Module):
    """BigGAN residual block; ``resample`` "up"/"down" FIR-resamples inside the block."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        temb_dim: int,
        cfg: NCSNppConfig,
        *,
        resample: str | None = None,
        rngs: nnx.Rngs,
    ):
        dt = COMPUTE_DTYPES[cfg.compute_dtype]
        self.norm1 = GroupNorm(c_in, cfg.norm_eps, dt)
        self.conv1 = Conv(c_in, c_out, 3, dt, rngs=rngs)
        self.temb_proj = Dense(temb_dim, c_out, dt, rngs=rngs)
        self.norm2 = GroupNorm(c_out, cfg.norm_eps, dt)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.conv2 = Conv(c_out, c_out, 3, dt, init_scale=cfg.init_scale, rngs=rngs)
        needs_shortcut = c_in != c_out or resample is not None
        self.shortcut = Conv(c_in, c_out, 1, dt, rngs=rngs) if needs_shortcut else None
        self.resample = resample
        self.fir_kernel = cfg.fir_kernel
        self.skip_rescale = cfg.skip_rescale

    def _resample(self, x: Array) -> Array:
        if self.resample == "up":
            return fir.upsample_2d(x, self.fir_kernel)
        if self.resample == "down":
            return fir.downsample_2d(x, self.fir_kernel)
        return x

    def __call__(self, x: Array, temb: Array, train: bool, rngs: nnx.Rngs | None) -> Array:
        h = nnx.silu(self.norm1(x))
        h = self.conv1(self._resample(h))
        x = self._resample(x)
        h = h + self.temb_proj(nnx.silu(temb))[:, None, None, :]
        h = nnx.silu(self.norm2(h))
        h = self.dropout(h, deterministic=not train, rngs=rngs)
        h = self.conv2(h)
        if self.shortcut is not None:
            x = self.shortcut(x)
        return _residual(x, h, self.skip_rescale)


class AttnBlock(nnx.Module):
    """Self-attention over all pixels (one head unless ``attention_head_dim``), residual."""

    def __init__(self, channels: int, cfg: NCSNppConfig, *, rngs: nnx.Rngs):
        dt = COMPUTE_DTYPES[cfg.compute_dtype]
        self.norm = GroupNorm(channels, cfg.norm_eps, dt)
        self.q = Dense(channels, channels, dt, init_scale=0.1, rngs=rngs)
        self.k = Dense(channels, channels, dt, init_scale=0.1, rngs=rngs)
        self.v = Dense(channels, channels, dt, init_scale=0.1, rngs=rngs)
        self.out = Dense(channels, channels, dt, init_scale=cfg.init_scale, rngs=rngs)
        self.head_dim = cfg.attention_head_dim or channels
        self.skip_rescale = cfg.skip_rescale

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        heads = c // self.head_dim
        y = self.norm(x).reshape(b, h * w, c)

        def split(t: Array) -> Array:
            return t.reshape(b, h * w, heads, self.head_dim)

        q, k, v = split(self.q(y)), split(self.k(y)), split(self.v(y))
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32)
        weights = jax.nn.softmax(logits / math.sqrt(self.head_dim), axis=-1).astype(v.dtype)
        attended = jnp.einsum("bnqk,bknd->bqnd", weights, v).reshape(b, h * w, c)
        return _residual(x, self.out(attended).reshape(b, h, w, c), self.skip_rescale)


class FourierFeatures(nnx.Module):
    """``[sin(2 pi W log sigma), cos(2 pi W log sigma)]`` with fixed random ``W``."""

    def __init__(self, dim: int, scale: float, *, rngs: nnx.Rngs):
        self.W = nnx.Variable(scale * jax.random.normal(rngs.params(), (dim,)))

    def __call__(self, sigma: Array) -> Array:
        angles = jnp.log(sigma)[:, None] * self.W[...][None, :] * (2.0 * np.pi)
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class DownLevel(nnx.Module):
    """One resolution on the way down; all but the coarsest end with a downsampling block
    and the 1x1 conv that adds the downsampled input image ("combine")."""

    def __init__(self, level: int, c_in: int, temb_dim: int, cfg: NCSNppConfig, *, rngs: nnx.Rngs):
        width = cfg.nf * cfg.ch_mult[level]
        dt = COMPUTE_DTYPES[cfg.compute_dtype]
        self.resnets = nnx.List(
            [
                ResnetBlock(c_in if j == 0 else width, width, temb_dim, cfg, rngs=rngs)
                for j in range(cfg.num_res_blocks)
            ]
        )
        with_attn = level in cfg.attn_levels()
        self.attns = nnx.List(
            [AttnBlock(width, cfg, rngs=rngs) for _ in range(cfg.num_res_blocks)]
            if with_attn
            else []
        )
        last = level == cfg.num_levels - 1
        self.down = (
            None if last else ResnetBlock(width, width, temb_dim, cfg, resample="down", rngs=rngs)
        )
        self.combine = None if last else Conv(cfg.num_channels, width, 1, dt, rngs=rngs)


class UpLevel(nnx.Module):
    """One resolution on the way up: residual blocks over the skips, optional attention,
    the level's 3x3 conv into the output pyramid, then (but at full size) an
    upsampling block."""

    def __init__(
        self,
        level: int,
        c_in: int,
        skips: list[int],
        temb_dim: int,
        cfg: NCSNppConfig,
        *,
        rngs: nnx.Rngs,
    ):
        width = cfg.nf * cfg.ch_mult[level]
        dt = COMPUTE_DTYPES[cfg.compute_dtype]
        resnets = []
        for _ in range(cfg.num_res_blocks + 1):
            resnets.append(ResnetBlock(c_in + skips.pop(), width, temb_dim, cfg, rngs=rngs))
            c_in = width
        self.resnets = nnx.List(resnets)
        self.attn = AttnBlock(width, cfg, rngs=rngs) if level in cfg.attn_levels() else None
        self.skip_norm = GroupNorm(width, cfg.norm_eps, dt)
        self.skip_conv = Conv(width, cfg.num_channels, 3, dt, init_scale=cfg.init_scale, rngs=rngs)
        self.up = (
            None
            if level == 0
            else ResnetBlock(width, width, temb_dim, cfg, resample="up", rngs=rngs)
        )


class NCSNpp(nnx.Module):
    """The NCSN++ score network (see the module docstring)."""

    def __init__(self, config: NCSNppConfig, *, rngs: nnx.Rngs):
        cfg = NCSNppConfig.from_config(config)
        self.cfg = cfg
        dt = COMPUTE_DTYPES[cfg.compute_dtype]
        nf, temb_dim = cfg.nf, 4 * cfg.nf
        self.fourier = FourierFeatures(nf, cfg.fourier_scale, rngs=rngs)
        self.temb0 = Dense(2 * nf, temb_dim, dt, rngs=rngs)
        self.temb1 = Dense(temb_dim, temb_dim, dt, rngs=rngs)
        self.conv_in = Conv(cfg.num_channels, nf, 3, dt, rngs=rngs)
        down, c = [], nf
        for level in range(cfg.num_levels):
            down.append(DownLevel(level, c, temb_dim, cfg, rngs=rngs))
            c = nf * cfg.ch_mult[level]
        self.down = nnx.List(down)
        self.mid_res0 = ResnetBlock(c, c, temb_dim, cfg, rngs=rngs)
        self.mid_attn = AttnBlock(c, cfg, rngs=rngs)
        self.mid_res1 = ResnetBlock(c, c, temb_dim, cfg, rngs=rngs)
        skips, up = cfg.skip_channels(), []
        for level in reversed(range(cfg.num_levels)):
            up.append(UpLevel(level, c, skips, temb_dim, cfg, rngs=rngs))
            c = nf * cfg.ch_mult[level]
        self.up = nnx.List(up)

    def __call__(
        self,
        x: Array,
        t: Array,
        cond: None = None,
        *,
        train: bool = False,
        rngs: nnx.Rngs | None = None,
    ) -> Array:
        """Score (or raw output without ``scale_by_sigma``) at ``x [B,H,W,C]``, ``t = sigma [B]``.

        ``cond`` must be ``None`` (unconditional); ``train`` enables dropout, drawing
        from ``rngs``'s ``dropout`` stream.
        """
        unconditional(cond, "ncsnpp")
        sigma = t
        cfg = self.cfg
        dt = COMPUTE_DTYPES[cfg.compute_dtype]
        if x.ndim != 4 or x.shape[-1] != cfg.num_channels:
            raise ValueError(f"expected x [B,H,W,{cfg.num_channels}], got {x.shape}")
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
        temb = self.fourier(sigma).astype(dt)
        temb = self.temb1(nnx.silu(self.temb0(temb)))

        x = x.astype(jnp.float32)
        if cfg.center_input:
            x = 2.0 * x - 1.0
        image = x.astype(dt)
        hs = [self.conv_in(image)]
        for level in self.down:
            for j, resnet in enumerate(level.resnets):
                h = resnet(hs[-1], temb, train, rngs)
                if len(level.attns):
                    h = level.attns[j](h)
                hs.append(h)
            if level.down is not None:
                h = level.down(hs[-1], temb, train, rngs)
                image = fir.downsample_2d(image, cfg.fir_kernel)
                hs.append(level.combine(image) + h)

        h = self.mid_res0(hs[-1], temb, train, rngs)
        h = self.mid_res1(self.mid_attn(h), temb, train, rngs)

        pyramid = None
        for level in self.up:
            for resnet in level.resnets:
                h = resnet(jnp.concatenate([h, hs.pop()], axis=-1), temb, train, rngs)
            if level.attn is not None:
                h = level.attn(h)
            skip = level.skip_conv(nnx.silu(level.skip_norm(h)))
            pyramid = skip if pyramid is None else fir.upsample_2d(pyramid, cfg.fir_kernel) + skip
            if level.up is not None:
                h = level.up(h, temb, train, rngs)

        out = pyramid.astype(jnp.float32)
        if cfg.scale_by_sigma:
            out = out / sigma.reshape(-1, 1, 1, 1)
        return out


def count_params(model: nnx.Module) -> int:
    """Number of scalars in the model's weights (Fourier frequencies included)."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model)))


def build(config: NCSNppConfig | Mapping[str, Any], seed: int) -> NCSNpp:
    """A randomly initialised :class:`NCSNpp` (see :func:`initialise.build`)."""
    return initialise.build(NCSNpp, NCSNppConfig.from_config(config), seed)


def _path_key(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def abstract(config: NCSNppConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only state of the network of ``config`` (no weights computed)."""
    return initialise.abstract(NCSNpp, config)


def block_paths(config: NCSNppConfig) -> list[tuple[str, str]]:
    """``(kind, state path)`` of every block of the U-Net body, in score_sde's creation order.

    ``kind`` is ``"resnet"``, ``"attn"``, ``"combine"`` (the 1x1 conv adding the
    downsampled image), ``"norm"`` or ``"conv"`` (a level's GroupNorm and conv into the
    output pyramid). Importers name each block in their own layout from this one walk.
    """
    attn_levels, last = config.attn_levels(), config.num_levels - 1
    blocks = []
    for i in range(config.num_levels):
        for j in range(config.num_res_blocks):
            blocks.append(("resnet", f"down/{i}/resnets/{j}"))
            if i in attn_levels:
                blocks.append(("attn", f"down/{i}/attns/{j}"))
        if i != last:
            blocks += [("resnet", f"down/{i}/down"), ("combine", f"down/{i}/combine")]
    blocks += [("resnet", "mid_res0"), ("attn", "mid_attn"), ("resnet", "mid_res1")]
    for i in range(config.num_levels):  # up/0 is the coarsest level
        blocks += [("resnet", f"up/{i}/resnets/{j}") for j in range(config.num_res_blocks + 1)]
        if last - i in attn_levels:
            blocks.append(("attn", f"up/{i}/attn"))
        blocks += [("norm", f"up/{i}/skip_norm"), ("conv", f"up/{i}/skip_conv")]
        if i != last:
            blocks.append(("resnet", f"up/{i}/up"))
    return blocks


def abstract_params(config: NCSNppConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every weight, keyed by its ``/``-joined path in the model's state."""
    pure = nnx.to_pure_dict(abstract(config)[1])
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {_path_key(path): tuple(leaf.shape) for path, leaf in leaves}


ARCHITECTURE = Architecture(
    name="ncsnpp",
    config_class=NCSNppConfig,
    build=build,
    abstract=abstract,
    image_shape=lambda config: (config.image_size, config.num_channels),
)
