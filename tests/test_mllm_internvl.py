"""InternVL (``InternVLForConditionalGeneration``) family proofs beyond the generic adapter tests.

The reference is transformers' own ``InternVLProcessor`` (real class) over the tiny tokenizer with
the InternVL chat template, and the model's own forward on what it returns. Its video
sub-processor is a stand-in: ``InternVLVideoProcessor`` imports torchvision at module import,
which is not installed here, so :class:`FramesProcessor` hands the processor the adapter's own
normalized frames (and the processor's class check of that one sub-processor, which goes through
the torchvision-gated video-processor registry, is skipped while it is built). The processor's
text expansion, pixel flattening and tokenization are the real ones; the resize/normalize
arithmetic is not checked against the real video processor.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
from transformers import InternVLForConditionalGeneration, InternVLProcessor, PreTrainedTokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.video_processing_utils import VideoProcessorMixin

from pipeline.mllm import registry
from pipeline.mllm.internvl import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, InternVLAdapter, frame_text

ATOL = 1e-5
QUESTION = "what color is the circle ?"
TARGET = "red circle"
# transformers' convert_internvl_weights_to_hf.py chat template (the one the -hf checkpoints ship)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def make_frames(t: int, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), generator=g, dtype=torch.uint8)


class FramesProcessor(VideoProcessorMixin):
    """Video sub-processor stand-in: ``pixel_values_videos[B, T, 3, S, S]`` from the adapter's
    preprocessing (one tile per frame, as InternVLVideoProcessor returns)."""

    def __init__(self, adapter: InternVLAdapter) -> None:
        super().__init__()
        self._adapter = adapter

    def __call__(self, videos, **kwargs) -> BatchFeature:
        return BatchFeature({"pixel_values_videos": torch.stack([self._adapter.preprocess(v) for v in videos])})


def internvl_tokenizer(tok) -> PreTrainedTokenizerFast:
    """The tiny vocabulary with the named tokens and chat template of a real InternVL3 -hf
    tokenizer and, like its Qwen2 tokenizer, no BOS (the chat template starts the text) and
    newlines as tokens (here ``<unk>``), so the frame separators are visible."""
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),  # blanks but newlines
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    out = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=tok.eos_token,
        pad_token=tok.pad_token, unk_token=tok.unk_token, start_image_token="<img>", end_image_token="</img>",
        context_image_token="<IMG_CONTEXT>", video_token="<video>", padding_side="right",
    )
    out.chat_template = CHAT_TEMPLATE
    return out


@pytest.fixture(scope="module")
def hf(tiny_mllm):
    """``(adapter over the chat template, InternVLProcessor)`` sharing the tiny model."""
    a = tiny_mllm("internvl")
    tok = internvl_tokenizer(a.tokenizer)
    chat = InternVLAdapter(a.model, tok)
    n = chat.visual_grid(1)[1] * chat.visual_grid(1)[2]
    # the processor checks its video sub-processor's class through the video-processor registry,
    # which is a torchvision-gated placeholder here: skip that one class check
    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, arg):
        return type(arg) if name == "video_processor" and isinstance(arg, FramesProcessor) else check(self, name, arg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProcessorMixin, "check_argument_for_proper_class", lenient)
        proc = InternVLProcessor(
            image_processor=GotOcr2ImageProcessorPil(), tokenizer=tok, video_processor=FramesProcessor(chat),
            image_seq_length=n, chat_template=CHAT_TEMPLATE,
        )
    return chat, proc


def processor_inputs(proc: InternVLProcessor, frames: torch.Tensor, target: str | None) -> dict:
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    if target is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": target}]})
    text = proc.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=target is None)
    if target is not None:  # a scored conversation ends with the answer's <|im_end|>
        assert text.endswith("<|im_end|>\n")
        text = text[:-1]
    assert text.count("<video>") == 1
    out = proc(text=[text], videos=[frames.numpy()], return_tensors="pt")
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"], "pixel_values": out["pixel_values"]}


def lm_inputs(a: InternVLAdapter, kw: dict) -> torch.Tensor:
    """The inputs_embeds the model's own forward hands its language model."""
    seen: dict = {}
    h = a.language_model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            a.model(**kw)
    finally:
        h.remove()
    return seen["inputs_embeds"]


