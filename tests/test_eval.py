"""Evaluation core: Fréchet distance vs scipy, the digits classifier, its cache, FD-digits and accuracy."""
import jax
import numpy as np
import pytest
import scipy.linalg

from conftest import f32_tol
from lcm_jax.data import digits
from lcm_jax.eval import digits_metrics, digits_net, fid


# ----------------------------------------------------------------------------- Fréchet distance

def _random_gaussian(rng, dim, samples):
    features = rng.normal(size=(samples, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    return fid.gaussian_stats(features)


def _scipy_frechet_distance(mu1, sigma1, mu2, sigma2):
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [1, 3, 16, 64])
def test_frechet_distance_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    mu1, sigma1 = _random_gaussian(rng, dim, samples=4 * dim + 8)
    mu2, sigma2 = _random_gaussian(rng, dim, samples=4 * dim + 8)
    expected = _scipy_frechet_distance(mu1, sigma1, mu2, sigma2)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    assert fid.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_sets_is_zero_even_if_rank_deficient():
    rng = np.random.default_rng(0)
    mu, sigma = fid.gaussian_stats(rng.normal(size=(10, 32)))  # N < D: singular covariance
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_of_shifted_mean_is_squared_shift():
    rng = np.random.default_rng(1)
    mu, sigma = _random_gaussian(rng, 8, samples=50)
    assert fid.frechet_distance(mu, sigma, mu + 0.5, sigma) == pytest.approx(8 * 0.25, rel=1e-8)


def test_gaussian_stats_and_shape_errors():
    features = np.random.default_rng(2).normal(size=(20, 5))
    mu, sigma = fid.gaussian_stats(features)
    np.testing.assert_allclose(mu, features.mean(0))
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False))
    with pytest.raises(ValueError, match="at least 2"):
        fid.gaussian_stats(features[:1])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        fid.gaussian_stats(features[0])
    with pytest.raises(ValueError, match="shape mismatch"):
        fid.frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


# ----------------------------------------------------------------------------- digits classifier

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lcm_jax_cache"))


@pytest.fixture(scope="session")
def evaluator(cache_dir):
    """Trains the 16x16 grey classifier once per session (into the tmp cache) and fits the reference."""
    return digits_metrics.DigitsEvaluator(image_size=16, channels=1, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def test_split():
    return digits.load("test", 16, 1)


def test_classifier_reaches_97_percent_on_the_test_split(evaluator, test_split):
    assert evaluator.net.test_accuracy >= 0.97
    images, labels = test_split
    assert np.mean(evaluator.net.predict(images) == labels) == evaluator.net.test_accuracy


def test_cache_is_reused_without_retraining(evaluator, cache_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("load_or_train retrained although the cache holds the params")

    monkeypatch.setattr(digits_net, "train_params", fail)
    loaded = digits_net.load_or_train(16, 1, cache_dir=cache_dir)
    assert loaded.test_accuracy == evaluator.net.test_accuracy
    jax.tree.map(np.testing.assert_array_equal, loaded.params, evaluator.net.params)


def test_cache_is_keyed_by_size_channels_and_version(tmp_path, monkeypatch):
    paths = {digits_net.cache_path(s, c, str(tmp_path)) for s in (16, 32) for c in (1, 3)}
    assert len(paths) == 4 and all(digits_net.VERSION in p for p in paths)
    monkeypatch.setenv("LCM_JAX_CACHE", str(tmp_path / "env"))
    assert digits_net.cache_path(16, 1).startswith(str(tmp_path / "env"))


def test_corrupt_cache_fails_with_a_remedy(tmp_path):
    path = digits_net.cache_path(16, 1, str(tmp_path))
    with open(path, "wb") as f:
        f.write(b"not a msgpack file")
    with pytest.raises(ValueError, match="delete the file"):
        digits_net.load_or_train(16, 1, cache_dir=str(tmp_path))


def test_training_is_deterministic_for_a_seed(monkeypatch):
    monkeypatch.setattr(digits_net, "TRAIN_STEPS", 3)  # determinism, not accuracy: keep it short
    first, again = digits_net.train_params(16, 1, seed=0), digits_net.train_params(16, 1, seed=0)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    other = digits_net.train_params(16, 1, seed=1)
    assert not np.array_equal(other["Dense_1"]["kernel"], first["Dense_1"]["kernel"])


def test_features_are_batched_consistently(evaluator):
    images, _ = digits.load("train", 16, 1)  # 1497 > EVAL_BATCH_SIZE: several padded chunks
    features = evaluator.net.features(images)
    assert features.shape == (len(images), digits_net.FEATURE_DIM)
    # Chunks of 512 vs one of 3: two programs, which XLA sums in their own orders (64 ulps of
    # the features' scale); another image's features differ by O(1).
    tol = f32_tol(64, features)
    np.testing.assert_allclose(features[:3], evaluator.net.features(images[:3]), rtol=0, atol=tol)
    np.testing.assert_allclose(features[-3:], evaluator.net.features(images[-3:]), rtol=0, atol=tol)


def test_wrong_image_shape_is_rejected(evaluator):
    with pytest.raises(ValueError, match=r"\(16, 16, 1\)"):
        evaluator.net.features(np.zeros((4, 16, 16, 3), np.float32))


def test_larger_colour_inputs_reduce_to_the_same_grey_16x16_input():
    small, _ = digits.load("test", 16, 1)
    large, _ = digits.load("test", 32, 3)
    reduced = np.asarray(digits_net.to_net_input(large))
    assert reduced.shape == small.shape
    assert np.mean(np.abs(reduced - small)) < 0.05


# ----------------------------------------------------------------------------- FD-digits, accuracy

def test_fd_separates_real_digits_from_noise_and_from_one_class(evaluator, test_split):
    images, labels = test_split
    real_fd = evaluator.fd(images)
    noise = np.random.default_rng(0).uniform(-1, 1, images.shape).astype(np.float32)
    train_images, train_labels = digits.load("train", 16, 1)
    one_class = train_images[train_labels == 3]
    assert real_fd < 20.0
    assert evaluator.fd(noise) > 10 * real_fd
    assert evaluator.fd(one_class) > 10 * real_fd


def test_fd_of_the_reference_split_itself_is_zero(evaluator):
    images, _ = digits.load(evaluator.reference_split, 16, 1)
    assert evaluator.reference_count == len(images) == 1497
    assert evaluator.fd(images) < 1e-6


def test_accuracy_with_true_and_shuffled_labels(evaluator, test_split):
    images, labels = test_split
    assert evaluator.accuracy(images, labels) >= 0.97
    shuffled = np.random.default_rng(0).permutation(labels)
    assert 0.02 <= evaluator.accuracy(images, shuffled) <= 0.2
    with pytest.raises(ValueError, match="labels"):
        evaluator.accuracy(images, labels[:10])


def test_evaluate_matches_fd_and_accuracy(evaluator, test_split):
    images, labels = test_split
    metrics = evaluator.evaluate(images, labels)
    assert set(metrics) == {"fd", "acc"}
    assert metrics["fd"] == pytest.approx(evaluator.fd(images), rel=1e-6)
    assert metrics["acc"] == evaluator.accuracy(images, labels)
    assert set(evaluator.evaluate(images)) == {"fd"}
