"""Quarantine: bad input is skipped with a record, never a crash.

Readers raise :class:`BadSample` (a reason from :data:`REASONS`, the pipeline step that failed and a
short detail). Whoever catches it turns it into a :class:`QuarantineRecord`
``{id, source, reason, stage, kind, detail}`` and counts it: the single-process trainer in a
``Counter``, the Ray Data streams in :class:`actors.quarantine.QuarantineLog`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    # conversations (LLaVA-style records, pipeline/data/conversations.py) and other formats
    "text_only": "a record names no video or image (a text-only conversation)",
    "no_assistant_turn": "a conversation has no assistant (gpt) turn with text: nothing to score",
    "no_media_token": "no human turn of a conversation holds the media token (<image> or <video>)",
    "many_media_tokens": "a conversation holds the media token more than once (one video per sample)",
    "empty_turn": "a conversation turn has an empty or blank value",
    "unknown_role": "a conversation turn's 'from' is not human, gpt or system",
    "not_a_video": "a WebDataset sample of the video stage has no video member (mp4, webm, mkv, avi, mov)",
    "not_an_image": "a WebDataset sample of the image stage has no image member (jpg, jpeg, png, webp)",
    "too_short": "a video has fewer frames than data.min_frames",
}

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


def format_counts(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "quarantined: 0"
    parts = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if v)
    return f"quarantined: {total} ({parts})"
