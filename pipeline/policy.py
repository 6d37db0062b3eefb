"""SCORE policy: a small surprise-augmented transformer that scores every visual token.

State (docs/design.md), from the frozen MLLM's visual tokens ``X[B, T, N, D]`` (``N = gh*gw``
tokens per frame, row-major):

* residual ``R[t] = X[t] - X[t-1]`` per grid position, ``R[0] = 0``;
* surprise ``u[t, i] = ||R[t, i]|| / (||X[t, i]|| + eps)`` (clamped to ``[0, 10]``);
* token input ``[LN(W_x X), LN(W_r R), u, time emb, grid-position emb]`` -> Linear -> ``d``. The
  time embedding is a fixed sinusoid of the frame index (any T, no table to outgrow); the grid
  embedding is a fixed 2-D sinusoid of (row, col) (any grid). Both are mixed by the input Linear;
* ``video_scale=True``: ``W_x X / s`` and ``W_r R / s`` replace the LayerNorms, ``s`` the median
  token norm over the video, and the magnitude ``m[t, i] = log(||X[t, i]|| / s)`` (clamped to
  ``[-5, 5]``) is one more input. A per-token LayerNorm discards each token's scale, which is
  where a vision tower marks salient content (on score-tiny an object's token has ~3x a
  background token's norm, on every background); relative to the video's own median it stays
  unit-free, so a brighter world or another model does not move it.

Trunk: ``layers`` pre-LN transformer blocks. ``factorized=True``: spatial attention within each
frame (sequence N), then temporal attention along each grid position (sequence T), then an MLP;
``factorized=False``: full attention over all ``T*N`` tokens, then an MLP. ``layers=0``: no trunk,
every token scored from its own state (on score-tiny half the cost, a little weaker at 10%
retention, EXPERIMENTS.md). Head: LN -> Linear -> one
keep logit ``z`` per token; its weight starts at zero and its bias at ``init_keep_logit``, so the
initial keep probability of every token is exactly ``sigmoid(init_keep_logit)``.

Cost (from :meth:`ScorePolicy.flops`, 2 FLOPs per MAC, default config d=256, 2 layers, MLP 2x,
factorized), for D=896 (Qwen2-0.5B width), T=32, N=196 (6272 tokens): about 30 GFLOPs and 2.19 M
parameters (0.46 M of them the two D->d input projections). Qwen2-0.5B's prefill over the same
6272 visual tokens is about 2 * 0.36e9 (non-embedding params) * 6272 ~ 4.5 TFLOPs before attention,
so the policy costs ~0.7% of it. Full attention instead of factorized: ~101 GFLOPs (~2%).
(Measured on this 2-core CPU: ~0.6 s for that factorized forward in float32.)

Question-aware option (``question_aware=True``): the prompt's words, as the frozen MLLM's own
input embeddings ``Q[B, L, D]`` (:meth:`pipeline.mllm.base.MLLMAdapter.question_embeddings`),
are projected ``D -> d`` and every visual token cross-attends to them plus one learned null slot
(a token the question does not concern attends there), after the input projection and before the
trunk; each token's input also gets its highest cosine similarity to a question word in the MLLM's
embedding space (:func:`word_similarity`, a cue with no weights). Extra cost per video: about
``T*N*L*D + L*D*d + 4*T*N*d^2 + 2*T*N*(L+1)*d`` multiply-adds (:meth:`ScorePolicy.flops`).

Saved HF-style: ``save_pretrained(dir)`` writes ``model.safetensors`` + ``config.json``
(``embed_dim`` plus the :class:`~pipeline.config.PolicyConfig` fields); nothing else about the
MLLM is stored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.config import PolicyConfig, S3Config

Tensor = torch.Tensor

SURPRISE_EPS = 1e-6
SURPRISE_MAX = 10.0
MAGNITUDE_MAX = 5.0
TIME_EMB = 32  # sinusoid features of the frame index
POS_EMB = 32  # 16 for the row, 16 for the column
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "score-policy"


def sinusoid(pos: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """Fixed sinusoidal features: ``pos[...]`` (float) -> ``[..., dim]`` (``dim`` even)."""
    half = dim // 2
    freq = torch.exp(-math.log(base) * torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    ang = pos.float()[..., None] * freq
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


def surprise_state(X: Tensor) -> tuple[Tensor, Tensor]:
    """``X[B, T, N, D]`` -> ``(R[B, T, N, D], u[B, T, N])``: residual to the previous frame at the same
    grid position (``R[:, 0] = 0``) and surprise ``||R|| / (||X|| + eps)``."""
    R = torch.zeros_like(X)
    R[:, 1:] = X[:, 1:] - X[:, :-1]
    u = R.norm(dim=-1) / (X.norm(dim=-1) + SURPRISE_EPS)
    return R, u


def video_scale(X: Tensor, frame_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``X[B, T, N, D]`` -> ``(s[B], m[B, T, N])``: each sample's median token norm over its real
    frames (``frame_mask[B, T]``) and every token's ``log(||x|| / s)``, clamped to ``[-5, 5]``
    (padded frames: 0)."""
    n = X.norm(dim=-1).clamp_min(SURPRISE_EPS)  # [B, T, N]
    real = n if frame_mask is None else n.masked_fill(~frame_mask.to(torch.bool)[:, :, None], float("nan"))
    s = real.flatten(1).nanmedian(dim=1).values.nan_to_num(1.0)  # no real frame at all: 1
    m = (n / s[:, None, None]).log().clamp(-MAGNITUDE_MAX, MAGNITUDE_MAX)
    return s, (m if frame_mask is None else m * frame_mask.to(m.dtype)[:, :, None])


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``x[S, L, d]``, ``key_mask[S, L]`` bool (True = may be attended) -> ``[S, L, d]``."""
        s, l, d = x.shape
        q, k, v = self.qkv(x).view(s, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(s, l, d))


class _CrossAttention(nn.Module):
    """Visual tokens (queries) attend to the question's words and one learned null slot."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.null = nn.Parameter(torch.zeros(1, 1, d))
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
        """``x[B, M, d]``, ``words[B, L, d]``, ``word_mask[B, L]`` bool -> ``[B, M, d]``."""
        b, m, d = x.shape
        h = self.heads
        words = torch.cat([self.null.expand(b, 1, d).to(words.dtype), words], dim=1)  # [B, 1+L, d]
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device), word_mask.to(x.device, torch.bool)], 1)
        q = self.q(x).view(b, m, h, d // h).transpose(1, 2)
        k, v = self.kv(words).view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.out(y.transpose(1, 2).reshape(b, m, d))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int, factorized: bool):
        super().__init__()
        self.factorized = factorized
        self.ln_s = nn.LayerNorm(d)
        self.attn_s = _Attention(d, heads)  # spatial (factorized) or full attention
        if factorized:
            self.ln_t = nn.LayerNorm(d)
            self.attn_t = _Attention(d, heads)
        self.ln_m = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, h: Tensor, frame_mask: Tensor | None) -> Tensor:
        """``h[B, T, N, d]``, ``frame_mask[B, T]`` bool or None -> ``[B, T, N, d]``."""
        b, t, n, d = h.shape
        if self.factorized:
            x = h.reshape(b * t, n, d)  # padded frames only attend among themselves: harmless
            h = h + self.attn_s(self.ln_s(x)).view(b, t, n, d)
            x = h.permute(0, 2, 1, 3).reshape(b * n, t, d)
            km = None if frame_mask is None else frame_mask[:, None, :].expand(b, n, t).reshape(b * n, t)
            h = h + self.attn_t(self.ln_t(x), km).view(b, n, t, d).permute(0, 2, 1, 3)
        else:
            x = h.reshape(b, t * n, d)
            km = None if frame_mask is None else frame_mask[:, :, None].expand(b, t, n).reshape(b, t * n)
            h = h + self.attn_s(self.ln_s(x), km).view(b, t, n, d)
        return h + self.mlp(self.ln_m(h))


