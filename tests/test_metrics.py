"""Faithfulness and realism metrics against plain numpy/scipy/scikit-image references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import skimage.metrics

from sdedit_jax.metrics import faithfulness as fm
from sdedit_jax.metrics import realism as rm


def _images(seed, shape=(3, 16, 20, 3)):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, shape).astype(np.float32)


# --- faithfulness -------------------------------------------------------------------


def test_l2_mse_psnr_match_numpy():
    x, y = _images(0), _images(1)
    sq = (x.astype(np.float64) - y) ** 2
    np.testing.assert_allclose(fm.l2_distance(x, y), np.sqrt(sq.sum(axis=(1, 2, 3))), rtol=1e-5)
    np.testing.assert_allclose(fm.mse(x, y), sq.mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(
        fm.psnr(x, y), 10 * np.log10(1.0 / sq.mean(axis=(1, 2, 3))), rtol=1e-5
    )


def test_known_values_and_identical_images():
    x = np.zeros((2, 4, 4, 3), np.float32)
    y = np.full_like(x, 0.5)
    # 48 values each off by 0.5: L2 = sqrt(48 / 4) = sqrt(12); MSE 0.25 -> PSNR 10 log10(4).
    np.testing.assert_allclose(fm.l2_distance(x, y), [np.sqrt(12.0)] * 2, rtol=1e-6)
    np.testing.assert_allclose(fm.psnr(x, y), [10 * np.log10(4.0)] * 2, rtol=1e-6)
    np.testing.assert_array_equal(fm.l2_distance(y, y), [0.0, 0.0])
    assert np.all(np.isposinf(fm.psnr(y, y)))
    np.testing.assert_allclose(fm.ssim(_images(2), _images(2)), [1.0] * 3, atol=1e-6)


def test_masked_metrics_match_numpy_and_respect_mask():
    x, y = _images(3), _images(4)
    rng = np.random.default_rng(5)
    mask = (rng.uniform(size=x.shape[:3]) > 0.6).astype(np.float32)
    sq = (x.astype(np.float64) - y) ** 2
    region = np.broadcast_to(mask[..., None] > 0, x.shape)
    ref_l2 = [np.sqrt(sq[b][region[b]].sum()) for b in range(x.shape[0])]
    ref_psnr = [10 * np.log10(1.0 / sq[b][region[b]].mean()) for b in range(x.shape[0])]
    np.testing.assert_allclose(fm.masked_l2_distance(x, y, mask), ref_l2, rtol=1e-5)
    np.testing.assert_allclose(fm.masked_psnr(x, y, mask), ref_psnr, rtol=1e-5)
    # [B, H, W, 1] and [B, H, W, C] masks mean the same region.
    np.testing.assert_allclose(fm.masked_psnr(x, y, mask[..., None]), ref_psnr, rtol=1e-5)
    full_mask = np.repeat(mask[..., None], 3, axis=-1)
    np.testing.assert_allclose(fm.masked_l2_distance(x, y, full_mask), ref_l2, rtol=1e-5)

    # Changing pixels outside the mask leaves inside scores untouched, and vice versa.
    y_out = np.where(region, y, 1.0 - y)
    np.testing.assert_allclose(fm.masked_l2_distance(x, y_out, mask), ref_l2, rtol=1e-6)
    scores, scores_out = fm.faithfulness_scores(y, x, mask), fm.faithfulness_scores(y_out, x, mask)
    np.testing.assert_allclose(scores["psnr_inside"], scores_out["psnr_inside"], rtol=1e-6)
    assert not np.allclose(scores["l2_outside"], scores_out["l2_outside"])
    y_in = np.where(region, x, y)
    assert np.all(np.isposinf(fm.masked_psnr(x, y_in, mask)))
    np.testing.assert_allclose(
        fm.masked_l2_distance(x, y_in, 1.0 - mask), fm.l2_distance(x, y_in), rtol=1e-6
    )


def test_empty_mask_is_nan_psnr_and_zero_l2():
    x, y = _images(6), _images(7)
    empty = np.zeros(x.shape[:3], np.float32)
    assert np.all(np.isnan(fm.masked_psnr(x, y, empty)))
    assert np.all(np.isnan(fm.masked_mse(x, y, empty)))
    np.testing.assert_array_equal(fm.masked_l2_distance(x, y, empty), np.zeros(3))


def test_bad_shapes_raise():
    x = _images(8)
    with pytest.raises(ValueError, match="mask"):
        fm.masked_l2_distance(x, x, np.ones((3, 16, 19), np.float32))
    with pytest.raises(ValueError, match="equal shape"):
        fm.l2_distance(x, x[:2])
    with pytest.raises(ValueError, match="11x11"):
        fm.ssim(x[:, :8, :8], x[:, :8, :8])


def test_ssim_matches_scikit_image():
    x = _images(9, (2, 32, 28, 3))
    y = np.clip(x + np.random.default_rng(10).normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    ref = [
        skimage.metrics.structural_similarity(
            x[b],
            y[b],
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=-1,
        )
        for b in range(2)
    ]
    np.testing.assert_allclose(fm.ssim(x, y), ref, rtol=1e-4)


def test_scores_jit_equal_eager():
    x, y = _images(11), _images(12)
    mask = (np.random.default_rng(13).uniform(size=x.shape[:3]) > 0.5).astype(np.float32)
    eager = fm.faithfulness_scores(x, y, mask)
    jitted = jax.jit(fm.faithfulness_scores)(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))
    assert eager.keys() == jitted.keys()
    for name in eager:
        np.testing.assert_allclose(jitted[name], eager[name], rtol=1e-5, err_msg=name)


# --- realism ------------------------------------------------------------------------


def _reference_fid(f1, f2):
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = scipy.linalg.sqrtm(c1 @ c2).real
    return np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(root)


def _reference_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written as explicit pair loops."""
    m, d = len(x), x.shape[1]

    def k(a, b):
        return (np.dot(a, b) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_streaming_stats_match_numpy_with_large_offset():
    rng = np.random.default_rng(20)
    feats = 1e4 + rng.normal(size=(103, 6)) @ rng.normal(size=(6, 6))
    stats = rm.empty_stats(6)
    for start, stop in [(0, 1), (1, 40), (40, 40), (40, 103)]:
        stats = rm.update_stats(stats, feats[start:stop])
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-9)


