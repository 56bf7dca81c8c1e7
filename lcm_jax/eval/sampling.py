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
