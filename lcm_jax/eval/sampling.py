"""Draw many class-conditional samples in fixed-size batches (one compile) and score them."""
from __future__ import annotations

import jax
import numpy as np


def class_conditional_samples(sample_fn, params, frozen, sample_config, num_samples: int,
                              batch_size: int, seed: int = 0):
    """(images [N, H, W, C] in [-1, 1], labels [N]) from
    `sample_fn(params, frozen, rng, num_images, sample_config)` (labels cycle through the classes).
    Batch i uses fold_in(key(seed), i): every method evaluated with one seed starts from the same noise."""
    draw = jax.jit(lambda p, f, rng: sample_fn(p, f, rng, batch_size, sample_config))
    images, labels = [], []
    for i in range(-(-num_samples // batch_size)):
        x, y = draw(params, frozen, jax.random.fold_in(jax.random.PRNGKey(seed), i))
        images.append(np.asarray(x))
        labels.append(np.asarray(y))
    return np.concatenate(images)[:num_samples], np.concatenate(labels)[:num_samples]


def evaluate_digits(sample_fn, params, frozen, eval_config, evaluator, seed: int = 0):
    """(metrics {"fd", "acc"}, images) for `eval_config.num_samples` samples."""
    images, labels = class_conditional_samples(sample_fn, params, frozen, eval_config,
                                               eval_config.num_samples, eval_config.batch_size, seed)
    return evaluator.evaluate(images, labels), images


def class_balanced_fid(images_fn, params, frozen, sample_config, num_samples: int, batch_size: int,
                       num_classes: int, features_fn, ref_stats, seed: int = 0) -> float:
    """FID of `num_samples` class-conditional samples against `ref_stats` (mu, sigma), class
    balanced: sample i has label i mod num_classes (every class num_samples / num_classes times
    when it divides), as ADM's and the LEGO paper's FID-50K draw them.

    `images_fn(params, frozen, rng, labels, sample_config)` -> images in [-1, 1];
    `features_fn(images in [-1, 1]) -> [B, D]` (e.g. the Inception port's pool3). Batches are
    split over the local devices along the batch axis (when it divides); batch i uses
    fold_in(key(seed), i); features are accumulated in float64 as they come."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from lcm_jax.eval import fid

    devices = jax.local_devices()
    spec = PartitionSpec("data") if batch_size % len(devices) == 0 else PartitionSpec()
    sharded = NamedSharding(Mesh(np.asarray(devices), ("data",)), spec)
    draw = jax.jit(lambda p, f, rng, labels: images_fn(p, f, rng, labels, sample_config),
                   out_shardings=sharded)
    stats = fid.RunningStats()
    for i in range(-(-num_samples // batch_size)):
        labels = (i * batch_size + np.arange(batch_size, dtype=np.int32)) % max(num_classes, 1)
        images = draw(params, frozen, jax.random.fold_in(jax.random.PRNGKey(seed), i),
                      jax.device_put(labels, sharded))
        stats.update(features_fn(np.asarray(images)[:num_samples - i * batch_size]))
    return fid.frechet_distance(*stats.stats(), *ref_stats)
