"""Host-side prefetch: a thread decodes the next `depth` batches while the device runs the step.

The wrapped pipeline's position stays exact: each batch is queued with the inner pipeline's
state (and skip count) taken right after it was produced, and `get_state` reports the state of
the last batch handed out, not of the ones decoded ahead. `set_state` stops the thread, drops
what it read ahead and restarts it from the given position. Decoding (PIL, tf.data, tar reads)
releases the GIL for most of its time, so the thread overlaps with the step's dispatch.
"""
from __future__ import annotations

import copy
import queue
import threading
from typing import Mapping


class Prefetch:
    def __init__(self, pipeline, depth: int = 2):
        if depth < 1:
            raise ValueError(f"config.data.prefetch={depth}: give the number of batches to read "
                             f"ahead (>= 1), or 0 to read in the training loop.")
        self.pipeline, self.depth = pipeline, depth
        self._state = copy.deepcopy(pipeline.get_state())
        self.num_skipped = getattr(pipeline, "num_skipped", 0)
        self._thread = None

    def _start(self):
        self._queue = queue.Queue(self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(self._queue, self._stop),
                                        name="lcm_jax-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, out: queue.Queue, stop: threading.Event):
        while not stop.is_set():
            try:
                item = (next(self.pipeline), copy.deepcopy(self.pipeline.get_state()),
                        getattr(self.pipeline, "num_skipped", 0))
            except BaseException as error:  # StopIteration too: re-raised in the consumer
                item = error
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _halt(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        batch, self._state, self.num_skipped = item
        return batch

    def get_state(self) -> dict:
        return copy.deepcopy(self._state)

    def set_state(self, state: Mapping) -> None:
        self._halt()
        self.pipeline.set_state(state)
        self._state = copy.deepcopy(dict(state))
        self.num_skipped = getattr(self.pipeline, "num_skipped", 0)

    def close(self) -> None:
        """Stops the thread and rewinds the inner pipeline to the last batch handed out."""
        self.set_state(self._state)

    def __getattr__(self, name):  # the inner pipeline's other attributes (num_examples, ...)
        if name == "pipeline":
            raise AttributeError(name)
        return getattr(self.pipeline, name)
