"""The FID Inception-v3 network in Flax NNX, loaded from a user-supplied weights file.

Published FID (Heusel et al., 2017) and KID numbers are computed on the 2048-d
"pool3" features of one specific network: the TensorFlow Inception graph of
2015-12-05 that the original FID code uses. pytorch-fid re-creates it as
torchvision's Inception-v3 with a few blocks patched (``FIDInceptionA/C/E_1/E_2``)
and converted weights (``pt_inception-2015-12-05-6726825d.pth``). This module ports
that network, with the same module names, so its state dict loads name for name.

What differs from the ImageNet Inception-v3 of torchvision, all inherited from the
TF graph:

* the classifier has 1008 outputs;
* the 3x3 average pools inside Mixed_5b-d, Mixed_6b-e and Mixed_7b leave padding
  out of the count (``count_include_pad=False``);
* Mixed_7c's pool branch max-pools instead of averaging.

Convolutions have no bias and are followed by BatchNorm (epsilon 1e-3, running
statistics: inference only) and ReLU. Inputs are prepared as pytorch-fid does:
bilinear resize to 299x299 with half-pixel centres and no antialiasing (torch's
``F.interpolate(..., align_corners=False)``), then ``[0, 1] -> [-1, 1]``.

No weights can be downloaded here; pass a local copy of the file, either the torch
``.pth`` state dict (read by the torch-free, allow-listed ``torch_pickle`` reader)
or an ``.npz`` with the same keys.
"""

from __future__ import annotations

import os
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdedit_jax.importers import torch_pickle
from sdedit_jax.metrics.network_features import NetworkFeatures

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3
# Full float32 accuracy: on GPUs the default may use TF32, which shifts FID values.
PRECISION = jax.lax.Precision.HIGHEST
# nnx parameter name -> torch state-dict name (conv/linear "weight" need a transpose).
_TORCH_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


class BasicConv2d(nnx.Module):
    """Bias-free conv, inference BatchNorm and ReLU (torchvision's ``BasicConv2d``)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        *,
        rngs: nnx.Rngs,
    ):
        pad_h, pad_w = _pair(padding)
        self.conv = nnx.Conv(
            cin,
            cout,
            _pair(kernel),
            strides=stride,
            padding=((pad_h, pad_h), (pad_w, pad_w)),
            use_bias=False,
            precision=PRECISION,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPSILON, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # FID quirk: border windows average only the pixels inside the image.
    return nnx.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nnx.Module):
    """Mixed_5b-d: 1x1, 5x5, double 3x3 and pool branches (35x35 grid at 299 input)."""

    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], -1)


class InceptionB(nnx.Module):
    """Mixed_6a: stride-2 reduction from the 35x35 to the 17x17 grid."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), branch3x3dbl, _max_pool_3x3_stride2(x)], -1)


class InceptionC(nnx.Module):
    """Mixed_6b-e: factorised 7x7 convolutions (1x7 then 7x1) on the 17x17 grid."""

    def __init__(self, cin: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            branch7x7dbl = layer(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], -1)


