"""The building blocks Stable Diffusion's U-Net, VAE and CLIP text encoder share, in NNX.

Module and leaf names mirror diffusers/transformers (``to_q``, ``norm1``, ``conv1`` ...)
so that an importer only renames leaves and transposes kernels (see
:mod:`sdedit_jax.importers.diffusers_sd`). Weights are float32 and cast to the
activations' dtype; normalisation statistics and attention softmax are float32
whatever that dtype (what diffusers' ``upcast_attention`` asks for). In float32,
matmuls and convolutions run at full precision on accelerators too (no TF32).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from sdedit_jax.models import layers
from sdedit_jax.models.ddpm_unet import Conv, GroupNorm

Array = jax.Array

__all__ = [
    "Attention",
    "Conv",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "Resnet",
    "attend",
    "precision",
    "upsample_nearest",
]


def precision(dtype: jnp.dtype) -> jax.lax.Precision:
    """Full precision for float32 (parity everywhere), the hardware's own for bfloat16."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _bcast(v: Array, ndim: int) -> Array:
    return v.reshape((1,) * (ndim - 1) + v.shape)


class Linear(nnx.Module):
    """``x @ kernel (+ bias)`` over the last axis; ``bias=False`` for diffusers' q/k/v."""

    def __init__(self, c_in: int, c_out: int, *, bias: bool = True, rngs: nnx.Rngs):
        self.kernel, bias_param = layers.kernel_and_bias((c_in, c_out), 1.0, rngs)
        self.bias = bias_param if bias else None

    def __call__(self, x: Array) -> Array:
        y = jnp.matmul(x, self.kernel[...].astype(x.dtype), precision=precision(x.dtype))
        return y if self.bias is None else y + _bcast(self.bias[...].astype(x.dtype), y.ndim)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis, statistics in float32."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,)))
        self.bias = nnx.Param(jnp.zeros((dim,)))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        y = x.astype(jnp.float32)
        mean = y.mean(axis=-1, keepdims=True)
        var = jnp.square(y - mean).mean(axis=-1, keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * _bcast(self.scale[...], y.ndim) + _bcast(self.bias[...], y.ndim)).astype(
            x.dtype
        )


def attend(q: Array, k: Array, v: Array, heads: int, *, causal: bool = False) -> Array:
    """Multi-head scaled dot-product attention of ``[B, N, heads*d]`` projections.

    Logits and softmax in float32; ``causal`` masks keys after each query (CLIP).
    """
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (a.reshape(a.shape[0], a.shape[1], heads, d) for a in (q, k, v))
    logits = jnp.einsum(
        "bihd,bjhd->bhij",
        q,
        k,
        preferred_element_type=jnp.float32,
        precision=precision(q.dtype),
    ) * (1.0 / math.sqrt(d))
    if causal:
        allowed = jnp.tril(jnp.ones((n, k.shape[1]), bool))
        logits = jnp.where(allowed[None, None], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhij,bjhd->bihd", weights, v, precision=precision(v.dtype))
    return out.reshape(b, n, inner)


class Attention(nnx.Module):
    """diffusers' ``Attention``: q from ``x``, k/v from ``context`` (default ``x``), ``to_out``."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        rngs: nnx.Rngs,
    ):
        inner = heads * head_dim
        self.to_q = Linear(query_dim, inner, bias=qkv_bias, rngs=rngs)
        self.to_k = Linear(context_dim, inner, bias=qkv_bias, rngs=rngs)
        self.to_v = Linear(context_dim, inner, bias=qkv_bias, rngs=rngs)
        self.to_out = Linear(inner, query_dim, rngs=rngs)
        self.heads = heads

    def __call__(self, x: Array, context: Array | None = None) -> Array:
        context = x if context is None else context
        out = attend(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class Resnet(nnx.Module):
    """diffusers' ``ResnetBlock2D`` (GN-SiLU-conv, + time embedding, GN-SiLU-conv, + shortcut).

    ``temb_dim=None``: no time embedding (the VAE's blocks).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        temb_dim: int | None,
        groups: int,
        eps: float,
        *,
        rngs: nnx.Rngs,
    ):
        self.norm1 = GroupNorm(c_in, groups, eps)
        self.conv1 = Conv(c_in, c_out, rngs=rngs)
        self.time_emb_proj = None if temb_dim is None else Linear(temb_dim, c_out, rngs=rngs)
        self.norm2 = GroupNorm(c_out, groups, eps)
        self.conv2 = Conv(c_out, c_out, rngs=rngs)
        self.conv_shortcut = Conv(c_in, c_out, 1, rngs=rngs) if c_in != c_out else None

    def __call__(self, x: Array, temb: Array | None = None) -> Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


def upsample_nearest(x: Array, size: tuple[int, int]) -> Array:
    """torch's ``interpolate(mode="nearest")`` of NHWC ``x`` to ``size`` (any size: diffusers
    upsamples to the skip connection's size when a side is odd)."""
    if tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
        return layers.upsample_nearest2(x)  # repeats rather than a gather
    rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]
    cols = (jnp.arange(size[1]) * x.shape[2]) // size[1]
    return x[:, rows][:, :, cols]
