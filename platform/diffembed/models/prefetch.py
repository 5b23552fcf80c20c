"""A bounded background producer: the CPU side of encoding (tokenisation, windows, collation into pinned host
memory) runs in a thread a few batches ahead of the device, so the accelerator never waits for Python.

Tokenizers (Rust) and numpy release the GIL for their heavy parts, and CUDA kernels run asynchronously, so one
producer thread is enough to keep a GPU fed; on CPU the same code path overlaps tokenisation with the forward.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Yield `items` in order while a background thread computes up to `depth` of them ahead.

    An exception raised by the producer is re-raised here, at the item where it happened. If the consumer stops
    early (an error on the device, `close()`), the producer is told to stop and joined: no thread outlives the
    call. `depth < 1` runs the iterator inline (no thread).
    """
    if depth < 1:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer, raised there)
            put(_Failure(exc))

    worker = threading.Thread(target=produce, name="diffembed-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()