@pytest.mark.unit
def test_video_layout_is_the_processors_replacement(hf):
    """``_video_layout(t, n)`` is ``"Frame{i+1}: <img>" + <IMG_CONTEXT>*n + "</img>"`` joined by
    newlines, with the context tokens as the slots of X in order and everything else text."""
    a, proc = hf
    assert a.chat_video_text == proc.video_token == "<video>"
    ids, slots = a._video_layout(11, 4)
    assert ids == a.tokenizer(frame_text(11, 4), add_special_tokens=False)["input_ids"]
    toks = a.tokenizer.convert_ids_to_tokens(ids)
    ctx4 = ["<IMG_CONTEXT>"] * 4
    assert toks[:18] == ["frame", "1", ":", "<img>", *ctx4, "</img>", "<unk>", "frame", "2", ":", "<img>", *ctx4]  # <unk>: "\n"
    assert toks[-12:] == ["</img>", "<unk>", "frame", "1", "1", ":", "<img>", *ctx4, "</img>"]
    ctx = [i for i, t in enumerate(ids) if t == a.image_token_id]
    assert [slots[i] for i in ctx] == list(range(44))
    assert all(s == -1 for i, s in enumerate(slots) if i not in set(ctx))


@pytest.mark.unit
def test_layout_and_scores_equal_the_hf_processor(hf):
    """The real InternVLProcessor (chat template, 11 frames: two-digit labels) gives the same token
    ids as the adapter; the model's own forward on its output gives the adapter's full-keep
    logits and target CE; its merged inputs carry X at the <IMG_CONTEXT> positions in order."""
    a, proc = hf
    frames = make_frames(11)
    X = a.encode_video(frames)
    T, N = X.shape[:2]
    assert (T, N) == (11, 4)
    prompt = "<video>" + QUESTION
    full = torch.ones(1, 1, T * N, dtype=torch.bool)

    kw = processor_inputs(proc, frames, None)
    torch.testing.assert_close(kw["pixel_values"], a.preprocess(frames), atol=0, rtol=0)  # one tile per frame, in order
    batch = a.masked_batch(X[None], full, [prompt])
    assert batch.input_ids[0].tolist() == kw["input_ids"][0].tolist()
    ctx = (kw["input_ids"][0] == a.image_token_id).nonzero()[:, 0]
    assert len(ctx) == T * N and torch.equal(ctx, batch.visual_mask[0].nonzero()[:, 0])
    torch.testing.assert_close(lm_inputs(a, kw)[0, ctx], X.flatten(0, 1), atol=ATOL, rtol=0)
    with torch.no_grad():
        ref = a.model(**kw).logits[0, -1].float()
    pre = a.prefill(X, torch.arange(T * N), prompt)
    assert pre.cache_length == pre.full_length == kw["input_ids"].shape[1]
    torch.testing.assert_close(pre.logits, ref, atol=ATOL, rtol=0)

    kw = processor_inputs(proc, frames, TARGET)
    batch = a.masked_batch(X[None], full, [prompt], [TARGET])
    assert batch.input_ids[0].tolist() == kw["input_ids"][0].tolist()
    tgt = batch.target_mask[0]
    assert a.tokenizer.convert_ids_to_tokens(batch.input_ids[0][tgt]) == ["red", "circle", "<|im_end|>"]
    labels = kw["input_ids"].masked_fill(~tgt[None], -100)
    with torch.no_grad():
        loss = a.model(labels=labels, **kw).loss
    ce = a.score(X[None], full, [prompt], [TARGET])
    assert abs(float(loss) - float(ce[0, 0])) < ATOL


@pytest.mark.unit
def test_pruned_greedy_equals_processor_reference(hf):
    """Pruned greedy decoding == greedy decoding from the model's own merged inputs on the
    processor's output, hand-pruned to the kept <IMG_CONTEXT> positions, with the full
    sequence's position ids (no cache)."""
    a, proc = hf
    frames = make_frames(3, seed=4)
    X = a.encode_video(frames)
    tn = X.shape[0] * X.shape[1]
    keep_index = torch.tensor([0, 3, 5, 6, tn - 1])
    prompt = "<video>" + QUESTION
    kw = processor_inputs(proc, frames, None)
    emb = lm_inputs(a, kw)
    L = emb.shape[1]
    ctx = (kw["input_ids"][0] == a.image_token_id).nonzero()[:, 0]
    keep = torch.ones(L, dtype=torch.bool)
    keep[ctx] = False
    keep[ctx[keep_index]] = True
    emb, pos = emb[:, keep], torch.arange(L)[keep][None]
    ref, nxt, first = [], L, None
    with torch.no_grad():
        for _ in range(6):
            logits = a.model(inputs_embeds=emb, position_ids=pos, attention_mask=torch.ones(1, emb.shape[1], dtype=torch.long)).logits
            first = logits[0, -1].float() if first is None else first
            tok = int(logits[0, -1].argmax())
            ref.append(tok)
            emb = torch.cat([emb, a.embed_tokens(torch.tensor([[tok]]))], dim=1)
            pos = torch.cat([pos, torch.tensor([[nxt]])], dim=1)
            nxt += 1
    ours = a.generate_ids(X, keep_index, prompt, max_new_tokens=6)
    assert ours == ref[: len(ours)]
    pre = a.prefill(X, keep_index, prompt)
    assert pre.cache_length == L - (tn - len(keep_index)) and int(pre.next_position_ids) == L
    torch.testing.assert_close(pre.logits, first, atol=ATOL, rtol=0)


