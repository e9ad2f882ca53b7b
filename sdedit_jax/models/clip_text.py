"""The CLIP text transformer of Stable Diffusion (transformers' ``CLIPTextModel``), NNX.

``encoder(ids)`` maps token ids ``[B, L]`` (``L`` <= ``max_position_embeddings``) to
``last_hidden_state`` ``[B, L, hidden_size]``: token plus position embeddings, pre-LN
blocks with causal self-attention and a quick-GELU (SD 1.x, OpenAI CLIP) or GELU
(SD 2.x, OpenCLIP) MLP, and the final LayerNorm. That is what SD's pipelines feed
the U-Net (``clip_skip=None``); like them, no padding mask is applied. Module names
mirror transformers' for the importer. Float32 output; optional bfloat16 compute.

SDXL reads more of it (:meth:`CLIPTextEncoder.encode`): the penultimate layer's hidden
states (``hidden_states[-2]``, before the final LayerNorm) of both of its encoders, and
the second one's pooled projection (``CLIPTextModelWithProjection.text_embeds``: the
final-normed state at the end-of-text token through ``text_projection``).
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
from sdedit_jax.models.sd_layers import LayerNorm, Linear, attend
from sdedit_jax.util.config import frozen

Array = jax.Array
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of :class:`CLIPTextEncoder` (transformers' names; frozen).

    Attributes:
        vocab_size, max_position_embeddings: embedding table sizes.
        hidden_size, intermediate_size: widths of the residual stream and the MLP.
        num_hidden_layers, num_attention_heads: depth and heads.
        hidden_act: ``"quick_gelu"`` (``x * sigmoid(1.702 x)``) or ``"gelu"`` (exact).
        layer_norm_eps: LayerNorm epsilon.
        projection_dim: width of ``text_projection`` (``CLIPTextModelWithProjection``),
            None for a ``CLIPTextModel``.
        eos_token_id: the end-of-text token the pooled state is read at; None: at the
            largest id, as transformers does for configs with ``eos_token_id == 2``.
        compute_dtype: "float32" or "bfloat16".
    """

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None
    eos_token_id: int | None = None
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedConfig(
                f"hidden_act: must be one of {ACTIVATIONS}, got {self.hidden_act!r}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise UnsupportedConfig(
                f"compute_dtype: must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedConfig(
                f"num_attention_heads: {self.num_attention_heads} does not divide "
                f"hidden_size={self.hidden_size}"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | CLIPTextConfig) -> CLIPTextConfig:
        """From this class's own fields (as written to ``model_info.json``); strict."""
        return frozen(cls, config, "text_encoder", error=UnsupportedConfig)

    def to_config(self) -> dict[str, Any]:
        """JSON-ready fields (:meth:`from_config` inverts it)."""
        return dataclasses.asdict(self)


class Embedding(nnx.Module):
    def __init__(self, count: int, dim: int, *, rngs: nnx.Rngs):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (count, dim)) * 0.02)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class Embeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)

    def __call__(self, ids: Array) -> Array:
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))[None]


class SelfAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.q_proj, self.k_proj = Linear(d, d, rngs=rngs), Linear(d, d, rngs=rngs)
        self.v_proj, self.out_proj = Linear(d, d, rngs=rngs), Linear(d, d, rngs=rngs)
        self.heads = cfg.num_attention_heads

    def __call__(self, x: Array) -> Array:
        out = attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


def _activation(name: str, x: Array) -> Array:
    y = x.astype(jnp.float32)
    y = y * jax.nn.sigmoid(1.702 * y) if name == "quick_gelu" else jax.nn.gelu(y, approximate=False)
    return y.astype(x.dtype)


class MLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x: Array) -> Array:
        return self.fc2(_activation(self.act, self.fc1(x)))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: Array, stop: int | None = None) -> Array:
        """The residual stream after the first ``stop`` layers (all by default)."""
        for layer in self.layers[:stop]:
            x = layer(x)
        return x


class CLIPTextEncoder(nnx.Module):
    """``encoder(ids[B, L]) -> last_hidden_state[B, L, D]`` (float32)."""

    def __init__(self, config: Mapping[str, Any] | CLIPTextConfig, *, rngs: nnx.Rngs):
        cfg = CLIPTextConfig.from_config(config)
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

        if cfg.projection_dim is not None:
            self.text_projection = Linear(
                cfg.hidden_size, cfg.projection_dim, bias=False, rngs=rngs
            )

    def _embedded(self, ids: Array) -> Array:
        if ids.ndim != 2 or ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(
                f"ids: shape {tuple(ids.shape)}, expected (batch, <= "
                f"{self.cfg.max_position_embeddings})"
            )
        return self.embeddings(ids).astype(jnp.dtype(self.cfg.compute_dtype))

    def __call__(self, ids: Array) -> Array:
        return self.final_layer_norm(self.encoder(self._embedded(ids))).astype(jnp.float32)

    def encode(self, ids: Array, skip: int = 1) -> tuple[Array, Array]:
        """``(hidden, pooled)``, float32. ``hidden``: transformers' ``hidden_states[-1 - skip]``,
        the stream ``skip`` layers before the end, without the final LayerNorm (SDXL's
        ``skip=1``); ``skip=0`` is the last hidden state, as :meth:`__call__`. ``pooled``:
        the final-normed state at the end-of-text token, through ``text_projection`` when
        the encoder has it."""
        cfg = self.cfg
        if not 0 <= skip < cfg.num_hidden_layers:
            raise ValueError(f"skip: {skip} layers of {cfg.num_hidden_layers}")
        kept = cfg.num_hidden_layers - skip
        hidden = self.encoder(self._embedded(ids), kept)
        top = hidden
        for layer in self.encoder.layers[kept:]:
            top = layer(top)
        top = self.final_layer_norm(top)
        at = jnp.argmax(ids if cfg.eos_token_id is None else ids == cfg.eos_token_id, axis=-1)
        pooled = top[jnp.arange(ids.shape[0]), at]
        if cfg.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return (hidden if skip else top).astype(jnp.float32), pooled.astype(jnp.float32)


def build(config: Mapping[str, Any] | CLIPTextConfig, seed: int) -> CLIPTextEncoder:
    """A randomly initialised :class:`CLIPTextEncoder` (see :func:`initialise.build`)."""
    return initialise.build(CLIPTextEncoder, CLIPTextConfig.from_config(config), seed)


def abstract(config: CLIPTextConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and shape-only state of the encoder of ``config``."""
    return initialise.abstract(CLIPTextEncoder, config)
