"""Input pipelines: `make_pipeline(config.data, ...)` -> an iterator of this process's batches.

Every pipeline yields {image float32 NHWC in [-1, 1], label int32 (if the data has labels),
caption str array (if it has captions)}, has `get_state()` / `set_state(state)` for exact resume
and counts undecodable images in `num_skipped`. See pipeline.py for the contract.
"""
from __future__ import annotations

from lcm_jax.data import digits
from lcm_jax.data.pipeline import ArrayPipeline

DATASETS = ("digits", "folder", "tfds", "webdataset")


def make_pipeline(data_config, *, global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, split: str = "train"):
    """Builds the pipeline named by `data_config.name` for this process.

    `split` is the role: "train" draws random crops / flips when the config asks for them; any
    other split is read with center crops and no flips. For tfds the train role reads
    `config.data.split` (default "train"); other roles read the split named here. Folders and
    shards have a single split. `data_config.prefetch` > 0 reads that many batches ahead in a
    thread (prefetch.py), keeping the position exact.
    """
    pipeline = _make(data_config, global_batch_size=global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count, split=split)
    depth = data_config.get("prefetch", 0)
    if not depth:
        return pipeline
    from lcm_jax.data.prefetch import Prefetch

    return Prefetch(pipeline, depth)


def _make(data_config, *, global_batch_size: int, seed: int, process_index: int, process_count: int,
          split: str):
    name = data_config.get("name", "digits")
    if name not in DATASETS:
        raise ValueError(f"config.data.name={name!r} is not a known dataset; "
                         f"use one of {DATASETS}.")
    image_size = data_config.get("image_size", 16 if name == "digits" else None)
    if not image_size:
        raise ValueError("config.data.image_size is not set; give the training resolution, "
                         "e.g. 512.")
    train = split == "train"
    sharding = dict(global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                    process_count=process_count)
    augment = dict(random_crop=train and data_config.get("random_crop", False),
                   random_flip=train and data_config.get("random_flip", False))

    if name == "digits":
        images, labels = digits.load(split, image_size, data_config.get("channels", 1))
        return ArrayPipeline({"image": images, "label": labels,
                              "caption": digits.captions(labels)}, **sharding)
    if name in ("folder", "webdataset") and not data_config.get("path"):
        raise ValueError(f"config.data.path is not set; point it at "
                         f"{'a folder of images' if name == 'folder' else 'the .tar shards'}.")
    if name == "folder":
        from lcm_jax.data.folder import FolderPipeline

        return FolderPipeline(data_config.get("path"), image_size=image_size,
                              channels=data_config.get("channels", 3),
                              caption_key=data_config.get("caption_key", "text"), **augment,
                              **sharding)
    if name == "tfds":
        from lcm_jax.data.tfds import TfdsPipeline

        if not data_config.get("tfds_name"):
            raise ValueError("config.data.tfds_name is not set; name a tfds dataset, e.g. 'mnist'.")
        return TfdsPipeline(data_config.get("tfds_name"), image_size=image_size,
                            split=data_config.get("split", "train") if train else split,
                            data_dir=data_config.get("data_dir"),
                            channels=data_config.get("channels", 3),
                            image_key=data_config.get("image_key", "image"),
                            label_key=data_config.get("label_key"),
                            caption_key=data_config.get("caption_key"),
                            shuffle_buffer=data_config.get("shuffle_buffer", 10_000),
                            **augment, **sharding)
    from lcm_jax.data.webdataset import WebDatasetPipeline  # name == "webdataset"

    return WebDatasetPipeline(data_config.get("path"), image_size=image_size,
                              channels=data_config.get("channels", 3),
                              caption_key=data_config.get("caption_key", "caption"),
                              shuffle_buffer=data_config.get("shuffle_buffer", 1000),
                              **augment, **sharding)
