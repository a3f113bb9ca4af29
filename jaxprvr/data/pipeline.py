"""The generic input pipeline, for every task: background prefetch, an ordered thread-pool map, worker counts.

* :class:`prefetch`: ``for batch in prefetch(batches, 2)`` prepares items ahead on a background thread;
* :func:`ordered_map`: ``map`` over a thread pool, results in input order (batch building in parallel);
* :func:`batch_workers`: the ``data.workers`` setting resolved to a thread count.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Iterable, Iterator


def batch_workers(configured: int) -> int:
    """``data.workers``: a positive value as given; 0 = auto, ``cpu_count // 4`` clamped to 1..8."""
    if configured > 0:
        return int(configured)
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def ordered_map(fn, items: Iterable, workers: int) -> Iterator:
    """``map(fn, items)`` with up to ``workers`` calls running at once on threads, results in input order.
    At most ``workers`` results are held ahead of the consumer; ``workers <= 1`` is the plain serial map."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="jaxprvr-batch")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Raised:
    """Carries an exception of the producer thread to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def _offer(ready: queue.Queue, stop: threading.Event, item) -> bool:
    """Puts ``item`` unless the consumer has gone; returns whether it was put."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(source: Iterator, ready: queue.Queue, stop: threading.Event) -> None:
    """The producer thread. It holds no reference to its :class:`prefetch`, so that one can be collected."""
    try:
        for item in source:
            if not _offer(ready, stop, item):
                return
        _offer(ready, stop, _END)
    except BaseException as e:  # noqa: BLE001 - every producer failure goes to the consumer
        _offer(ready, stop, _Raised(e))
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


class prefetch:  # noqa: N801 - used like a function: ``for batch in prefetch(batches, 2)``
    """Iterates over ``iterator`` while a background thread keeps up to ``size`` items ready.

    The thread starts at once, so the first batch is prepared while the caller does other work (e.g.
    compiles the step). An exception raised by ``iterator`` is re-raised to the consumer at the point where
    that item would have come. If the consumer stops early, :meth:`close` (also called on ``with`` exit and
    on garbage collection) tells the producer to stop, joins it and closes ``iterator`` from its own thread.
    ``size == 0`` iterates synchronously, without a thread.
    """

    def __init__(self, iterator: Iterable, size: int):
        self._thread = None
        self._source = iter(iterator)
        if size <= 0:
            return
        self._ready: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_produce, args=(self._source, self._ready, self._stop),
                                        name="jaxprvr-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> "prefetch":
        return self

    def __next__(self):
        if self._thread is None:
            return next(self._source)
        if self._stop.is_set():
            raise StopIteration
        item = self._ready.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Raised):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stops the producer thread and waits for it (idempotent)."""
        if self._thread is not None:
            self._stop.set()
            if self._thread is not threading.current_thread():  # __del__ may run on any thread
                self._thread.join()

    def __enter__(self) -> "prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter shutdown the threading module's globals may already be gone
            pass


__all__ = ["prefetch", "ordered_map", "batch_workers"]
