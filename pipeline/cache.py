"""A byte-bounded LRU for what a rollout does not need to recompute (no Ray, no torch import).

:func:`pipeline.trainer.rollout` keeps the vision features ``(X, side)`` under the sample id and
``CE_full`` under ``("ce_full", sample id, prompt, target)``: neither depends on the policy, so a
sample seen again (the next data epoch of a real video, a pseudo-video grouped the same way) skips
the vision tower and the all-tokens scoring row. A rollout actor lives for a whole stage and may
see millions of samples, so the cache is bounded in bytes and evicts the least recently used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, MutableMapping
from typing import Any, Iterator


def nbytes(value: Any) -> int:
    """Bytes a cached value holds: torch tensors and numpy arrays by their buffers, tuples, lists
    and dicts by their items, else 0."""
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return int(value.element_size()) * int(value.numel())
    return int(getattr(value, "nbytes", 0))


class ByteLRU(MutableMapping):
    """``dict``-like LRU holding at most ``max_bytes`` of tensors (0: keeps nothing).

    A read (``cache[k]``) counts a hit and refreshes ``k``; storing a new key counts a miss (the
    caller computed it). A value larger than the whole budget is not kept. :meth:`stats` gives
    ``{entries, bytes, hits, misses, evictions}``, :meth:`hit_rate` hits per lookup."""

    @classmethod
    def from_mb(cls, mb: float) -> "ByteLRU":
        """The cache of a ``rollout.cache_mb`` budget (MiB)."""
        return cls(int(float(mb) * 2**20))

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"ByteLRU: max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __getitem__(self, key: Hashable) -> Any:
        value, _ = self._data[key]
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        size = nbytes(value)
        if key in self._data:
            self.bytes -= self._data.pop(key)[1]
        else:
            self.misses += 1
        if size > self.max_bytes:
            return
        self._data[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, s) = self._data.popitem(last=False)
            self.bytes -= s
            self.evictions += 1

    def __delitem__(self, key: Hashable) -> None:
        self.bytes -= self._data.pop(key)[1]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def hit_rate(self) -> float:
        """Hits / lookups so far (0 before the first)."""
        return self.hits / max(1, self.hits + self.misses)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._data), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}
