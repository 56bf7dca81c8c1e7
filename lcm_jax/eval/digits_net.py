"""A small CNN classifier of the digits images: the feature extractor behind FD-digits.

The role Inception plays for FID, at the scale of the embedded digits dataset. Inputs of any side and
1 or 3 channels are reduced to 16x16 grey first (channel mean + antialiased resize), so one network
shape serves every digits config. It is trained by the project on the digits train split (a few
hundred Adam steps on in-memory arrays with small random shifts; deterministic for a fixed seed;
seconds on CPU) and cached on disk, keyed by image_size, channels and VERSION, so later calls load it.

    net = load_or_train(image_size=16, channels=1)
    net.features(images)  # [N, FEATURE_DIM] penultimate activations
    net.predict(images)   # [N] labels
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcm_jax.data import digits

# Bump when the architecture, preprocessing or training recipe changes: old caches are then ignored.
VERSION = "v1"
FEATURE_DIM = 64
NET_SIDE = 16  # every input is resized to NET_SIDE x NET_SIDE grey
SEED = 0
TRAIN_STEPS = 300
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
MAX_SHIFT = 2  # pixels at NET_SIDE
EVAL_BATCH_SIZE = 512  # fixed chunk size: one compilation for any N


class DigitsCNN(nn.Module):
    """[N, 16, 16, 1] in [-1, 1] -> (features [N, FEATURE_DIM], logits [N, 10])."""

    @nn.compact
    def __call__(self, x):
        for width in (16, 32):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
        return features, nn.Dense(digits.NUM_CLASSES)(features)


def to_net_input(images):
    """[N, S, S, C] (C = 1 or 3) -> [N, 16, 16, 1]: grey, antialiased resize when S != 16."""
    grey = jnp.mean(jnp.asarray(images, jnp.float32), axis=-1, keepdims=True)
    if grey.shape[1:3] != (NET_SIDE, NET_SIDE):
        grey = jax.image.resize(grey, (grey.shape[0], NET_SIDE, NET_SIDE, 1), "linear", antialias=True)
    return grey


def _random_shift(rng, images):
    """Shifts each image by up to MAX_SHIFT pixels, filling with the background value -1."""
    padded = jnp.pad(images, ((0, 0), (MAX_SHIFT,) * 2, (MAX_SHIFT,) * 2, (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(rng, (images.shape[0], 2), 0, 2 * MAX_SHIFT + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (NET_SIDE, NET_SIDE, image.shape[-1]))
    return jax.vmap(crop)(padded, offsets)


def _optimizer(train_steps: int):
    return optax.adamw(optax.cosine_decay_schedule(LEARNING_RATE, train_steps), weight_decay=1e-4)


@functools.partial(jax.jit, static_argnames="train_steps")
def _train_step(params, opt_state, rng, inputs, labels, train_steps):
    """One Adam step on a random shifted minibatch of the in-memory training arrays."""
    index_rng, shift_rng = jax.random.split(rng)
    index = jax.random.choice(index_rng, inputs.shape[0], (BATCH_SIZE,), replace=False)
    batch = _random_shift(shift_rng, inputs[index])

    def loss_fn(params):
        _, logits = DigitsCNN().apply({"params": params}, batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[index]).mean()

    updates, opt_state = _optimizer(train_steps).update(jax.grad(loss_fn)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def train_params(image_size: int, channels: int, seed: int = SEED) -> dict:
    """Trains DigitsCNN on the digits train split; returns its params (deterministic for a seed)."""
    images, labels = digits.load("train", image_size, channels)
    inputs, labels = to_net_input(images), jnp.asarray(labels)
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    params = DigitsCNN().init(init_rng, inputs[:1])["params"]
    opt_state = _optimizer(TRAIN_STEPS).init(params)
    for step_rng in jax.random.split(train_rng, TRAIN_STEPS):
        params, opt_state = _train_step(params, opt_state, step_rng, inputs, labels, train_steps=TRAIN_STEPS)
    return jax.device_get(params)


@dataclasses.dataclass(frozen=True, eq=False)  # params arrays have no truth value
class DigitsNet:
    """A trained DigitsCNN for one (image_size, channels); images are [N, S, S, C] in [-1, 1]."""

    params: Any
    image_size: int
    channels: int
    test_accuracy: float

    def __post_init__(self):
        apply = lambda params, images: DigitsCNN().apply({"params": params}, to_net_input(images))
        object.__setattr__(self, "_apply", jax.jit(apply))

    def _check(self, images) -> np.ndarray:
        images = np.asarray(images, np.float32)
        expected = (self.image_size, self.image_size, self.channels)
        if images.ndim != 4 or images.shape[1:] != expected or images.shape[0] == 0:
            raise ValueError(f"DigitsNet for {expected} images expects [N>0, {', '.join(map(str, expected))}] "
                             f"NHWC images in [-1, 1], got shape {images.shape}.")
        return images

    def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(features, logits) in one pass; fixed-size padded chunks, so any N reuses one compilation."""
        images = self._check(images)
        chunk = min(EVAL_BATCH_SIZE, images.shape[0])
        features, logits = [], []
        for start in range(0, images.shape[0], chunk):
            part = images[start:start + chunk]
            padded = np.pad(part, ((0, chunk - part.shape[0]), (0, 0), (0, 0), (0, 0)))
            part_features, part_logits = jax.device_get(self._apply(self.params, padded))
            features.append(part_features[:part.shape[0]])
            logits.append(part_logits[:part.shape[0]])
        return np.concatenate(features), np.concatenate(logits)

    def features(self, images) -> np.ndarray:
        """Penultimate activations [N, FEATURE_DIM] (float32)."""
        return self.features_and_logits(images)[0]

    def logits(self, images) -> np.ndarray:
        return self.features_and_logits(images)[1]

    def predict(self, images) -> np.ndarray:
        return np.argmax(self.logits(images), axis=-1).astype(np.int32)