@pytest.mark.unit
def test_pixel_shuffle_token_grid(tiny_mllm):
    """X is the model's own get_image_features per frame ([T, N, D]); with a patch-embedding-only
    tower each token sees exactly its 2x2 block of patches, so a change in patch (py, px) of
    frame f moves only token ``f, (py//2) * 2 + px//2``: the shuffled grid is row-major per frame."""
    a = tiny_mllm("internvl")
    frames = make_frames(3)
    pixels = a.preprocess(frames)
    with torch.no_grad():
        ref = a.model.get_image_features(pixel_values=pixels).pooler_output
    X = a.encode_video(frames)
    assert X.shape == (3, 4, 32)
    torch.testing.assert_close(X, ref, atol=0, rtol=0)

    z = tiny_mllm("internvl", vision_layers=0)
    px = z.preprocess(frames)
    with torch.no_grad():
        base = z._encode(px)
        for f in (0, 2):
            for py in range(4):
                for pxx in range(4):
                    moved = px.clone()
                    moved[f, :, 4 * py : 4 * py + 4, 4 * pxx : 4 * pxx + 4] += 0.5
                    changed = ((z._encode(moved) - base).abs().amax(-1) > 1e-6).nonzero().tolist()
                    assert changed == [[f, (py // 2) * 2 + pxx // 2]], (f, py, pxx, changed)


@pytest.mark.unit
def test_mean_std_default_and_from_the_preprocessor_config(tiny_mllm, tmp_path):
    a = tiny_mllm("internvl")
    frames = torch.full((1, 16, 16, 3), 128, dtype=torch.uint8)  # already at 16x16: no resize
    want = (128 / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(a.preprocess(frames)[0, :, 3, 5], want, atol=1e-6, rtol=0)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    b = InternVLAdapter(a.model, a.tokenizer, processor_dir=tmp_path)
    torch.testing.assert_close(b.preprocess(frames)[0, :, 3, 5], torch.full((3,), (128 / 255 - 0.5) / 0.25), atol=1e-6, rtol=0)


@pytest.mark.unit
def test_inputs_the_family_cannot_take(tiny_mllm):
    """Each is one ValueError naming the problem: frames, X grids, and vision configs whose
    tokens do not form InternVL's square pixel-shuffle grid."""
    a = tiny_mllm("internvl")
    with pytest.raises(ValueError, match="0 frames"):
        a.encode_video(make_frames(3)[:0])
    with pytest.raises(ValueError, match="too small"):
        a.encode_video(np.zeros((2, 1, 16, 3), np.uint8))
    X = a.encode_video(make_frames(2))
    with pytest.raises(ValueError, match=r"3 tokens per frame, this model's grid has 2x2 = 4"):
        a.score(X[None, :, :3], torch.ones(1, 1, 6, dtype=torch.bool), [QUESTION + " <video>"], [TARGET])

    fam = registry.family("internvl")

    def adapter_for(tokenizer=None, **changes):
        cfg, tok = fam.tiny(0)
        for k, v in changes.items():
            target = cfg.vision_config if k in ("image_size", "patch_size") else cfg
            setattr(target, k, v)
        return InternVLAdapter(InternVLForConditionalGeneration(cfg), tokenizer or tok)

    with pytest.raises(ValueError, match=r"pixel shuffle: a 3x3 patch grid .* downsample_ratio=0.5"):
        adapter_for(image_size=(12, 12))
    with pytest.raises(ValueError, match=r"image_size \(16, 20\) .* must be square"):
        adapter_for(image_size=(16, 20))
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        adapter_for(vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="no '<img>' token"):
        adapter_for(tokenizer=registry.tiny_tokenizer())
