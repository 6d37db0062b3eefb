"""Frozen-MLLM adapters on tiny random models of every registered family (CPU, float32).

The generic tests run over ``registry.kinds()``: a new family file is picked up with no edit
here. Their reference is the model's own forward on the inputs its processor would build
(``Family.processor_inputs``: expanded input_ids, pixel tensors, mm_token_type_ids), written
from the documented layouts, not through the adapter's own templates.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pipeline.config import ConfigError, MLLMConfig, load_config
from pipeline.mllm import registry
from pipeline.mllm.base import MLLMAdapter, MaskedBatch
from pipeline.mllm.llava_onevision import LlavaOnevisionAdapter
from pipeline.mllm.loader import inspect_model_dir, load_mllm

KINDS = registry.kinds()
PROMPT = "what color is the <video> circle ?"
TARGET = "red circle"
ATOL = 1e-5


def make_frames(t: int, h: int = 20, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), generator=g, dtype=torch.uint8)


def stack_side(sides: list[dict]) -> dict:
    """Per-video side features (``encode_video_with_side``) stacked into a batch's (``{}`` for most families)."""
    return {k: torch.stack([s[k] for s in sides]) for k in sides[0]} if sides and sides[0] else {}


def builtin_inputs(a: MLLMAdapter, kind: str, frames: torch.Tensor, prompt: str, target: str | None) -> tuple[dict, int, torch.Tensor]:
    """Processor-free inputs for the model's own forward: ``(kwargs, n_target_tokens,
    positions of X's tokens in input_ids)``."""
    tok = a.tokenizer
    before, after = prompt.split("<video>")
    pre = tok(before)["input_ids"]
    post = tok(after, add_special_tokens=False)["input_ids"]
    tgt = tok(target, add_special_tokens=False)["input_ids"] if target else []
    kw, x_positions = registry.family(kind).processor_inputs(a, a.preprocess(frames), pre, post + tgt)
    return kw, len(tgt), x_positions