def word_similarity(X: Tensor, Q: Tensor, mask: Tensor) -> Tensor:
    """``X[B, T, N, D]``, ``Q[B, L, D]``, ``mask[B, L]`` -> ``[B, T, N]``: each visual token's highest
    cosine similarity to a question word, in the MLLM's own embedding space (its projector maps
    visual tokens there; 0 for a question of no words). A parameter-free relevance cue the policy
    reads from its first step; the cross-attention learns the rest."""
    sim = torch.einsum("btnd,bld->btnl", F.normalize(X, dim=-1), F.normalize(Q, dim=-1))
    sim = sim.masked_fill(~mask[:, None, None, :], -1.0).amax(-1) if Q.shape[1] else X.new_zeros(X.shape[:3])
    return torch.where(mask.any(-1)[:, None, None], sim, torch.zeros_like(sim))


Question = tuple[Tensor, Tensor]  # (Q[B, L, D] the prompt's word embeddings, mask[B, L] bool: real words)


def padded_logits(policy: nn.Module, X: Tensor, grid: tuple[int, int], steps: Tensor | None = None,
                  question: Question | None = None) -> Tensor:
    """Keep logits of a batch whose samples may differ in length, each scored at its OWN length.

    ``X[B, T, N, D]`` (samples shorter than ``T`` zero-padded at the end), ``steps[B]`` each
    sample's ``T'`` (``None``: all ``T``) -> ``z[B, T*N]``; a sample's logits past its own
    ``T'*N`` are 0 and meaningless (the caller's ``valid`` mask excludes them everywhere).

    Samples are grouped by ``T'`` and each group runs one plain ``policy(X[group, :T'], grid)``:
    a sample's logits are what a batch of equal-length samples gives, whatever the longest sample
    of the batch is, so the behaviour logits a rollout records and the learner's recomputation
    agree when Ray Data regroups the records into other batches, and no padded token is ever seen
    by the policy (padding cannot leak into the residuals or the temporal attention). An equal-length batch (``steps`` None or all ``T``) is one plain
    ``policy(X, grid)`` call. ``policy`` may be a DeepSpeed engine (one forward per group,
    one backward). ``question``: a question-aware policy's words (:data:`Question`), split with
    the samples."""
    b, t = X.shape[:2]
    kw = {} if question is None else {"question": question}
    if steps is None or bool((steps == t).all()):
        return policy(X, grid, **kw)
    steps = steps.to("cpu", torch.long)
    if steps.shape != (b,) or int(steps.min()) < 1 or int(steps.max()) > t:
        raise ValueError(f"steps must be [{b}] in 1..{t}, got {steps.tolist()}")
    n = X.shape[2]
    parts, order = [], []
    for length in sorted(set(steps.tolist())):
        idx = (steps == length).nonzero().flatten()
        if question is not None:
            kw = {"question": (question[0][idx.to(question[0].device)], question[1][idx.to(question[1].device)])}
        z = policy(X[idx.to(X.device), :length], grid, **kw)  # [b_l, length*N]
        parts.append(F.pad(z, (0, (t - length) * n)))
        order.append(idx)
    inverse = torch.empty(b, dtype=torch.long)
    inverse[torch.cat(order)] = torch.arange(b)
    return torch.cat(parts)[inverse.to(parts[0].device)]


