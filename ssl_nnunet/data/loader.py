"""Background loading of sampler batches for the trainer (:class:`PrefetchLoader`).

Two ways to make batches ahead of the training step:

* ``num_workers == 0``: the sampler runs in a background thread of the training process (``num_prefetch``
  batches ahead), or synchronously with ``num_prefetch == 0``.
* ``num_workers = N > 0``: N worker processes (``forkserver`` start, never ``fork``, so a CUDA context of the
  parent is never inherited), each building its own sampler from a picklable :class:`SamplerFactory` with the
  seed :func:`worker_seed` ``(seed, rank, worker)``. Batches are taken from the workers in turn (batch ``i``
  from worker ``i mod N``), so a run is reproducible for a given N. A thread of the parent collects them and,
  with ``pin_memory``, copies them to page-locked memory for an asynchronous host-to-GPU copy.

Either way the loader only cuts patches (numpy, float32 tensors on the CPU); every view is built on the device by
the method. :meth:`PrefetchLoader.close` stops and joins everything (workers still alive after a grace period are
terminated, then killed); an error in a worker is raised in the parent with the worker's traceback, after the
workers were stopped, and a worker that dies without a message (killed, out of memory) is reported by pid.
"""
from __future__ import annotations

import os
import pickle
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, replace
from typing import List, Optional

import numpy as np
import torch

from ssl_nnunet.data.samplers import SamplerSpec, UnlabeledPatchSampler

#: seconds between checks of the stop flag / worker liveness while waiting on a queue
_POLL_S = 0.1
#: seconds a stopping worker gets before it is terminated (then killed)
_JOIN_S = 5.0


def worker_seed(seed: int, rank: int, worker: int) -> int:
    """Seed of loader worker ``worker`` of DDP rank ``rank`` in a run seeded ``seed``: the first 32-bit word of
    ``numpy.random.SeedSequence([seed, rank, worker])`` (independent streams for every pair)."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(worker)]).generate_state(1)[0])


@dataclass(frozen=True)
class SamplerFactory:
    """Picklable recipe of a method's sampler for a worker process:
    ``factory(seed) == method.make_sampler(replace(spec, seed=seed))``."""

    method: type
    spec: SamplerSpec

    def __call__(self, seed: int):
        return self.method.make_sampler(replace(self.spec, seed=int(seed)))


class _WorkerError:
    """An exception of a worker (the exception itself when it pickles) and its formatted traceback."""

    def __init__(self, worker: int, pid: int, error: BaseException):
        self.worker, self.pid = worker, pid
        self.traceback = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        try:
            pickle.loads(pickle.dumps(error))
            self.error = error
        except Exception:
            self.error = RuntimeError(f"{type(error).__name__}: {error}")

    def exception(self) -> BaseException:
        e = self.error
        e.add_note(f"(raised in loader worker {self.worker}, pid {self.pid}; its traceback:)\n{self.traceback}")
        return e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _worker_main(factory, seed: int, worker: int, out: "queue.Queue", stop, parent_pid: int) -> None:
    """Body of a worker process: make batches into ``out`` until ``stop`` is set or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent, which stops the workers
    torch.set_num_threads(1)
    out.cancel_join_thread()  # exiting never waits for batches nobody will read

    def put(item) -> bool:
        while not stop.is_set() and _alive(parent_pid):
            try:
                out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    try:
        sampler = factory(seed)
        while put(sampler.next_batch()):
            pass
    except Exception as e:
        # the error is sent, then the worker waits to be stopped: batches it already queued stay valid
        # until the parent has read them (torch shares their memory through this process)
        if put(_WorkerError(worker, os.getpid(), e)):
            while not stop.wait(_POLL_S) and _alive(parent_pid):
                pass


