"""Image helpers shared by the folder, tfds and webdataset pipelines: decode, resize, crop, scale.

The steps match the usual Stable Diffusion preprocessing: resize the shorter side to `image_size`
(bicubic), then a center crop (or a random one when training with `random_crop`), an optional
horizontal flip, and scaling to float32 in [-1, 1].
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_MODES = {1: "L", 3: "RGB"}


def decode(data: bytes, channels: int = 3) -> np.ndarray | None:
    """Encoded bytes -> uint8 [H, W, channels], or None when PIL cannot read them."""
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}; set config.data.channels.")
    try:
        with warnings.catch_warnings():  # e.g. truncated-file or palette warnings are not errors
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert(_MODES[channels])
                array = np.asarray(image, dtype=np.uint8)
    except Exception:  # PIL raises many types for bad data; any of them means "skip this image"
        return None
    return array.reshape(array.shape[0], array.shape[1], channels)


def as_uint8(array: np.ndarray, channels: int = 3) -> np.ndarray | None:
    """An already-decoded uint8 [H, W] / [H, W, 1|3] array -> [H, W, channels]; None if unusable."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or min(array.shape[:2]) == 0:
        return None
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == channels:
        return array
    if array.shape[-1] == 1 and channels == 3:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 3 and channels == 1:
        return np.asarray(Image.fromarray(array).convert("L"), dtype=np.uint8)[..., None]
    return None


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of a uint8 [H, W, C] image so that min(H, W) == size."""
    height, width, channels = image.shape
    scale = size / min(height, width)
    new_hw = (max(size, round(height * scale)), max(size, round(width * scale)))
    if new_hw == (height, width):
        return image
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil.resize((new_hw[1], new_hw[0]), Image.BICUBIC), dtype=np.uint8)
    return resized.reshape(new_hw[0], new_hw[1], channels)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    top = (image.shape[0] - size) // 2
    left = (image.shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def crop_at_random(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    top = int(rng.integers(0, image.shape[0] - size + 1))
    left = int(rng.integers(0, image.shape[1] - size + 1))
    return image[top:top + size, left:left + size]


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 in [0, 255] -> float32 in [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0  # 255 / 127.5 == 2 exactly: stays <= 1


def crop_flip_scale(image: np.ndarray, size: int, rng: np.random.Generator | None, *,
                    random_crop: bool = False, random_flip: bool = False) -> np.ndarray:
    """A resized uint8 image (shorter side == size) -> float32 [size, size, C] in [-1, 1].

    Without an rng (evaluation) the crop is central and nothing is flipped.
    """
    if rng is not None and random_crop:
        image = crop_at_random(image, size, rng)
    else:
        image = center_crop(image, size)
    if rng is not None and random_flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return to_float(image)


def prepare(data: bytes | np.ndarray, size: int, channels: int = 3,
            rng: np.random.Generator | None = None, *, random_crop: bool = False,
            random_flip: bool = False) -> np.ndarray | None:
    """Encoded bytes (or a uint8 array) -> float32 [size, size, channels] in [-1, 1].

    None when the image cannot be decoded: the caller skips and counts it.
    """
    image = decode(data, channels) if isinstance(data, bytes) else as_uint8(data, channels)
    if image is None:
        return None
    return crop_flip_scale(resize_shorter_side(image, size), size, rng,
                           random_crop=random_crop, random_flip=random_flip)