class ScorePolicy(nn.Module):
    """Per-token keep logits for a video's visual tokens.

    ``ScorePolicy(embed_dim=D, cfg=PolicyConfig())``; ``forward(X, grid)``:

    * ``X``: ``[B, T, N, D]`` or ``[T, N, D]`` visual tokens in the MLLM embedding width (any float
      dtype; computed in the policy's dtype);
    * ``grid``: ``(gh, gw)`` with ``gh * gw == N``;
    * ``frame_mask``: optional ``[B, T]`` bool, True for real frames when videos of different
      length are padded to one T (padded frames are excluded from temporal/full attention keys;
      their logits are meaningless: pass the matching ``valid`` to the loss);
    * ``question``: ``(Q[B, L, D], mask[B, L])`` (:data:`Question`), required by a question-aware
      policy (``cfg.question_aware``) and refused by an agnostic one;
    * returns logits ``z[B, T*N]`` (or ``[T*N]``), flattened ``t*N + i``; keep prob ``sigmoid(z)``.
    """

    def __init__(self, embed_dim: int, cfg: PolicyConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else PolicyConfig()
        d = cfg.hidden
        if d % cfg.heads:
            raise ValueError(f"policy.hidden ({d}) must be divisible by policy.heads ({cfg.heads})")
        self.embed_dim = int(embed_dim)
        self.cfg = cfg
        self.w_x = nn.Linear(embed_dim, d)
        self.w_r = nn.Linear(embed_dim, d)
        if not cfg.video_scale:
            self.ln_x = nn.LayerNorm(d)
            self.ln_r = nn.LayerNorm(d)
        self.inp = nn.Linear(2 * d + 1 + int(cfg.video_scale) + int(cfg.question_aware) + TIME_EMB + POS_EMB, d)
        self.blocks = nn.ModuleList(_Block(d, cfg.heads, cfg.mlp_ratio, cfg.factorized) for _ in range(cfg.layers))
        if cfg.question_aware:
            self.w_q = nn.Linear(embed_dim, d)
            self.ln_q = nn.LayerNorm(d)
            self.ln_c = nn.LayerNorm(d)
            self.cross = _CrossAttention(d, cfg.heads)
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, cfg.init_keep_logit)
        self._emb_cache: dict[tuple, Tensor] = {}  # (T, gh, gw, device, dtype) -> fixed embeddings

    def _embeddings(self, t: int, gh: int, gw: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``[T, N, E_t + E_p]`` time and grid-position features. They hold no weights, so they are
        cached per shape: at score-tiny's size building them was ~10% of the forward's time."""
        key = (t, gh, gw, device, dtype)
        emb = self._emb_cache.get(key)
        if emb is None:
            temb = sinusoid(torch.arange(t, device=device), TIME_EMB)  # [T, E_t]
            rows = torch.arange(gh, device=device).repeat_interleave(gw)
            cols = torch.arange(gw, device=device).repeat(gh)
            pemb = torch.cat([sinusoid(rows, POS_EMB // 2), sinusoid(cols, POS_EMB // 2)], -1)  # [N, E_p]
            n = gh * gw
            emb = torch.cat([temb[:, None, :].expand(t, n, TIME_EMB), pemb[None].expand(t, n, POS_EMB)], -1).to(dtype)
            if len(self._emb_cache) >= 32:  # many video lengths: keep the cache bounded
                self._emb_cache.clear()
            self._emb_cache[key] = emb
        return emb

    def forward(self, X: Tensor, grid: tuple[int, int], frame_mask: Tensor | None = None,
                question: Question | None = None) -> Tensor:
        squeeze = X.dim() == 3
        if squeeze:
            X = X[None]
            if question is not None:
                question = (question[0][None], question[1][None])
        if self.cfg.question_aware and question is None:
            raise ValueError("this policy is question-aware (policy.question_aware): pass the question "
                             "(MLLMAdapter.question_embeddings of the prompt)")
        if not self.cfg.question_aware and question is not None:
            raise ValueError("this policy is question-agnostic: it takes no question")
        if X.dim() != 4 or X.shape[-1] != self.embed_dim:
            raise ValueError(f"X must be [B, T, N, {self.embed_dim}], got {tuple(X.shape)}")
        b, t, n, _ = X.shape
        gh, gw = grid
        if gh * gw != n:
            raise ValueError(f"grid {grid} has {gh * gw} positions, X has N={n} tokens per frame")
        if frame_mask is not None and tuple(frame_mask.shape) != (b, t):
            raise ValueError(f"frame_mask must be [{b}, {t}], got {tuple(frame_mask.shape)}")
        X = X.to(self.head.weight.dtype)
        R, u = surprise_state(X)
        emb = self._embeddings(t, gh, gw, X.device, X.dtype)
        if self.cfg.video_scale:
            scale, m = video_scale(X, frame_mask)
            scale = scale[:, None, None, None]
            parts = [self.w_x(X / scale), self.w_r(R / scale), u.clamp(max=SURPRISE_MAX)[..., None], m[..., None]]
        else:
            parts = [self.ln_x(self.w_x(X)), self.ln_r(self.w_r(R)), u.clamp(max=SURPRISE_MAX)[..., None]]
        if question is not None:
            Q, qm = question
            if Q.dim() != 3 or Q.shape[0] != b or Q.shape[-1] != self.embed_dim or tuple(qm.shape) != tuple(Q.shape[:2]):
                raise ValueError(f"question must be (Q[{b}, L, {self.embed_dim}], mask[{b}, L]), "
                                 f"got {tuple(Q.shape)} and {tuple(qm.shape)}")
            Q, qm = Q.to(X.dtype), qm.to(X.device, torch.bool)
            parts.append(word_similarity(X, Q, qm)[..., None])
        feats = torch.cat(parts + [emb[None].expand(b, t, n, TIME_EMB + POS_EMB)], dim=-1)
        h = self.inp(feats)
        if question is not None:
            words = self.ln_q(self.w_q(Q))
            h = h + self.cross(self.ln_c(h).reshape(b, t * n, -1), words, qm).view(b, t, n, -1)
        fm = None if frame_mask is None else frame_mask.to(torch.bool)
        for blk in self.blocks:
            h = blk(h, fm)
        z = self.head(self.ln_out(h)).reshape(b, t * n)
        return z[0] if squeeze else z

    # ------------------------------------------------------------------ cost
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self, T: int, N: int, L: int = 16) -> int:
        """Forward FLOPs (2 per multiply-add; norms, activations and softmax ignored) for one
        video of ``T`` frames x ``N`` tokens (a question-aware policy: and ``L`` question words)."""
        d, D, r = self.cfg.hidden, self.embed_dim, self.cfg.mlp_ratio
        m = T * N
        macs = m * (2 * D * d + (2 * d + 1 + int(self.cfg.video_scale) + TIME_EMB + POS_EMB) * d + d)  # W_x, W_r, input, head
        if self.cfg.question_aware:  # words D -> d, their keys/values, token queries + output, QK^T and AV
            macs += m * L * D + L * D * d + (L + 1) * 2 * d * d + m * 2 * d * d + m * 2 * (L + 1) * d
        for _ in range(self.cfg.layers):
            macs += m * 2 * r * d * d  # MLP
            if self.cfg.factorized:
                macs += 2 * m * 4 * d * d + m * 2 * (N + T) * d  # 2 attentions: proj + QK^T, AV
            else:
                macs += m * 4 * d * d + m * 2 * m * d
        return 2 * macs

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (created)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {"model_type": MODEL_TYPE, "embed_dim": self.embed_dim, **self.cfg.model_dump()}
        (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        s3: S3Config | None = None) -> "ScorePolicy":
        """Load what :meth:`save_pretrained` wrote, from a local folder or an ``s3://`` prefix
        (downloaded first; ``s3``: the endpoint, else the AWS environment's). Unknown config keys
        (a newer writer's extra fields) are ignored; missing ones take :class:`PolicyConfig`
        defaults (a policy saved before ``video_scale`` existed loads with it off, as it was built)."""
        if str(directory).startswith("s3://"):  # storage (pyarrow, boto3) only for S3: the vLLM plugin's venv has neither
            import tempfile

            from pipeline import storage

            with tempfile.TemporaryDirectory(prefix="score-policy-") as tmp:
                return cls.from_pretrained(storage.download_dir(str(directory), tmp, s3), map_location)
        src = Path(directory)
        meta = json.loads((src / CONFIG_NAME).read_text())
        if meta.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{src / CONFIG_NAME}: model_type {meta.get('model_type')!r} is not {MODEL_TYPE!r}")
        fields = {k: v for k, v in meta.items() if k in PolicyConfig.model_fields}
        policy = cls(int(meta["embed_dim"]), PolicyConfig(**fields))
        state = load_file(str(src / WEIGHTS_NAME), device=str(map_location))
        policy.load_state_dict(state, strict=True)
        return policy.to(map_location)
