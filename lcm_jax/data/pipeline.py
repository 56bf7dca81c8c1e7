"""The batch iterator contract shared by every input pipeline.

A pipeline yields dict batches of numpy arrays for THIS process (global batch / process count):
`image` float32 NHWC in [-1, 1], and where the data has them `label` int32 and `caption` (str
array). Its position is a small JSON-able dict (`get_state` / `set_state`) that the training loop
stores in every checkpoint, so a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np


class ArrayPipeline:
    """Deterministic, process-sharded batches over in-memory arrays.

    Epoch e visits the examples in the order `permutation(seed, e)`; global batch b takes the
    slice [b * global_batch, (b + 1) * global_batch) of that order (batches never straddle two
    epochs: the epoch's tail that does not fill a batch is dropped, as `drop_remainder` would).
    Process p keeps its contiguous `1 / process_count` share of each global batch. The position
    is just the number of global batches taken, so resuming is exact and O(1).
    """

    num_skipped = 0  # in-memory arrays are decoded up front: nothing is skipped mid-run

    def __init__(self, arrays: Mapping[str, np.ndarray], *, global_batch_size: int, seed: int = 0,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1,
                 transform=None):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"ArrayPipeline: arrays have different lengths {sizes}.")
        self.num_examples = next(iter(sizes.values()))
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the "
                             f"process count {process_count}; choose a multiple of it.")
        if global_batch_size > self.num_examples:
            raise ValueError(f"global_batch_size={global_batch_size} exceeds the dataset size "
                             f"{self.num_examples}; lower config.batch_size.")
        self.arrays = dict(arrays)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed, self.shuffle = seed, shuffle
        self.process_index = process_index
        self.transform = transform  # optional (batch, rng) -> batch, e.g. random flips
        self.batches_per_epoch = self.num_examples // global_batch_size
        self._step = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = np.arange(self.num_examples)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        epoch, b = divmod(step, self.batches_per_epoch)
        start = b * self.global_batch_size + self.process_index * self.local_batch_size
        idx = self._order(epoch)[start:start + self.local_batch_size]
        batch = {k: v[idx] for k, v in self.arrays.items()}
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, step, self.process_index, 1])
            batch = self.transform(batch, rng)
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self._step)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self._step}

    def set_state(self, state: Mapping) -> None:
        self._step = int(state["step"])