def default_cache_dir() -> str:
    return os.environ.get("LCM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lcm_jax")


def cache_path(image_size: int, channels: int, cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(),
                        f"digits_net_{VERSION}_s{image_size}_c{channels}.msgpack")


def _save(path: str, params, test_accuracy: float) -> None:
    """Writes atomically (tmp file + os.replace): concurrent readers never see a partial file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = flax.serialization.msgpack_serialize(
        {"params": flax.serialization.to_state_dict(params), "test_accuracy": float(test_accuracy)})
    handle, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(payload)
        os.chmod(tmp_path, 0o644)  # mkstemp makes it owner-only; the cache is a plain shared file
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def _load(path: str, image_size: int, channels: int) -> DigitsNet:
    template_params = jax.eval_shape(
        DigitsCNN().init, jax.random.PRNGKey(0), jnp.zeros((1, NET_SIDE, NET_SIDE, 1)))["params"]
    try:
        with open(path, "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
        params = flax.serialization.from_state_dict(template_params, state["params"])
        shapes_match = jax.tree.all(jax.tree.map(lambda t, p: t.shape == p.shape, template_params, params))
        test_accuracy = float(state["test_accuracy"])
    except Exception as e:  # any unreadable file gets the same remedy
        raise ValueError(f"Digits classifier cache {path} does not match DigitsCNN {VERSION} ({e}); "
                         f"delete the file to retrain.") from e
    if not shapes_match:
        raise ValueError(f"Digits classifier cache {path} has wrong parameter shapes; delete it to retrain.")
    return DigitsNet(params, image_size, channels, test_accuracy)


def load_or_train(image_size: int = 16, channels: int = 1, cache_dir: str | None = None) -> DigitsNet:
    """The digits classifier for (image_size, channels): loaded from the cache, else trained and cached."""
    if channels not in (1, 3):
        raise ValueError(f"digits classifier supports channels 1 or 3, got {channels}.")
    path = cache_path(image_size, channels, cache_dir)
    if os.path.exists(path):
        return _load(path, image_size, channels)
    logging.info("Training the digits classifier for %dx%dx%d (cache: %s).", image_size, image_size, channels, path)
    params = train_params(image_size, channels)
    untested = DigitsNet(params, image_size, channels, test_accuracy=float("nan"))
    test_images, test_labels = digits.load("test", image_size, channels)
    test_accuracy = float(np.mean(untested.predict(test_images) == test_labels))
    _save(path, params, test_accuracy)
    return DigitsNet(params, image_size, channels, test_accuracy)
