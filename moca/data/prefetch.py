"""Background preparation of micro-batches (image decoding, tokenisation, masking, collation) while the GPU works.

:class:`Prefetcher` runs ``make(index)`` for index = i, i+1, ... in one worker thread, ``depth`` batches ahead,
and hands them out in order. It remembers the loader position *after each batch it handed out*, so a
checkpoint saves the position of what was consumed, not of what was read ahead: resuming is exact whether or not
prefetching is on. Errors in the worker (a bad record without ``skip_bad``) are raised in the caller, at the
batch where they happened.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from typing import Callable, Optional


class Prefetcher:
    """Args:
        make: ``fn(index) -> batch`` (uses the loader; called only from the worker thread while it runs).
        loader: the object with ``state_dict()`` / ``load_state_dict()`` whose position ``make`` advances.
        depth: batches prepared ahead (>= 1).
    """

    def __init__(self, make: Callable[[int], object], loader, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self.make, self.loader, self.depth = make, loader, depth
        self._state = loader.state_dict()
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._expected: Optional[int] = None

    # -- worker --------------------------------------------------------------------------------------

    def _start(self, index: int) -> None:
        self.close()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        stop, q = self._stop, self._queue

        def work(i: int) -> None:
            while not stop.is_set():
                try:
                    item = (self.make(i), self.loader.state_dict(), None)
                except BaseException as exc:  # handed to the consumer, raised there
                    item = (None, None, exc)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[2] is not None:
                    return
                i += 1

        self._thread = threading.Thread(target=work, args=(index,), name="moca-prefetch", daemon=True)
        self._thread.start()
        self._expected = index

    def close(self) -> None:
        """Stop the worker (batches read ahead are dropped; the consumed position is kept)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self._state is not None:
                self.loader.load_state_dict(self._state)   # rewind past what was read ahead

    # -- consumer ------------------------------------------------------------------------------------

    def __call__(self, index: int):
        """The batch of micro-batch ``index`` (indices must be consecutive; a jump restarts the worker)."""
        if self._thread is None or index != self._expected:
            self._start(index)
        batch, state, exc = self._queue.get()
        if exc is not None:
            self._thread.join()
            self._thread = None
            raise exc
        self._state = state
        self._expected = index + 1
        return batch

    def state_dict(self) -> dict:
        """Loader position after the last batch handed out."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    @property
    def skipped(self) -> Counter:
        """Bad records skipped up to the last batch handed out."""
        return Counter(self._state.get("skipped", {}))
