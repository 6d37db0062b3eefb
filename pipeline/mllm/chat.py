"""Conversations -> the text an adapter tokenizes: the checkpoint's own chat template, or a plain one.

A *conversation* is a sequence of messages ``{"role": "system" | "user" | "assistant", "content":
str}``; the video placeholder ``<video>`` appears exactly once, inside a user turn. The assistant
turns are the *targets*: delta-CE and the evaluation score them, everything else is context. The
adapters' ``(prompt, target)`` pair is the short form ``[user: prompt, assistant: target]``
(:func:`conversation`); a prompt may also be a whole conversation ending in a user turn.

:meth:`ChatFormat.segments` turns a conversation into ``(text, is_target)`` pieces whose
concatenation is the rendered conversation, with the video as the placeholder. Two formats share
that one path:

* **template** (the checkpoint has a chat template: ``chat_template.jinja`` or
  ``chat_template.json`` in its directory, else the tokenizer's ``chat_template``): the user turn
  holding the video is passed to the template as ``[text, {"type": "video"}, text]`` items, as the
  family's processor expects; the text the template writes for the video (the adapter's
  ``chat_video_text``, e.g. Qwen2-VL's ``<|video_pad|>``) becomes the placeholder, and the
  adapter's ``_video_layout`` lays the video out where it stood, as the family's processor does.
  Pieces come from rendering the conversation one turn at a time (each render must extend the
  previous one): an assistant turn's generation header (``<|im_start|>assistant\\n``) is context,
  its content and end-of-turn token are the target; whitespace after the end-of-turn goes to
  the next piece. The template writes any BOS itself.
* **plain** (no template, or ``mllm.chat_template: plain``; the project's own score-tiny): each
  turn's content is one piece, tokenized on its own, BOS before the first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

VIDEO_PLACEHOLDER = "<video>"
ROLES = ("system", "user", "assistant")

#: a conversation in hashable form: ((role, content), ...)
Conversation = tuple[tuple[str, str], ...]


class ChatPrompt(str):
    """A conversation prompt (messages) that is also its JSON text, so it travels wherever a
    prompt string does (rollout records, Ray Data columns, memo keys) and renders as the
    conversation it is. ``ChatPrompt([{"role": "user", "content": "<video> hi"}])``."""

    messages: tuple[tuple[str, str], ...]

    def __new__(cls, messages: Sequence[Mapping[str, str]]) -> "ChatPrompt":
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        obj = super().__new__(cls, json.dumps(msgs, ensure_ascii=False))
        obj.messages = tuple((m["role"], m["content"]) for m in msgs)
        return obj

    def __reduce__(self):  # pickles (Ray) as its messages, not as a bare str
        return ChatPrompt, ([{"role": r, "content": c} for r, c in self.messages],)


def conversation(prompt: str | Sequence[Mapping[str, str]], target: str | None = None) -> Conversation:
    """Normalize ``prompt`` (a user turn's text, a :class:`ChatPrompt`, or a sequence of messages)
    and an optional target (one more assistant turn) into a checked :data:`Conversation`
    (ValueError/TypeError naming the problem)."""
    if isinstance(prompt, ChatPrompt):
        turns = list(prompt.messages)
    elif isinstance(prompt, str):
        turns = [("user", prompt)]
    elif isinstance(prompt, (list, tuple)):
        turns = []
        for i, m in enumerate(prompt):
            if isinstance(m, tuple) and len(m) == 2:
                role, content = m
            elif isinstance(m, Mapping) and "role" in m and "content" in m:
                role, content = m["role"], m["content"]
            else:
                raise ValueError(f"message {i} must be {{'role': ..., 'content': ...}}, got {str(m)[:80]!r}")
            turns.append((role, content))
    else:
        raise TypeError(f"prompt must be a str or a list of messages, got {type(prompt).__name__}")
    if target is not None:
        if not isinstance(target, str):
            raise TypeError(f"target must be a str, got {type(target).__name__}")
        turns.append(("assistant", target))
    if not turns:
        raise ValueError("the conversation has no messages")
    for i, (role, content) in enumerate(turns):
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TypeError(f"message {i} ({role}): content must be a str, got {type(content).__name__}")
    where = [i for i, (role, c) in enumerate(turns) for _ in range(c.count(VIDEO_PLACEHOLDER))]
    if len(where) != 1:
        raise ValueError(
            f"a conversation must contain the video placeholder {VIDEO_PLACEHOLDER!r} exactly once, "
            f"found {len(where)} in {str(turns)[:120]!r}"
        )
    if turns[where[0]][0] != "user":
        raise ValueError(f"the video placeholder must be in a user turn, found it in a {turns[where[0]][0]} turn")
    return tuple(turns)


def find_template(tokenizer: Any, model_dir: str | Path | None) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja`` / ``chat_template.json`` in its
    directory (where multimodal processors keep theirs), else the tokenizer's; ``None`` if none."""
    if model_dir is not None:
        d = Path(model_dir)
        if (d / "chat_template.jinja").is_file():
            return (d / "chat_template.jinja").read_text()
        if (d / "chat_template.json").is_file():
            try:
                tpl = json.loads((d / "chat_template.json").read_text()).get("chat_template")
            except ValueError as e:
                raise ValueError(f"{str(d / 'chat_template.json')!r} is not valid JSON: {e}") from e
            if isinstance(tpl, str):
                return tpl
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):  # named templates: the default one
        tpl = tpl.get("default")
    return tpl if isinstance(tpl, str) and tpl.strip() else None


