"""Class-balanced FID of runs trained from scratch (eval/sampling.class_balanced_fid): labels cycle
over the classes across batches, features stream into float64 statistics, and the value equals a
NumPy / SciPy Frechet distance of the same features; a tiny LEGO draws through it."""
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from lcm_jax import config_loading, models
from lcm_jax.eval import fid, sampling
from lcm_jax.objectives.edm import EDMObjective


def numpy_fd(a, b):
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_labels_cycle_over_classes_across_batches():
    seen = []
    images_fn = lambda p, f, rng, labels, sc: jnp.broadcast_to(
        labels[:, None, None, None].astype(jnp.float32) / 10, (labels.shape[0], 2, 2, 1))

    def features_fn(images):
        seen.extend(np.rint(images[:, 0, 0, 0] * 10).astype(int).tolist())
        return np.asarray(images).reshape(len(images), -1) + np.random.default_rng(len(seen)).normal(
            size=(len(images), 4))

    ref = fid.gaussian_stats(np.random.default_rng(0).normal(size=(50, 4)))
    sampling.class_balanced_fid(images_fn, None, {}, None, num_samples=40, batch_size=6,
                                num_classes=10, features_fn=features_fn, ref_stats=ref)
    assert seen == [i % 10 for i in range(40)]  # 4 of each class, the last batch cut to 4


def test_running_stats_equal_gaussian_stats():
    x = np.random.default_rng(1).normal(size=(37, 5)) * 3 + 1
    stats = fid.RunningStats()
    for part in np.array_split(x, 4):
        stats.update(part)
    for ours, ref in zip(stats.stats(), fid.gaussian_stats(x)):
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_tiny_lego_fid_equals_a_numpy_frechet_distance():
    config = config_loading.load("configs/digits_lego.py:pg,tiny")
    objective = EDMObjective(config, models.make_model(config.model, 1), (16, 16, 1))
    params = objective.init_state(jax.random.PRNGKey(0)).params
    projection = np.random.default_rng(2).normal(size=(256, 6)) / 16
    feats = []

    def features_fn(images):
        assert images.shape[1:] == (16, 16, 1) and np.abs(images).max() <= 1
        feats.append(np.asarray(images, np.float64).reshape(len(images), -1) @ projection)
        return feats[-1]

    reference = np.random.default_rng(3).normal(size=(64, 6)) * 0.1
    sc = config.eval.copy_and_resolve_references()
    sc.num_steps = 2
    value = sampling.class_balanced_fid(objective.sample_images, params, objective.frozen, sc,
                                        num_samples=30, batch_size=12, num_classes=10,
                                        features_fn=features_fn,
                                        ref_stats=fid.gaussian_stats(reference))
    np.testing.assert_allclose(value, numpy_fd(np.concatenate(feats), reference), rtol=1e-6)
    assert sum(len(f) for f in feats) == 30
