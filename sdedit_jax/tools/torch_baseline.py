"""An eager PyTorch port of the U-Net and of the SDEdit sampler, for throughput baselines.

The port exists to answer "how fast is the compiled JAX edit program compared
with the obvious PyTorch implementation?" on the same weights, batch and step
count. It is inference only (no dropout, no training) and mirrors
:mod:`sdedit_jax.models.unet` module by module, with the same attribute
names, so :func:`load_flax_state` can copy an ``nnx.State`` by path.

The sampler is SDEdit with Euler-Maruyama on the reverse SDE: perturb the
guide to ``t0``, take ``n_steps`` uniform steps to ``eps`` and return the last
step's noise-free mean, as :func:`sdedit_jax.edit.sdedit_batch` does without a
mask. Time-dependent coefficients come from the project's own SDE classes,
computed once per edit, so the torch loop does only the per-step tensor work.

torch is an optional dependency: import this module only where torch is installed.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from sdedit_jax.models import unet
from sdedit_jax.pretrained import LoadedModel
from sdedit_jax.sampling.integrate import grid_time
from sdedit_jax.score import check_parameterization, condition_value
from sdedit_jax.sde import SDE

Tensor = torch.Tensor

# Flax leaf names that torch calls differently; the rest of the path (and "bias",
# "freqs") is shared.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight"}


def _residual_sum(a: Tensor, b: Tensor, rescale: bool) -> Tensor:
    s = a + b
    return s / math.sqrt(2.0) if rescale else s


def _group_norm(channels: int) -> nn.GroupNorm:
    # Same grouping and epsilon as layers.group_norm (flax's default is 1e-6, torch's 1e-5).
    return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


def _conv(c_in: int, c_out: int, kernel_size: int = 3) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)


class FourierFeatures(nn.Module):
    """Fixed random Fourier features; ``freqs`` is a buffer, as it is not trained."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.zeros(dim // 2))

    def forward(self, x: Tensor) -> Tensor:
        angles = 2.0 * math.pi * x[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, add time projection, GN-SiLU-conv, (1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, skip_rescale: bool):
        super().__init__()
        self.norm1 = _group_norm(c_in)
        self.conv1 = _conv(c_in, c_out)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = _group_norm(c_out)
        self.conv2 = _conv(c_out, c_out)
        self.skip = _conv(c_in, c_out, 1) if c_in != c_out else None
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.skip(x) if self.skip is not None else x
        return _residual_sum(shortcut, h, self.skip_rescale)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, skip_rescale: bool):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # Pixels as a sequence [B, HW, C]: a free view when x is channels_last.
        pixels = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        q, k, v = self.qkv(pixels).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v)
        out = self.out(attended).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return _residual_sum(x, out, self.skip_rescale)


