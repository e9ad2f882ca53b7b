"""Scores of one setting: faithfulness to the guides and realism against the cached reference."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io

import jax
import jax.numpy as jnp
import numpy as np

from sdedit_jax.evaluation.inputs import (
    ImageSet,
)
from sdedit_jax.metrics import faithfulness, realism
from sdedit_jax.metrics.realism import fid_to_reference, image_features, to_unit_rgb
from sdedit_jax.util import files


def _reference_key(extractor, reference: ImageSet) -> str:
    digest = hashlib.sha256(f"{extractor.name}:{reference.images.shape}".encode())
    digest.update(np.ascontiguousarray(reference.images, np.float32).tobytes())
    return digest.hexdigest()


def reference_features(
    extractor, reference: ImageSet, cache_path: str, batch_size: int
) -> tuple[np.ndarray, bool]:
    """Reference features, from ``cache_path`` when it holds these exact images; (features, hit)."""
    key = _reference_key(extractor, reference)
    if files.exists(cache_path):
        with np.load(io.BytesIO(files.read_bytes(cache_path))) as cached:
            if str(cached["key"]) == key:
                return cached["features"], True
    features = image_features(extractor, reference.images, batch_size)
    buffer = io.BytesIO()
    np.savez(buffer, features=features, key=np.array(key))
    files.publish_bytes(cache_path, buffer.getvalue())
    return features, False


def _mean(values) -> float | None:
    """Mean over examples; None where the score does not apply (all NaN)."""
    values = np.asarray(values, np.float64)
    return None if np.all(np.isnan(values)) else float(np.mean(values))


def setting_scores(
    outputs: np.ndarray,
    guides: ImageSet,
    features: np.ndarray,
    reference: np.ndarray,
    reference_stats: realism.GaussianStats,
    kid_key: jax.Array,
    kid_subset_size: int,
    kid_subsets: int,
) -> dict:
    """Faithfulness (means over examples) and realism of one setting's outputs."""
    scores = faithfulness.faithfulness_scores(
        jnp.asarray(to_unit_rgb(outputs)),
        jnp.asarray(to_unit_rgb(guides.images)),
        jnp.asarray(guides.masks) if guides.masked else None,
    )
    kid = realism.kid(features, reference, kid_key, kid_subset_size, kid_subsets)
    fid = fid_to_reference(features, reference_stats)
    l2 = np.asarray(scores["l2"], np.float64)
    return {
        "l2": float(l2.mean()),
        "l2_std": float(l2.std(ddof=1)) if len(l2) > 1 else 0.0,
        "mse": _mean(scores["mse"]),
        "psnr": _mean(scores["psnr"]),
        "ssim": _mean(scores["ssim"]),
        "l2_inside": _mean(scores["l2_inside"]) if guides.masked else None,
        "l2_outside": _mean(scores["l2_outside"]) if guides.masked else None,
        "kid": kid.mean,
        "kid_std": kid.std,
        "kid_stderr": kid.stderr,
        "fid": fid,
    }


@dataclasses.dataclass(frozen=True)
class Scorer:
    """Scores sets of outputs against one reference; the same KID subsets for every setting."""

    extractor: realism.FeatureExtractor
    reference: np.ndarray  # [N, dim] features
    reference_stats: realism.GaussianStats
    kid_key: jax.Array
    kid_subset_size: int
    kid_subsets: int
    feature_batch_size: int

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of everything the scores depend on besides the outputs and guides."""
        digest = hashlib.sha256(
            f"{self.extractor.name}:{self.kid_subset_size}:{self.kid_subsets}".encode()
        )
        digest.update(np.ascontiguousarray(self.reference, np.float32).tobytes())
        digest.update(np.asarray(jax.random.key_data(self.kid_key)).tobytes())
        return digest.hexdigest()[:16]

    def __call__(self, outputs: np.ndarray, guides: ImageSet) -> dict:
        features = image_features(self.extractor, outputs, self.feature_batch_size)
        return setting_scores(
            outputs,
            guides,
            features,
            self.reference,
            self.reference_stats,
            self.kid_key,
            self.kid_subset_size,
            self.kid_subsets,
        )
