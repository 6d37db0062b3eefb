"""Quarantine: bad input is skipped with a record, never a crash.

Readers raise :class:`BadSample` (a reason from :data:`REASONS`, the pipeline step that failed and a
short detail). The stream's map functions catch it and send a record
``{id, source, reason, stage, kind, detail}`` to a :class:`QuarantineLog`.

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
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import ray

# reason -> meaning
REASONS: dict[str, str] = {
    "missing_file": "a listed shard or a referenced clip does not exist",
    "empty_file": "zero-length file or image bytes",
    "unreadable_shard": "a parquet/jsonl shard cannot be read (truncated, not parquet, I/O error)",
    "bad_annotation": "a jsonl line is not JSON or lacks a required field",
    "corrupt_image": "image bytes do not decode",
    "corrupt_video": "the video container or stream does not decode, or has no frames",
    "empty_caption": "caption missing or blank",
    "long_caption": "caption longer than data.max_caption_words words",
    "bad_shape": "frame size/shape unusable or not what the annotation declares",
    "too_few_images": "a shard has fewer good images than one pseudo-video needs (data.pseudo_images)",
    "unexpected_error": "any other exception while building the sample",
}

# pipeline steps a record can come from
STAGES = ("read", "caption", "decode", "shape", "synthesize")


class BadSample(Exception):
    """A sample (or a whole shard) that must be skipped."""

    def __init__(self, reason: str, stage: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        super().__init__(f"{reason} at {stage}: {detail}" if detail else f"{reason} at {stage}")
        self.reason = reason
        self.stage = stage
        self.detail = detail


@dataclass(frozen=True)
class QuarantineRecord:
    id: str
    source: str
    reason: str
    stage: str
    kind: str
    detail: str = ""

    @classmethod
    def from_error(cls, err: BadSample, *, id: str, source: str, kind: str) -> "QuarantineRecord":
        return cls(id=str(id), source=str(source), reason=err.reason, stage=err.stage, kind=kind, detail=err.detail[:300])

    @classmethod
    def unexpected(cls, exc: BaseException, *, id: str, source: str, kind: str, stage: str) -> "QuarantineRecord":
        detail = f"{type(exc).__name__}: {exc}"[:300]
        return cls(id=str(id), source=str(source), reason="unexpected_error", stage=stage, kind=kind, detail=detail)


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


def format_counts(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "quarantined: 0"
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if v)
    return f"quarantined: {total} ({parts})"
