"""Reference outputs of the project's own inference path, for the serving tests.

Run with the MAIN venv (transformers 5.25, the adapters); the serving tests (``.venv-serve``,
vLLM, transformers < 5.20) run it as a subprocess and compare vLLM against what it writes::

    .venv/bin/python tests/serving/reference.py OUT [--family qwen2_5_vl|qwen3_vl] [--retention 0.1] \
        [--frames 8] [--size 32x64] [--max-new-tokens 6] [--seed 0]

It builds, in ``OUT/``:

* ``model/``: a tiny random MLLM of the family from the project's registry
  (``registry.family(kind).tiny``), widened to text head_dim 32 (vLLM's CPU attention refuses
  smaller heads), over the family's tiny word-level tokenizer with Qwen's special tokens (vLLM's
  Qwen processors need them; a real Qwen tokenizer works too, but takes seconds to load in every
  engine), with Qwen2.5-VL's chat template (``dora-qwen2-5-vl``'s data; the Qwen3-VL template
  writes a video the same way) and the family's processor configs, in ``save_pretrained`` layout;
* ``policy/``: a randomly initialised :class:`~pipeline.policy.ScorePolicy` (``save_pretrained``)
  whose head ranks the tokens (a fresh head scores them all alike);
* ``frames.npy``: uint8 ``[T, H, W, 3]`` frames at exactly the processor's frame size (so
  neither side resizes); 32x64 keeps the grid wider than tall and the temporal extent below the
  width, where vLLM's and transformers' M-RoPE conventions for the text after a video agree
  (docs/serving.md);
* ``reference.json``: the chat template's rendering, the prompt's token ids as the adapter lays
  them out (``prompt_ids``) and with the video's whole layout as ONE pad (``prompt_ids_unexpanded``:
  what vLLM's processor expands), the top-K at ``retention`` (``keep``: flat indices into ``T'*N``,
  what :class:`pipeline.inference.CompressedMLLM` keeps) with the gap between the K-th and the
  next logit, and for SCORE and for all tokens the greedy token ids, their log-probabilities and
  the smallest gap between the best and the second-best token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FPS = 2.0  # the adapters' default sampling rate; second_per_grid = temporal_patch / FPS
QUESTION_BEFORE = "describe the video :\n"
QUESTION_AFTER = "\nwhat color is the circle ?"
#: the special tokens the Qwen2.5-VL template and processor write
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]


def real_qwen_template() -> str:
    """Qwen2.5-VL's processor chat template (package data of ``dora-qwen2-5-vl``; its code is
    never imported)."""
    spec = importlib.util.find_spec("dora_qwen2_5_vl")
    if spec is None:
        raise SystemExit("reference.py: dora-qwen2-5-vl is not installed (make venv installs it)")
    return json.loads((Path(spec.submodule_search_locations[0]) / "chat_template.json").read_text())["chat_template"]


def widen_text(config, tok, hidden: int = 64, heads: int = 2, kv_heads: int = 1) -> None:
    """Text head_dim ``hidden / heads`` = 32, M-RoPE sections summing to head_dim / 2, the vision
    merger's output at the new width, vocabulary and special ids of the real tokenizer."""
    tc = config.text_config
    tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads = hidden, heads, kv_heads
    tc.head_dim = hidden // heads
    tc.vocab_size = len(tok)
    tc.pad_token_id, tc.bos_token_id, tc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.convert_tokens_to_ids("<|im_end|>")
    rope = dict(tc.rope_parameters)
    half = hidden // heads // 2
    rope["mrope_section"] = [half // 2, half // 4, half - half // 2 - half // 4]
    tc.rope_parameters = rope
    config.vision_config.out_hidden_size = hidden
    for name, token in (("video_token_id", "<|video_pad|>"), ("image_token_id", "<|image_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(config, name, tok.convert_tokens_to_ids(token))


def processor_files(out: Path, vc, size: tuple[int, int], frames: int, template: str, mean_std, spec: dict) -> None:
    """``preprocessor_config.json`` / ``video_preprocessor_config.json`` / ``chat_template.jinja``
    of the family's processor, with pixel bounds that keep ``size`` (a multiple of patch*merge) as is."""
    pixels = size[0] * size[1]
    mean, std = mean_std
    common = {
        "patch_size": vc.patch_size, "temporal_patch_size": vc.temporal_patch_size, "merge_size": vc.spatial_merge_size,
        "image_mean": list(mean), "image_std": list(std), "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "size": {"shortest_edge": pixels, "longest_edge": pixels}, "processor_class": spec["processor"],
    }
    (out / "preprocessor_config.json").write_text(json.dumps({**common, "image_processor_type": spec["image"]}, indent=1))
    video = {**common, "video_processor_type": spec["video"], "do_sample_frames": False, "fps": FPS}
    if spec["video_bounds"] == "whole video":  # Qwen3-VL's video processor bounds frames x height x width
        video["size"] = {"shortest_edge": pixels * frames, "longest_edge": pixels * frames}
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=1))
    # the family's template for tokenizer and processor alike (tokenizer.save_pretrained may write its own)
    (out / "chat_template.jinja").write_text(template)


#: per family: the processor class names of its checkpoint and its normalization
FAMILIES = {
    "qwen2_5_vl": {"processor": "Qwen2_5_VLProcessor", "image": "Qwen2VLImageProcessor",
                   "video": "Qwen2VLVideoProcessor", "mean_std": "clip", "video_bounds": "frame"},
    "qwen3_vl": {"processor": "Qwen3VLProcessor", "image": "Qwen2VLImageProcessor",
                 "video": "Qwen3VLVideoProcessor", "mean_std": "half", "video_bounds": "whole video"},
}


def build(out: Path, family: str, size: tuple[int, int], frames: int, seed: int):
    from pipeline.mllm import registry
    from pipeline.mllm.base import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from pipeline.mllm.loader import adapter_for

    if family not in FAMILIES:
        raise SystemExit(f"reference.py: no serving reference for family {family!r}; known: {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    fam = registry.family(family)
    config, tok = fam.tiny(2)
    # the family's tiny word-level tokenizer with Qwen's special tokens (vLLM's Qwen processors and
    # the chat template need those); a real Qwen tokenizer works too but takes seconds per engine
    missing = [t for t in QWEN_SPECIAL if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok = registry.tiny_tokenizer(extra_special=QWEN_SPECIAL)
    template = real_qwen_template()
    widen_text(config, tok)
    config._attn_implementation = "sdpa"
    # wider random init than the tiny default: peaked next-token distributions, so greedy choices
    # are separated by far more than float32 noise between two implementations
    config.text_config.initializer_range = 0.2
    torch.manual_seed(seed)
    model = fam.model_class(config.model_type)(config).eval()
    mdir = out / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    mean_std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if spec["mean_std"] == "clip" else (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)
    processor_files(mdir, config.vision_config, size, frames, template, mean_std, spec)
    return adapter_for(model, tok, frame_size=size, fps=FPS, processor_dir=mdir), tok, template


def _layout_start(ids: list[int], adapter, t: int, n: int) -> int:
    """Index in ``ids`` where the adapter's video layout (``_video_layout``) begins."""
    layout = adapter._video_layout(t, n)[0]
    for i in range(len(ids) - len(layout) + 1):
        if ids[i:i + len(layout)] == layout:
            return i
    raise AssertionError("the video layout is not in the prompt's ids")


@torch.inference_mode()
def greedy(adapter, X: torch.Tensor, side: dict, keep: torch.Tensor, prompt: str, max_new_tokens: int) -> dict:
    """:meth:`MLLMAdapter.generate_ids` with each chosen token's log-probability (the same
    prefill and decode steps)."""
    pre = adapter.prefill(X, keep, prompt, side=side)
    cache, pos, length = pre.past_key_values, pre.next_position_ids, pre.cache_length
    logits = pre.logits
    ids, lps, margin = [], [], float("inf")
    for step in range(max_new_tokens):
        lp = torch.log_softmax(logits.float(), -1)
        top2 = lp.topk(2).values
        margin = min(margin, float(top2[0] - top2[1]))
        tok = int(lp.argmax())
        ids.append(tok)
        lps.append(float(lp[tok]))
        if tok in adapter.eos_token_ids or step == max_new_tokens - 1:
            break
        emb = adapter.embed_tokens(torch.tensor([[tok]]))
        am = torch.ones((1, length + 1), dtype=torch.long)
        res = adapter.language_model(inputs_embeds=emb, attention_mask=am, position_ids=pos, use_cache=True,
                                     **{adapter._cache_kw: cache})
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None) or cache
        length, pos = length + 1, pos + 1
        logits = adapter.lm_head(res.last_hidden_state[0, -1])
    assert ids == adapter.generate_ids(X, keep, prompt, max_new_tokens, side=side), "greedy() drifted from generate_ids"
    # margin: the smallest gap between the best and second-best token: a comparison of greedy
    # ids across implementations is only meaningful well above float32 noise
    return {"ids": ids, "logprobs": lps, "margin": margin}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--family", default="qwen2_5_vl")
    p.add_argument("--retention", type=float, default=0.1)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", default="32x64", help="frame HxW (multiples of patch*merge = 8)")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from pipeline.config import PolicyConfig
    from pipeline.inference import CompressedMLLM
    from pipeline.policy import ScorePolicy

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    size = tuple(int(v) for v in args.size.split("x"))
    adapter, tok, template = build(out, args.family, size, args.frames, args.seed)

    torch.manual_seed(args.seed + 1)
    policy = ScorePolicy(adapter.hidden_size, PolicyConfig(hidden=32, heads=2, layers=1)).eval()
    torch.nn.init.normal_(policy.head.weight, std=1.0)  # a fresh head scores every token alike: no ranking to test
    policy.save_pretrained(out / "policy")
    policy = ScorePolicy.from_pretrained(out / "policy")

    rng = np.random.default_rng(args.seed)
    frames = rng.integers(0, 256, (args.frames, *size, 3), dtype=np.uint8)
    np.save(out / "frames.npy", frames)

    user = QUESTION_BEFORE + adapter.video_placeholder + QUESTION_AFTER
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION_BEFORE}, {"type": "video"},
                                             {"type": "text", "text": QUESTION_AFTER}]}]
    prompt_text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)

    cm = CompressedMLLM(adapter, policy, retention=args.retention, min_per_frame=policy.cfg.min_per_frame)
    X, side = adapter.encode_video_with_side(frames)
    t, n = X.shape[0], X.shape[1]
    keep, _ = cm.select(X)
    with torch.inference_mode():
        z = policy(X, adapter.visual_grid(args.frames)[1:]).sort(descending=True).values
    keep_gap = float(z[keep.numel() - 1] - z[keep.numel()]) if keep.numel() < z.numel() else float("inf")
    everything = torch.arange(t * n)
    ids = adapter._template(user, None, t, n).ids.tolist()  # the adapter's layout: T'*N video tokens (+ markers)
    layout = len(adapter._video_layout(t, n)[0])  # the span a processor writes for the video
    start = _layout_start(ids, adapter, t, n)
    unexpanded = ids[:start] + [adapter.video_token_id] + ids[start + layout:]  # what vLLM's processor expands: one pad
    ref = {
        "family": args.family, "frames": list(frames.shape), "fps": FPS, "retention": args.retention,
        "grid": list(adapter.visual_grid(args.frames)), "k": int(keep.numel()), "keep": keep.tolist(),
        "keep_gap": keep_gap,
        "prompt_text": prompt_text, "video_token_id": int(adapter.video_token_id),
        "max_new_tokens": args.max_new_tokens, "prompt_ids": ids,
        "prompt_ids_unexpanded": unexpanded,
        "score": greedy(adapter, X, side, keep, user, args.max_new_tokens),
        "full": greedy(adapter, X, side, everything, user, args.max_new_tokens),
    }
    (out / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    print(json.dumps({"grid": ref["grid"], "k": ref["k"], "keep_gap": keep_gap, "margins": [ref["score"]["margin"], ref["full"]["margin"]]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
