"""Realism of generated images: FID and KID on features of a pretrained network.

* FID (Heusel et al., 2017): Frechet distance between Gaussians fitted to the two
  feature sets. Only the mean and covariance are needed, so ``GaussianStats`` is
  accumulated batch by batch in float64 on the host (Chan et al.'s pairwise update,
  which stays accurate when features have a large common offset) and large sets
  never need to be held in memory.
* KID (Binkowski et al., 2018): the unbiased MMD^2 estimate with the cubic kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random equal-size subsets of both
  sets. It needs the features themselves; subsets are drawn from an explicit JAX key
  and the kernel sums run in float64 numpy, because MMD^2 is a small difference of
  large kernel means and float32 cancels badly.

Scores depend on the feature network. The only network with offline weights here is
EfficientNet-Lite0 (``load_feature_extractor("efficientnet_lite0")``), whose values
are not comparable with published FID/KID numbers. Those use the FID Inception-v3
(``load_feature_extractor("inception_v3", weights_path)``), whose weights cannot be
downloaded here: the user must supply the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from typing import NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np
from numpy.typing import ArrayLike

from sdedit_jax.metrics.efficientnet import EfficientNetFeatures
from sdedit_jax.metrics.inception import InceptionV3Features


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps ``[B, H, W, 3]`` RGB images in ``[0, 1]`` to ``[B, dim]`` features."""

    name: str
    dim: int

    def __call__(self, images: jax.Array) -> jax.Array: ...


FEATURE_EXTRACTORS = ("efficientnet_lite0", "inception_v3")


def load_feature_extractor(
    name: str, weights_path: str | os.PathLike | None = None
) -> FeatureExtractor:
    """The pretrained extractor called ``name``.

    EfficientNet-Lite0 weights default to the pip-shipped file; Inception-v3 needs
    ``weights_path`` (no default exists offline).
    """
    if name == "efficientnet_lite0":
        return EfficientNetFeatures.pretrained(weights_path)
    if name == "inception_v3":
        if weights_path is None:
            raise ValueError(
                "load_feature_extractor('inception_v3') needs weights_path: a local copy of "
                "the FID Inception weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                "or an .npz of its tensors); they cannot be downloaded here"
            )
        return InceptionV3Features.from_weights(weights_path)
    raise ValueError(f"unknown feature extractor '{name}'; available: {FEATURE_EXTRACTORS}")


def _as_features(features: ArrayLike, what: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{what}: features must be [N, D], got shape {array.shape}")
    bad = np.count_nonzero(~np.isfinite(array).all(axis=1))
    if bad:
        raise ValueError(f"{what}: {bad} of {array.shape[0]} feature rows are not finite")
    return array


@dataclasses.dataclass(frozen=True)
class GaussianStats:
    """Running mean and scatter (sum of outer products of deviations) in float64."""

    count: int
    mean: np.ndarray
    scatter: np.ndarray

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased sample covariance (``N - 1`` normalisation, like ``np.cov``)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, have {self.count}")
        return self.scatter / (self.count - 1)


def empty_stats(dim: int) -> GaussianStats:
    """Statistics of zero samples in ``dim`` dimensions, the start of an accumulation."""
    return GaussianStats(0, np.zeros(dim), np.zeros((dim, dim)))


def update_stats(stats: GaussianStats, features: ArrayLike) -> GaussianStats:
    """Adds a batch ``[N, D]`` of features to running statistics (pure: returns new stats)."""
    batch = _as_features(features, "update_stats")
    if batch.shape[1] != stats.dim:
        raise ValueError(f"update_stats: features have dim {batch.shape[1]}, stats {stats.dim}")
    n = batch.shape[0]
    if n == 0:
        return stats
    batch_mean = batch.mean(axis=0)
    centred = batch - batch_mean
    batch_scatter = centred.T @ centred
    total = stats.count + n
    delta = batch_mean - stats.mean
    # Chan et al. (1979): merge two (count, mean, scatter) summaries exactly.
    mean = stats.mean + delta * (n / total)
    scatter = stats.scatter + batch_scatter + np.outer(delta, delta) * (stats.count * n / total)
    return GaussianStats(total, mean, scatter)


def stats_from_features(features: ArrayLike) -> GaussianStats:
    """Statistics of one in-memory feature set ``[N, D]``."""
    array = _as_features(features, "stats_from_features")
    return update_stats(empty_stats(array.shape[1]), array)


def accumulate_stats(extractor: FeatureExtractor, batches: Iterable[ArrayLike]) -> GaussianStats:
    """Runs ``extractor`` over image batches, keeping only running statistics."""
    stats = empty_stats(extractor.dim)
    for images in batches:
        stats = update_stats(stats, jax.device_get(extractor(images)))
    return stats


def extract_features(extractor: FeatureExtractor, batches: Iterable[ArrayLike]) -> np.ndarray:
    """Runs ``extractor`` over image batches and returns all features ``[N, dim]`` (for KID)."""
    chunks = [np.asarray(jax.device_get(extractor(images))) for images in batches]
    if not chunks:
        return np.zeros((0, extractor.dim), dtype=np.float32)
    return np.concatenate(chunks, axis=0)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix; tiny negative eigenvalues are rounding."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(
    mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray
) -> float:
    """``|m1 - m2|^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2)`` in float64.

    ``tr((C1 C2)^1/2)`` equals the trace of the square root of the symmetric PSD
    matrix ``C1^1/2 C2 C1^1/2``, whose eigenvalues ``eigh`` finds stably; the general
    ``sqrtm(C1 C2)`` can return complex parts for singular covariances.
    """
    mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    dim = mean1.shape[0]
    if mean2.shape != (dim,) or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ValueError(
            f"frechet_distance: shapes {mean1.shape}, {cov1.shape}, {mean2.shape}, {cov2.shape} "
            "do not describe two Gaussians of one dimension"
        )
    root1 = _sqrt_psd(cov1)
    product = root1 @ cov2 @ root1
    product = 0.5 * (product + product.T)
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(product), 0.0, None)))
    diff = mean1 - mean2
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt
    # The distance is non-negative; for (near-)equal inputs rounding can dip below 0.
    return float(max(value, 0.0))