def reference_patchify(pixels: torch.Tensor, tp: int, p: int, m: int) -> torch.Tensor:
    """Qwen2-VL's documented patch layout, by explicit loops: patches ordered (t, h-block, w-block,
    i, j), each flattened as (channel, temporal, py, px); odd frame counts repeat the last frame."""
    if pixels.shape[0] % tp:
        pixels = torch.cat([pixels, pixels[-1:].expand(tp - pixels.shape[0] % tp, -1, -1, -1)])
    T, C, H, W = pixels.shape
    rows = []
    for t in range(T // tp):
        for bh in range(H // p // m):
            for bw in range(W // p // m):
                for i in range(m):
                    for j in range(m):
                        y, x = (bh * m + i) * p, (bw * m + j) * p
                        patch = pixels[t * tp : (t + 1) * tp, :, y : y + p, x : x + p]  # [tp, C, p, p]
                        rows.append(patch.permute(1, 0, 2, 3).reshape(-1))
    return torch.stack(rows)


@pytest.mark.unit
def test_word_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    from pipeline.mllm.tokenizer import build_word_tokenizer

    tok = build_word_tokenizer(["A", "red", "circle", "moves", "left"], ["<video>", "<image>"])
    enc = tok("A red <video>circle, 2 zebras?")["input_ids"]
    assert tok.convert_ids_to_tokens(enc) == ["<bos>", "a", "red", "<video>", "circle", ",", "2", "<unk>", "?"]
    assert tok.decode(enc, skip_special_tokens=True) == "a red circle, 2?"
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("A red <video>circle, 2 zebras?")["input_ids"] == enc
    assert again.convert_tokens_to_ids("<video>") == tok.convert_tokens_to_ids("<video>")
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)
    with pytest.raises(ValueError, match="word list is empty"):
        build_word_tokenizer([], ["<video>"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.unit
def test_full_keep_equals_builtin_forward(tiny_mllm, kind):
    a = tiny_mllm(kind)
    frames = make_frames(5)  # odd: a family with temporal patches pads like its processor
    X, side = a.encode_video_with_side(frames)  # side: per-token features some families need (DeepStack)
    t, gh, gw = a.visual_grid(frames.shape[0])
    assert X.shape == (t, gh * gw, 32) and not X.is_inference() and not X.requires_grad
    keep = torch.ones(1, 1, X.shape[0] * X.shape[1], dtype=torch.bool)
    ce = a.score(X[None], keep, [PROMPT], [TARGET], side=stack_side([side]))

    kw, nt, _ = builtin_inputs(a, kind, frames, PROMPT, TARGET)
    labels = kw["input_ids"].clone()
    labels[:, :-nt] = -100
    with torch.no_grad():
        out = a.model(labels=labels, **kw)
    assert ce.dtype == torch.float32 and ce.shape == (1, 1)
    assert abs(float(out.loss) - float(ce[0, 0])) < ATOL

    # next-token logits of the prompt (no target) == built-in forward's last logits
    kw, _, _ = builtin_inputs(a, kind, frames, PROMPT, None)
    with torch.no_grad():
        ref = a.model(**kw).logits[0, -1]
    pre = a.prefill(X, torch.arange(X.shape[0] * X.shape[1]), PROMPT, side=side)
    assert pre.cache_length == pre.full_length == kw["input_ids"].shape[1]
    torch.testing.assert_close(pre.logits, ref.float(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.unit
def test_full_keep_generate_equals_builtin_generate(tiny_mllm, kind):
    a = tiny_mllm(kind)
    frames = make_frames(4)
    X, side = a.encode_video_with_side(frames)
    ours = a.generate_ids(X, torch.arange(X.shape[0] * X.shape[1]), PROMPT, max_new_tokens=6, side=side)
    kw, _, _ = builtin_inputs(a, kind, frames, PROMPT, None)
    L = kw["input_ids"].shape[1]
    with torch.no_grad():
        ref = a.model.generate(**kw, max_new_tokens=6, do_sample=False)[0, L:].tolist()
    n = len(ours)
    assert ours == ref[:n]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.unit
def test_batched_masks_equal_single_masks(tiny_mllm, kind):
    a = tiny_mllm(kind)
    enc = [a.encode_video_with_side(make_frames(4, seed=s)) for s in (1, 2)]
    X, side = torch.stack([x for x, _ in enc]), stack_side([s for _, s in enc])
    tn = X.shape[1] * X.shape[2]
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(2, 4, tn, generator=g) < 0.5
    keep[:, 0] = True  # one full mask
    keep[:, :, 0] = True  # never empty
    prompts = [PROMPT, "which shape <video> moves left ?"]
    targets = [TARGET, "a blue square moves left"]
    ce = a.score(X, keep, prompts, targets, side=side)
    assert ce.shape == (2, 4)
    for b in range(2):
        for j in range(4):
            one_side = {k: v[b : b + 1] for k, v in side.items()}
            one = a.score(X[b : b + 1], keep[b : b + 1, j : j + 1], prompts[b : b + 1], targets[b : b + 1], side=one_side)
            assert abs(float(one) - float(ce[b, j])) < ATOL, (b, j)
    # the padded batch the LM sees has one row per (sample, mask)
    batch = a.masked_batch(X, keep, prompts, targets, side=side)
    assert batch.inputs_embeds.shape[0] == 8
    assert torch.equal(batch.attention_mask.sum(1), batch.lengths)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.unit
def test_option_logprobs_batched(tiny_mllm, kind):
    a = tiny_mllm(kind)
    X, side = a.encode_video_with_side(make_frames(4))
    tn = X.shape[0] * X.shape[1]
    keep_index = torch.arange(0, tn, 3)
    options = ["red", "blue square", "a green cross moves"]
    lp = a.option_logprobs(X, keep_index, PROMPT, options, side=side)
    keep = torch.zeros(1, 1, tn, dtype=torch.bool)
    keep[0, 0, keep_index] = True
    for i, o in enumerate(options):
        n = len(a.tokenizer(o, add_special_tokens=False)["input_ids"])
        ce = a.score(X[None], keep, [PROMPT], [o], side=stack_side([side]))
        assert abs(float(lp[i]) + n * float(ce)) < 1e-4


def own_lm_inputs(a: MLLMAdapter, kw: dict, seen: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs_embeds, position_ids)`` that the model's own forward hands its language model:
    the built-in merge of the built-in visual features and the model's own positions (``seen``,
    if given, receives every keyword argument of that call, e.g. DeepStack's)."""
    seen = {} if seen is None else seen

    def grab(module, args, kwargs):
        seen.update(kwargs)

    h = a.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            a.model(**kw)
    finally:
        h.remove()
    emb, pos = seen["inputs_embeds"], seen.get("position_ids")
    if pos is None:  # the language model's own default: 0..L-1
        pos = torch.arange(emb.shape[1]).unsqueeze(0)
    return emb, pos


def reference_pruned_greedy(a: MLLMAdapter, kind: str, frames, keep_index, prompt, steps) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding from the model's own pieces, without a cache: the inputs its own forward
    gives its language model (built-in merge, full-sequence position ids), hand-pruned to the kept
    tokens, then the model's own forward on ``inputs_embeds`` with explicit position ids.
    Returns the token ids and the first step's logits."""
    kw, _, x_positions = builtin_inputs(a, kind, frames, prompt, None)
    model = a.model
    seen: dict = {}
    emb, pos = own_lm_inputs(a, kw, seen)
    deepstack = seen.get("deepstack_visual_embeds")  # Qwen3-VL: per-level features of the visual positions
    with torch.no_grad():
        nxt = int(pos.max()) + 1  # the next token follows the FULL sequence's positions
        keep_full = torch.ones(emb.shape[1], dtype=torch.bool)
        keep_full[x_positions] = False
        keep_full[x_positions[keep_index]] = True  # always-kept extras (LLaVA-OV's newline) stay
        emb = emb[:, keep_full]
        pos = pos[..., keep_full]
        if deepstack is not None:  # the model's own DeepStack features of exactly the kept visual positions
            vis_mask = seen["visual_pos_masks"]
            deepstack = [d[keep_full[vis_mask[0]]] for d in deepstack]
            vis_mask = vis_mask[:, keep_full]
        out, first = [], None
        for _ in range(steps):
            L = emb.shape[1]
            am = torch.ones(1, L, dtype=torch.long)
            if deepstack is None:
                logits = model(inputs_embeds=emb, position_ids=pos, attention_mask=am).logits
            else:  # the model's forward cannot take DeepStack inputs with inputs_embeds: its own LM + head
                ds = dict(visual_pos_masks=vis_mask, deepstack_visual_embeds=deepstack)
                logits = a.lm_head(a.language_model(inputs_embeds=emb, position_ids=pos, attention_mask=am, **ds).last_hidden_state)
                vis_mask = torch.cat([vis_mask, torch.zeros_like(vis_mask[:, :1])], dim=1)
            first = logits[0, -1].float() if first is None else first
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            emb = torch.cat([emb, model.get_input_embeddings()(torch.tensor([[tok]]))], dim=1)
            new = torch.full_like(pos[..., :1], nxt)
            pos = torch.cat([pos, new], dim=-1)
            nxt += 1
    return out, first


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.unit
def test_pruned_generate_matches_reference(tiny_mllm, kind):
    a = tiny_mllm(kind)
    frames = make_frames(4, seed=5)
    X, side = a.encode_video_with_side(frames)
    tn = X.shape[0] * X.shape[1]
    keep_index = torch.tensor(sorted({0, 2, 3, tn // 2, tn - 1}))
    ours = a.generate_ids(X, keep_index, PROMPT, max_new_tokens=5, side=side)
    ref, first_logits = reference_pruned_greedy(a, kind, frames, keep_index, PROMPT, 5)
    assert ours == ref[: len(ours)]
    pre = a.prefill(X, keep_index, PROMPT, side=side)
    assert pre.cache_length == pre.full_length - (tn - len(keep_index))
    torch.testing.assert_close(pre.logits, first_logits, atol=ATOL, rtol=0)
    text = a.generate(X, keep_index, PROMPT, max_new_tokens=5, side=side)
    assert isinstance(text, str)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.unit
def test_qwen_mrope_positions_of_kept_tokens_are_original(tiny_mllm, kind):
    a = tiny_mllm(kind)
    frames = make_frames(6)
    X = a.encode_video(frames)  # T'=3, grid 2x3
    T2, N = X.shape[:2]
    assert (T2, N) == (3, 6)
    keep = torch.zeros(1, 1, T2 * N, dtype=torch.bool)
    kept = [1, 5, 6, 10, 17]
    keep[0, 0, kept] = True
    batch = a.masked_batch(X[None], keep, [PROMPT], [TARGET])
    pos = batch.position_ids[:, 0, : int(batch.lengths[0])]  # [3, L_kept]
    kw, _, _ = builtin_inputs(a, kind, frames, PROMPT, TARGET)
    start = len(a.tokenizer("what color is the ")["input_ids"])  # text before the video
    interval = 2 * (2 / 2.0) if kind == "qwen2_5_vl" else 1  # tokens_per_second * temporal_patch / fps
    for i, j in enumerate(kept):
        t, r = divmod(j, N)
        h, w = divmod(r, 3)
        expect = [start + int(t * interval), start + h, start + w]
        assert pos[:, start + i].tolist() == expect, (j, pos[:, start + i].tolist(), expect)
    # the whole kept sequence equals the model's own get_rope_index on the full sequence, sliced
    extra = {"second_per_grid_ts": kw["second_per_grid_ts"]} if "second_per_grid_ts" in kw else {}
    full, _ = a.model.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], video_grid_thw=kw["video_grid_thw"], **extra)
    vis = (kw["input_ids"][0] == a.video_token_id).nonzero()[:, 0]
    keep_full = kw["input_ids"][0] != a.video_token_id
    keep_full[vis[kept]] = True
    assert torch.equal(pos, full[:, 0, keep_full])
    # text positions after the video are those of the full sequence (not shifted by pruning)
    assert pos[:, -1].tolist() == full[:, 0, -1].tolist()


@pytest.mark.parametrize("kind", ["llava_onevision", "qwen2_vl"])
@pytest.mark.unit
def test_compact_positions(tiny_mllm, kind):
    a = tiny_mllm(kind, compact_positions=True)
    X = a.encode_video(make_frames(4))
    tn = X.shape[0] * X.shape[1]
    keep = torch.zeros(1, 2, tn, dtype=torch.bool)
    keep[0, 0, ::3] = True
    keep[0, 1, :2] = True
    batch = a.masked_batch(X[None], keep, [PROMPT], [TARGET])
    for r in range(2):
        L = int(batch.lengths[r])
        pos = batch.position_ids[..., r, :L]
        assert torch.equal(pos, torch.arange(L).expand_as(pos))
    pre = a.prefill(X, torch.tensor([0, 1]), PROMPT)
    assert int(pre.next_position_ids.flatten()[0]) == pre.cache_length
    # default (original ids): text after the video continues from the unpruned length
    b = tiny_mllm(kind).masked_batch(X[None], keep, [PROMPT], [TARGET])
    L = int(b.lengths[1])
    full_len = int(tiny_mllm(kind).masked_batch(X[None], torch.ones(1, 1, tn, dtype=torch.bool), [PROMPT], [TARGET]).lengths[0])
    if kind == "llava_onevision":
        assert int(b.position_ids[1, L - 1]) == full_len - 1


@pytest.mark.unit
def test_llava_zero_layer_vision_tower(tiny_mllm):
    """score-tiny's layout: SigLIP with zero encoder layers (patch embedding only). The built-in
    get_video_features fails there in transformers 5.24 (hidden states are collected by hooks
    on encoder layers); the adapter computes the embeddings output by hand."""
    from pipeline.mllm.llava_onevision import _video_features_from_embeddings, video_features

    # the by-hand path equals the built-in one where both exist: 1-layer tower, layer 0
    one = tiny_mllm("llava_onevision", vision_layers=1)
    pv = one.preprocess(make_frames(3))[None]
    inner = one.model.model
    inner.config.vision_feature_layer = [0]  # (a bare 0 is falsy for transformers' output_hidden_states)
    try:
        with torch.no_grad():
            ref = inner.get_video_features(pixel_values_videos=pv).pooler_output
            mine = _video_features_from_embeddings(inner, pv)
    finally:
        inner.config.vision_feature_layer = -1
    torch.testing.assert_close(mine, ref, atol=ATOL, rtol=0)

    a = tiny_mllm("llava_onevision", vision_layers=0)
    frames = make_frames(3)
    X = a.encode_video(frames)
    assert X.shape == (3, 4, 32)
    ce = a.score(X[None], torch.ones(1, 1, 12, dtype=torch.bool), [PROMPT], [TARGET])
    # built-in forward with the features passed in (its pixel path cannot run with 0 layers)
    kw, nt, _ = builtin_inputs(a, "llava_onevision", frames, PROMPT, TARGET)
    pixels = kw.pop("pixel_values_videos")
    with torch.no_grad():
        feats = video_features(a.model, pixels)
        labels = kw["input_ids"].clone()
        labels[:, :-nt] = -100
        out = a.model(labels=labels, mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=feats)}, **kw)
    assert abs(float(out.loss) - float(ce)) < ATOL
    assert isinstance(a.generate(X, torch.tensor([1, 5]), PROMPT, max_new_tokens=3), str)


@pytest.mark.unit
def test_qwen_patch_layout_matches_documented_layout(tiny_mllm):
    a = tiny_mllm("qwen2_vl")
    pixels = a.preprocess(make_frames(3))
    flat, grid = a.patchify(pixels)
    assert grid.tolist() == [[2, 4, 6]]
    torch.testing.assert_close(flat, reference_patchify(pixels, 2, 4, 2), atol=0, rtol=0)


@pytest.mark.unit
def test_encode_video_independent_of_batching_and_input_types(tiny_mllm):
    a = tiny_mllm("llava_onevision")
    frames = make_frames(3)
    X = a.encode_video(frames)
    torch.testing.assert_close(a.encode_video(frames.numpy()), X, atol=0, rtol=0)
    torch.testing.assert_close(a.encode_video(list(frames.numpy())), X, atol=0, rtol=0)
    torch.testing.assert_close(a.encode_video(frames[1:2]), X[1:2], atol=ATOL, rtol=0)  # frames are independent


@pytest.mark.unit
def test_read_only_frames(tiny_mllm):
    """A read-only array (a decoded or Arrow-backed video) is copied, not shared: no warning."""
    a = tiny_mllm("llava_onevision")
    frames = make_frames(2).numpy()
    X = a.encode_video(frames)
    frames.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(a.encode_video(frames), X, atol=0, rtol=0)
        torch.testing.assert_close(a.encode_video(list(frames)), X, atol=0, rtol=0)


# ---------------------------------------------------------------- the registry
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.unit
def test_family_registration(tiny_mllm, kind):
    fam = registry.family(kind)
    a = tiny_mllm(kind)
    model_type = a.model.config.model_type
    assert type(a) is fam.adapter and model_type in fam.models
    assert type(a.model) is fam.model_class(model_type)  # the tiny model is the real class
    for mt in fam.model_types:
        assert registry.for_model_type(mt) is fam and fam.model_class(mt).__name__ == fam.models[mt]
    assert MLLMConfig(kind=kind).kind == kind


@pytest.mark.unit
def test_discovery_imports_every_family_module():
    """pkgutil finds every family file of pipeline/mllm: each non-shared module registers one."""
    import pkgutil

    import pipeline.mllm as pkg

    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)} - registry._SHARED
    assert {f.adapter.__module__.rsplit(".", 1)[1] for f in registry.families().values()} == modules
    assert pkg.Qwen25VLAdapter is registry.family("qwen2_5_vl").adapter  # by name, without a list


@pytest.mark.unit
def test_stage_checks_the_model_before_any_ray_work(tiny_mllm, tmp_path):
    """``check_model_dir`` (run first by ``run_stage``): an unsupported class, a config the family
    cannot serve (Qwen3-VL's DeepStack layers) and a frame count that is not a multiple of the
    temporal patch are one-line errors, before a Ray cluster is touched."""
    from actors.stage import run_stage
    from pipeline.mllm.loader import check_model_dir

    a = tiny_mllm("qwen3_vl")
    d = tmp_path / "qwen3"
    a.model.save_pretrained(d)
    a.tokenizer.save_pretrained(d)
    ok = load_config(None, [f"mllm.path={d}", "data.video_frames=4", "data.pseudo_repeat=2"])
    check_model_dir(ok)
    for key, value in (("data.video_frames", 5), ("data.pseudo_repeat", 3)):
        cfg = load_config(None, [f"mllm.path={d}", "data.video_frames=4", "data.pseudo_repeat=2", f"{key}={value}"])
        with pytest.raises(ConfigError, match=rf"^{key}={value}: .* merges every 2 frames into one token step; use a multiple of 2$"):
            check_model_dir(cfg)
        with pytest.raises(ConfigError, match=rf"^{key}={value}"):
            run_stage(cfg, "pseudo_video", log=None)
    config = json.loads((d / "config.json").read_text())
    config["vision_config"]["deepstack_visual_indexes"] = [0, 7]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"deepstack_visual_indexes=\[0, 7\] points past the vision tower's 2 layers"):
        check_model_dir(ok)
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a supported multimodal LLM: config.json has model_type='bert'"):
        check_model_dir(ok)
    # the project's own score-tiny (LLaVA-OneVision, no temporal patch) takes any count
    a = tiny_mllm("llava_onevision")
    d = tmp_path / "llava"
    a.model.save_pretrained(d)
    a.tokenizer.save_pretrained(d)
    check_model_dir(load_config(None, [f"mllm.path={d}", "data.video_frames=5", "data.pseudo_repeat=3"]))


@pytest.mark.unit
def test_unknown_kind_is_one_config_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["mllm.kind=qwen9_vl"])
    msg = str(e.value)
    assert msg.startswith(f"config: mllm.kind: not a registered MLLM kind; known: auto, {', '.join(KINDS)}") and "\n" not in msg
    assert MLLMConfig().kind == "auto"


@pytest.mark.unit
def test_register_a_family(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry.families()))  # restored afterwards

    class Mine(LlavaOnevisionAdapter):
        pass

    stub = dict(tiny=registry.family("llava_onevision").tiny, processor_inputs=registry.family("llava_onevision").processor_inputs)
    with pytest.raises(ValueError, match="'qwen2_vl' is registered twice"):
        registry.register("qwen2_vl", models={"mine_vl": "LlavaOnevisionForConditionalGeneration"}, **stub)(Mine)
    with pytest.raises(ValueError, match=r"model_type \['smolvlm'\] claimed by MLLM kinds 'idefics3' and 'mine'"):
        registry.register("mine", models={"smolvlm": "LlavaOnevisionForConditionalGeneration"}, **stub)(Mine)
    registry.register("mine", models={"llava_onevision_mine": "LlavaOnevisionForConditionalGeneration"}, **stub)(Mine)
    assert "mine" in registry.kinds() and registry.for_model_type("llava_onevision_mine").adapter is Mine
    assert MLLMConfig(kind="mine").kind == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_family_loads_from_a_checkpoint_dir(tiny_mllm, kind, tmp_path):
    src = tiny_mllm(kind)
    src.model.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    assert inspect_model_dir(tmp_path / "m") == (kind, src.model.config.model_type)
    fam = registry.family(kind)
    frames = make_frames(4)
    X, side = src.encode_video_with_side(frames)
    side = stack_side([side])
    keep = torch.ones(1, 1, X.shape[0] * X.shape[1], dtype=torch.bool)
    keep[0, 0, 1::2] = False
    for k in ("auto", kind):
        a = load_mllm(MLLMConfig(path=str(tmp_path / "m"), kind=k), device="cpu", **fam.tiny_adapter_kwargs)
        assert type(a) is fam.adapter
        torch.testing.assert_close(a.encode_video(frames), X, atol=ATOL, rtol=0)
        torch.testing.assert_close(
            a.score(X[None], keep, [PROMPT], [TARGET], side=side), src.score(X[None], keep, [PROMPT], [TARGET], side=side), atol=ATOL, rtol=0
        )