def test_fid_matches_scipy_reference():
    rng = np.random.default_rng(21)
    f1 = rng.normal(size=(60, 8))
    f2 = 0.5 + rng.normal(size=(70, 8)) @ rng.normal(size=(8, 8)) * 0.7
    np.testing.assert_allclose(rm.fid(f1, f2), _reference_fid(f1, f2), rtol=1e-8)
    assert rm.fid(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(22)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a = np.array([0.0, 0.3, 1.0, 2.5, 4.0])  # one zero eigenvalue: a singular covariance
    b = np.array([1.0, 0.2, 1.5, 0.5, 9.0])
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    cov1, cov2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    # A zero eigenvalue is only known to ~1e-16, and its square root to ~1e-8.
    assert rm.frechet_distance(m1, cov1, m2, cov2) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_of_sampled_gaussians_approaches_closed_form():
    rng = np.random.default_rng(23)
    f1 = rng.normal(0.0, 1.0, size=(20000, 2))
    f2 = rng.normal(1.0, 2.0, size=(20000, 2))
    # Closed form: |mu1 - mu2|^2 + sum (sigma1 - sigma2)^2 = 2 + 2 = 4.
    assert rm.fid(f1, f2) == pytest.approx(4.0, rel=0.03)


def test_kid_full_subsets_equal_plain_mmd():
    rng = np.random.default_rng(24)
    x, y = rng.normal(size=(25, 4)), 0.3 + rng.normal(size=(25, 4))
    result = rm.kid(x, y, jax.random.key(0), subset_size=25, num_subsets=3)
    assert result.mean == pytest.approx(_reference_mmd2(x, y), rel=1e-9)
    assert result.std == pytest.approx(0.0, abs=1e-9)


def test_kid_same_distribution_near_zero_and_shift_detected():
    rng = np.random.default_rng(25)
    x, x_other = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same = rm.kid(x, x_other, jax.random.key(1), subset_size=100, num_subsets=50)
    shifted = rm.kid(x, x_other + 0.5, jax.random.key(1), subset_size=100, num_subsets=50)
    assert same.stderr > 0 and same.stderr == pytest.approx(same.std / np.sqrt(50))
    assert abs(same.mean) < 4 * same.stderr
    assert shifted.mean > 10 * shifted.stderr
    again = rm.kid(x, x_other + 0.5, jax.random.key(1), subset_size=100, num_subsets=50)
    assert again == shifted


def test_kid_of_a_set_with_itself_has_the_known_small_bias():
    # Subsets of x and of its copy are drawn independently, so a cross pair is the
    # same point with probability 1/n: E[MMD^2] = (2/n)(mean off-diagonal k - mean diagonal k).
    rng = np.random.default_rng(26)
    n, d = 400, 16
    x = rng.normal(size=(n, d))
    k = (x @ x.T / d + 1.0) ** 3
    diag = np.trace(k) / n
    off_diag = (k.sum() - np.trace(k)) / (n * (n - 1))
    expected = 2.0 / n * (off_diag - diag)
    result = rm.kid(x, x, jax.random.key(4), subset_size=100, num_subsets=50)
    assert abs(result.mean - expected) < 4 * result.stderr
    assert abs(expected) > 4 * result.stderr  # the check above is not vacuous


def test_draw_subsets_are_without_replacement_and_keyed():
    rows = rm.draw_subsets(jax.random.key(2), 50, 20, 10)
    assert rows.shape == (10, 20)
    assert all(len(set(r.tolist())) == 20 for r in rows)
    assert rows.min() >= 0 and rows.max() < 50
    np.testing.assert_array_equal(rows, rm.draw_subsets(jax.random.key(2), 50, 20, 10))
    assert not np.array_equal(rows, rm.draw_subsets(jax.random.key(3), 50, 20, 10))


def test_realism_input_errors():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="subset_size"):
        rm.kid(x, x, jax.random.key(0), subset_size=11, num_subsets=2)
    with pytest.raises(ValueError, match="num_subsets"):
        rm.kid(x, x, jax.random.key(0), subset_size=5, num_subsets=1)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="1 of 10 feature rows"):
        rm.stats_from_features(bad)
    with pytest.raises(ValueError, match="dim"):
        rm.update_stats(rm.empty_stats(4), x)
    with pytest.raises(ValueError, match="unknown feature extractor"):
        rm.load_feature_extractor("inception_v4")
    with pytest.raises(ValueError, match="needs weights_path"):
        rm.load_feature_extractor("inception_v3")


class _ColorMoments:
    """A toy FeatureExtractor: per-channel mean and std of each image."""

    name = "color_moments"
    dim = 6

    def __call__(self, images):
        return jnp.concatenate([images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=-1)


def test_batchwise_statistics_equal_in_memory_statistics():
    extractor = _ColorMoments()
    assert isinstance(extractor, rm.FeatureExtractor)
    batches = [_images(30 + i, (n, 8, 8, 3)) for i, n in enumerate([4, 1, 7])]
    features = rm.extract_features(extractor, batches)
    assert features.shape == (12, 6)
    streamed = rm.accumulate_stats(extractor, batches)
    direct = rm.stats_from_features(features)
    assert streamed.count == 12
    np.testing.assert_allclose(streamed.mean, direct.mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.covariance, direct.covariance, rtol=1e-9, atol=1e-15)
