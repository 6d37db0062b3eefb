"""Qwen3.5 (``qwen3_5``, ``qwen3_5_moe``): the family's own proofs, beyond the generic adapter
tests (tests/test_mllm_adapters.py runs those for both kinds).

* the tiny byte-level BPE tokenizer survives ``save_pretrained`` + ``AutoTokenizer`` (which
  reloads a Qwen3.5 directory as ``Qwen3_5Tokenizer``) with identical ids;
* the video layout is the one transformers' ``Qwen3VLProcessor.replace_video_token`` writes
  (per-frame timestamps and vision markers), and M-RoPE ids are the model's ``get_rope_index``
  on the full sequence, sliced (and equal a hand computation of Qwen3.5's per-frame rule);
* right padding never reaches a real token of the hybrid stack (Gated DeltaNet + attention):
  rows of very different lengths give, batched, what they give alone;
* a cached prefill (batched or not) continues exactly: decoding over the hybrid cache equals
  recomputing without a cache, and a padded batch's short rows keep their own linear states.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.mllm.base import MLLMAdapter
from pipeline.mllm.qwen3_5 import TINY_SPECIAL, _row, tiny_tokenizer
from pipeline.mllm.qwen3_vl import calculate_timestamps, processor_video_text
from pipeline.mllm.registry import TINY_WORDS
from tests.test_mllm_adapters import ATOL, PROMPT, TARGET, builtin_inputs, make_frames

KIND = "qwen3_5"
KINDS = ["qwen3_5", "qwen3_5_moe"]
CHAT = "<|im_start|>user\n<video>what color is the circle ?<|im_end|>\n<|im_start|>assistant\n"
PAD6 = "<|video_pad|>" * 6


# ---------------------------------------------------------------- tokenizer
@pytest.mark.unit
def test_byte_bpe_tokenizer_survives_save_and_autotokenizer(tmp_path):
    from transformers import AutoTokenizer, Qwen3_5Config
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    from pipeline.mllm import registry
    from pipeline.mllm.tokenizer import build_byte_bpe_tokenizer

    tok = tiny_tokenizer()
    texts = [
        CHAT + "a red circle<|im_end|>",
        "<0.2 seconds><|vision_start|>" + PAD6 + "<|vision_end|><1.2 seconds>",
        "A zebra, ünïcode and 12 digits?!  two  spaces\n\nnew lines",
    ]
    for w in TINY_WORDS:  # every test word (alone and after a space) is one token
        assert len(tok(w)["input_ids"]) == 1 and len(tok(" " + w)["input_ids"]) == 1, w
    assert tok("")["input_ids"] == []  # no BOS, as Qwen
    assert tok.decode(tok(texts[2])["input_ids"]) == texts[2]  # byte-level: nothing is lost

    d = tmp_path / "qwen3_5"
    tok.save_pretrained(d)
    Qwen3_5Config().save_pretrained(d)  # what makes AutoTokenizer pick Qwen3_5Tokenizer
    again = AutoTokenizer.from_pretrained(d)
    assert type(again) is Qwen3_5Tokenizer
    for t in texts:
        ids = tok(t)["input_ids"]
        assert again(t)["input_ids"] == ids, t
        for skip in (False, True):
            assert again.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)
    assert [again.convert_tokens_to_ids(s) for s in TINY_SPECIAL] == [tok.convert_tokens_to_ids(s) for s in TINY_SPECIAL]
    assert (again.pad_token_id, again.eos_token_id, len(again)) == (tok.pad_token_id, tok.eos_token_id, len(tok))

    # why not the word-level tokenizer: reloaded the same way, it no longer gives its ids
    word = registry.tiny_tokenizer()
    (tmp_path / "w").mkdir()
    word.save_pretrained(tmp_path / "w")
    Qwen3_5Config().save_pretrained(tmp_path / "w")
    assert AutoTokenizer.from_pretrained(tmp_path / "w")("what color")["input_ids"] != word("what color")["input_ids"]

    with pytest.raises(ValueError, match="word list is empty"):
        build_byte_bpe_tokenizer([], TINY_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    with pytest.raises(ValueError, match=r"eos/pad token\(s\) \['<eos>'\] are not among the special tokens"):
        build_byte_bpe_tokenizer(["red"], TINY_SPECIAL, eos_token="<eos>", pad_token="<|endoftext|>")


# ---------------------------------------------------------------- layout and positions
@pytest.mark.unit
def test_video_layout_is_the_processors(tiny_mllm):
    a = tiny_mllm(KIND)
    tok = a.tokenizer
    assert a.chat_video_text == "<|vision_start|><|video_pad|><|vision_end|>"  # the wrapper the processor collapses
    # by hand: fps 2, temporal patch 2 -> steps at (0+1)/2/2 = 0.25, 1.25, 2.25 s, printed with .1f
    want = "".join(f"<{s} seconds><|vision_start|>{PAD6}<|vision_end|>" for s in ("0.2", "1.2", "2.2"))
    for fps, t in ((2.0, 3), (1.0, 1), (3.0, 4)):
        b = tiny_mllm(KIND, fps=fps)
        ids, slots = b._video_layout(t, 6)
        text = processor_video_text(b, list(range(2 * t)), [t, 4, 6])  # transformers' own replace_video_token
        assert ids == tok(text, add_special_tokens=False)["input_ids"] and tok.decode(ids) == text, (fps, t)
        vis = [s for s in slots if s >= 0]
        assert vis == list(range(t * 6))  # X's tokens, in order ...
        assert all((i == b.video_token_id) == (s >= 0) for i, s in zip(ids, slots))  # ... exactly on the video pads
        if (fps, t) == (2.0, 3):
            assert text == want
    assert tok.decode(tiny_mllm(KIND, fps=1.0)._video_layout(1, 6)[0]).startswith("<0.5 seconds>")
    # an odd frame count: the processor times the padded last step at the last frame; X does not
    # carry the frame count, so the adapter lays out the even video (documented; one text differs)
    odd = processor_video_text(a, list(range(5)), [3, 4, 6]).split("<|vision_end|>")
    even = tok.decode(a._video_layout(3, 6)[0]).split("<|vision_end|>")
    assert odd[:2] == even[:2] and odd[2] != even[2]
    assert odd[2].startswith("<2.0 seconds>") and even[2].startswith("<2.2 seconds>")
    assert calculate_timestamps([0, 1, 2, 3, 4], 2.0, 2) == [0.25, 1.25, 2.0]
    with pytest.raises(ValueError, match="fps must be positive"):
        tiny_mllm(KIND, fps=0)


def hand_positions(ids: torch.Tensor, slot: torch.Tensor, gw: int, gh: int) -> torch.Tensor:
    """Qwen3.5's M-RoPE by hand: text advances all three axes by 1; each frame's ``gh x gw``
    tokens sit at ``(p, p + row, p + col)`` and the text after it resumes at ``p + max(gh, gw)``."""
    out, p, j = [], 0, 0
    for s in slot.tolist():
        if s < 0:
            out.append((p, p, p))
            p += 1
            continue
        r, c = divmod(j, gw)
        out.append((p, p + r, p + c))
        j += 1
        if j == gh * gw:
            p, j = p + max(gh, gw), 0
    return torch.tensor(out).T


@pytest.mark.unit
def test_mrope_positions_are_get_rope_index_on_the_full_sequence(tiny_mllm):
    a = tiny_mllm(KIND)
    frames = make_frames(6)
    X = a.encode_video(frames)
    T, N = X.shape[:2]
    assert (T, N) == (3, 6)
    kept = [1, 5, 6, 10, 17]
    keep = torch.zeros(1, 1, T * N, dtype=torch.bool)
    keep[0, 0, kept] = True
    batch = a.masked_batch(X[None], keep, [PROMPT], [TARGET])
    pos = batch.position_ids[:, 0, : int(batch.lengths[0])]
    kw, _, x_positions = builtin_inputs(a, KIND, frames, PROMPT, TARGET)
    full, _ = a.model.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], video_grid_thw=kw["video_grid_thw"])
    keep_full = torch.ones(kw["input_ids"].shape[1], dtype=torch.bool)
    keep_full[x_positions] = False
    keep_full[x_positions[kept]] = True
    assert torch.equal(pos, full[:, 0, keep_full])
    t = a._template(PROMPT, TARGET, T, N)
    assert torch.equal(t.ids, kw["input_ids"][0])
    assert torch.equal(hand_positions(t.ids, t.slot, gw=3, gh=2)[:, keep_full], pos)
    # pruning never shifts the text after the video, and generation continues after the full sequence
    assert pos[:, -1].tolist() == full[:, 0, -1].tolist()
    pre = a.prefill(X, torch.tensor(kept), PROMPT)
    kw0, _, _ = builtin_inputs(a, KIND, frames, PROMPT, None)
    full0, _ = a.model.model.get_rope_index(kw0["input_ids"], kw0["mm_token_type_ids"], video_grid_thw=kw0["video_grid_thw"])
    assert pre.next_position_ids.flatten().tolist() == [int(full0.max()) + 1] * 3


@pytest.mark.unit
def test_full_keep_chat_prompt_equals_builtin_forward(tiny_mllm):
    """A chat-formatted prompt (special tokens around the video), 1 fps, 8 frames: CE and the
    next-token logits equal the model's own forward on the processor's inputs."""
    a = tiny_mllm(KIND, fps=1.0)
    frames = make_frames(8, seed=4)
    X = a.encode_video(frames)
    full = torch.ones(1, 1, X.shape[0] * X.shape[1], dtype=torch.bool)
    ce = a.score(X[None], full, [CHAT], ["a red circle<|im_end|>"])
    kw, nt, _ = builtin_inputs(a, KIND, frames, CHAT, "a red circle<|im_end|>")
    assert a.tokenizer.decode(kw["input_ids"][0]).count("seconds>") == 4
    labels = kw["input_ids"].clone()
    labels[:, :-nt] = -100
    with torch.no_grad():
        out = a.model(labels=labels, **kw)
    assert abs(float(out.loss) - float(ce)) < ATOL
    kw, _, _ = builtin_inputs(a, KIND, frames, CHAT, None)
    with torch.no_grad():
        ref = a.model(**kw).logits[0, -1].float()
    torch.testing.assert_close(a.prefill(X, torch.arange(full.shape[-1]), CHAT).logits, ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- the hybrid stack: padding and cache
LONG = "describe the video " * 16 + "<video> what color is the circle that moves left and then right ?"
SHORT = "what <video> ?"


def _two_videos(a: MLLMAdapter) -> torch.Tensor:
    return torch.stack([a.encode_video(make_frames(8, seed=s)) for s in (7, 8)])  # T'=4, N=6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.unit
def test_padding_never_leaks_into_real_tokens(tiny_mllm, kind):
    """Rows from ~25 to ~140 tokens (across the delta rule's 64-token chunks) in one right-padded
    batch: every real position's hidden state, and every CE, equals the row run alone (no
    padding, so no mask at all); and the linear-attention layers did get the padding mask."""
    a = tiny_mllm(kind)
    X = _two_videos(a)
    tn = X.shape[1] * X.shape[2]
    keep = torch.zeros(2, 3, tn, dtype=torch.bool)
    keep[:, 0] = True
    keep[:, 1, 3] = True
    keep[:, 2, ::5] = True
    prompts, targets = [SHORT, LONG], ["red", "a blue square moves left and then a green cross moves right"]
    batch = a.masked_batch(X, keep, prompts, targets)
    L = batch.lengths
    assert int(L.min()) < 40 and int(L.max()) > 128 and len(set(L.tolist())) == 6

    seen = []
    linear = next(layer.linear_attn for layer in a.language_model.layers if hasattr(layer, "linear_attn"))
    hook = linear.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        with torch.inference_mode():
            hidden = a._lm(batch).last_hidden_state
        ce = a.score(X, keep, prompts, targets)
    finally:
        hook.remove()
    assert seen[0] is not None and torch.equal(seen[0], batch.attention_mask)  # the masked path is the one tested
    for r in range(6):
        b, g = divmod(r, 3)
        one = a.masked_batch(X[b : b + 1], keep[b : b + 1, g : g + 1], prompts[b : b + 1], targets[b : b + 1])
        assert int(one.lengths[0]) == int(L[r]) == one.attention_mask.shape[1]  # alone: no padding
        with torch.inference_mode():
            alone = a._lm(one).last_hidden_state[0]
        torch.testing.assert_close(hidden[r, : int(L[r])], alone, atol=ATOL, rtol=0)
        one_ce = a.score(X[b : b + 1], keep[b : b + 1, g : g + 1], prompts[b : b + 1], targets[b : b + 1])
        assert abs(float(ce[b, g]) - float(one_ce)) < ATOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.unit
def test_cached_decode_equals_recompute(tiny_mllm, kind):
    """Greedy decoding over the hybrid cache after a pruned prefill (KV for attention layers,
    conv + recurrent state for linear ones) gives, at every step, the logits of recomputing the
    whole kept sequence without a cache."""
    from transformers.cache_utils import DynamicCache, LinearAttentionCacheLayerMixin

    a = tiny_mllm(kind)
    X = a.encode_video(make_frames(6, seed=2))
    keep_index = torch.tensor([0, 4, 9, 13, 17])
    steps = 6
    with torch.inference_mode():
        pre, batch = a._prefill(X, keep_index, CHAT)
        cache = pre.past_key_values
        assert isinstance(cache, DynamicCache) and isinstance(cache.layers[0], LinearAttentionCacheLayerMixin)
        assert cache.layers[1].get_seq_length() == pre.cache_length  # the attention layer's KV holds the kept prompt
        emb, pos = batch.inputs_embeds, batch.position_ids
        nxt, logits, tok = pre.next_position_ids, pre.logits, int(pre.logits.argmax())
        for _ in range(steps):
            ones = torch.ones(1, emb.shape[1], dtype=torch.long)
            hidden = a.language_model(inputs_embeds=emb, attention_mask=ones, position_ids=pos).last_hidden_state
            ref = a.lm_head(hidden[0, -1]).float()
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
            e = a.embed_tokens(torch.tensor([[tok]]))
            am = torch.ones(1, emb.shape[1] + 1, dtype=torch.long)
            out = a.language_model(inputs_embeds=e, attention_mask=am, position_ids=nxt, use_cache=True, cache=cache)
            logits = a.lm_head(out.last_hidden_state[0, -1]).float()
            tok = int(logits.argmax())
            emb, pos, nxt = torch.cat([emb, e], 1), torch.cat([pos, nxt], -1), nxt + 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.unit
def test_padded_cached_prefill_keeps_each_rows_linear_state(tiny_mllm, kind):
    """A cached forward of a right-padded batch, then decode steps over the shared cache (as
    lmms_eval_model.generate_batch does): every row's logits equal its own prefill + decode. The
    base forward alone would carry the short rows' linear states through their padding."""
    from pipeline.lmms_eval_model import generate_batch

    a = tiny_mllm(kind)
    X = _two_videos(a)
    tn = X.shape[1] * X.shape[2]
    keeps = [torch.arange(tn), torch.tensor([2, 11])]
    prompts = [SHORT, SHORT]
    keep = torch.zeros(2, 1, tn, dtype=torch.bool)
    for b, k in enumerate(keeps):
        keep[b, 0, k] = True

    toks = torch.tensor([[5], [9]])  # the token each row feeds at every decode step

    def step(cache, tok, am, pos):
        out = a.language_model(inputs_embeds=a.embed_tokens(tok), attention_mask=am, position_ids=pos, use_cache=True,
                               cache=cache)
        return a.lm_head(out.last_hidden_state[:, -1]).float()

    def decode(lm_call, steps=3):  # [2, steps, V]: one padded cached prefill, then steps over the shared cache
        with torch.inference_mode():
            batch = a._masked_batch(X, keep, prompts, None)
            assert len(set(batch.lengths.tolist())) == 2  # real padding
            cache = lm_call(batch).cache
            nxt = [a._full_position_max(X[b], prompts[b]) + 1 for b in range(2)]
            pos = torch.tensor(nxt).view(1, 2, 1).expand(3, 2, 1).contiguous()
            am, rows = batch.attention_mask, []
            for i in range(steps):
                am = torch.cat([am, torch.ones(2, 1, dtype=torch.long)], 1)
                rows.append(step(cache, toks, am, pos + i))
        return torch.stack(rows, 1)

    def alone(b, steps=3):  # [steps, V]: the row's own prefill, then the same steps
        with torch.inference_mode():
            pre = a.prefill(X[b], keeps[b], prompts[b])
            am = lambda i: torch.ones(1, pre.cache_length + 1 + i, dtype=torch.long)  # noqa: E731
            return torch.stack([step(pre.past_key_values, toks[b : b + 1], am(i), pre.next_position_ids + i)[0] for i in range(steps)])

    ours = decode(lambda batch: a._lm(batch, use_cache=True))
    base = decode(lambda batch: MLLMAdapter._lm(a, batch, use_cache=True))
    for b in range(2):
        torch.testing.assert_close(ours[b], alone(b), atol=1e-4, rtol=0)
    short = int(a._masked_batch(X, keep, prompts, None).lengths.argmin())
    assert (base[short] - ours[short]).abs().max() > 1e-3  # the fix is needed (and this test can tell)
    torch.testing.assert_close(base[1 - short], ours[1 - short], atol=ATOL, rtol=0)  # the longest row needs none
    got = generate_batch(a, list(X), keeps, prompts, max_new_tokens=5)
    assert got == [a.generate(X[b], keeps[b], prompts[b], max_new_tokens=5) for b in range(2)]


@pytest.mark.unit
def test_row_of_a_batch(tiny_mllm):
    a = tiny_mllm(KIND)
    X = _two_videos(a)
    keep = torch.ones(2, 2, X.shape[1] * X.shape[2], dtype=torch.bool)
    keep[:, 1, 1:] = False
    batch = a.masked_batch(X, keep, [SHORT, LONG], None)
    r = 1
    row = _row(batch, r)
    L = int(batch.lengths[r])
    assert row.inputs_embeds.shape == (1, L, 32) and row.position_ids.shape == (3, 1, L) and bool(row.attention_mask.all())
    assert torch.equal(row.input_ids[0], batch.input_ids[r, :L])
    assert torch.equal(row.position_ids[:, 0], batch.position_ids[:, r, :L])
