"""img2dataset-style .tar shards (e.g. LAION subsets), read with Python's tarfile.

A shard `00000.tar` holds samples as consecutive members sharing a key: `KEY.jpg|png|webp` and a
caption in `KEY.txt` and/or `KEY.json` (field `caption_key`, "caption" in img2dataset's output).
`path` is a glob (`/data/*.tar`) or a brace range (`/data/{00000..00099}.tar`).

Order, a pure function of (seed, process): each epoch permutes all shards with the seed and deals
them to processes round-robin; a process reads its shards in that order and shuffles them in
blocks of `shuffle_buffer` consecutive samples (a block may span shards, never epochs). The
position is where the current block starts (epoch, shard cursor, sample offset within that
shard) plus how many of its samples were taken, so resuming re-reads one block and continues
with exactly the batches that would have followed.
"""
from __future__ import annotations

import concurrent.futures
import glob
import json
import logging
import os
import posixpath
import re
import tarfile
from typing import Iterator

import numpy as np

from lcm_jax.data import images as image_lib

logger = logging.getLogger(__name__)

_IMAGE_EXTENSIONS = tuple(ext.lstrip(".") for ext in image_lib.IMAGE_EXTENSIONS)


def expand_braces(pattern: str) -> list[str]:
    """'a{000..002}b{x,y}' -> ['a000bx', 'a000by', 'a001bx', ...]; zero padding is kept."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        width = len(span.group(1))
        options = [str(i).zfill(width) for i in range(int(span.group(1)), int(span.group(2)) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for option in options for name in expand_braces(head + option + tail)]


def list_shards(pattern: str) -> list[str]:
    """Sorted shard paths for a glob and/or brace pattern; fails if none exist."""
    names = expand_braces(os.path.expanduser(pattern))
    shards = sorted({path for name in names for path in glob.glob(name)})
    if not shards:
        raise ValueError(f"config.data.path={pattern!r} matches no .tar shards; give a glob "
                         f"('/data/*.tar') or a brace range ('/data/{{00000..00099}}.tar').")
    missing = [name for name in names if not glob.has_magic(name) and not os.path.exists(name)]
    if missing:  # img2dataset leaves no file for a shard that failed to download
        logger.warning("%d of the shards named by %r do not exist, e.g. %s; reading the other %d.",
                       len(missing), pattern, missing[0], len(shards))
    return shards


def iter_tar_samples(path: str, start: int = 0) -> Iterator[dict[str, bytes]]:
    """Yields the samples {extension: bytes} of one shard, from sample index `start` on.

    Consecutive members that share a key (folder + file name up to its first dot) form a sample.
    Skipped samples are counted from the headers only, without reading their data. A damaged
    shard ends early with a warning instead of stopping the run.
    """
    index, key, sample = -1, None, {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = posixpath.split(member.name)
                stem, _, extension = name.partition(".")
                if posixpath.join(folder, stem) != key:
                    if key is not None and index >= start:
                        yield sample
                    index, key, sample = index + 1, posixpath.join(folder, stem), {}
                if index >= start:
                    sample[extension.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as e:
        logger.warning("Shard %s is damaged after sample %d (%s); moving on to the next shard.",
                       path, index, e)
        return
    if key is not None and index >= start:
        yield sample


def sample_image_and_caption(sample: dict[str, bytes],
                             caption_key: str) -> tuple[bytes | None, str]:
    image = next((sample[ext] for ext in _IMAGE_EXTENSIONS if ext in sample), None)
    caption = ""
    try:
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8").strip()
        elif "json" in sample:
            caption = str(json.loads(sample["json"]).get(caption_key) or "")
    except (UnicodeDecodeError, ValueError, AttributeError):
        pass  # a broken caption file leaves the caption empty; the image is still usable
    return image, caption


class WebDatasetPipeline:
    """Batches of {image float32 [B, S, S, C] in [-1, 1], caption [B] str} from tar shards."""

    def __init__(self, path: str, *, image_size: int, global_batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, channels: int = 3,
                 caption_key: str = "caption", random_crop: bool = False,
                 random_flip: bool = False, shuffle_buffer: int = 1000):
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the "
                             f"process count {process_count}; choose a multiple of it.")
        self.shards = list_shards(path)
        if len(self.shards) < process_count:
            raise ValueError(f"config.data.path={path!r} has {len(self.shards)} shards but there "
                             f"are {process_count} processes; each process needs at least one.")
        self.local_batch_size = global_batch_size // process_count
        self.image_size, self.channels, self.caption_key = image_size, channels, caption_key
        self.random_crop, self.random_flip = random_crop, random_flip
        self.seed, self.process_index, self.process_count = seed, process_index, process_count
        # Samples are read in blocks even without shuffling, so reads stay sequential.
        self.block_size = max(1, shuffle_buffer)
        self.shuffle = shuffle_buffer > 1
        self.num_skipped = 0
        self._block_start = (0, 0, 0)  # (epoch, shard cursor, sample offset in that shard)
        self._taken = 0  # samples of the current block already taken
        self._block = None  # (samples, order, end position) of the block at _block_start
        self._reader = None  # (position, open shard iterator): lets the next block continue
        self._pool = concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1))

    def local_shards(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order[self.process_index::self.process_count]]

    def _read_block(self, start: tuple[int, int, int]):
        epoch, cursor, offset = start
        shards = self.local_shards(epoch)
        reader = self._reader[1] if self._reader is not None and self._reader[0] == start else None
        samples = []
        while len(samples) < self.block_size and cursor < len(shards):
            if reader is None:
                reader = iter_tar_samples(shards[cursor], offset)
            sample = next(reader, None)
            if sample is None:
                cursor, offset, reader = cursor + 1, 0, None
            else:
                samples.append(sample)
                offset += 1
        if not samples and start[1:] == (0, 0):
            raise ValueError(f"The shards of process {self.process_index} hold no samples in epoch "
                             f"{epoch}: {shards[:3]}...; check config.data.path.")
        end = (epoch, cursor, offset) if cursor < len(shards) else (epoch + 1, 0, 0)
        self._reader = (end, reader) if reader is not None else None
        order = np.arange(len(samples))
        if self.shuffle:
            order = np.random.default_rng([self.seed, *start]).permutation(len(samples))
        return samples, order, end

    def _take_sample(self):
        """The next raw sample of this process's stream and the key that seeds its augmentation."""
        while self._block is None or self._taken >= len(self._block[0]):
            if self._block is not None:
                self._block_start, self._taken = self._block[2], 0
            self._block = self._read_block(self._block_start)
        samples, order, _ = self._block
        key = (self.seed, *self._block_start, self._taken)
        sample = samples[order[self._taken]]
        self._taken += 1
        return sample, key

    def _prepare(self, sample_and_key):
        sample, key = sample_and_key
        image, caption = sample_image_and_caption(sample, self.caption_key)
        if image is None:
            return None, caption
        rng = np.random.default_rng(key)  # per sample, so threads cannot change the result
        image = image_lib.prepare(image, self.image_size, self.channels, rng,
                                  random_crop=self.random_crop, random_flip=self.random_flip)
        return image, caption

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        images, captions = [], []
        epoch_at_last_image = self._block_start[0]
        while len(images) < self.local_batch_size:
            samples = [self._take_sample() for _ in range(self.local_batch_size - len(images))]
            for image, caption in self._pool.map(self._prepare, samples):
                if image is None:
                    self.num_skipped += 1
                    logger.warning("Skipping an undecodable or missing image in the shards of %r "
                                   "(%d skipped so far).", self.shards[0], self.num_skipped)
                else:
                    images.append(image)
                    captions.append(caption)
                    epoch_at_last_image = self._block_start[0]
            if self._block_start[0] - epoch_at_last_image >= 2:  # a whole epoch without one image
                raise ValueError(f"No decodable image in a whole epoch of config.data.path shards "
                                 f"({len(self.shards)} shards, e.g. {self.shards[0]}).")
        return {"image": np.stack(images), "caption": np.asarray(captions, dtype=str)}

    def get_state(self) -> dict:
        epoch, cursor, offset = self._block_start
        return {"epoch": epoch, "shard_cursor": cursor, "sample_offset": offset,
                "taken_from_block": self._taken, "num_skipped": self.num_skipped}

    def set_state(self, state) -> None:
        self._block_start = (int(state["epoch"]), int(state["shard_cursor"]),
                             int(state["sample_offset"]))
        self._taken = int(state["taken_from_block"])
        self.num_skipped = int(state.get("num_skipped", 0))
        self._block, self._reader = None, None  # the block is re-read on the next batch