class ChatFormat:
    """Renders conversations for one tokenizer (module docstring). ``template=None``: plain."""

    def __init__(self, tokenizer: Any, template: str | None, video_text: str = VIDEO_PLACEHOLDER) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.video_text = video_text

    @property
    def plain(self) -> bool:
        return self.template is None

    @property
    def adds_bos(self) -> bool:
        """Whether the first piece is tokenized with the tokenizer's special tokens (plain only)."""
        return self.plain

    def segments(self, conv: Conversation, generation: bool) -> list[tuple[str, bool]]:
        """``(text, is_target)`` pieces of ``conv`` with the video as ``<video>``; ``generation``:
        end with the assistant's generation header (``conv`` must then end in a non-assistant turn)."""
        if generation and conv[-1][0] == "assistant":
            raise ValueError("a prompt to answer must not end with an assistant turn")
        if self.plain:
            return [(content, role == "assistant") for role, content in conv]
        return self._template_segments(conv, generation)

    def _render(self, conv: Conversation, generation: bool) -> str:
        msgs = []
        for role, content in conv:
            if role == "user" and VIDEO_PLACEHOLDER in content:
                before, after = content.split(VIDEO_PLACEHOLDER)
                items = [{"type": "text", "text": before}] if before else []
                items.append({"type": "video"})
                if after:
                    items.append({"type": "text", "text": after})
                msgs.append({"role": role, "content": items})
            else:
                msgs.append({"role": role, "content": content})
        try:
            text = self.tokenizer.apply_chat_template(
                msgs, chat_template=self.template, tokenize=False, add_generation_prompt=generation
            )
        except Exception as e:  # a Jinja error in the checkpoint's template: name it
            raise ValueError(f"the chat template failed to render a conversation: {type(e).__name__}: {e}") from e
        return text if isinstance(text, str) else str(text)

    def _template_segments(self, conv: Conversation, generation: bool) -> list[tuple[str, bool]]:
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, (role, _) in enumerate(conv):
            if role == "assistant":
                header = self._render(conv[:i], True)
                full = self._render(conv[: i + 1], False)
                self._check_extends(done, header, i)
                self._check_extends(header, full, i)
                body = full[len(header):]
                content = body.rstrip()
                pieces += [(header[len(done):], False), (content, True)]
                done = header + content
            else:
                full = self._render(conv[: i + 1], False)
                self._check_extends(done, full, i)
                pieces.append((full[len(done):], False))
                done = full
        if generation:
            full = self._render(conv, True)
            self._check_extends(done, full, len(conv))
            pieces.append((full[len(done):], False))
        pieces = [(t, tgt) for t, tgt in pieces if t]
        return self._mark_video(pieces)

    def _check_extends(self, prefix: str, text: str, turn: int) -> None:
        if not text.startswith(prefix):
            raise ValueError(
                f"the chat template does not render turn {turn} as an extension of the turns before it "
                f"(needed to tell context from target): {prefix[-60:]!r} is not a prefix of {text[:len(prefix) + 20][-80:]!r}"
            )

    def _mark_video(self, pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
        hits = [i for i, (t, tgt) in enumerate(pieces) if not tgt for _ in range(t.count(self.video_text))]
        if len(hits) != 1:
            rendered = "".join(t for t, _ in pieces)
            raise ValueError(
                f"the chat template has no single place for the video: expected {self.video_text!r} once where "
                f"the user turn holds a {{'type': 'video'}} item, found {len(hits)} in {rendered[:200]!r}"
            )
        i = hits[0]
        text = pieces[i][0].replace(self.video_text, VIDEO_PLACEHOLDER)
        if text.count(VIDEO_PLACEHOLDER) != 1:
            raise ValueError(f"the rendered conversation already contains {VIDEO_PLACEHOLDER!r} besides the video")
        pieces[i] = (text, False)
        return pieces


def chat_format(tokenizer: Any, model_dir: str | Path | None, video_text: str, mode: str = "auto") -> ChatFormat:
    """The :class:`ChatFormat` of a checkpoint: its own template (``mode="auto"``, when it has
    one) or the plain one (``mode="plain"``, or no template)."""
    if mode not in ("auto", "plain"):
        raise ValueError(f"chat_template must be 'auto' or 'plain', got {mode!r}")
    template = find_template(tokenizer, model_dir) if mode == "auto" else None
    return ChatFormat(tokenizer, template, video_text)
