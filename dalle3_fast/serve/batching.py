"""Dynamic batching: concurrent requests with the same sampling settings share one ``generate_latents`` call.

One worker thread owns the pipeline. It takes the oldest queued job, then keeps collecting queued jobs with the
same ``Settings.batch_key`` (and kind: text-to-image or edit) for up to ``window_s`` or until ``max_batch``
images are gathered, and runs them as one batch: per-image seeds make every image equal to the one a single
call would give. The queue is bounded (``QueueFull`` past ``max_queue`` waiting jobs). A job whose deadline
passes is cancelled: dropped from the queue if still waiting; if its batch is running, the batch stops at the
next denoising step when every job in it is cancelled, otherwise the job's images are discarded.
A batch that raises is run again one job at a time, so a job the model cannot take fails alone.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from dalle3_fast.serve.metrics import Metrics
from dalle3_fast.serve.policy import Settings


class QueueFull(Exception):
    """More jobs are waiting than ``max_queue``."""


class JobCancelled(Exception):
    """The job's deadline passed (or its client went away) before it finished."""


class _BatchCancelled(Exception):
    pass


@dataclass
class Job:
    """``prompts``: one (revised) prompt per image; ``images``/``masks`` (edits): per-image tensors."""

    kind: str                         # "generate" | "edit"
    settings: Settings
    prompts: list[str]
    seeds: list[int]
    deadline: float                   # time.monotonic() seconds
    images: torch.Tensor | None = None    # (n, 3, H, W) in [-1, 1]
    masks: torch.Tensor | None = None     # (n, 1, H, W), 1 = repaint
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple:
        return (self.kind, *self.settings.batch_key)

    @property
    def count(self) -> int:
        return len(self.prompts)

    def _resolve(self, setter: str, value) -> None:
        if self.loop is None or self.future is None:
            return

        def deliver():
            if not self.future.done():
                getattr(self.future, setter)(value)

        self.loop.call_soon_threadsafe(deliver)

    def succeed(self, result) -> None:
        self._resolve("set_result", result)

    def fail(self, exc: BaseException) -> None:
        self._resolve("set_exception", exc)


Runner = Callable[[list[Job], Callable[[], bool]], list[list]]


class Batcher:
    """``submit`` jobs from the event loop; ``run_batch(jobs, should_stop)`` runs in the worker thread."""

    def __init__(self, run_batch: Runner, *, max_batch: int = 8, max_queue: int = 64, window_s: float = 0.02,
                 metrics: Metrics | None = None):
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError(f"Batcher: need max_batch >= 1, max_queue >= 1, window_s >= 0; got {max_batch}, "
                             f"{max_queue}, {window_s}")
        self.run_batch = run_batch
        self.max_batch, self.max_queue, self.window_s = max_batch, max_queue, window_s
        self.metrics = metrics or Metrics()
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._worker, name="dalle3-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            pending, self._queue = self._queue, []
            self._cond.notify_all()
        for job in pending:
            job.fail(JobCancelled("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # ------------------------------------------------------------ client side
    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (limit {self.max_queue})")
            self._queue.append(job)
            self.metrics.set_queue_depth(len(self._queue))
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Mark ``job`` cancelled and drop it from the queue if it has not started."""
        with self._cond:
            if job.cancelled:
                return
            job.cancelled = True
            if job in self._queue:
                self._queue.remove(job)
                self.metrics.set_queue_depth(len(self._queue))
        self.metrics.record_cancelled()

    # ------------------------------------------------------------ worker side
    def _drop_expired(self, now: float) -> None:
        for job in [j for j in self._queue if j.deadline <= now]:
            self._queue.remove(job)
            job.cancelled = True
            self.metrics.record_cancelled()
            job.fail(JobCancelled("the request's deadline passed while it was queued"))

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                if self._stop:
                    return None
                self._drop_expired(time.monotonic())
                if self._queue:
                    break
                self._cond.wait(timeout=0.5)
            first = self._queue.pop(0)
            batch, images = [first], first.count
            window_end = time.monotonic() + self.window_s
            while images < self.max_batch and not self._stop:
                for job in list(self._queue):
                    if job.key == first.key and images + job.count <= self.max_batch:
                        self._queue.remove(job)
                        batch.append(job)
                        images += job.count
                remaining = window_end - time.monotonic()
                if images >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(timeout=remaining)
            self.metrics.set_queue_depth(len(self._queue))
            return batch

    def _worker(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [j for j in batch if not j.cancelled]
            if not live:
                continue
            try:
                self._run(live)
            except _BatchCancelled:
                continue
            except Exception as exc:
                if len(live) == 1:
                    live[0].fail(exc)
                    continue
                # one bad job must not fail its batch mates: each alone, so only the one(s) at fault fail
                for job in live:
                    if job.cancelled:
                        continue
                    try:
                        self._run([job])
                    except _BatchCancelled:
                        pass
                    except Exception as alone:  # the worker lives on
                        job.fail(alone)

    def _run(self, jobs: list[Job]) -> None:
        results = self.run_batch(jobs, lambda: all(j.cancelled for j in jobs))
        self.metrics.record_batch(sum(j.count for j in jobs))
        for job, images in zip(jobs, results):
            if not job.cancelled:
                job.succeed(images)


def stop_when(should_stop: Callable[[], bool]):
    """A sampler callback raising out of the batch once ``should_stop()`` is true."""
    def callback(*_):
        if should_stop():
            raise _BatchCancelled()

    return callback
