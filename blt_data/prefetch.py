"""Running a generator ahead of its consumer on a background thread (reading and packing on CPU
while the device computes)."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

_END = object()


def in_background(make: Callable[[], Iterator], depth: int, name: str) -> Iterator:
    """Run the generator ``make()`` on a daemon thread, ``depth`` items ahead of the consumer.

    Items travel unchanged (e.g. a batch with its reader state), so prefetching never changes
    what an item means. An exception in the producer is raised in the consumer; closing the
    consumer stops the producer and closes its generator.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        items = make()
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # handed to the consumer, raised there
            put(error)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
