"""Qwen3-VL (dense and MoE) on tiny random models of the real classes: DeepStack, timestamps, M-RoPE.

Beyond the generic adapter tests (tests/test_mllm_adapters.py, which run for kind ``qwen3_vl``
with the side features passed, so DeepStack is live there too): the video layout and the patch
layout are the processor's own (its ``replace_video_token`` / ``_calculate_timestamps`` /
``patchify``), also through a Qwen-style chat template; full-keep CE and logits equal the model's
own forward for the dense AND the MoE model; the adapter's DeepStack features are the model's
own; pruned greedy decoding equals a reference built from the model's own embeddings, positions
and DeepStack features hand-sliced to the kept tokens, and that reference tells a correct slicing
from a wrong one; a padded B*G batch hands the language model every row's kept features in row
order; a DeepStack config the model cannot mean is one ValueError at construction.
"""

from __future__ import annotations

import copy
import re
import types

import pytest
import torch

from pipeline.mllm import registry
from pipeline.mllm.loader import adapter_for
from pipeline.mllm.qwen3_vl import VIDEO_PAD, VISION_END, VISION_START, Qwen3VLAdapter, calculate_timestamps, tiny_moe
from tests.test_mllm_adapters import (
    PROMPT,
    TARGET,
    builtin_inputs,
    make_frames,
    own_lm_inputs,
    reference_patchify,
    reference_pruned_greedy,
)

KIND = "qwen3_vl"
ATOL = 1e-5
FRAME = {"frame_size": (16, 24)}  # 2x3 tokens per temporal step


@pytest.fixture(scope="module")
def moe():
    """The tiny Qwen3VLMoeForConditionalGeneration, as an adapter (built once)."""
    cfg, tok = tiny_moe()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = registry.family(KIND).model_class("qwen3_vl_moe")(cfg).eval()
    return adapter_for(model, tok, **FRAME)


@pytest.fixture(params=["dense", "moe"])
def adapter(request, tiny_mllm):
    return tiny_mllm(KIND) if request.param == "dense" else request.getfixturevalue("moe")


def qwen3_processor(a):
    """A ``Qwen3VLProcessor`` holding what its text expansion reads (the full processor needs
    torchvision, which the project does not install)."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    vp = Qwen3VLVideoProcessor(patch_size=a.patch, temporal_patch_size=a.temporal_patch, merge_size=a.merge)
    proc = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    proc.__dict__.update(video_processor=vp, vision_start_token=VISION_START, vision_end_token=VISION_END, video_token=VIDEO_PAD)
    return proc


def processor_expansion(a, grid: tuple[int, int, int], indices: list[int], fps: float) -> str:
    """The text Qwen3VLProcessor puts in place of the chat template's video wrapper."""
    from transformers.video_utils import VideoMetadata

    meta = VideoMetadata(total_num_frames=len(indices), fps=fps, frames_indices=list(indices))
    return qwen3_processor(a).replace_video_token({"video_grid_thw": torch.tensor([grid]), "video_metadata": [meta]}, 0)


def one_batch(side: dict) -> dict:
    return {k: v[None] for k, v in side.items()}


