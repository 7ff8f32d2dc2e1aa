"""The one micro-batching helper: collect items, hand them on in bounded lists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["MicroBatch"]

T = TypeVar("T")


class MicroBatch(Generic[T]):
    """Buffer of at most ``size`` items; ``sink(items)`` is called whenever it fills.

    ``size`` may be changed while streaming (adaptive batch sizes); a smaller size takes
    effect at the next append. Memory: ``size`` items at a time.
    """

    def __init__(self, sink: Callable[[list[T]], None], size: int) -> None:
        if size < 1:
            raise ValueError("batch size must be >= 1")
        self._sink = sink
        self.size = size
        self._items: list[T] = []
        self.flushes = 0

    def append(self, item: T) -> None:
        self._items.append(item)
        if len(self._items) >= self.size:
            self.flush()

    def flush(self) -> None:
        """Hand on what is buffered (no-op when empty)."""
        if self._items:
            items, self._items = self._items, []
            self.flushes += 1
            self._sink(items)

    def __len__(self) -> int:
        return len(self._items)