class PrefetchLoader:
    """Makes ``sampler.next_batch()`` batches ahead of the consumer (``next(loader)``).

    Args:
        sampler: the sampler (used directly when ``num_workers == 0``; with workers it is not called).
        num_prefetch: batches kept ready (per worker with workers; 0 without workers: synchronous).
        num_workers: worker processes (0: a thread of this process).
        sampler_factory: with workers, builds each worker's sampler from its seed (:class:`SamplerFactory`).
        seed, rank: give the workers' seeds :func:`worker_seed` ``(seed, rank, worker)``.
        pin_memory: copy batches to page-locked memory (for ``.to("cuda", non_blocking=True)``).

    ``wait_time`` accumulates the seconds the consumer spent blocked on data (for the benchmark's
    data-wait share). Use :meth:`close` (or ``with``) when done.
    """

    def __init__(self, sampler: Optional[UnlabeledPatchSampler], num_prefetch: int = 2, num_workers: int = 0,
                 sampler_factory: Optional[SamplerFactory] = None, seed: int = 0, rank: int = 0,
                 pin_memory: bool = False):
        if num_workers < 0 or num_prefetch < 0:
            raise ValueError(f"num_workers and num_prefetch must be >= 0, got {num_workers}, {num_prefetch}")
        if num_workers > 0 and sampler_factory is None:
            raise ValueError("num_workers > 0 needs a sampler_factory (each worker builds its own sampler)")
        if num_workers == 0 and sampler is None:
            raise ValueError("num_workers == 0 needs a sampler")
        self.sampler = sampler
        self.num_prefetch = num_prefetch
        self.num_workers = num_workers
        self.pin_memory = bool(pin_memory)
        self.wait_time = 0.0
        self._stop = threading.Event()
        self._closed = False
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._processes: List = []
        self._worker_queues: List = []
        self._mp_stop = None
        if num_workers > 0:
            self._start_workers(sampler_factory, seed, rank)
        if num_workers > 0 or num_prefetch > 0:
            self._queue = queue.Queue(maxsize=max(1, num_prefetch))
            self._thread = threading.Thread(target=self._collect, daemon=True, name="ssl_nnunet-loader")
            self._thread.start()

    # ------------------------------------------------------------------ workers
    def _start_workers(self, factory: SamplerFactory, seed: int, rank: int) -> None:
        import torch.multiprocessing as mp
        ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        if ctx.get_start_method() == "forkserver":
            # imported once by the fork server (not by every worker); takes effect when it first starts
            ctx.set_forkserver_preload(["ssl_nnunet.data.loader", "ssl_nnunet.methods"])
        self._mp_stop = ctx.Event()
        for w in range(self.num_workers):
            out = ctx.Queue(maxsize=max(1, self.num_prefetch))
            p = ctx.Process(target=_worker_main, name=f"ssl_nnunet-loader-{w}", daemon=True,
                            args=(factory, worker_seed(seed, rank, w), w, out, self._mp_stop, os.getpid()))
            p.start()
            self._processes.append(p)
            self._worker_queues.append(out)

    @property
    def worker_pids(self) -> List[int]:
        return [p.pid for p in self._processes]

    def _from_worker(self, w: int):
        """The next item of worker ``w``; ``None`` once stopped. A dead worker raises."""
        q, p = self._worker_queues[w], self._processes[w]
        while not self._stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except (EOFError, OSError) as e:  # the worker went away while its batch was being received
                return RuntimeError(f"loader worker {w} (pid {p.pid}): receiving a batch failed ({e!r}); "
                                    f"exit code {p.exitcode}")
            except queue.Empty:
                if not p.is_alive():
                    try:
                        return q.get(timeout=_POLL_S)
                    except queue.Empty:
                        return RuntimeError(f"loader worker {w} (pid {p.pid}) exited with code {p.exitcode} "
                                            f"without an error message (killed, e.g. out of memory?)")
        return None

    def _next_item(self, i: int):
        if self.num_workers == 0:
            try:
                return self.sampler.next_batch()
            except Exception as e:
                return e
        return self._from_worker(i % self.num_workers)

    def _collect(self) -> None:
        """Thread: batch ``i`` (from worker ``i mod N``, or from the sampler), pinned, into the queue."""
        i = 0
        while not self._stop.is_set():
            item = self._next_item(i)
            if item is None:
                return
            if self.pin_memory and isinstance(item, torch.Tensor):
                item = item.pin_memory()
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, (BaseException, _WorkerError)):
                return
            i += 1

    # ------------------------------------------------------------------ consumer
    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._closed:
            raise RuntimeError("PrefetchLoader is closed")
        t0 = time.perf_counter()
        try:
            if self._queue is None:
                batch = self.sampler.next_batch()
            else:
                batch = self._get()
        except BaseException:
            self.close()
            raise
        self.wait_time += time.perf_counter() - t0
        if isinstance(batch, (BaseException, _WorkerError)):
            self.close()
            raise batch.exception() if isinstance(batch, _WorkerError) else batch
        return batch

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return RuntimeError("the loader's collecting thread stopped without a batch")

    def close(self, timeout: float = 60.0) -> None:
        """Stops the thread and the workers and waits for them; idempotent. A worker still alive after
        ``_JOIN_S`` seconds is terminated, then killed."""
        self._closed = True
        self._stop.set()
        # the thread first: a batch it is receiving needs its worker alive (torch shares the memory through it)
        if self._thread is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._mp_stop is not None:
            self._mp_stop.set()
        for p in self._processes:
            p.join(_JOIN_S)
            if p.is_alive():
                p.terminate()
                p.join(_JOIN_S)
            if p.is_alive():
                p.kill()
                p.join()
        for q in self._worker_queues:
            q.cancel_join_thread()
            q.close()
        self._worker_queues, self._processes = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close(timeout=1.0)
        except Exception:
            pass
