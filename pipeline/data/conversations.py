"""LLaVA-style conversations -> the project's conversations (:mod:`pipeline.mllm.chat`).

A LLaVA record (LLaVA-Video-178K, LLaVA-OneVision, ShareGPT4Video, LLaVA-Pretrain-558K) holds
``"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]``.
:func:`from_llava` turns it into messages ``[{"role", "content"}]``:

* ``from``: ``human`` -> ``user``, ``gpt`` -> ``assistant``, ``system`` -> ``system`` (``user`` /
  ``assistant`` and a ``role``/``content`` spelling are accepted as they are); anything else is
  ``unknown_role``;
* the media token, ``<image>`` (what LLaVA writes for videos too) or ``<video>``, becomes the
  project's placeholder ``<video>``; exactly one, in a human turn (``no_media_token`` /
  ``many_media_tokens``);
* an empty or blank value is ``empty_turn``; no assistant turn is ``no_assistant_turn``.

The assistant turns are the targets, everything else context (:func:`split_target`): the
prompt is every message before the last assistant turn, the target that turn's text; the
adapters render ``prompt + [assistant: target]`` through the chat format, which scores every
assistant turn. Turns after the last assistant turn (a trailing question) are dropped.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from pipeline.data.prompts import VIDEO
from pipeline.data.quarantine import BadSample

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MEDIA_TOKENS = ("<image>", "<video>")
TARGET_JOINER = " "  # an image record's caption for stage 1: its assistant turns in order


def from_llava(turns: Any) -> list[dict[str, str]]:
    """A LLaVA ``conversations`` list -> checked messages ``[{"role", "content"}]`` with the one
    ``<video>`` placeholder; a :class:`BadSample` with a conversation reason otherwise."""
    if not isinstance(turns, (list, tuple)) or not turns:
        raise BadSample("bad_annotation", "conversation", "'conversations' is not a non-empty list")
    out: list[dict[str, str]] = []
    media: list[tuple[int, str]] = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise BadSample("bad_annotation", "conversation", f"turn {i} is not an object")
        frm = t.get("from", t.get("role"))
        value = t.get("value", t.get("content"))
        role = ROLES.get(frm.strip().lower()) if isinstance(frm, str) else None
        if role is None:
            raise BadSample("unknown_role", "conversation", f"turn {i}: from={frm!r}")
        if not isinstance(value, str) or not value.strip():
            raise BadSample("empty_turn", "conversation", f"turn {i} ({frm}): value={value!r}"[:120])
        media += [(i, role)] * sum(value.count(tok) for tok in MEDIA_TOKENS)
        for tok in MEDIA_TOKENS:
            value = value.replace(tok, VIDEO)
        out.append({"role": role, "content": value})
    if len(media) > 1:
        raise BadSample("many_media_tokens", "conversation", f"{len(media)} media tokens in turns {[i for i, _ in media]}")
    if not media or media[0][1] != "user":
        where = f" (found in turn {media[0][0]}, a {media[0][1]} turn)" if media else ""
        raise BadSample("no_media_token", "conversation", f"no human turn holds <image> or <video>{where}")
    if not any(m["role"] == "assistant" for m in out):
        raise BadSample("no_assistant_turn", "conversation", f"{len(out)} turns, none from gpt")
    return out


def targets(messages: Sequence[dict[str, str]]) -> list[str]:
    """The assistant turns' texts, in order."""
    return [m["content"].strip() for m in messages if m["role"] == "assistant"]


def caption_of(messages: Sequence[dict[str, str]]) -> str:
    """What an image-caption record says, for stage 1's pseudo-videos: its targets joined."""
    return TARGET_JOINER.join(targets(messages))


def split_target(messages: Sequence[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """``(prompt messages, target)``: everything before the last assistant turn, and its text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [dict(m) for m in messages[:last]], messages[last]["content"].strip()


def dumps(messages: Sequence[dict[str, str]]) -> str:
    """The ``conversation`` column of a sample: JSON text (Ray Data rows hold strings)."""
    return json.dumps(list(messages), ensure_ascii=False)


def chat_target(conversation: str | Sequence[dict[str, str]]) -> tuple[str, str]:
    """A sample's ``conversation`` (JSON text or messages) -> ``(prompt, target)`` for scoring:
    the prompt a :class:`pipeline.mllm.chat.ChatPrompt` (a str that renders as the messages,
    so rollout records carry it as text), the target the last assistant turn."""
    from pipeline.mllm.chat import ChatPrompt

    messages = json.loads(conversation) if isinstance(conversation, (str, bytes)) else list(conversation)
    prompt, target = split_target(messages)
    return ChatPrompt(prompt), target