class Downsample(nn.Module):
    """2x average pooling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.avg_pool2d(x, 2))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TorchUNet(nn.Module):
    """The U-Net of :class:`sdedit_jax.models.unet.UNet` on NCHW tensors (inference only)."""

    def __init__(self, config: unet.UNetConfig):
        super().__init__()
        cfg = unet.UNetConfig.from_config(config)
        self.cfg = cfg
        nf, rescale = cfg.nf, cfg.skip_rescale
        temb_dim = 4 * nf
        if cfg.time_embedding == "fourier":
            self.fourier = FourierFeatures(nf)
        self.temb_in = nn.Linear(nf, temb_dim)
        self.temb_hidden = nn.Linear(temb_dim, temb_dim)
        self.conv_in = _conv(cfg.num_channels, nf)

        # Block order and channel bookkeeping follow UNet.__init__ exactly, so
        # the list indices match the flax state paths.
        skip_channels = [nf]
        channels, resolution = nf, cfg.image_size
        down: list[nn.Module] = []
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                down.append(ResBlock(channels, nf * mult, temb_dim, rescale))
                channels = nf * mult
                if resolution in cfg.attn_resolutions:
                    down.append(AttnBlock(channels, rescale))
                skip_channels.append(channels)
            if level != len(cfg.ch_mult) - 1:
                down.append(Downsample(channels))
                resolution //= 2
                skip_channels.append(channels)
        self.down = nn.ModuleList(down)

        self.mid_res1 = ResBlock(channels, channels, temb_dim, rescale)
        self.mid_attn = AttnBlock(channels, rescale)
        self.mid_res2 = ResBlock(channels, channels, temb_dim, rescale)

        up: list[nn.Module] = []
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                up.append(ResBlock(channels + skip_channels.pop(), nf * mult, temb_dim, rescale))
                channels = nf * mult
                if resolution in cfg.attn_resolutions:
                    up.append(AttnBlock(channels, rescale))
            if level != 0:
                up.append(Upsample(channels))
                resolution *= 2
        self.up = nn.ModuleList(up)

        self.norm_out = _group_norm(channels)
        self.conv_out = _conv(channels, cfg.num_channels)

    def _time_embedding(self, cond: Tensor) -> Tensor:
        if self.cfg.time_embedding == "fourier":
            features = self.fourier(torch.log(cond))
        else:
            features = sinusoidal_embedding(999.0 * cond, self.cfg.nf)
        return self.temb_hidden(F.silu(self.temb_in(features)))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """``x [B, C, H, W]`` and ``cond [B]`` (``t`` or ``sigma``) -> raw output like ``x``."""
        temb = self._time_embedding(cond)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, temb) if isinstance(block, ResBlock) else block(h)
            if not isinstance(block, AttnBlock):
                skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb)), temb)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
            else:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Same features as :func:`sdedit_jax.models.layers.sinusoidal_embedding`."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * steps / (half - 1))
    angles = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def count_params(net: nn.Module) -> int:
    """Trainable scalars (buffers such as the Fourier frequencies excluded, as in flax)."""
    return sum(p.numel() for p in net.parameters())


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    """HWIO conv kernels -> OIHW; ``[in, out]`` dense kernels -> ``[out, in]``."""
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
        return value.T
    return value


def load_flax_state(net: TorchUNet, state: nnx.State) -> TorchUNet:
    """Copies every variable of a flax U-Net state into ``net`` (in place; returns it).

    Raises:
        ValueError: naming the variable, when the architectures differ
            (a variable without counterpart, a shape mismatch, or a torch
            tensor left unset).
    """
    targets = net.state_dict()
    unset = set(targets)
    for path, variable in nnx.to_flat_state(state):
        *prefix, leaf = (str(p) for p in path)
        name = ".".join([*prefix, _LEAF_NAMES.get(leaf, leaf)])
        if name not in targets:
            raise ValueError(
                f"flax variable {'/'.join((*prefix, leaf))} has no torch "
                f"counterpart {name!r}: the architectures differ"
            )
        value = _to_torch_layout(np.asarray(variable.get_value(), np.float32))
        if value.shape != tuple(targets[name].shape):
            raise ValueError(
                f"{name}: flax shape (torch layout) {value.shape} != torch shape "
                f"{tuple(targets[name].shape)}"
            )
        with torch.no_grad():
            targets[name].copy_(torch.tensor(value))
        unset.discard(name)
    if unset:
        raise ValueError(f"torch tensors not set by the flax state: {sorted(unset)}")
    return net


def from_flax(model: unet.UNet) -> TorchUNet:
    """A torch U-Net in eval mode with ``model``'s architecture and weights."""
    return load_flax_state(TorchUNet(model.cfg), nnx.state(model)).eval()


@dataclasses.dataclass(frozen=True)
class EditSchedule:
    """Per-step coefficients of an SDEdit run, ``[n_steps, B]`` unless noted.

    Attributes:
        mean0, std0: ``[B]`` perturbation kernel ``x_t0 = mean0 * x_0 + std0 * z``.
        cond: network conditioning at each step's start time ``t``.
        inv_std: ``1 / s(t)``, turning noise/scaled outputs into scores.
        drift_coeff: ``f(t)``, the linear forward drift ``f(t) x``.
        g2: ``g(t)^2``.
        dt: step length (positive; time decreases).
        noise_scale: ``g(t) sqrt(dt)``.
    """

    mean0: Tensor
    std0: Tensor
    cond: Tensor
    inv_std: Tensor
    drift_coeff: Tensor
    g2: Tensor
    dt: Tensor
    noise_scale: Tensor

    @property
    def n_steps(self) -> int:
        return self.dt.shape[0]