def fid_from_stats(stats1: GaussianStats, stats2: GaussianStats) -> float:
    """FID between two accumulated feature statistics."""
    return frechet_distance(stats1.mean, stats1.covariance, stats2.mean, stats2.covariance)


def fid(features1: ArrayLike, features2: ArrayLike) -> float:
    """FID between two in-memory feature sets ``[N1, D]`` and ``[N2, D]``."""
    return fid_from_stats(stats_from_features(features1), stats_from_features(features2))


class KIDResult(NamedTuple):
    """KID over subsets: mean, sample std across subsets, and standard error of the mean.

    ``stderr = std / sqrt(num_subsets)`` measures only the subset-sampling noise for
    these two feature sets, not the noise of drawing the sets themselves; ``std`` is
    what most papers report as "±".
    """

    mean: float
    std: float
    stderr: float


def draw_subsets(key: jax.Array, num_items: int, subset_size: int, num_subsets: int) -> np.ndarray:
    """``[num_subsets, subset_size]`` indices; each row samples without replacement."""
    if not 2 <= subset_size <= num_items:
        raise ValueError(
            f"subset_size must be in [2, {num_items}] (the set size), got {subset_size}"
        )
    keys = jax.random.split(key, num_subsets)
    choose = jax.vmap(lambda k: jax.random.choice(k, num_items, (subset_size,), replace=False))
    return np.asarray(choose(keys))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's cubic kernel matrix ``(x.y / d + 1)^3``."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 estimate with the cubic kernel for two equal-size samples."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kid(
    features1: ArrayLike,
    features2: ArrayLike,
    key: jax.Array,
    subset_size: int = 1000,
    num_subsets: int = 100,
) -> KIDResult:
    """KID between two feature sets, averaged over ``num_subsets`` random subsets.

    Raises:
        ValueError: a set is smaller than ``subset_size``, dims differ, or ``num_subsets < 2``.
    """
    x = _as_features(features1, "kid features1")
    y = _as_features(features2, "kid features2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"kid: feature dims differ ({x.shape[1]} vs {y.shape[1]})")
    if num_subsets < 2:
        raise ValueError(f"kid: num_subsets must be >= 2 for a standard error, got {num_subsets}")
    key1, key2 = jax.random.split(key)
    rows1 = draw_subsets(key1, x.shape[0], subset_size, num_subsets)
    rows2 = draw_subsets(key2, y.shape[0], subset_size, num_subsets)
    values = np.array([mmd2_unbiased(x[i], y[j]) for i, j in zip(rows1, rows2, strict=True)])
    std = float(values.std(ddof=1))
    return KIDResult(float(values.mean()), std, std / math.sqrt(num_subsets))


# --- features of model images, FID against cached reference statistics ---------------------


def to_unit_rgb(images: np.ndarray) -> np.ndarray:
    """``[-1, 1]`` model images -> ``[0, 1]`` RGB, clipped as a saved PNG would be."""
    images = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def image_features(extractor, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Features of ``[-1, 1]`` images in fixed-size (padded) batches: one compile for any count."""
    unit = to_unit_rgb(images)
    padded = np.concatenate(
        [unit, np.zeros((-len(unit) % batch_size,) + unit.shape[1:], np.float32)]
    )
    batches = (padded[i : i + batch_size] for i in range(0, len(padded), batch_size))
    return extract_features(extractor, batches)[: len(unit)]


def fid_to_reference(features: np.ndarray, reference: GaussianStats) -> float:
    """FID of a feature set against reference statistics, exactly, in O(n d^2) when n <= d.

    FID needs ``tr((C_r^1/2 C C_r^1/2)^1/2)``. With ``C = A^T A / (n - 1)`` (``A``:
    the n centred samples as rows), ``C_r^1/2 C C_r^1/2`` has the same non-zero
    eigenvalues as the n x n matrix ``A C_r A^T / (n - 1)``, so a sweep's small
    output sets never eigendecompose a d x d matrix (1280 x 1280 for
    EfficientNet-Lite0, seconds each on a CPU). Larger sets use
    ``fid_from_stats``.
    """
    stats = stats_from_features(features)
    count, dim = np.shape(features)
    if count > dim:
        return fid_from_stats(stats, reference)
    centred = np.asarray(features, np.float64) - stats.mean
    small = centred @ reference.covariance @ centred.T / (count - 1)
    eigenvalues = np.linalg.eigvalsh(0.5 * (small + small.T))
    trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
    difference = stats.mean - reference.mean
    value = (
        difference @ difference
        + np.sum(centred**2) / (count - 1)
        + np.trace(reference.covariance)
        - 2.0 * trace_sqrt
    )
    return float(max(value, 0.0))  # rounding can dip below 0 for equal sets, as in realism
