"""The ``shapes_video_qa`` task: the shapes world's held-out videos and their primary question.

Its documents come from a world directory: ``$SHAPES_WORLD`` (default ``runs/world`` under the
repository root, what ``make demo`` writes); the JSONL ``<world>/heldout/shapes_video_qa.jsonl`` is
exported (``python -m pipeline.lmms_eval_model export-task WORLD``) when missing or older than the
world's annotations. ``$SHAPES_VIDEO_QA_JSONL`` names a ready JSONL instead (no world needed).
A document: ``{id, video (absolute path), question, answer, options, type}``.

Prompt: the video, then ``question : <q> answer :`` -- with the ``score`` model's plain prompt this
is exactly ``pipeline.data.prompts.qa_prompt(q)``, the prompt ``jobs/evaluate.py`` scores. Metric:
``accuracy``, the exact match of the answer's first word with the reference (``evaluate_qa``'s);
the ``_mc`` variant scores the options by log-likelihood (``option_accuracy``).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _test_file() -> str:
    explicit = os.environ.get("SHAPES_VIDEO_QA_JSONL")
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"SHAPES_VIDEO_QA_JSONL={explicit}: no such file")
        return str(Path(explicit).resolve())
    from pipeline.lmms_eval_model import task_file

    world = Path(os.environ.get("SHAPES_WORLD") or REPO / "runs" / "world")
    try:
        return str(task_file(world))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"shapes_video_qa: {e} (run `make demo`, or set SHAPES_WORLD=<world dir> "
                                "or SHAPES_VIDEO_QA_JSONL=<exported jsonl>)") from None


#: the YAML's ``data_files`` (``!function utils.TEST_FILE``): resolved when the task loads
TEST_FILE = _test_file()


def _video(doc: dict) -> str:
    video = doc.get("video")
    if not video:
        raise ValueError(f"shapes_video_qa: document {doc.get('id', '?')!r} has no video")
    return video


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return f"question : {doc['question']} answer :"


def doc_to_visual(doc: dict) -> list[str]:
    return [_video(doc)]


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "url": _video(doc)},
                                         {"type": "text", "text": doc_to_text(doc)}]}]


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["options"])


def doc_to_target_index(doc: dict) -> int:
    return list(doc["options"]).index(doc["answer"])


def process_results(doc: dict, results: list) -> dict:
    from pipeline.evaluation import answer_word

    text = results[0] if results else ""
    return {"accuracy": float(answer_word(text or "") == doc["answer"])}