# ---------------------------------------------------------------- side features and LM kwargs hooks
class SideProbe(LlavaOnevisionAdapter):
    """LLaVA-OV that emits two side features per visual token (``id``: 1 + the token's flat index,
    ``[T', N]``; ``vec``: ``[T', N, 3]``) and asks for the kept ones (and the visual mask) as
    language-model kwargs. :meth:`recording` takes them off the call before the real LM runs."""

    def _encode(self, pixels):
        X = super()._encode(pixels)
        T, N = X.shape[:2]
        ids = torch.arange(1, T * N + 1).view(T, N)
        return X, {"id": ids, "vec": torch.stack([ids, -ids, 2 * ids], dim=-1).float()}

    def _lm_kwargs(self, batch: MaskedBatch) -> dict:
        return {"probe_side": batch.side, "probe_visual": batch.visual_mask}

    def recording(self):
        calls: list[dict] = []

        def take(module, args, kwargs):
            if "probe_visual" in kwargs:
                calls.append({k: kwargs.pop(k) for k in ("probe_side", "probe_visual")})
            return args, kwargs

        return calls, self.language_model.register_forward_pre_hook(take, with_kwargs=True)


@pytest.mark.unit
def test_side_features_are_kept_with_the_tokens(tiny_mllm):
    base = tiny_mllm("llava_onevision")
    a = SideProbe(base.model, base.tokenizer)
    frames = [make_frames(3, seed=s) for s in (1, 2)]
    X, side = a.encode_video_with_side(frames[0])
    assert torch.equal(X, a.encode_video(frames[0])) and torch.equal(X, base.encode_video(frames[0]))
    assert side["id"].shape == (3, 4) and side["vec"].shape == (3, 4, 3)
    Xb = torch.stack([a.encode_video(f) for f in frames])
    tn = 12
    # per sample: different ids (sample 1 adds 100), one as [B, T', N], one flat as [B, T'*N, 3]
    ids = torch.stack([side["id"], side["id"] + 100])
    vec = torch.stack([side["vec"], side["vec"] + 100]).flatten(1, 2)
    keep = torch.zeros(2, 3, tn, dtype=torch.bool)
    keep[:, 0] = True  # all 12
    keep[0, 1, [0, 5, 11]] = True
    keep[1, 1, [3]] = True
    keep[0, 2, 1::2] = True
    keep[1, 2, :7] = True
    prompts = [PROMPT, "which shape <video> moves left and then right ?"]  # rows of different lengths
    targets = [TARGET, "a blue square"]
    calls, hook = a.recording()
    try:
        ce = a.score(Xb, keep, prompts, targets, side={"id": ids, "vec": vec})
        batch = a.masked_batch(Xb, keep, prompts, targets, side={"id": ids, "vec": vec})
    finally:
        hook.remove()
    # the hooks change nothing for the LM: the same CE as the plain adapter
    torch.testing.assert_close(ce, base.score(Xb, keep, prompts, targets), atol=ATOL, rtol=0)
    (got,) = calls
    vis, kept_ids, kept_vec = got["probe_visual"], got["probe_side"]["id"], got["probe_side"]["vec"]
    assert torch.equal(vis, batch.visual_mask) and torch.equal(kept_ids, batch.side["id"])
    assert len(set(batch.lengths.tolist())) > 2  # padding is in play
    for r in range(6):
        b, g = divmod(r, 3)
        m, L = vis[r], int(batch.lengths[r])
        assert torch.equal(kept_ids[r][m], ids[b].flatten()[keep[b, g]])  # the same keep mask as X ...
        assert torch.equal(kept_vec[r][m], vec[b][keep[b, g]])
        assert torch.equal(batch.inputs_embeds[r][m], Xb[b].flatten(0, 1)[keep[b, g]])  # ... whose tokens sit there
        assert not m[L:].any() and not kept_ids[r][~m].any() and not kept_vec[r][~m].any()  # padding, text, newline: 0
    # all rows at once, in order: the layout DeepStack-style kwargs take
    assert torch.equal(kept_ids[vis], torch.cat([ids[r // 3].flatten()[keep[r // 3, r % 3]] for r in range(6)]))

    # prefill / generate / option_logprobs: one video, side as [T', N, ...] or flat
    keep_index = torch.tensor([0, 2, 3, 9])
    calls, hook = a.recording()
    try:
        pre = a.prefill(X, keep_index, PROMPT, side=side)
        out = a.generate_ids(X, keep_index, PROMPT, max_new_tokens=4, side={k: v.flatten(0, 1) for k, v in side.items()})
        a.option_logprobs(X, keep_index, PROMPT, ["red", "blue square"], side=side)
    finally:
        hook.remove()
    assert len(calls) == 3  # decode steps carry no visual token: no hook call
    for c in calls:
        for r in range(c["probe_visual"].shape[0]):
            m = c["probe_visual"][r]
            assert torch.equal(c["probe_side"]["id"][r][m], keep_index + 1)
            assert torch.equal(c["probe_side"]["vec"][r][m], side["vec"].flatten(0, 1)[keep_index])
    torch.testing.assert_close(pre.logits, base.prefill(X, keep_index, PROMPT).logits, atol=0, rtol=0)
    assert out == base.generate_ids(X, keep_index, PROMPT, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"side feature 'id' must have shape \[B, T', N, \.\.\.\] = \(2, 3, 4\)"):
        a.score(Xb, keep, prompts, targets, side={"id": ids[:, :2]})
    with pytest.raises(ValueError, match=r"side feature 'id' must have shape \[T', N, \.\.\.\]"):
        a.prefill(X, keep_index, PROMPT, side={"id": side["id"][None]})


@pytest.mark.unit
def test_no_side_features_by_default(tiny_mllm):
    a = tiny_mllm("llava_onevision")
    X, side = a.encode_video_with_side(make_frames(3))
    assert side == {}
    keep = torch.ones(1, 2, 12, dtype=torch.bool)
    keep[0, 1, 4:] = False
    batch = a.masked_batch(X[None], keep, [PROMPT], [TARGET])
    assert batch.side == {} and a._lm_kwargs(batch) == {}
    # the visual mask marks the kept tokens of X: video tokens but the trailing image_newline
    video = batch.input_ids == a.video_token_id
    assert batch.visual_mask.sum(1).tolist() == [12, 4] and torch.equal(batch.visual_mask, video & (video.cumsum(1) < video.sum(1, keepdim=True)))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kind", ["llava_onevision", "idefics3"])
@pytest.mark.unit
def test_bad_frames(tiny_mllm, kind):
    a = tiny_mllm(kind)
    good = make_frames(2)
    with pytest.raises(ValueError, match=r"shape \[T, H, W, 3\]"):
        a.encode_video(good.permute(0, 3, 1, 2).contiguous())  # channels first
    with pytest.raises(ValueError, match=r"shape \[T, H, W, 3\]"):
        a.encode_video(good[0])  # one frame without the T axis
    with pytest.raises(TypeError, match="uint8"):
        a.encode_video(good.float() / 255)
    with pytest.raises(ValueError, match="0 frames"):
        a.encode_video(good[:0])
    with pytest.raises(ValueError, match="different sizes"):
        a.encode_video([np.zeros((16, 16, 3), np.uint8), np.zeros((16, 20, 3), np.uint8)])
    with pytest.raises(ValueError, match="too small"):
        a.encode_video(np.zeros((2, 1, 16, 3), np.uint8))
    a.max_frames = 3
    try:
        with pytest.raises(ValueError, match="at most 3"):
            a.encode_video(make_frames(4))
    finally:
        a.max_frames = None


@pytest.mark.parametrize("kind", ["llava_onevision", "qwen2_vl"])
@pytest.mark.unit
def test_bad_prompts_masks_and_tokens(tiny_mllm, kind):
    a = tiny_mllm(kind)
    X = a.encode_video(make_frames(4))
    tn = X.shape[0] * X.shape[1]
    full = torch.ones(1, 2, tn, dtype=torch.bool)
    with pytest.raises(ValueError, match="placeholder '<video>' exactly once, found 0"):
        a.score(X[None], full, ["what color is it ?"], [TARGET])
    with pytest.raises(ValueError, match="exactly once, found 2"):
        a.prefill(X, torch.arange(tn), "<video> and <video>")
    zero = full.clone()
    zero[0, 1] = False
    with pytest.raises(ValueError, match="all-zero keep mask: sample 0, mask 1"):
        a.score(X[None], zero, [PROMPT], [TARGET])
    with pytest.raises(ValueError, match=r"keep mask must have shape"):
        a.score(X[None], full[..., :-1], [PROMPT], [TARGET])
    with pytest.raises(ValueError, match="keep_index is empty"):
        a.prefill(X, torch.tensor([], dtype=torch.long), PROMPT)
    with pytest.raises(ValueError, match="sorted"):
        a.generate(X, torch.tensor([3, 1]), PROMPT)
    with pytest.raises(ValueError, match="out of range"):
        a.prefill(X, torch.tensor([0, tn]), PROMPT)
    with pytest.raises(ValueError, match="embedding width"):
        a.score(X[None, ..., :-1], full, [PROMPT], [TARGET])
    with pytest.raises(ValueError, match="tokens per frame"):
        a.score(X[None, :, :-1], full[..., : X.shape[0] * (X.shape[1] - 1)], [PROMPT], [TARGET])
    with pytest.raises(ValueError, match="2 prompts for a batch of 1"):
        a.score(X[None], full, [PROMPT, PROMPT], [TARGET])
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        a.score(X[None], full, [PROMPT], [""])


@pytest.mark.unit
def test_loader_roundtrip_and_not_an_mllm(tiny_mllm, tmp_path):
    from transformers import LlamaConfig

    src = tiny_mllm("llava_onevision", vision_layers=0)
    d = tmp_path / "score-tiny-like"
    src.model.save_pretrained(d)
    src.tokenizer.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    assert inspect_model_dir(d) == ("llava_onevision", "llava_onevision")
    a = load_mllm(MLLMConfig(path=str(d)), cache_dir=tmp_path / "cache", device="cpu")
    assert type(a).__name__ == "LlavaOnevisionAdapter"
    assert not any(p.requires_grad for p in a.model.parameters()) and not a.model.training
    frames = make_frames(3)
    X = a.encode_video(frames)
    torch.testing.assert_close(X, src.encode_video(frames), atol=ATOL, rtol=0)
    keep = torch.ones(1, 1, 12, dtype=torch.bool)
    torch.testing.assert_close(a.score(X[None], keep, [PROMPT], [TARGET]), src.score(X[None], keep, [PROMPT], [TARGET]), atol=ATOL, rtol=0)
    # bf16 where asked (CPU supports it); scores stay float32
    b = load_mllm(MLLMConfig(path=str(d), dtype="bfloat16"), device="cpu")
    assert b.dtype == torch.bfloat16
    assert b.score(b.encode_video(frames)[None], keep, [PROMPT], [TARGET]).dtype == torch.float32
    with pytest.raises(ValueError, match="holds a 'llava_onevision' model"):
        load_mllm(MLLMConfig(path=str(d), kind="qwen2_vl"), device="cpu")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"empty.*no config.json.*notes.txt"):
        load_mllm(MLLMConfig(path=str(empty)))
    llm = tmp_path / "text-only"
    LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(llm)
    with pytest.raises(ValueError, match=r"text-only.*not a supported multimodal LLM.*model_type='llama'"):
        load_mllm(MLLMConfig(path=str(llm)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mllm(MLLMConfig(path=str(tmp_path / "nowhere")))


# ---------------------------------------------------------------- real weights (optional extra)
@pytest.mark.slow
def test_smolvlm_with_real_smollm2_weights():
    from pipeline.mllm.smollm2 import build_smolvlm, chat_prompt, extra_missing

    why = extra_missing()
    if why:
        pytest.skip(why)
    a = build_smolvlm(image_size=64, patch_size=16, scale_factor=2, vision_layers=1, vision_hidden=64)
    X = a.encode_video(make_frames(3, 64, 64))
    assert X.shape == (3, 4, 576)
    prompt = chat_prompt(a.tokenizer, "What is the capital of France? Answer in one word.")
    pre = a.prefill(X, torch.tensor([0, 5]), prompt)
    assert pre.cache_length == pre.full_length - 10
    answer = a.generate(X, torch.tensor([0, 5]), prompt, max_new_tokens=8)
    assert "paris" in answer.lower(), answer
    lp = a.option_logprobs(X, torch.arange(12), prompt, ["Paris", "London"])
    assert lp[0] > lp[1]
