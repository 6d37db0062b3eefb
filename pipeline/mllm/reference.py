"""score-tiny: the embedded frozen MLLM, built and pre-trained by the project.

A tiny ``LlavaOnevisionForConditionalGeneration`` (the same class and adapter as real
LLaVA-OneVision checkpoints) with a word-level tokenizer over the shapes world's vocabulary.
Its SigLIP tower has no encoder layer, so visual tokens are token-local (patch embedding +
projector + the 2x2 video pooling): an object's colour lives only in the tokens that cover it,
which is what makes the choice of tokens matter.

Pre-training is plain next-token loss on fresh world samples (never the held-out shards):
video captions and QA, pseudo-videos and image captions (stage 1's material), single frames
first (``binding_steps``: where the question-object binding forms), then variable frame counts
(short clips first: an easy-to-hard order) and mild random token dropout on half the samples,
as real MLLMs see many resolutions and frame counts. It never sees a selector's or the policy's
masks. Training runs through the adapter's own masked path (``target_ce``), the one that later
scores rollouts.

Levers (``ReferenceConfig``; measurements in EXPERIMENTS.md): every target ends with ``<eos>``
(``target_eos``) so greedy answers stop after the answer word; QA samples draw the question
type uniformly (``balance_types``: direction and order are otherwise ~10% of the QA); the
auxiliary per-token colour/shape heads can be the LM's own word embeddings (``aux_tied``);
half the clips go through a 4:2:0 chroma round trip (``codec_aug``), the main loss of the H.264
shards the held-out videos come from; optional multi-turn QA per video (``qa_per_sample``).
Motion direction (the change of an object's grid cell) gets its own levers: a vision-side head
naming each token's cell (``position_aux``: the LM's 1-D RoPE carries no 2-D position), an
LM-side dense loss where the LM's own head emits the direction word on a moving object's tokens
(``direction_aux``; read after ``direction_layer`` layers, so the direction exists where the
answer position's later layers can still read it), and a sampling weight per question type
(``type_weights``). The question-object binding has one too (``binding_aux``): from the position
that predicts the answer, one head of the last layer must put its attention on the tokens of the
objects the question names, so the answer reads them and not the distractors, however many.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.config import ReferenceConfig, WorldConfig
from pipeline.data.prompts import CAPTION_PROMPT, VIDEO, qa_prompt
from pipeline.data.pseudo_video import make_pseudo_video
from pipeline.data.world import (COLORS, DIRECTIONS, QUESTION_TYPES, SHAPES, VOCAB, make_image, make_video, sample_rng,
                                 token_directions, token_labels)
from pipeline.mllm.base import MLLMAdapter
from pipeline.mllm.llava_onevision import video_features
from pipeline.mllm.loader import adapter_for
from pipeline.mllm.tokenizer import build_word_tokenizer

PROMPT_WORDS = ["question", "answer", "describe", "the", "video"]


def build_tokenizer():
    return build_word_tokenizer(list(VOCAB) + PROMPT_WORDS, [VIDEO, "<image>"])


def build_model(rcfg: ReferenceConfig, wcfg: WorldConfig, tokenizer) -> torch.nn.Module:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(rcfg.seed)
    vision = {
        "model_type": "siglip_vision_model", "hidden_size": rcfg.vision_hidden,
        "intermediate_size": 2 * rcfg.vision_hidden, "num_hidden_layers": 0, "num_attention_heads": 1,
        "image_size": wcfg.size, "patch_size": rcfg.patch, "vision_use_head": False,
    }
    text = {
        "model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": rcfg.hidden,
        "intermediate_size": 3 * rcfg.hidden, "num_hidden_layers": rcfg.layers,
        "num_attention_heads": rcfg.heads, "num_key_value_heads": rcfg.heads,
        "max_position_embeddings": 4096, "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    model = LlavaOnevisionForConditionalGeneration(cfg)
    # HF initialises every linear with std 0.02: through patch embedding + a 2-layer projector the
    # visual tokens start ~100x smaller than text embeddings and the LLM learns to ignore them.
    # PyTorch's fan-in init keeps them at a usable scale from the first step.
    for m in (model.model.vision_tower.embeddings.patch_embedding, *model.model.multi_modal_projector.children()):
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def spec_hash(rcfg: ReferenceConfig, wcfg: WorldConfig) -> str:
    """Cache key: everything that changes the built model. Not the world's sample counts: the build
    draws its own fresh ``train`` samples by index, so a world with more videos (or more held-out or
    validation ones) reuses the same model."""
    # eval_every picks the candidate checkpoints only when the build selects one on validation
    ref = rcfg.model_dump(exclude={"eval_videos", "min_qa_accuracy"} | ({"eval_every"} if not rcfg.select_videos else set()))
    for k, off in (("type_weights", {}), ("direction_aux", 0.0), ("position_aux", 0.0), ("direction_layer", 0),
                   ("select_videos", 0), ("binding_aux", 0.0)):
        if ref[k] == off:  # knobs added later hash only when set: existing builds stay cached
            del ref[k]
    blob = json.dumps({"reference": ref,
                       "world": wcfg.model_dump(exclude={"images", "videos", "heldout_videos", "val_videos", "shard_size"}),
                       "version": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def frames_schedule(step: int, steps: int, max_frames: int, binding_steps: int = 0) -> list[int]:
    """Frame counts to draw from at ``step``. The first ``binding_steps`` are single frames (so
    colour and shape questions only; 64 scenes a step with the default token budget): the question-object binding forms there
    (measured: shape questions 0.10 -> 0.83 between steps 100 and 500). Then short clips first,
    full-length videos by 40% of the remaining steps."""
    if step < binding_steps:
        return [1]
    frac = (step - binding_steps) / max(steps - binding_steps, 1)
    if frac < 0.15:
        return [1, 2, 4]
    if frac < 0.4:
        return sorted({2, 4, max_frames // 2, max_frames})
    return sorted({4, max_frames // 2, 3 * max_frames // 4, max_frames, max_frames, max_frames})


def _possible(qtype: str, motions: list[str]) -> bool:
    """Whether a world with these motion kinds can ask a question of this type."""
    need = {"color": None, "shape": None, "direction": {"linear"}, "change": {"color_change"}, "order": {"appear"}}[qtype]
    if qtype in ("color", "shape"):
        return any(m != "color_change" for m in motions)
    return bool(need & set(motions))


def chroma_420(frames: np.ndarray) -> np.ndarray:
    """uint8 [T,H,W,3] through a BT.601 YCbCr 4:2:0 round trip (chroma averaged over 2x2 pixels),
    the main loss of the H.264 (yuv420p) shards the held-out videos are read from."""
    f = frames.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    T, H, W = y.shape

    def sub(c: np.ndarray) -> np.ndarray:
        c = c[:, : H - H % 2, : W - W % 2].reshape(T, H // 2, 2, W // 2, 2).mean(axis=(2, 4))
        up = np.repeat(np.repeat(c, 2, axis=1), 2, axis=2)
        out = np.empty_like(y)
        out[:, : up.shape[1], : up.shape[2]] = up
        if H % 2:
            out[:, -1] = out[:, -2]
        if W % 2:
            out[:, :, -1] = out[:, :, -2]
        return out

    cb, cr = sub(cb), sub(cr)
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


class Pretrainer:
    """One readable pre-training step at a time (``step()``), over fresh world samples."""

    def __init__(self, rcfg: ReferenceConfig, wcfg: WorldConfig, model: torch.nn.Module, tokenizer) -> None:
        self.rcfg, self.wcfg = rcfg, wcfg
        self.model = model
        self.adapter = adapter_for(model, tokenizer)
        for p in model.parameters():  # the adapter freezes; pre-training is the one place that trains it
            p.requires_grad_(True)
        model.train()
        # Auxiliary dense heads (not saved): what object colour/shape is under each visual token.
        # Real MLLMs start from a pre-trained vision tower; this gives ours the same head start.
        d = model.config.text_config.hidden_size
        self.aux = torch.nn.ModuleDict({"color": torch.nn.Linear(d, len(COLORS)), "shape": torch.nn.Linear(d, len(SHAPES))})
        # aux_tied: the heads are the LM's own (tied) embeddings of the colour and shape words, so a
        # visual token is pulled towards the words that describe it (as in a CLIP-aligned tower).
        self.aux_words = {"color": tokenizer.convert_tokens_to_ids(list(COLORS)),
                          "shape": tokenizer.convert_tokens_to_ids(list(SHAPES))}
        self.direction_words = torch.tensor(tokenizer.convert_tokens_to_ids(list(DIRECTIONS)))
        self.aux_bg = torch.nn.Linear(d, 1)  # aux_background: one "no object here" logit for both heads
        # position_aux: which grid cell a visual token covers, from the token alone (not saved). The
        # LM's 1-D RoPE gives no 2-D cell position; direction = the change of an object's cell.
        # Made only when on: an unused layer would still draw from torch's RNG.
        cells = self.adapter.visual_grid(1)[1] * self.adapter.visual_grid(1)[2]
        self.aux_pos = torch.nn.Linear(d, cells) if rcfg.position_aux > 0 else None
        params = list(model.parameters()) + ([] if rcfg.aux_tied else list(self.aux.parameters()))
        params += list(self.aux_pos.parameters()) if self.aux_pos is not None else []
        params += list(self.aux_bg.parameters()) if rcfg.aux_background else []
        self.opt = torch.optim.AdamW(params, lr=rcfg.lr, weight_decay=0.01)
        self.rng = np.random.default_rng([rcfg.seed, 7])
        self._mid = None  # direction_layer: that layer's output, kept by a forward hook during training steps
        if rcfg.direction_aux > 0 and rcfg.direction_layer:
            self.adapter.language_model.layers[rcfg.direction_layer - 1].register_forward_hook(self._keep_mid)
        self._attn_in = None  # binding_aux: the last layer's attention input, kept by a pre-hook during training steps
        if rcfg.binding_aux > 0:
            self.adapter.language_model.layers[-1].self_attn.register_forward_pre_hook(self._keep_attn_in, with_kwargs=True)
        self.eos = tokenizer.eos_token
        self.step_idx = 0
        self.sample_idx = 0
        self.image_idx = 0

    def _aux_loss(self, X: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = torch.zeros(())
        for name in self.aux:
            if self.rcfg.aux_tied:
                logits = X @ self.model.get_input_embeddings().weight[self.aux_words[name]].t()
            else:
                logits = self.aux[name](X)
            y = labels[name]
            if self.rcfg.aux_background:  # background tokens are a class of their own
                logits = torch.cat([logits, self.aux_bg(X)], dim=-1)
                y = torch.where(y < 0, logits.shape[-1] - 1, y)
            loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 2), y.flatten(), ignore_index=-1)
        return loss

    def _draw(self, world: WorldConfig, t: int, want: str | None) -> tuple[dict, dict | None]:
        """A fresh training video of ``t`` frames and one of its questions (``None``: caption).
        ``want``: a question type to draw (fresh videos until one has it, bounded tries)."""
        for attempt in range(32):
            v = make_video(world, sample_rng(self.wcfg.seed, "train", "video", self.sample_idx), frames=t)
            self.sample_idx += 1
            if want is None:
                return v, None
            pool = [q for q in v["qa"] if q["type"] == want]
            if pool or attempt == 31:
                pool = pool or v["qa"]
                return v, (pool[self.rng.integers(len(pool))] if pool else None)
        raise AssertionError("unreachable")

    def _pseudo_video(self, t: int) -> dict:
        """A fresh stage-1 sample of ``t`` frames: k images (k divides t, at most 4) from the
        world's image generator, each repeated t/k frames by the stage's own synthesizer, the
        captions joined in order; k=1 is an image caption. Objects in the video layout (per-frame
        boxes, None outside their segment) for the auxiliary heads."""
        ks = [k for k in range(1, 5) if t % k == 0]
        k = ks[self.rng.integers(len(ks))]
        imgs = [make_image(self.wcfg, sample_rng(self.wcfg.seed, "train", "image", self.image_idx + j)) for j in range(k)]
        self.image_idx += k
        rep = t // k
        pv = make_pseudo_video([s["image"] for s in imgs], [s["caption"] for s in imgs], [str(j) for j in range(k)], rep)
        objects = [{"id": o["id"], "shape": o["shape"], "color": o["color"], "new_color": None, "change_at": None,
                    "boxes": [o["box"] if j * rep <= f < (j + 1) * rep else None for f in range(t)]}
                   for j, s in enumerate(imgs) for o in s["objects"]]
        return {"frames": pv["frames"], "caption": pv["caption"], "qa": [], "objects": objects}

    def _qtype(self, types: list[str]) -> str:
        """A question type drawn among ``types``, weighted by ``type_weights`` (uniform by default)."""
        p = np.array([self.rcfg.type_weights.get(q, 1.0) for q in types], dtype=float)
        return types[self.rng.choice(len(types), p=p / p.sum())]

    def _lr(self) -> float:
        s, r = self.step_idx, self.rcfg
        if s < r.warmup:
            return r.lr * (s + 1) / r.warmup
        return r.lr * 0.5 * (1 + math.cos(math.pi * (s - r.warmup) / max(r.steps - r.warmup, 1)))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str], dict[str, torch.Tensor]]:
        """``(pixels[B,T,3,S,S], keep[B,1,T*N], prompts, targets, labels)`` of fresh training
        samples; ``labels[name]`` is ``[B,T,N]`` (-1 = background) for the auxiliary heads
        (``direction``: -1 except on a moving object's tokens, see :func:`token_directions`;
        ``asked``: bool, the tokens of the objects the sample's question names; with ``binding_aux`` only)."""
        r, w = self.rcfg, self.wcfg
        t = int(self.rng.choice(frames_schedule(self.step_idx, r.steps, w.frames_max or w.frames, r.binding_steps)))
        n = self.adapter.visual_grid(t)[1] * self.adapter.visual_grid(t)[2]
        bs = int(min(r.max_batch, max(4, r.tokens_per_batch // (t * n + 24))))
        # Short clips cannot hold an appear/disappear window or a colour change in the middle.
        # A single frame cannot show motion (a "moves left" object would not move): static only.
        short = ("static",) if t < 2 else ("static", "linear", "bounce")
        world = w if t >= 4 else w.model_copy(update={"motion": [m for m in w.motion if m in short] or ["static"]})
        types = sorted({q for q in QUESTION_TYPES if _possible(q, world.motion)})
        pixels, prompts, targets, colors, shapes, dirs, asked, is_qa = [], [], [], [], [], [], [], []
        grid = self.adapter.visual_grid(t)[1:]
        end = f" {self.eos}" if r.target_eos else ""
        for i in range(bs):
            u = self.rng.random()
            caption = u < r.caption_fraction + r.pseudo_fraction
            want = None if caption else (self._qtype(types) if r.balance_types else "")
            if u < r.pseudo_fraction:
                v = self._pseudo_video(t)
                q = None
            elif want == "":  # unbalanced: a random question of a random video
                v, _ = self._draw(world, t, None)
                q = v["qa"][self.rng.integers(len(v["qa"]))] if v["qa"] else None
            else:
                v, q = self._draw(world, t, want)
            pixels.append(self.adapter.preprocess(chroma_420(v["frames"]) if self.rng.random() < r.codec_aug else v["frames"]))
            c, sh = token_labels(v["objects"], t, w.size, grid)
            colors.append(torch.from_numpy(c))
            shapes.append(torch.from_numpy(sh))
            dirs.append(torch.from_numpy(token_directions(v["objects"], t, w.size, grid)))
            named = [o for o in v["objects"] if q is not None and o["id"] in q.get("objects", ())] if r.binding_aux > 0 else []
            asked.append(torch.from_numpy(token_labels(named, t, w.size, grid)[1] >= 0) if named else torch.zeros(t, n, dtype=torch.bool))
            if q is None:
                prompts.append(CAPTION_PROMPT)
                targets.append(v["caption"] + end)
            else:
                prompts.append(qa_prompt(q["question"]))
                # qa_per_sample > 1: more questions on the same video as further turns, each
                # answer ending its turn with <eos> (only answers and <eos> carry loss).
                more = [o for o in v["qa"] if o is not q]
                more = [more[j] for j in self.rng.permutation(len(more))[: r.qa_per_sample - 1]]
                turns = [q["answer"] + end] + [f"{qa_prompt(o['question']).replace(VIDEO, '').strip()} {o['answer']}{end}" for o in more]
                targets.append(" ".join(turns))
            is_qa.append(q is not None)
        self.last_is_qa = torch.tensor(is_qa)
        keep = torch.ones(bs, 1, t * n, dtype=torch.bool)
        for b in range(bs):
            if r.token_dropout > 0 and self.rng.random() < 0.5:
                drop = torch.from_numpy(self.rng.random(t * n) < self.rng.uniform(0, r.token_dropout))
                drop[self.rng.integers(t * n)] = False  # never an empty video
                keep[b, 0] = ~drop
        return torch.stack(pixels), keep, prompts, targets, {"color": torch.stack(colors), "shape": torch.stack(shapes),
                                                             "direction": torch.stack(dirs), "asked": torch.stack(asked)}

    def _answer_ce(self, hidden: torch.Tensor, batch) -> torch.Tensor:
        """Per-sample mean NLL over the answer tokens (the word after ``answer :``, and ``<eos>``)
        of multi-turn QA targets; caption targets count every token."""
        ad, tok = self.adapter, self.adapter.tokenizer
        ids = batch.input_ids
        pred = batch.target_mask[:, 1:]
        labels = ids[:, 1:]
        prev1 = ids[:, :-1]
        prev2 = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :-2]], dim=1)
        answer = ((prev1 == tok.convert_tokens_to_ids(":")) & (prev2 == tok.convert_tokens_to_ids("answer"))) | (labels == tok.eos_token_id)
        w = torch.where(self.last_is_qa.unsqueeze(1), answer.float(), torch.ones_like(answer, dtype=torch.float))[pred]
        rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(pred)[pred]
        nll = torch.nn.functional.cross_entropy(ad.lm_head(hidden[:, :-1][pred]).float(), labels[pred], reduction="none")
        sums = torch.zeros(ids.shape[0]).index_add(0, rows, nll * w)
        return sums / torch.zeros(ids.shape[0]).index_add(0, rows, w).clamp(min=1e-6)

    def _keep_mid(self, module, args, out) -> None:
        if module.training:
            self._mid = out[0] if isinstance(out, tuple) else out

    def _keep_attn_in(self, module, args, kwargs) -> None:
        if module.training:
            self._attn_in = (kwargs["hidden_states"], kwargs["position_embeddings"])

    def _binding_loss(self, batch) -> torch.Tensor:
        """LM-side binding loss: ``-log`` of the attention mass that head 0 of the last layer puts
        on the named objects' kept visual tokens, from the position that predicts the answer.
        Recomputed for that one query from the layer's own projections and RoPE, so it is exactly
        the attention the forward used. Rows without a question or a kept named token add nothing."""
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        on = batch.side["asked"] > 0  # [R, L]
        first = batch.target_mask.float().argmax(1)  # first answer token; the position before predicts it
        rows = on.any(1) & self.last_is_qa & batch.target_mask.any(1) & (first > 0)
        if not bool(rows.any()):
            return torch.zeros(())
        attn = self.adapter.language_model.layers[-1].self_attn
        h, (cos, sin) = self._attn_in
        hd = attn.head_dim
        q = attn.q_proj(h)[..., :hd].unsqueeze(1)  # head 0: [R, 1, L, hd]
        k = attn.k_proj(h)[..., :hd].unsqueeze(1)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        r = torch.arange(h.shape[0])
        pos = (first - 1).clamp(min=0)
        scores = (k[:, 0] @ q[r, 0, pos].unsqueeze(-1)).squeeze(-1) * attn.scaling  # [R, L]
        L = h.shape[1]
        valid = (torch.arange(L).unsqueeze(0) <= pos.unsqueeze(1)) & batch.attention_mask.bool()
        logp = torch.log_softmax(scores.float().masked_fill(~valid, float("-inf")), dim=1)
        mass = torch.logsumexp(logp.masked_fill(~(on & valid), float("-inf")), dim=1)
        return -mass[rows].mean()

    def _direction_loss(self, hidden: torch.Tensor, batch) -> torch.Tensor:
        """LM-side dense direction loss: on a moving object's visual tokens (after it left its
        first cell) the LM's own head must emit the direction word. A token can compare its
        position with the same object's earlier tokens (causal attention); the answer position
        then only has to read the direction from the named object, as it reads its colour."""
        d = batch.side["direction"]  # label + 1 on kept visual tokens, 0 elsewhere
        on = d > 0
        if not bool(on.any()):
            return torch.zeros(())
        if self.rcfg.direction_layer:
            hidden = self.adapter.language_model.norm(self._mid)
        logits = self.adapter.lm_head(hidden[on]).float()
        return torch.nn.functional.cross_entropy(logits, self.direction_words[d[on] - 1])

    def step(self) -> dict:
        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = self._lr()
        pixels, keep, prompts, targets, labels = self.batch()
        t_data = time.perf_counter() - t0
        feats = video_features(self.model, pixels)[:, :-1]  # drop the image_newline (an always-kept extra)
        B, T = pixels.shape[:2]
        X = feats.reshape(B, T, -1, feats.shape[-1])
        # the adapter's masked path (as target_ce, which scores rollouts), run here once for both losses
        ad = self.adapter
        side = {}
        if self.rcfg.direction_aux > 0:
            side["direction"] = labels["direction"] + 1
        if self.rcfg.binding_aux > 0:
            side["asked"] = labels["asked"].long()
        lm_batch = ad._masked_batch(X, keep, prompts, targets, side=side or None)
        hidden = ad._lm(lm_batch).last_hidden_state
        if self.rcfg.qa_per_sample > 1:
            ce = self._answer_ce(hidden, lm_batch)
        else:
            sums, counts = ad._target_nll(hidden, lm_batch)
            ce = sums / counts.clamp(min=1)
        wts = torch.where(self.last_is_qa, self.rcfg.qa_weight, 1.0)
        lm_loss = (ce * wts).sum() / wts.sum()
        aux_loss = self._aux_loss(X, labels) if self.rcfg.aux_weight > 0 else torch.zeros(())
        dir_loss = self._direction_loss(hidden, lm_batch) if self.rcfg.direction_aux > 0 else torch.zeros(())
        bind_loss = self._binding_loss(lm_batch) if self.rcfg.binding_aux > 0 else torch.zeros(())
        loss = lm_loss + self.rcfg.aux_weight * aux_loss + self.rcfg.direction_aux * dir_loss + self.rcfg.binding_aux * bind_loss
        if self.rcfg.position_aux > 0:  # every token's own cell index
            cells = torch.arange(X.shape[2]).expand(B, T, -1)
            loss = loss + self.rcfg.position_aux * torch.nn.functional.cross_entropy(self.aux_pos(X).flatten(0, 2), cells.flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        self.step_idx += 1
        return {"loss": float(lm_loss.detach()), "aux_loss": float(aux_loss.detach()), "dir_loss": float(dir_loss.detach()),
                "bind_loss": float(bind_loss.detach()), "frames": T, "batch": B, "lr": self._lr(),
                "time_data": t_data, "time_step": time.perf_counter() - t0}


def pretrain(rcfg: ReferenceConfig, wcfg: WorldConfig, out: str | Path,
             evaluate: Callable[[MLLMAdapter], dict] | None = None, progress: bool = True,
             select: Callable[[MLLMAdapter], dict] | None = None) -> dict:
    """Build, pre-train and save score-tiny to ``out`` (``save_pretrained`` + safetensors); returns
    the summary. ``evaluate(adapter)`` (held-out) runs at the end, and every ``eval_every`` steps
    for the history when there is no ``select``. ``select(adapter)`` (validation videos, returns
    ``{"accuracy", ...}``) runs every ``eval_every`` steps and at the end: the saved model is the
    best-scoring candidate (the later one on a tie), ``summary["selected_step"]`` says which; the
    choice never sees the held-out videos. Both probes must encode their videos with the model as
    it is at that step (the vision tower trains too)."""
    from tqdm import tqdm

    torch.manual_seed(rcfg.seed)
    tok = build_tokenizer()
    model = build_model(rcfg, wcfg, tok)
    trainer = Pretrainer(rcfg, wcfg, model, tok)
    t0 = time.perf_counter()
    history: list[dict] = []
    bar = tqdm(range(rcfg.steps), desc="pre-train score-tiny", disable=not progress, mininterval=5)
    ema = None
    best = None  # (validation accuracy, step, weights) of the best candidate so far
    probe = select if select is not None else evaluate
    for s in bar:
        m = trainer.step()
        ema = m["loss"] if ema is None else 0.98 * ema + 0.02 * m["loss"]
        # refresh=False: drawn at the bar's own interval (every step would bloat non-tty logs)
        extra = {"bind": f"{m['bind_loss']:.2f}"} if rcfg.binding_aux > 0 else {}
        bar.set_postfix(loss=f"{ema:.3f}", aux=f"{m['aux_loss']:.3f}", T=m["frames"], B=m["batch"], **extra, refresh=False)
        if probe is not None and (s + 1) % rcfg.eval_every == 0 and s + 1 < rcfg.steps:
            model.eval()
            res = probe(trainer.adapter)
            model.train()
            history.append({"step": s + 1, "loss": round(ema, 4), **res})
            bar.write(f"step {s + 1}: loss {ema:.3f} {json.dumps(res)}")
            if select is not None and (best is None or res["accuracy"] >= best[0]):
                best = (res["accuracy"], s + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train_seconds = time.perf_counter() - t0
    selected = {}
    if select is not None:
        res = select(trainer.adapter)
        history.append({"step": rcfg.steps, "loss": round(ema, 4), **res})
        step = rcfg.steps
        if best is not None and res["accuracy"] < best[0]:
            model.load_state_dict(best[2])
            step = best[1]
        selected = {"selected_step": step}
        print(f"selected the step-{step} weights on {res.get('n', '?')} validation videos", flush=True)
    final = evaluate(trainer.adapter) if evaluate is not None else {}
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    summary = {"train_seconds": round(train_seconds, 1), "loss": round(ema or 0.0, 4), "history": history, **selected, **final}
    (tmp / "build.json").write_text(json.dumps({"hash": spec_hash(rcfg, wcfg), "reference": rcfg.model_dump(),
                                                "world": wcfg.model_dump(), "summary": summary}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a reader never sees a half-written model
    return summary


def cached_build(out: str | Path, rcfg: ReferenceConfig, wcfg: WorldConfig) -> dict | None:
    """The saved build summary if ``out`` holds a model built from the same spec, else None."""
    f = Path(out) / "build.json"
    if not f.is_file():
        return None
    try:
        info = json.loads(f.read_text())
    except ValueError:
        return None
    return info["summary"] if info.get("hash") == spec_hash(rcfg, wcfg) else None
