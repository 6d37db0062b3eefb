"""The quarantine log of a Ray stage: every worker's :class:`~pipeline.data.quarantine.QuarantineRecord`
collected in one place.

How records get from Ray Data's worker processes back to the driver: a :class:`QuarantineLog`
wraps a tiny Ray actor (``num_cpus=0``, so it never takes a CPU from the read tasks). The log
object is picklable (it carries the actor handle), is captured by the map functions, and each
task sends its records in one *blocking* call per shard/batch. Because the call blocks, every record
of a block is in the actor before that block reaches the consumer, so after the driver has
iterated a dataset the counts are complete. Records are de-duplicated by
``(kind, id, source, reason, stage)``, so a retried task does not count twice. The actor keeps exact
counters and the first ``keep`` records; :meth:`QuarantineLog.dump` writes them as jsonl.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from typing import Iterable

import ray

from pipeline.data.quarantine import QuarantineRecord, format_counts


@ray.remote(num_cpus=0, max_restarts=0)
class _QuarantineActor:
    def __init__(self, keep: int):
        self._keep = keep
        self._seen: set[tuple] = set()
        self._records: list[dict] = []
        self._counts: Counter[str] = Counter()

    def add(self, records: list[dict]) -> int:
        for r in records:
            key = (r["kind"], r["id"], r["source"], r["reason"], r["stage"])
            if key in self._seen:
                continue
            self._seen.add(key)
            self._counts[r["reason"]] += 1
            if len(self._records) < self._keep:
                self._records.append(r)
        return len(self._seen)

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def records(self, limit: int | None) -> list[dict]:
        return list(self._records if limit is None else self._records[:limit])


class QuarantineLog:
    """Driver-side handle to the quarantine actor; pass it (pickled) into Ray Data map functions."""

    def __init__(self, keep: int = 10_000):
        self._actor = _QuarantineActor.remote(keep)

    # --- writers (workers or driver) ---
    def add(self, records: Iterable[QuarantineRecord | dict]) -> None:
        rows = [asdict(r) if isinstance(r, QuarantineRecord) else dict(r) for r in records]
        if rows:
            ray.get(self._actor.add.remote(rows))

    # --- readers (driver) ---
    def counts(self) -> dict[str, int]:
        return ray.get(self._actor.counts.remote())

    def total(self) -> int:
        return sum(self.counts().values())

    def records(self, limit: int | None = None) -> list[dict]:
        return ray.get(self._actor.records.remote(limit))

    def format(self, counts: dict[str, int] | None = None) -> str:
        """``"quarantined: N (reason: count, ...)"``, most frequent reason first."""
        return format_counts(self.counts() if counts is None else counts)

    def dump(self, path: str, s3=None) -> int:
        """Write the kept records as jsonl to a local or ``s3://`` path; returns how many."""
        from pipeline import storage

        recs = self.records()
        storage.write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs).encode(), s3)
        return len(recs)
