"""Draw many class-conditional samples in fixed-size batches (one compile) and score them."""
from __future__ import annotations

import jax
import numpy as np


def class_conditional_samples(objective, params, sample_config, num_samples: int,
                              batch_size: int, seed: int = 0):
    """(images [N, H, W, C] in [-1, 1], labels [N]) with labels cycling through the classes."""
    draw = jax.jit(lambda p, rng: objective.sample_fn(p, rng, batch_size, sample_config))
    images, labels = [], []
    for i in range(-(-num_samples // batch_size)):
        x, y = draw(params, jax.random.fold_in(jax.random.PRNGKey(seed), i))
        images.append(np.asarray(x))
        labels.append(np.asarray(y))
    return np.concatenate(images)[:num_samples], np.concatenate(labels)[:num_samples]


def evaluate_digits(objective, params, eval_config, evaluator, seed: int = 0) -> dict:
    images, labels = class_conditional_samples(objective, params, eval_config,
                                               eval_config.num_samples, eval_config.batch_size, seed)
    return evaluator.evaluate(images, labels)