def random_keep(tn: int, seed: int, p: float = 0.4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(tn, generator=g) < p
    keep[int(torch.randint(tn, (1,), generator=g))] = True  # never empty
    return keep.nonzero()[:, 0]


# ---------------------------------------------------------------- layout: the processor's own
@pytest.mark.unit
def test_video_layout_is_the_processors(tiny_mllm):
    base = tiny_mllm(KIND)
    proc = qwen3_processor(base)
    # the adapter's timestamp rule is the processor's, operation for operation (any index list)
    for idx, fps in [(range(8), 2.0), (range(5), 2.0), (range(0, 30, 3), 24.0), ([0, 7, 13, 20, 26, 33], 29.97), (range(7), 0.5)]:
        assert calculate_timestamps(list(idx), fps, 2) == proc._calculate_timestamps(list(idx), fps, 2)
    for t, fps in [(1, 2.0), (3, 2.0), (4, 1.0), (3, 0.7)]:
        a = Qwen3VLAdapter(base.model, base.tokenizer, fps=fps, **FRAME)
        ids, slots = a._video_layout(t, 6)
        text = processor_expansion(a, (t, 4, 6), list(range(2 * t)), fps)  # frames 0..2t-1 at fps
        assert ids == a.tokenizer(text, add_special_tokens=False)["input_ids"], text
        is_pad = torch.tensor(ids) == a.video_token_id
        assert torch.equal(torch.tensor(slots)[is_pad], torch.arange(t * 6))  # X's tokens, in order
        assert (torch.tensor(slots)[~is_pad] == -1).all()  # timestamps and markers: always-kept text
    assert [s for s in text.split(">") if "seconds" in s] == ["<0.7 seconds", "<3.6 seconds", "<6.4 seconds"]  # by hand: (i/0.7 + (i+1)/0.7)/2
    # the documented contract for an odd video: its repeated last frame counts as the next sample
    # (the processor, told the true count of 5, would write <2.0 seconds> for the last step)
    assert base.timestamps(3)[-1] == 2.25 and calculate_timestamps(list(range(5)), 2.0, 2)[-1] == 2.0
    assert base.chat_video_text == VISION_START + VIDEO_PAD + VISION_END


@pytest.mark.unit
def test_patch_layout_and_normalization_are_the_processors(tiny_mllm):
    a = tiny_mllm(KIND)
    frames = make_frames(5)
    pixels = a.preprocess(frames)
    flat, grid = a.patchify(pixels)
    vp = qwen3_processor(a).video_processor
    ref, gt, gh, gw = vp.patchify(pixels[None], patch_size=4, merge_size=2, temporal_patch_size=2)
    assert grid.tolist() == [[gt, gh, gw]] == [[3, 4, 6]]
    torch.testing.assert_close(flat, ref[0], atol=0, rtol=0)
    torch.testing.assert_close(flat, reference_patchify(pixels, 2, 4, 2), atol=0, rtol=0)
    # mean = std = 0.5 (the Qwen3-VL video processor's), not Qwen2-VL's CLIP statistics
    mean, std = a.image_mean_std
    assert mean.tolist() == std.tolist() == [0.5, 0.5, 0.5]
    raw = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2).float(), size=(16, 24), mode="bicubic", antialias=True)
    torch.testing.assert_close(pixels, (raw.clamp(0, 255) / 255 - 0.5) / 0.5, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- full keep == the model's own forward
@pytest.mark.unit
def test_full_keep_equals_model_forward(adapter):
    a = adapter
    frames = make_frames(4, seed=7)
    X, side = a.encode_video_with_side(frames)
    assert side["deepstack"].shape == (2, 6, 2, 32)
    tn = X.shape[0] * X.shape[1]
    keep = torch.ones(1, 1, tn, dtype=torch.bool)
    ce = a.score(X[None], keep, [PROMPT], [TARGET], side=one_batch(side))
    kw, nt, _ = builtin_inputs(a, KIND, frames, PROMPT, TARGET)
    labels = kw["input_ids"].clone()
    labels[:, :-nt] = -100
    with torch.no_grad():
        out = a.model(labels=labels, **kw)
    assert abs(float(out.loss) - float(ce)) < ATOL
    # DeepStack is live: the same sequence without it is another model
    zero = {"deepstack": torch.zeros_like(side["deepstack"])[None]}
    assert abs(float(out.loss) - float(a.score(X[None], keep, [PROMPT], [TARGET], side=zero))) > 1e-3

    kw, _, _ = builtin_inputs(a, KIND, frames, PROMPT, None)
    with torch.no_grad():
        ref = a.model(**kw).logits[0, -1]
    pre = a.prefill(X, torch.arange(tn), PROMPT, side=side)
    assert pre.cache_length == pre.full_length == kw["input_ids"].shape[1]
    torch.testing.assert_close(pre.logits, ref.float(), atol=ATOL, rtol=0)
    L = kw["input_ids"].shape[1]
    with torch.no_grad():
        gen = a.model.generate(**kw, max_new_tokens=5, do_sample=False, min_new_tokens=5)[0, L:].tolist()
    ours = a.generate_ids(X, torch.arange(tn), PROMPT, max_new_tokens=5, side=side)
    assert ours == gen[: len(ours)]


@pytest.mark.unit
def test_deepstack_features_are_the_models_own(adapter):
    """The side features equal what the model's own forward hands its language model."""
    a = adapter
    frames = make_frames(4, seed=3)
    X, side = a.encode_video_with_side(frames)
    kw, _, x_positions = builtin_inputs(a, KIND, frames, PROMPT, None)
    seen: dict = {}
    emb, _ = own_lm_inputs(a, kw, seen)
    own = seen["deepstack_visual_embeds"]
    assert len(own) == 2 and torch.equal(seen["visual_pos_masks"][0].nonzero()[:, 0], x_positions)
    for level in range(2):
        torch.testing.assert_close(side["deepstack"].flatten(0, 1)[:, level], own[level], atol=ATOL, rtol=0)
    torch.testing.assert_close(X.flatten(0, 1), emb[0, x_positions], atol=ATOL, rtol=0)


@pytest.mark.unit
def test_chat_template_layout(tiny_mllm):
    """Through a Qwen-style chat template (video item -> the wrapper triple): the adapter's prompt
    is the processor's expansion of the rendered chat, and its logits the model's."""
    base = tiny_mllm(KIND)
    tok = copy.deepcopy(base.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    a = Qwen3VLAdapter(base.model, tok, **FRAME)
    frames = make_frames(4, seed=2)
    X, side = a.encode_video_with_side(frames)
    prompt = [{"role": "system", "content": "describe the video"}, {"role": "user", "content": "what color is the <video> circle ?"}]
    msgs = [prompt[0], {"role": "user", "content": [{"type": "text", "text": "what color is the "}, {"type": "video"},
                                                    {"type": "text", "text": " circle ?"}]}]
    chat = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat.count(a.chat_video_text) == 1
    text = chat.replace(a.chat_video_text, processor_expansion(a, (2, 4, 6), list(range(4)), a.fps))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])  # the template writes any BOS (Qwen: none)
    assert torch.equal(a._template(prompt, None, 2, 6).ids, ids[0])
    kw, _, _ = builtin_inputs(a, KIND, frames, PROMPT, None)
    kw["input_ids"] = ids
    kw["mm_token_type_ids"] = (ids == a.video_token_id).int() * 2
    with torch.no_grad():
        ref = a.model(**kw).logits[0, -1]
    torch.testing.assert_close(a.prefill(X, torch.arange(12), prompt, side=side).logits, ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- pruned: DeepStack of exactly the kept tokens
@pytest.mark.unit
def test_pruned_generate_matches_own_pieces(adapter):
    """Pruned prefill + greedy decoding == the model's own embeddings, positions and DeepStack
    features, hand-sliced to the kept tokens, through its language model (random masks)."""
    a = adapter
    frames = make_frames(6, seed=11)
    X, side = a.encode_video_with_side(frames)
    tn = X.shape[0] * X.shape[1]
    for seed in range(3):
        keep_index = random_keep(tn, seed)
        ref, first = reference_pruned_greedy(a, KIND, frames, keep_index, PROMPT, 5)
        pre = a.prefill(X, keep_index, PROMPT, side=side)
        assert pre.cache_length == pre.full_length - (tn - len(keep_index))
        torch.testing.assert_close(pre.logits, first, atol=ATOL, rtol=0)
        ours = a.generate_ids(X, keep_index, PROMPT, max_new_tokens=5, side=side)
        assert ours == ref[: len(ours)]


@pytest.mark.unit
def test_deepstack_slicing_is_what_the_reference_checks(tiny_mllm):
    """The reference tells a correct slicing from wrong ones: an adapter that hands the language
    model unsliced (the first k), another video's, zero or no DeepStack features misses it."""
    base = tiny_mllm(KIND)
    frames = make_frames(6, seed=11)
    X, side = base.encode_video_with_side(frames)
    _, other = base.encode_video_with_side(make_frames(6, seed=12))
    full = side["deepstack"].flatten(0, 1)
    tn = full.shape[0]
    keep_index = random_keep(tn, 5)
    assert keep_index[-1] >= len(keep_index)  # a pruned mask that is not a prefix
    _, first = reference_pruned_greedy(base, KIND, frames, keep_index, PROMPT, 1)

    def broken(levels):
        a = Qwen3VLAdapter(base.model, base.tokenizer, **FRAME)

        def lm_kwargs(self, batch):
            k = int(batch.visual_mask.sum())
            return {"visual_pos_masks": batch.visual_mask, "deepstack_visual_embeds": levels(k)} if levels else {}

        a._lm_kwargs = types.MethodType(lm_kwargs, a)
        return a.prefill(X, keep_index, PROMPT, side=side).logits

    good = base.prefill(X, keep_index, PROMPT, side=side).logits
    torch.testing.assert_close(good, first, atol=ATOL, rtol=0)
    wrong = {
        "unsliced": lambda k: [full[:k, lv] for lv in range(2)],
        "other video": lambda k: [other["deepstack"].flatten(0, 1)[keep_index, lv] for lv in range(2)],
        "zero": lambda k: [torch.zeros(k, 32)] * 2,
        "none": None,
    }
    for name, levels in wrong.items():
        diff = float((broken(levels) - first).abs().max())
        assert diff > 1e-3, (name, diff)


@pytest.mark.unit
def test_batched_rows_carry_their_own_deepstack(adapter):
    """A padded B*G batch hands the language model every row's kept DeepStack features, rows
    concatenated in order (how the text model reads ``hidden[visual_pos_masks]``); each row's CE
    equals its own single-row CE, and the batch's CE depends on the DeepStack features."""
    a = adapter
    enc = [a.encode_video_with_side(make_frames(4, seed=s)) for s in (1, 2)]
    X = torch.stack([x for x, _ in enc])
    ds = torch.stack([s["deepstack"] for _, s in enc])
    tn = X.shape[1] * X.shape[2]
    g = torch.Generator().manual_seed(9)
    keep = torch.rand(2, 3, tn, generator=g) < 0.5
    keep[:, :, 1] = True
    keep[0, 0] = True
    prompts, targets = [PROMPT, "which shape <video> moves left ?"], [TARGET, "a blue square moves left"]
    batch = a.masked_batch(X, keep, prompts, targets, side={"deepstack": ds})
    kw = a._lm_kwargs(batch)
    assert kw["visual_pos_masks"] is batch.visual_mask
    rows = [(b, j) for b in range(2) for j in range(3)]
    for lv in range(2):
        expect = torch.cat([ds[b].flatten(0, 1)[keep[b, j], lv] for b, j in rows])
        assert torch.equal(kw["deepstack_visual_embeds"][lv], expect)
    ce = a.score(X, keep, prompts, targets, side={"deepstack": ds})
    zero = a.score(X, keep, prompts, targets, side={"deepstack": torch.zeros_like(ds)})
    for b, j in rows:
        one = a.score(X[b : b + 1], keep[b : b + 1, j : j + 1], prompts[b : b + 1], targets[b : b + 1], side={"deepstack": ds[b : b + 1]})
        assert abs(float(one) - float(ce[b, j])) < ATOL, (b, j)
    assert float((zero - ce).abs().max()) > 1e-3  # the batched path runs DeepStack (tiny effect on some rows)


# ---------------------------------------------------------------- positions: one group per frame
@pytest.mark.unit
def test_mrope_positions_one_group_per_step(tiny_mllm):
    """get_rope_index treats every temporal step as its own group (its timestamp and markers are
    text): positions counted by hand on the full sequence, then sliced to the kept tokens."""
    a = tiny_mllm(KIND)
    X, side = a.encode_video_with_side(make_frames(6))
    T, N = X.shape[:2]
    tmpl = a._template(PROMPT, TARGET, T, N)
    expect, pos = [], 0
    i = 0
    ids, slots = tmpl.ids.tolist(), tmpl.slot.tolist()
    while i < len(ids):
        if slots[i] < 0:
            expect.append([pos] * 3)
            pos, i = pos + 1, i + 1
        else:  # a step: t id = its start, h/w ids = start + row/column; the run advances by max(gh, gw)
            expect += [[pos, pos + r // 3, pos + r % 3] for r in range(N)]
            pos, i = pos + 3, i + N
    expect = torch.tensor(expect).T  # [3, L]
    keep = torch.zeros(1, 1, T * N, dtype=torch.bool)
    kept = [1, 5, 6, 10, 17]
    keep[0, 0, kept] = True
    batch = a.masked_batch(X[None], keep, [PROMPT], [TARGET], side=one_batch(side))
    keep_full = tmpl.slot < 0
    keep_full[(tmpl.slot[:, None] == torch.tensor(kept)).any(1)] = True
    assert torch.equal(batch.position_ids[:, 0, : int(batch.lengths[0])], expect[:, keep_full])
    assert int(a.prefill(X, torch.tensor(kept), PROMPT, side=side).next_position_ids.flatten()[0]) == int(
        expect[:, : -len(a.tokenizer(TARGET, add_special_tokens=False)["input_ids"])].max()
    ) + 1


# ---------------------------------------------------------------- bad input
@pytest.mark.unit
@pytest.mark.parametrize(
    "indexes, depth, problem",
    [
        ([0, 2], 2, r"points past the vision tower's 2 layers"),
        ([1, 1], 2, r"repeats a layer"),
        ([0, 1, 2], 3, r"has 3 levels, more than the language model's 2 layers"),
    ],
)
def test_bad_deepstack_config(indexes, depth, problem):
    cfg, tok = tiny_moe(vision_layers=depth, deepstack_visual_indexes=indexes)
    cfg._attn_implementation = "sdpa"
    model = registry.family(KIND).model_class("qwen3_vl_moe")(cfg)
    msg = re.escape(f"Qwen3-VL DeepStack config: vision_config.deepstack_visual_indexes={indexes} ") + problem
    with pytest.raises(ValueError, match=msg):
        Qwen3VLAdapter(model, tok, **FRAME)


@pytest.mark.unit
def test_missing_deepstack_side_is_one_error(tiny_mllm):
    a = tiny_mllm(KIND)
    X, side = a.encode_video_with_side(make_frames(2))
    keep = torch.ones(1, 1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"Qwen3-VL needs its DeepStack side features: pass side=\.\.\. from encode_video_with_side"):
        a.score(X[None], keep, [PROMPT], [TARGET])
    with pytest.raises(ValueError, match=r"got shape \(1, 32\) per token"):
        a.prefill(X, torch.arange(6), PROMPT, side={"deepstack": side["deepstack"][:, :, :1]})
    with pytest.raises(ValueError, match="fps must be positive"):
        Qwen3VLAdapter(a.model, a.tokenizer, fps=0.0, **FRAME)
