"""Any tensorflow-datasets dataset by name, including ones prepared locally under `data_dir`.

Nothing is downloaded: the dataset must already be prepared (`tfds build`, or
`tfds.builder(name, data_dir=...).download_and_prepare()`). Each process reads its own even slice
of the split (`tfds.split_for_jax_process`) with a fixed file-shuffle and buffer-shuffle seed,
so the example stream is a pure function of (seed, process). Images are read as encoded bytes and
decoded with PIL (the same resize/crop as the other pipelines), so an undecodable image is
skipped and counted instead of stopping the run.

The position is the number of examples this process has consumed (decoded or skipped);
`set_state` rebuilds the stream with `.skip(position)`, which is exact and fine for the sizes that
tfds datasets have.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os

import numpy as np

from lcm_jax.data import images as image_lib

logger = logging.getLogger(__name__)


def _lookup(example: dict, key: str):
    """`captions/text` -> example['captions']['text'] (tfds features may be nested)."""
    for part in key.split("/"):
        example = example[part]
    return example


def _nested(key: str, leaf) -> dict:
    tree = leaf
    for part in reversed(key.split("/")):
        tree = {part: tree}
    return tree


def _has_feature(features, key: str) -> bool:
    try:
        _lookup(features, key)
    except (KeyError, TypeError):
        return False
    return True


class TfdsPipeline:
    """Batches of {image, label?, caption?} for this process from a prepared tfds dataset."""

    def __init__(self, name: str, *, image_size: int, global_batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, split: str = "train",
                 data_dir: str | None = None, channels: int = 3, image_key: str = "image",
                 label_key: str | None = None, caption_key: str | None = None,
                 random_crop: bool = False, random_flip: bool = False,
                 shuffle_buffer: int = 10_000):
        import tensorflow_datasets as tfds  # local import: tensorflow is slow to import

        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the "
                             f"process count {process_count}; choose a multiple of it.")
        try:
            self.builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.DatasetNotFoundError as e:
            raise ValueError(f"config.data.tfds_name={name!r} is not a known tfds dataset and "
                             f"none was prepared under config.data.data_dir={data_dir!r}.") from e
        if not self.builder.is_prepared():
            raise ValueError(
                f"tfds dataset {name!r} is not prepared under config.data.data_dir={data_dir!r} "
                f"(looked in {self.builder.data_dir}); build it first (`tfds build {name} "
                f"--data_dir=...`) or point config.data.data_dir at the folder that holds it.")
        features = self.builder.info.features
        for field, key in (("image_key", image_key), ("label_key", label_key),
                           ("caption_key", caption_key)):
            if key and not _has_feature(features, key):
                raise ValueError(f"config.data.{field}={key!r} is not a feature of {name!r}; its "
                                 f"features are {sorted(features.keys())}.")
        self.keys = {"image": image_key, "label": label_key or None, "caption": caption_key or None}
        self.keys = {out: key for out, key in self.keys.items() if key}
        # Encoded images stay bytes in tf.data; PIL decodes them so a bad one can be skipped.
        encoded = isinstance(_lookup(features, image_key), tfds.features.Image)
        self._decoders = _nested(image_key, tfds.decode.SkipDecoding()) if encoded else None

        self.split = tfds.split_for_jax_process(split, process_index=process_index,
                                                process_count=process_count)
        self.num_examples = self.builder.info.splits[self.split].num_examples
        if self.num_examples == 0:
            raise ValueError(f"Split {split!r} of {name!r} has no examples for process "
                             f"{process_index} of {process_count}; check config.data.split.")
        self.image_size, self.channels = image_size, channels
        self.random_crop, self.random_flip = random_crop, random_flip
        self.local_batch_size = global_batch_size // process_count
        self.seed, self.process_index = seed, process_index
        self.shuffle_buffer = shuffle_buffer
        self.num_skipped = 0
        self._consumed = 0  # examples of this process's stream taken so far (kept or skipped)
        self._iterator = None
        self._pool = concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1))

    def _dataset(self, skip: int):
        import tensorflow as tf
        import tensorflow_datasets as tfds

        read_config = tfds.ReadConfig(shuffle_seed=self.seed)  # seeded: deterministic file order
        ds = self.builder.as_dataset(split=self.split, shuffle_files=True, decoders=self._decoders,
                                     read_config=read_config)
        keys = self.keys
        ds = ds.map(lambda example: {out: _lookup(example, key) for out, key in keys.items()})
        if self.shuffle_buffer > 1:
            ds = ds.shuffle(self.shuffle_buffer, seed=self.seed, reshuffle_each_iteration=True)
        return ds.repeat().skip(skip).prefetch(tf.data.AUTOTUNE)

    def _prepare(self, indexed_example):
        """(stream index, example) -> (image, label, caption), image None if undecodable."""
        index, example = indexed_example
        # One generator per example: the result cannot depend on which thread decodes it.
        rng = np.random.default_rng([self.seed, self.process_index, index])
        image = image_lib.prepare(example["image"], self.image_size, self.channels, rng,
                                  random_crop=self.random_crop, random_flip=self.random_flip)
        caption = example.get("caption")
        if isinstance(caption, np.ndarray) and caption.ndim:  # several captions: draw one
            caption = caption[rng.integers(len(caption))] if len(caption) else b""
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8")
        return image, example.get("label"), caption

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._dataset(self._consumed).as_numpy_iterator()
        kept, skipped_in_a_row = [], 0  # a guard against spinning forever on a broken dataset
        while len(kept) < self.local_batch_size:
            needed = self.local_batch_size - len(kept)
            examples = [(self._consumed + i, next(self._iterator)) for i in range(needed)]
            self._consumed += needed
            for image, label, caption in self._pool.map(self._prepare, examples):
                if image is None:
                    self.num_skipped += 1
                    skipped_in_a_row += 1
                    logger.warning("Skipping an undecodable image of tfds %s (%d skipped so far).",
                                   self.builder.name, self.num_skipped)
                else:
                    kept.append((image, label, caption))
                    skipped_in_a_row = 0
            if skipped_in_a_row > self.num_examples:
                raise ValueError(f"No decodable image in a whole pass over tfds "
                                 f"{self.builder.name!r}; check config.data.image_key.")
        batch = {"image": np.stack([image for image, _, _ in kept])}
        if "label" in self.keys:
            batch["label"] = np.asarray([label for _, label, _ in kept], dtype=np.int32)
        if "caption" in self.keys:
            batch["caption"] = np.asarray([caption for _, _, caption in kept], dtype=str)
        return batch

    def get_state(self) -> dict:
        return {"examples": self._consumed, "num_skipped": self.num_skipped}

    def set_state(self, state) -> None:
        self._consumed = int(state["examples"])
        self.num_skipped = int(state.get("num_skipped", 0))
        self._iterator = None  # rebuilt lazily with .skip(examples)
