"""Convolution with a fast weight gradient, and the small layers of the U-Net.

XLA's CPU backend computes the weight gradient of a convolution at roughly a
sixth of the forward throughput. For a stride-1 "SAME" convolution that
gradient is a sum over kernel taps of ``x_shifted^T @ g``: one matmul per tap,
which XLA runs at full matmul speed. :func:`conv2d` uses that form in a
``jax.custom_vjp``; forward and input gradient stay ordinary convolutions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

_DIMS = ("NHWC", "HWIO", "NHWC")


def default_init(scale: float = 1.0) -> jax.nn.initializers.Initializer:
    """DDPM's fan-average uniform init; ``scale=0`` is mapped to a tiny value
    so that zero-initialised output layers still carry a gradient to the kernel."""
    return jax.nn.initializers.variance_scaling(
        max(scale, 1e-10), "fan_avg", "uniform", in_axis=-2, out_axis=-1
    )


def _same_padding(w: Array) -> list[tuple[int, int]]:
    kh, kw = w.shape[0], w.shape[1]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"conv2d needs odd kernel sizes, got {kh}x{kw}")
    return [(kh // 2, kh // 2), (kw // 2, kw // 2)]


def lax_conv2d(x: Array, w: Array) -> Array:
    """Stride-1 "SAME" NHWC/HWIO convolution, differentiated by XLA."""
    return jax.lax.conv_general_dilated(x, w, (1, 1), _same_padding(w), dimension_numbers=_DIMS)


@jax.custom_vjp
def conv2d(x: Array, w: Array) -> Array:
    """Same result as :func:`lax_conv2d`; weight gradient via per-tap matmuls."""
    return lax_conv2d(x, w)


def _conv2d_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return lax_conv2d(x, w), (x, w)


def _conv2d_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, w = res
    kh, kw = w.shape[0], w.shape[1]
    # Input gradient of a stride-1 SAME conv: conv with the spatially flipped,
    # in/out-swapped kernel (exact for odd kernels).
    dx = lax_conv2d(g, jnp.flip(w, (0, 1)).swapaxes(2, 3))
    height, width = x.shape[1], x.shape[2]
    xp = jnp.pad(x, [(0, 0), *_same_padding(w), (0, 0)])
    taps = [
        jnp.einsum("bhwc,bhwd->cd", xp[:, i : i + height, j : j + width, :], g)
        for i in range(kh)
        for j in range(kw)
    ]
    dw = jnp.stack(taps).reshape(w.shape)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _as_last_axis(v: Array, ndim: int) -> Array:
    """Reshapes a per-channel vector to broadcast explicitly (rank promotion may be off)."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def kernel_and_bias(
    shape: tuple[int, ...], init_scale: float, rngs: nnx.Rngs
) -> tuple[nnx.Param, nnx.Param]:
    """A kernel of ``shape`` (inputs, outputs last) with DDPM's init, and a zero bias."""
    kernel = default_init(init_scale)(rngs.params(), shape)
    return nnx.Param(kernel), nnx.Param(jnp.zeros(shape[-1:]))


class ConvParams(nnx.Module):
    """A square HWIO ``kernel`` with DDPM's init and a zero ``bias``: every network's conv.

    Each network subclasses it with its own forward (fast gradient, compute dtype,
    stride), so all of them share parameter names, shapes and initial values.
    """

    def __init__(
        self, c_in: int, c_out: int, size: int = 3, *, init_scale: float = 1.0, rngs: nnx.Rngs
    ):
        self.kernel, self.bias = kernel_and_bias((size, size, c_in, c_out), init_scale, rngs)


class Conv(ConvParams):
    """Stride-1 SAME conv (odd kernel) with bias; ``fast=True`` uses :func:`conv2d`.

    Other arguments as :class:`ConvParams`.
    """

    def __init__(self, c_in: int, c_out: int, size: int = 3, *, fast: bool = True, **kwargs: Any):
        super().__init__(c_in, c_out, size, **kwargs)
        self.fast = fast

    def __call__(self, x: Array) -> Array:
        conv = conv2d if self.fast else lax_conv2d
        return conv(x, self.kernel[...]) + _as_last_axis(self.bias[...], x.ndim)


class Dense(nnx.Module):
    """Linear layer over the last axis with DDPM's init."""

    def __init__(
        self, in_features: int, out_features: int, *, init_scale: float = 1.0, rngs: nnx.Rngs
    ):
        self.kernel, self.bias = kernel_and_bias((in_features, out_features), init_scale, rngs)

    def __call__(self, x: Array) -> Array:
        return x @ self.kernel[...] + _as_last_axis(self.bias[...], x.ndim)


def group_norm_float32(x: Array, scale: Array, bias: Array, groups: int, eps: float) -> Array:
    """torch-style GroupNorm of NHWC ``x`` with statistics in float32 (also for bf16
    activations); returns float32, the caller casts."""
    b, h, w, c = x.shape
    grouped = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(grouped - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((grouped - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return y * scale.reshape(1, 1, 1, c) + bias.reshape(1, 1, 1, c)


def group_norm(num_channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (DDPM/NCSN++ choice)."""
    return nnx.GroupNorm(num_channels, num_groups=min(num_channels // 4, 32), rngs=rngs)


def sinusoidal_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """Transformer-style sin/cos features of a scalar per example, ``[B] -> [B, dim]``."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    angles = t[:, None].astype(jnp.float32) * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def avg_pool2(x: Array) -> Array:
    """2x2 average pooling, ``[B,H,W,C] -> [B,H/2,W/2,C]``."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample_nearest2(x: Array) -> Array:
    """Nearest-neighbour 2x upsampling."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
