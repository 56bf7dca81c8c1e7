"""The embedded default dataset: scikit-learn's bundled handwritten digits.

1,797 real 8x8 grey images (UCI optical digits), 10 classes, shipped inside scikit-learn: no network.
A fixed permutation splits them into 1,497 train and 300 test images. Images are upsampled to the
configured side with bicubic interpolation, replicated to `channels`, and scaled to [-1, 1].
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

NUM_CLASSES = 10
NUM_TEST = 300
_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def caption(label: int) -> str:
    return f"a handwritten digit {_WORDS[int(label)]}"


@functools.lru_cache(maxsize=8)
def load(split: str = "train", image_size: int = 16, channels: int = 1):
    """Returns (images [N, S, S, C] float32 in [-1, 1], labels [N] int32) for 'train' or 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}.")
    if image_size < 8:
        raise ValueError(f"digits image_size must be >= 8, got {image_size}.")
    from sklearn.datasets import load_digits  # local import: sklearn is slow to import

    raw = load_digits()
    order = np.random.default_rng(0).permutation(len(raw.images))
    idx = order[NUM_TEST:] if split == "train" else order[:NUM_TEST]
    images = raw.images[idx].astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    if image_size != 8:
        images = np.stack([
            np.asarray(Image.fromarray(im, mode="F").resize((image_size, image_size), Image.BICUBIC))
            for im in images])
    images = np.clip(images, 0.0, 1.0) * 2.0 - 1.0
    images = np.repeat(images[..., None], channels, axis=-1).astype(np.float32)
    labels = raw.target[idx].astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def captions(labels: np.ndarray) -> np.ndarray:
    return np.asarray([caption(l) for l in labels])