def edit_schedule(sde: SDE, time_embedding: str, t0: np.ndarray, n_steps: int) -> EditSchedule:
    """Coefficients of ``n_steps`` uniform reverse steps from ``t0 [B]`` to ``sde.eps``.

    Uses the integrator's own time grid and the SDE's own formulas (in float32,
    as the JAX program does), so only the tensor arithmetic is ported.
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps: must be a positive int, got {n_steps!r}")
    t0 = jnp.asarray(t0, jnp.float32)
    if t0.ndim != 1:
        raise ValueError(f"t0: expected a [B] array, got shape {t0.shape}")
    times = grid_time(
        t0[None, :],
        jnp.full_like(t0, sde.eps)[None, :],
        jnp.full((1, t0.shape[0]), n_steps, jnp.int32),
        jnp.arange(n_steps + 1)[:, None],
    )
    t, dt = times[:-1], times[:-1] - times[1:]
    g = sde.diffusion(t)
    mean0, std0 = sde.marginal(jnp.ones_like(t0), t0)
    coeffs = {
        "mean0": mean0,
        "std0": std0,
        "cond": condition_value(sde, t, unet.TIME_INPUTS[time_embedding]),
        "inv_std": 1.0 / sde.marginal_std(t),
        "drift_coeff": sde.drift_coeff(t),
        "g2": g**2,
        "dt": dt,
        "noise_scale": g * jnp.sqrt(dt),
    }
    return EditSchedule(**{k: torch.from_numpy(np.array(v, np.float32)) for k, v in coeffs.items()})


def _per_example(v: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, 1, 1]`` to broadcast against NCHW images."""
    return v.view(-1, 1, 1, 1)


def output_to_score(out: Tensor, inv_std: Tensor, parameterization: str) -> Tensor:
    """Torch twin of :func:`sdedit_jax.score.output_to_score` (``inv_std = 1 / s(t)``)."""
    check_parameterization(parameterization)
    if parameterization == "score":
        return out
    scale = _per_example(inv_std)
    return -out * scale if parameterization == "noise" else out * scale


def euler_maruyama_step(
    net: TorchUNet,
    parameterization: str,
    schedule: EditSchedule,
    step: int,
    x: Tensor,
    noise: Tensor,
) -> tuple[Tensor, Tensor]:
    """One reverse-SDE Euler-Maruyama step ``step`` of ``schedule``: ``(x_next, x_next_mean)``.

    ``noise`` is passed in (not drawn) so tests can feed JAX's draws.
    """
    out = net(x, schedule.cond[step])
    score = output_to_score(out, schedule.inv_std[step], parameterization)
    drift = _per_example(schedule.drift_coeff[step]) * x - _per_example(schedule.g2[step]) * score
    x_mean = x - drift * _per_example(schedule.dt[step])
    return x_mean + _per_example(schedule.noise_scale[step]) * noise, x_mean


def reverse(
    net: TorchUNet,
    parameterization: str,
    schedule: EditSchedule,
    x: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integrates from ``t0`` to ``eps``; returns the last step's mean (noise removal)."""
    x_mean = x
    for step in range(schedule.n_steps):
        noise = _normal_like(x, generator)
        x, x_mean = euler_maruyama_step(net, parameterization, schedule, step, x, noise)
    return x_mean


def _normal_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise in ``x``'s shape and memory format (empty_like keeps the format)."""
    return torch.empty_like(x).normal_(generator=generator)


def sdedit(
    net: TorchUNet,
    parameterization: str,
    schedule: EditSchedule,
    guides: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SDEdit without a mask: perturb ``guides [B, C, H, W]`` to ``t0``, integrate back.

    Runs under ``torch.no_grad()``; the output keeps the guides' memory format.
    """
    with torch.no_grad():
        noise = _normal_like(guides, generator)
        x = _per_example(schedule.mean0) * guides + _per_example(schedule.std0) * noise
        return reverse(net, parameterization, schedule, x, generator)


MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


class EditBaseline:
    """A loaded model's SDEdit in eager PyTorch on fixed guides, in each memory format.

    The one PyTorch side of the benchmarks: the network ported once per entry of
    :data:`MEMORY_FORMATS`, the guides ``[B, H, W, C]`` and ``t0 [B]`` fixed.
    """

    def __init__(self, model: LoadedModel, guides: np.ndarray, t0: np.ndarray):
        self.flax_model = model.network()
        self.sde = model.sde
        self.parameterization = model.parameterization
        self.t0 = t0
        self.nets = {
            name: from_flax(self.flax_model).to(memory_format=fmt)
            for name, fmt in MEMORY_FORMATS.items()
        }
        self.guides = torch.from_numpy(guides).permute(0, 3, 1, 2)

    def edit(self, memory_format: str, n_steps: int, seed: int = 0) -> Tensor:
        """One edit of all guides with ``n_steps`` steps, in ``memory_format``.

        The schedule is built inside the call: the JAX program computes it too,
        so a timed call of this is comparable to one of the compiled program.
        """
        schedule = edit_schedule(self.sde, self.flax_model.cfg.time_embedding, self.t0, n_steps)
        return sdedit(
            self.nets[memory_format],
            self.parameterization,
            schedule,
            self.guides.contiguous(memory_format=MEMORY_FORMATS[memory_format]),
            torch.Generator().manual_seed(seed),
        )
