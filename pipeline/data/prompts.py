"""Prompt templates shared by pre-training, rollouts, evaluation and inference.

A prompt holds the video placeholder exactly once; the target is what the MLLM should say.
"""

from __future__ import annotations

VIDEO = "<video>"
CAPTION_PROMPT = f"{VIDEO} describe the video ."


def qa_prompt(question: str) -> str:
    return f"{VIDEO} question : {question} answer :"
