"""LLaVA-OneVision-1.5 (RICE-ViT + Qwen3, 1-D RoPE) on a tiny random model of the real class.

Beyond the generic adapter tests (tests/test_mllm_adapters.py, which run for this kind too):
with the Qwen2-VL style chat template, the sequence the adapter builds equals the processor's
flow (render the template, expand ``<|video_pad|>``, tokenize); full-keep CE and logits equal the model's own forward on those inputs; pruned
greedy decoding equals a reference assembled by hand from the model's own pieces; X is the
model's own video (and per-frame image) features, in grid order; a frame size the grid cannot
take is one ValueError.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.mllm.loader import adapter_for
from tests.test_chat import QWEN2_VL_TEMPLATE
from tests.test_mllm_adapters import make_frames, reference_patchify

KIND = "llava_onevision1_5"
ATOL = 1e-5
PROMPT = "what color is the <video> circle ?"
TARGET = "red circle"
# the same user turn as the family's processor gets it: text, a video item, text
VIDEO_MSG = {"role": "user", "content": [{"type": "text", "text": "what color is the "}, {"type": "video"},
                                         {"type": "text", "text": " circle ?"}]}


@pytest.fixture(scope="module")
def chat_adapter(tiny_mllm, tmp_path_factory):
    """The tiny model with the Qwen2-VL style chat template in its directory (the template path)."""
    d = tmp_path_factory.mktemp("lo15")
    (d / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    a = tiny_mllm(KIND)
    return adapter_for(a.model, a.tokenizer, processor_dir=d, frame_size=(16, 24))


def processor_ids(a, messages: list[dict], n: int, generation: bool) -> torch.Tensor:
    """The processor flow: render the template over the conversation, replace ``<|video_pad|>`` by
    ``n`` of them, tokenize the text in one go (no whitespace after a final end-of-turn)."""
    text = a.tokenizer.apply_chat_template(messages, chat_template=QWEN2_VL_TEMPLATE, tokenize=False,
                                           add_generation_prompt=generation)
    text = text.replace("<|video_pad|>", "<|video_pad|>" * n)
    text = text if generation else text.rstrip()
    return torch.tensor(a.tokenizer(text, add_special_tokens=False)["input_ids"])


def own_video_features(a, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features [T*N, D], pixel_values_videos, video_grid_thw)`` from the model's own
    get_video_features on the documented patch layout (explicit loops, temporal patch 1)."""
    pixels = a.preprocess(frames)
    flat = reference_patchify(pixels, 1, a.patch, a.merge)
    grid = torch.tensor([[pixels.shape[0], pixels.shape[2] // a.patch, pixels.shape[3] // a.patch]])
    with torch.no_grad():
        feats = a.model.model.get_video_features(pixel_values_videos=flat, video_grid_thw=grid).pooler_output
    return torch.cat(feats), flat, grid


@pytest.mark.unit
def test_chat_layout_and_full_keep_equal_the_models_forward(chat_adapter):
    a = chat_adapter
    assert not a.chat.plain and a.chat_video_text == "<|video_pad|>" and a.position_dims == 1
    frames = make_frames(3)  # odd: no temporal patch, T' = T
    X = a.encode_video(frames)
    T, N = X.shape[:2]
    assert (T, N) == (3, 6)
    # the adapter's sequence is the processor's: the template's markers stay text, the pad becomes
    # T*N video tokens whose slots are the tokens of X in order
    ids = processor_ids(a, [VIDEO_MSG], T * N, True)
    tpl = a._template(PROMPT, None, T, N)
    assert torch.equal(tpl.ids, ids)
    video = ids == a.video_token_id
    assert torch.equal(tpl.slot[video], torch.arange(T * N)) and bool((tpl.slot[~video] == -1).all())
    start = int(video.nonzero()[0])
    cfg = a.model.config
    assert ids[start - 1] == cfg.vision_start_token_id and ids[start + T * N] == cfg.vision_end_token_id

    feats, flat, grid = own_video_features(a, frames)
    full = processor_ids(a, [VIDEO_MSG, {"role": "assistant", "content": TARGET}], T * N, False)
    t = a._template(PROMPT, TARGET, T, N)
    assert torch.equal(t.ids, full)
    assert a.tokenizer.convert_ids_to_tokens(full[t.target].tolist()) == ["red", "circle", "<|im_end|>"]
    labels = torch.where(t.target, full, -100)[None]
    with torch.no_grad():
        out = a.model(input_ids=full[None], pixel_values_videos=flat, video_grid_thw=grid, labels=labels)
        ref_logits = a.model(input_ids=ids[None], pixel_values_videos=flat, video_grid_thw=grid).logits[0, -1]
    keep = torch.ones(1, 1, T * N, dtype=torch.bool)
    ce = a.score(X[None], keep, [PROMPT], [TARGET])
    assert abs(float(out.loss) - float(ce[0, 0])) < ATOL
    pre = a.prefill(X, torch.arange(T * N), PROMPT)
    assert pre.cache_length == pre.full_length == ids.numel()
    torch.testing.assert_close(pre.logits, ref_logits.float(), atol=ATOL, rtol=0)
    assert pre.next_position_ids.tolist() == [[ids.numel()]]  # 1-D: the next id follows 0..L-1


@pytest.mark.unit
def test_pruned_generate_equals_a_reference_from_the_models_pieces(chat_adapter):
    a = chat_adapter
    frames = make_frames(4, seed=7)
    X = a.encode_video(frames)
    T, N = X.shape[:2]
    prompt = PROMPT
    keep_index = torch.tensor([0, 1, 7, 13, 14, 23])
    steps = 6

    # reference: embeddings of the processor's ids, the model's own video features scattered into
    # the video slots, pruned video slots dropped, positions = the full sequence's 0..L-1 sliced
    ids = processor_ids(a, [VIDEO_MSG], T * N, True)[None]
    feats, _, _ = own_video_features(a, frames)
    model = a.model
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        video = ids == a.video_token_id
        emb = emb.masked_scatter(video.unsqueeze(-1), feats)
        keep_full = ~video[0]
        keep_full[video[0].nonzero()[keep_index, 0]] = True
        emb = emb[:, keep_full]
        pos = torch.arange(ids.shape[1])[keep_full][None]
        nxt = ids.shape[1]
        ref, first = [], None
        for _ in range(steps):
            L = emb.shape[1]
            logits = model(inputs_embeds=emb, position_ids=pos, attention_mask=torch.ones(1, L, dtype=torch.long)).logits[0, -1]
            first = logits.float() if first is None else first
            tok = int(logits.argmax())
            ref.append(tok)
            emb = torch.cat([emb, model.get_input_embeddings()(torch.tensor([[tok]]))], dim=1)
            pos = torch.cat([pos, torch.tensor([[nxt]])], dim=1)
            nxt += 1

    ours = a.generate_ids(X, keep_index, prompt, max_new_tokens=steps)
    assert ours == ref[: len(ours)]
    pre = a.prefill(X, keep_index, prompt)
    torch.testing.assert_close(pre.logits, first, atol=ATOL, rtol=0)
    assert pre.cache_length == int(keep_full.sum()) and pre.full_length == ids.shape[1]
    # the masked batch carries exactly those positions: kept tokens keep their full-sequence ids
    keep = torch.zeros(1, 1, T * N, dtype=torch.bool)
    keep[0, 0, keep_index] = True
    batch = a.masked_batch(X[None], keep, [prompt])
    assert torch.equal(batch.position_ids[0], torch.arange(ids.shape[1])[keep_full])
    assert torch.equal(batch.inputs_embeds[0][batch.visual_mask[0]], X.flatten(0, 1)[keep_index])


@pytest.mark.unit
def test_X_is_the_models_own_video_and_image_features_in_grid_order(tiny_mllm):
    a = tiny_mllm(KIND)
    frames = make_frames(3, seed=2)
    X = a.encode_video(frames)
    pixels = a.preprocess(frames)
    # the adapter's patchify is the processor's documented layout (temporal patch 1)
    flat, grid = a.patchify(pixels)
    assert grid.tolist() == [[3, 4, 6]]
    torch.testing.assert_close(flat, reference_patchify(pixels, 1, a.patch, a.merge), atol=0, rtol=0)
    feats, _, _ = own_video_features(a, frames)
    torch.testing.assert_close(X, feats.view(3, 6, -1), atol=ATOL, rtol=0)
    # each frame is its own attention segment: the image path on one frame gives that frame's tokens
    for t in range(3):
        one = reference_patchify(pixels[t : t + 1], 1, a.patch, a.merge)
        with torch.no_grad():
            img = a.model.model.get_image_features(pixel_values=one, image_grid_thw=torch.tensor([[1, 4, 6]])).pooler_output[0]
        torch.testing.assert_close(X[t], img, atol=ATOL, rtol=0)

    # grid order, seen without attention mixing tokens: with no vision blocks every token depends
    # on its own 2x2 block of patches only, so a changed 8x8 pixel block (frame 1, block row 1,
    # block column 2) changes exactly token 1*3 + 2 of frame 1 (frames at the grid's 16x24: no
    # resize blurs the change into the next block)
    b = tiny_mllm(KIND, vision_layers=0)
    frames = make_frames(3, 16, 24, seed=4)
    base = b.encode_video(frames)
    moved = frames.clone()
    moved[1, 8:16, 16:24] = 255 - moved[1, 8:16, 16:24]
    changed = (b.encode_video(moved) - base).abs().amax(-1) > 1e-6
    expect = torch.zeros(3, 6, dtype=torch.bool)
    expect[1, 5] = True
    assert torch.equal(changed, expect)


@pytest.mark.unit
def test_frame_size_the_grid_cannot_take_is_one_value_error(tiny_mllm, tmp_path):
    a = tiny_mllm(KIND)
    model, tok = a.model, a.tokenizer
    for bad in [(20, 24), (16, 12), (0, 16)]:
        with pytest.raises(ValueError, match=rf"frame_size {bad[0]}x{bad[1]} must be positive multiples of patch_size\*merge_size = 8"):
            adapter_for(model, tok, frame_size=bad)
    # the processor config's size is the default, checked the same way
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"size": {"height": 24, "width": 32}}))
    assert adapter_for(model, tok, processor_dir=tmp_path).frame_size == (24, 32)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"size": {"height": 24, "width": 30}}))
    with pytest.raises(ValueError, match="frame_size 24x30 must be positive multiples"):
        adapter_for(model, tok, processor_dir=tmp_path)
    # min/max pixels only: smart_resize of a 16*f square, as for the real 448x448
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 64, "longest_edge": 64 * 64}}))
    assert adapter_for(model, tok, processor_dir=tmp_path).frame_size == (64, 64)
    # frames of any size are resized onto the grid: X's shape does not depend on the input size
    assert a.encode_video(make_frames(2, 37, 11)).shape == (2, 6, 32)
