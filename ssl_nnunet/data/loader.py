"""Background loading of sampler batches for the trainer (:class:`PrefetchLoader`)."""
from __future__ import annotations

import queue
import threading
import time
from typing import Optional

import torch

from ssl_nnunet.data.samplers import UnlabeledPatchSampler


class PrefetchLoader:
    """Runs ``sampler.next_batch`` in a background thread, ``num_prefetch`` batches ahead.

    ``wait_time`` accumulates the seconds the consumer spent blocked on data (for the benchmark's
    data-wait share). With ``num_prefetch == 0`` batches are made synchronously in the caller.
    """

    def __init__(self, sampler: UnlabeledPatchSampler, num_prefetch: int = 2):
        self.sampler = sampler
        self.num_prefetch = num_prefetch
        self.wait_time = 0.0
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if num_prefetch > 0:
            self._queue = queue.Queue(maxsize=num_prefetch)
            self._thread = threading.Thread(target=self._work, daemon=True)
            self._thread.start()

    def _work(self):
        while not self._stop.is_set():
            try:
                batch = self.sampler.next_batch()
            except Exception as e:  # surfaced in the consumer
                batch = e
            while not self._stop.is_set():
                try:
                    self._queue.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def __next__(self) -> torch.Tensor:
        t0 = time.perf_counter()
        batch = self.sampler.next_batch() if self._queue is None else self._queue.get()
        self.wait_time += time.perf_counter() - t0
        if isinstance(batch, Exception):
            raise batch
        return batch

    def close(self, timeout: float = 60.0):
        """Stops the worker and waits for it (it finishes the batch it is making, then exits)."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