class InceptionD(nnx.Module):
    """Mixed_7a: stride-2 reduction from the 17x17 to the 8x8 grid."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = layer(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride2(x)], -1)


class InceptionE(nnx.Module):
    """Mixed_7b/7c: 1x3 and 3x1 convolutions side by side on the 8x8 grid.

    ``max_pool`` selects the FID graph's pool branch: average (without padding) in
    Mixed_7b, max in Mixed_7c.
    """

    def __init__(self, cin: int, *, max_pool: bool, rngs: nnx.Rngs):
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.branch3x3_1(x)
        branch3x3 = [self.branch3x3_2a(h), self.branch3x3_2b(h)]
        h = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = [self.branch3x3dbl_3a(h), self.branch3x3dbl_3b(h)]
        pooled = _max_pool_3x3(x) if self.max_pool else _avg_pool_3x3(x)
        branches = [self.branch1x1(x), *branch3x3, *branch3x3dbl, self.branch_pool(pooled)]
        return jnp.concatenate(branches, -1)


class FIDInceptionV3(nnx.Module):
    """The FID Inception-v3 on NHWC inputs in ``[-1, 1]`` (see ``preprocess``).

    Attribute names mirror the torch state dict, so loading maps keys by name.
    Inputs smaller than 75x75 leave no pixels for the last blocks.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)
        self.fc = nnx.Linear(FEATURE_DIM, NUM_CLASSES, precision=PRECISION, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """The 2048-d pool3 features: global average of Mixed_7c's output."""
        h = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        h = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool_3x3_stride2(h)))
        h = _max_pool_3x3_stride2(h)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            h = block(h)
        return jnp.mean(h, axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[B, 1008]`` of the TF graph's classifier."""
        return self.fc(self.features(x))


def preprocess(images: jax.Array) -> jax.Array:
    """``[B, H, W, 3]`` in ``[0, 1]`` -> 299x299 in ``[-1, 1]``, exactly as pytorch-fid.

    No antialiasing: pytorch-fid's bilinear ``F.interpolate`` has none, and FID is
    sensitive to the resize filter.
    """
    batch, _, _, channels = images.shape
    resized = jax.image.resize(
        images.astype(jnp.float32),
        (batch, INPUT_SIZE, INPUT_SIZE, channels),
        method="bilinear",
        antialias=False,
    )
    return 2.0 * resized - 1.0


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    if path.suffix != ".npz":
        return torch_pickle.load_state_dict(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{os.fspath(path)}: not a readable .npz of tensors ({err})") from err


def _torch_key(path: tuple) -> str:
    """``('Mixed_5b', 'branch1x1', 'bn', 'mean')`` -> ``'Mixed_5b.branch1x1.bn.running_mean'``."""
    return ".".join([*map(str, path[:-1]), _TORCH_NAMES[path[-1]]])


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
    # torch conv OIHW -> flax HWIO; torch linear [out, in] -> flax [in, out].
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
        return value.T
    return value


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:
        height, width, cin, cout = flax_shape
        return (cout, cin, height, width)
    if len(flax_shape) == 2:
        return flax_shape[::-1]
    return flax_shape


def load_fid_inception_v3(weights_path: str | os.PathLike) -> FIDInceptionV3:
    """Builds the network and fills every parameter from a ``.pth`` or ``.npz`` file.

    Raises:
        FileNotFoundError: ``weights_path`` is not a file.
        ValueError: a tensor is missing, mis-shaped, not floating point or unexpected
            (the message names the file and the key).
    """
    path = pathlib.Path(weights_path)
    source = os.fspath(path)
    if not path.is_file():
        raise FileNotFoundError(f"{source}: FID Inception-v3 weights file not found")
    state = _read_tensors(path)
    # Abstract init: every parameter is overwritten, so skip the random initialisers.
    model = nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))
    used = set()
    for node_path, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Variable):
            continue
        key = _torch_key(node_path)
        if key not in state:
            raise ValueError(f"{source}: missing tensor '{key}'")
        value = state[key]
        expected = _torch_shape(tuple(variable.get_value().shape))
        if value.shape != expected:
            raise ValueError(
                f"{source}: tensor '{key}' has shape {value.shape}, expected {expected}"
            )
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(
                f"{source}: tensor '{key}' has dtype {value.dtype}, not floating point"
            )
        variable.set_value(jnp.asarray(_to_flax_layout(value), dtype=jnp.float32))
        used.add(key)
    # BatchNorm step counters are training bookkeeping, absent from older checkpoints.
    unexpected = sorted(k for k in set(state) - used if not k.endswith(".num_batches_tracked"))
    if unexpected:
        raise ValueError(
            f"{source}: unexpected tensors {unexpected[:5]} (not the FID Inception-v3 weights?)"
        )
    return model


class InceptionV3Features(NetworkFeatures):
    """FeatureExtractor: 2048-d FID Inception-v3 pool3 features of ``[0, 1]`` RGB images.

    These are the only features here whose FID/KID can be compared with published
    numbers, and only when loaded from the genuine FID weights (pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth``); any other weights give a different
    metric. Even then, scores also depend on the sample count and the reference set.
    Any input size is accepted; images are resized to 299x299 inside the jitted
    call. ``logits`` gives the 1008 logits (e.g. for an Inception Score).
    """

    name = "inception_v3"
    dim = FEATURE_DIM

    def __init__(self, model: FIDInceptionV3):
        super().__init__(model, preprocess, "fc")

    @classmethod
    def from_weights(cls, weights_path: str | os.PathLike) -> InceptionV3Features:
        """The extractor with weights read from a local ``.pth`` or ``.npz`` file."""
        return cls(load_fid_inception_v3(weights_path))
