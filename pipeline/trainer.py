"""Single-process SCORE trainer (no Ray): the reference the distributed pipeline must match.

Built from small pieces that the Ray roles reuse (docs/design.md):

* **targets** - :func:`select_target`: pseudo-video -> ``(CAPTION_PROMPT, joined caption)``;
  video -> one QA pair ``(qa_prompt(question), answer)`` chosen by ``crc32(f"{seed}:{sample_id}")``
  among its QA pairs (drawn again each data epoch with ``stage.resample_qa``), or its caption when
  it has none.
* **rollout** (rollout actors) - :func:`rollout`: encode (optionally cached by sample id), policy
  logits without grad, G Bernoulli masks per sample from a CPU ``torch.Generator``, padding-aware
  scoring (:func:`score_packed`: ``CE_full`` from the cache or its own batch, the ``B x G`` masked
  rows sorted by length and padded only to their bucket's longest), then ``dCE`` and ``rho``. Returns a :class:`RolloutBatch`; :meth:`RolloutBatch.to_records` /
  :meth:`RolloutBatch.from_records` convert to and from per-sample rollout records.
* **variable length** - samples of one batch may differ in frame count (``data.sampling: fps``),
  hence in ``T'``. The batch then holds ``X`` zero-padded to the longest ``T'`` and each sample's
  ``steps`` (its ``T'``); :meth:`RolloutBatch.token_valid` marks its real tokens. The policy scores
  every sample at its own length (:func:`pipeline.policy.padded_logits`), masks, budget and
  ``rho`` count real tokens only (a padded token is never kept, never sampled), the MLLM scores
  each ``T'`` group at its own length, and the loss, entropy and KL skip padded tokens. Records
  are per sample and unpadded. A batch of equal lengths takes the unpadded path (``steps``
  None, no mask anywhere): the draws, masks and numbers of a plain stacked batch.
* **learn** - :func:`pipeline.update.ppo_update`, the one update the DeepSpeed learner runs too.
* **loop** - :func:`train_step` (rollout -> update, timed) and :func:`train_stage` (progress bar,
  TensorBoard scalars, summary line), :func:`train_curriculum_local` (stage 1 pseudo-videos, then
  stage 2 real videos from stage 1's saved policy).

Determinism: a stage runs with ``seed = stage_seed(run.seed, stage)``; step ``s`` draws its masks
from ``step_generator(seed, s)`` (a fresh CPU generator seeded from ``(seed, s)``) and every QA
choice uses the same ``seed``, so the same samples and starting weights give bit-identical weights,
also when a stage resumes at ``start_step``. Initial weights: ``init_policy(D, cfg.policy,
run.seed)``. The policy version of a rollout made at step ``s`` is ``s`` (updates applied so far in
this stage).

Rollout record (one per sample; numpy/str/int only, so it travels as a Ray Data row)::

    sample_id       str
    policy_version  int         policy version that drew the masks
    X               float32     [T', N, D]  visual tokens (the learner's state; R, u are derived), this
                                sample's own T' (never padded); float16, or bfloat16 as its raw
                                bits in int16, per x_dtype
    x_dtype         str         "float32" | "float16" | "bfloat16" (rollout.state_dtype)
    grid            int64       [2] (gh, gw), N = gh*gw
    mask_bits       uint8       [G, ceil(M/8)]  pack_masks, little bit order, M = T'*N
    num_tokens      int         M
    old_logits      float32     [M]  behaviour-policy logits, shift included (log-probs follow per mask)
    dce             float32     [G]  CE_full + tau - CE_g
    rho             float32     [G]  1 - kept/M
    ce              float32     [G]  CE_g
    ce_full         float       CE with every visual token
    prompt, target  str
    logit_shift     float       b added to the policy's logits for this sample (stage.rollout_budget; else 0)
    num_frames      int         frames decoded for the sample (T; T' = T / temporal patch)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, MutableMapping, Sequence

import numpy as np
import torch

from pipeline.cache import ByteLRU
from pipeline.config import Config, ConfigError, DataConfig, LearnerConfig, PolicyConfig, StageConfig, WorldConfig
from pipeline.data.prompts import CAPTION_PROMPT, qa_prompt
from pipeline.metrics import MetricsWriter, format_metrics, mean_metrics, timed
from pipeline.policy import Question, ScorePolicy, padded_logits
from pipeline.rewards import PackedMasks, budget_shift, delta_ce, pack_masks, sample_masks, sparsity, unpack_masks
from pipeline.mllm.base import stack_side
from pipeline.update import (KEEP_PROB, KEPT, LR, REWARD, ROLLOUTS_PER_S, SAFE_FRAC, VERSION, VERSION_LAG, Optimizer,
                             TorchOptimizer, lr_at, ppo_update)

Tensor = torch.Tensor
STAGES = ("pseudo_video", "real_video")



# =============================================================================================
# seeds and targets


def _mix(*parts: int | str) -> int:
    """A 63-bit seed from integers/strings (stable across processes and Python versions)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def stage_seed(run_seed: int, stage: str) -> int:
    """Seed of one curriculum stage: distinct streams per stage from one run seed."""
    return _mix("stage", int(run_seed), stage)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator that draws the masks of ``step`` (independent of earlier steps, so a
    resumed stage draws what an uninterrupted one would)."""
    return torch.Generator(device="cpu").manual_seed(_mix("step", int(seed), int(step)))


def init_policy(embed_dim: int, cfg: PolicyConfig, seed: int) -> ScorePolicy:
    """A fresh policy whose initial weights depend only on ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_mix("policy-init", int(seed)) % (2**63))
        return ScorePolicy(embed_dim, cfg)


def parse_qa(qa: Any) -> list[dict]:
    """A sample's ``qa`` field (JSON str/bytes, list, numpy object array or None) -> list of dicts."""
    if qa is None:
        return []
    if isinstance(qa, bytes):
        qa = qa.decode("utf-8")
    if isinstance(qa, str):
        qa = json.loads(qa) if qa.strip() else []
    if isinstance(qa, np.ndarray):
        qa = qa.tolist()
    if isinstance(qa, dict):
        qa = [qa]
    return [q for q in qa if isinstance(q, dict)]


def select_target(sample: Mapping[str, Any], seed: int = 0, resample: bool = False) -> tuple[str, str]:
    """``(prompt, target)`` the MLLM is scored on for this sample (see module doc). ``resample``
    (``stage.resample_qa``): a video's data epoch ``e > 0`` (its ``epoch`` field) draws the QA pair
    again with ``crc32(f"{seed}:{e}:{sample_id}")`` - the policy never sees the question, so over
    the epochs it has to keep what every question about the video needs, not only the one asked
    first. A video sample with a ``conversation`` (LLaVA-style data) is scored on it instead:
    :func:`pipeline.data.conversations.chat_target`."""
    kind = str(sample.get("kind", "video"))
    if kind != "pseudo_video" and sample.get("conversation"):
        from pipeline.data.conversations import chat_target

        return chat_target(sample["conversation"])
    if kind != "pseudo_video":
        usable = [q for q in parse_qa(sample.get("qa")) if q.get("question") and q.get("answer")]
        if usable:
            epoch = int(sample.get("epoch", 0) or 0) if resample else 0
            key = f"{seed}:{sample['sample_id']}" if epoch == 0 else f"{seed}:{epoch}:{sample['sample_id']}"
            q = usable[zlib.crc32(key.encode()) % len(usable)]
            return qa_prompt(str(q["question"])), str(q["answer"])
    caption = sample.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"sample {sample.get('sample_id')!r} has neither QA nor a caption to score")
    return CAPTION_PROMPT, caption.strip()


# =============================================================================================
# rollout


STATE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def state_to_numpy(X: Tensor) -> tuple[np.ndarray, str]:
    """``(array, dtype name)`` of a state tensor for a rollout record: float32/float16 as they are,
    bfloat16 (which numpy lacks) as its raw 16 bits in ``int16`` - half the bytes, no rounding."""
    X = X.detach().to("cpu")
    if X.dtype == torch.bfloat16:
        return X.view(torch.int16).numpy(), "bfloat16"
    if X.dtype not in (torch.float32, torch.float16):
        X = X.float()
    return X.numpy(), str(X.dtype).removeprefix("torch.")


def state_from_numpy(a: np.ndarray, dtype: str) -> Tensor:
    """Inverse of :func:`state_to_numpy` (``a`` must be writable: torch shares its memory)."""
    if dtype not in STATE_DTYPES:
        raise ValueError(f"rollout record: unknown x_dtype {dtype!r} (expected one of {sorted(STATE_DTYPES)})")
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t.to(STATE_DTYPES[dtype])


def pad_steps(xs: Sequence[Tensor], steps: int | None = None) -> Tensor:
    """``[T'_b, ...]`` tensors -> ``[B, steps, ...]`` zero-padded at the end (``steps``: the longest)."""
    t = max(int(x.shape[0]) for x in xs) if steps is None else int(steps)
    out = xs[0].new_zeros((len(xs), t, *xs[0].shape[1:]))
    for b, x in enumerate(xs):
        out[b, : x.shape[0]] = x
    return out


def token_valid(steps: Tensor | None, n: int, max_steps: int) -> Tensor | None:
    """``[B, max_steps * n]`` bool: True on each sample's own ``steps[b] * n`` tokens (flattened
    ``t * n + i``, so a sample's real tokens are a prefix); ``None`` when ``steps`` is None."""
    if steps is None:
        return None
    return torch.arange(max_steps * n)[None, :] < (steps.to("cpu", torch.long) * n)[:, None]


@dataclass
class RolloutBatch:
    """B samples x G rollouts. Tensors on CPU except ``X`` (the adapter's device and dtype).

    Samples of different ``T'`` (module doc, *variable length*): ``X``, the masks and
    ``old_logits`` are padded to the longest and ``steps`` holds each sample's ``T'``; padded
    tokens are never kept (mask bits 0) and their logits are 0. ``steps`` None: every sample has
    ``X.shape[1]`` steps (an equal-length batch, unpadded)."""

    sample_ids: list[str]
    policy_version: Tensor  # [B] int64
    X: Tensor  # [B, T', N, D] the state (float32, or the rollout's state_dtype); zero-padded past steps[b]
    grid: tuple[int, int]  # (gh, gw)
    masks: PackedMasks  # bits [B, G, ceil(M/8)], M = T'*N of the longest
    old_logits: Tensor  # [B, M] float32
    dce: Tensor  # [B, G] float32
    rho: Tensor  # [B, G] float32 (1 - kept / the sample's own token count)
    ce_full: Tensor  # [B] float32
    ce: Tensor  # [B, G] float32
    prompts: list[str]
    targets: list[str]
    shift: Tensor | None = None  # [B] float32 logit shift b of the behaviour policy (stage.rollout_budget); None = 0
    steps: Tensor | None = None  # [B] int64 each sample's T' when they differ; None: all X.shape[1]
    num_frames: Tensor | None = None  # [B] int64 frames decoded per sample (data/frames_* metrics); None: unknown
    question: Tensor | None = None  # [B, L, D] a question-aware policy's words (X's dtype), zero-padded; None: agnostic
    question_mask: Tensor | None = None  # [B, L] bool, True on each sample's real words

    def question_input(self) -> Question | None:
        """What the policy reads besides ``X``: ``(Q, mask)`` or None (a question-agnostic policy)."""
        return None if self.question is None else (self.question, self.question_mask)

    @property
    def size(self) -> int:
        return len(self.sample_ids)

    @property
    def group_size(self) -> int:
        return int(self.dce.shape[1])

    @property
    def num_tokens(self) -> int:
        """``M`` of the batch: the longest sample's ``T' * N``."""
        return int(self.masks.num_tokens)

    def sample_steps(self) -> list[int]:
        """Each sample's ``T'``."""
        return [int(self.X.shape[1])] * self.size if self.steps is None else [int(t) for t in self.steps]

    def token_valid(self) -> Tensor | None:
        """``[B, M]`` bool, True on each sample's real tokens; ``None`` for an equal-length batch."""
        return token_valid(self.steps, int(self.X.shape[2]), int(self.X.shape[1]))

    def unpacked_masks(self) -> Tensor:
        """``[B, G, M]`` bool (CPU)."""
        return unpack_masks(self.masks)

    def to_records(self) -> list[dict[str, Any]]:
        """One rollout record per sample (layout in the module doc), each at its own ``T'``."""
        X, x_dtype = state_to_numpy(self.X)
        Q = None if self.question is None else state_to_numpy(self.question.to(self.X.dtype))[0]
        bits = self.masks.bits.numpy()
        n = int(X.shape[2])
        masks = None if self.steps is None else self.unpacked_masks()
        out = []
        for b, sid in enumerate(self.sample_ids):
            t = None if self.steps is None else int(self.steps[b])
            rec = {
                "sample_id": sid,
                "policy_version": int(self.policy_version[b]),
                "X": X[b] if t is None else X[b, :t],
                "x_dtype": x_dtype,
                "grid": np.asarray(self.grid, dtype=np.int64),
                "mask_bits": bits[b] if t is None else pack_masks(masks[b, :, : t * n]).bits.numpy(),
                "num_tokens": self.num_tokens if t is None else t * n,
                "old_logits": (self.old_logits[b] if t is None else self.old_logits[b, : t * n]).numpy(),
                "dce": self.dce[b].numpy(),
                "rho": self.rho[b].numpy(),
                "ce": self.ce[b].numpy(),
                "ce_full": float(self.ce_full[b]),
                "prompt": self.prompts[b],
                "target": self.targets[b],
                "logit_shift": 0.0 if self.shift is None else float(self.shift[b]),
            }
            if self.num_frames is not None:
                rec["num_frames"] = int(self.num_frames[b])
            if self.question is not None:
                rec["question"] = Q[b, : int(self.question_mask[b].sum())]
            out.append(rec)
        return out

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> "RolloutBatch":
        """Records of one token grid, width, state dtype and G back into a batch; records of
        different ``T'`` are padded to the longest (class doc), equal ones stacked as they are."""
        if not records:
            raise ValueError("from_records: no records")
        shapes = {(np.shape(r["X"])[1:], np.shape(r["mask_bits"])[0], str(r.get("x_dtype", "float32"))) for r in records}
        if len(shapes) > 1:
            raise ValueError(f"from_records: records of different shapes (N, D), G or state dtype cannot form one batch: "
                             f"{sorted(shapes)}")
        grids = {tuple(int(g) for g in r["grid"]) for r in records}
        if len(grids) > 1:
            raise ValueError(f"from_records: different grids {sorted(grids)}")
        n = int(np.shape(records[0]["X"])[1])
        for r in records:
            if int(r["num_tokens"]) != np.shape(r["X"])[0] * n:
                raise ValueError(f"from_records: {r['sample_id']}: num_tokens {int(r['num_tokens'])} is not T'*N of X "
                                 f"{np.shape(r['X'])}")
        lengths = [int(np.shape(r["X"])[0]) for r in records]
        T = max(lengths)
        equal = len(set(lengths)) == 1

        def f32(key: str) -> Tensor:
            return torch.from_numpy(np.stack([np.asarray(r[key], dtype=np.float32) for r in records]))

        x_dtype = str(records[0].get("x_dtype", "float32"))
        if equal:
            bits = torch.from_numpy(np.stack([np.asarray(r["mask_bits"], dtype=np.uint8) for r in records]))
            X = state_from_numpy(np.stack([np.asarray(r["X"]) for r in records]), x_dtype)
            old = f32("old_logits")
        else:  # pad X, the behaviour logits and the masks to the longest; padded tokens never kept
            X = pad_steps([state_from_numpy(np.array(r["X"]), x_dtype) for r in records], T)
            old = pad_steps([torch.from_numpy(np.asarray(r["old_logits"], dtype=np.float32)) for r in records], T * n)
            masks = [unpack_masks(PackedMasks(torch.from_numpy(np.asarray(r["mask_bits"], dtype=np.uint8)),
                                              int(r["num_tokens"]))) for r in records]  # [G, M_b] each
            bits = pack_masks(torch.stack([torch.nn.functional.pad(m, (0, T * n - m.shape[1])) for m in masks])).bits
        shift = torch.tensor([float(r.get("logit_shift", 0.0)) for r in records], dtype=torch.float32)
        frames = ([int(r["num_frames"]) for r in records]
                  if all(r.get("num_frames") is not None for r in records) else None)
        asked = [r.get("question") is not None for r in records]
        if any(asked) and not all(asked):
            raise ValueError("from_records: some records carry a question and some do not (one policy makes a batch)")
        question = qmask = None
        if all(asked):
            question, qmask = pad_words([state_from_numpy(np.array(r["question"]), x_dtype) for r in records])
        return cls(
            sample_ids=[str(r["sample_id"]) for r in records],
            policy_version=torch.tensor([int(r["policy_version"]) for r in records], dtype=torch.long),
            X=X,
            grid=next(iter(grids)),  # type: ignore[arg-type]
            masks=PackedMasks(bits, T * n),
            old_logits=old,
            dce=f32("dce"),
            rho=f32("rho"),
            ce_full=torch.tensor([float(r["ce_full"]) for r in records], dtype=torch.float32),
            ce=f32("ce"),
            prompts=[str(r["prompt"]) for r in records],
            targets=[str(r["target"]) for r in records],
            shift=shift if bool(shift.any()) else None,  # None = no shift, as the rollout made it
            steps=None if equal else torch.tensor(lengths, dtype=torch.long),
            num_frames=None if frames is None else torch.tensor(frames, dtype=torch.long),
            question=question,
            question_mask=qmask,
        )


def pad_words(words: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``[L_b, D]`` word embeddings -> ``(Q[B, L, D]`` zero-padded, ``mask[B, L]`` bool): a question-aware
    policy's :data:`~pipeline.policy.Question` (``L`` at least 1 so an all-empty batch has a shape)."""
    L = max(1, max(int(w.shape[0]) for w in words))
    Q = words[0].new_zeros((len(words), L, words[0].shape[-1]))
    mask = torch.zeros(len(words), L, dtype=torch.bool)
    for b, w in enumerate(words):
        Q[b, : w.shape[0]] = w
        mask[b, : w.shape[0]] = True
    return Q, mask


def question_aware(policy: torch.nn.Module) -> bool:
    """Whether ``policy`` (a ScorePolicy, or a DeepSpeed engine around one) reads the question."""
    return bool(getattr(getattr(policy, "module", policy), "cfg").question_aware)


def encode_sample(adapter: Any, sample: Mapping[str, Any], cache: MutableMapping[Any, Any] | None = None
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """``(X[T', N, D], side)`` of a sample (``side``: the family's per-token side features, ``{}``
    for most), from ``cache`` (keyed by sample id) when present."""
    sid = str(sample["sample_id"])
    if cache is not None and sid in cache:
        return cache[sid]
    out = adapter.encode_video_with_side(sample["frames"])
    if cache is not None:
        cache[sid] = out
    return out


def length_buckets(kept: Sequence[int], max_tokens: int | None = None, max_rows: int | None = None) -> list[list[int]]:
    """Row indices sorted by ``kept`` (ascending) cut into consecutive buckets so that a bucket's
    padded size ``rows * max(kept)`` stays within ``max_tokens`` and its row count within
    ``max_rows`` (each bucket has at least one row). ``None``: no limit."""
    order = sorted(range(len(kept)), key=lambda i: (kept[i], i))
    buckets: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur:
            padded = (len(cur) + 1) * kept[i]  # kept[i] is the bucket's new max (ascending order)
            if (max_tokens is not None and padded > max_tokens) or (max_rows is not None and len(cur) >= max_rows):
                buckets.append(cur)
                cur = []
        cur.append(i)
    if cur:
        buckets.append(cur)
    return buckets


def score_packed(adapter: Any, X: Tensor, masks: Tensor, prompts: list[str], targets: list[str], *,
                 side: dict[str, Tensor] | None = None, ce_full: Tensor | None = None,
                 max_tokens: int | None = None, max_rows: int | None = None,
                 steps: Tensor | None = None) -> tuple[Tensor, Tensor, dict]:
    """Padding-aware version of the rollout's single ``adapter.score(X, [all-ones, masks])`` call.

    ``X[B,T',N,D]``, ``masks[B,G,M]`` bool -> ``(ce_full[B], ce[B,G], stats)`` (float32, CPU), the
    same values (up to float round-off) as ``adapter.score`` on ``keep = [ones, masks]``:

    * ``CE_full``: taken from ``ce_full`` when given (a per-sample cache: it does not depend on the
      policy), else one batch of B full rows;
    * masked rows: sorted by kept-token count and cut into buckets (:func:`length_buckets`, budget in
      visual tokens incl. padding), each bucket one ``adapter.score`` call with ``G=1`` rows, so no
      row is padded to the full length.

    ``side``: the batch's side features (``[B, T', N, ...]``), sliced with ``X``.

    ``steps[B]``: each sample's ``T'`` when they differ (``X`` zero-padded, ``masks`` False past a
    sample's own ``T'*N``). The MLLM lays out a video of ``T'`` steps, so every call holds one
    ``T'``: the samples are grouped by ``T'`` (each group's full rows one call; its masked rows
    bucketed as above) and each call sees ``X[:, :T']``, never a padded step. ``None`` (one
    length): the single group is the whole batch, the calls are the ones above.

    ``stats``: ``{calls, padded_visual_tokens, real_visual_tokens}``.
    """
    B, G, M = masks.shape
    T = int(X.shape[1])
    lengths = [T] * B if steps is None else [int(t) for t in steps]
    groups: dict[int, list[int]] = {}
    for b, t in enumerate(lengths):
        groups.setdefault(t, []).append(b)
    n = M // T

    def part(t: int, sample: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # X and side features of these samples at T' = t (the whole X when nothing is padded)
        if t == T and len(groups) == 1:
            sample_d = sample.to(X.device)
            return X[sample_d], {k: v[sample.to(v.device)] for k, v in (side or {}).items()}
        return X[sample.to(X.device), :t], {k: v[sample.to(v.device), :t] for k, v in (side or {}).items()}

    calls = 0
    if ce_full is None:
        if len(groups) == 1:
            full = torch.ones(B, 1, M, dtype=torch.bool)
            ce_full = adapter.score(X, full.to(X.device), prompts, targets, side=side).float().cpu()[:, 0]
            calls += 1
        else:
            ce_full = torch.empty(B, dtype=torch.float32)
            for t, members in groups.items():
                sample = torch.tensor(members, dtype=torch.long)
                Xt, side_t = part(t, sample)
                full = torch.ones(len(members), 1, t * n, dtype=torch.bool)
                ce_full[sample] = adapter.score(Xt, full.to(X.device), [prompts[b] for b in members],
                                                [targets[b] for b in members], side=side_t).float().cpu()[:, 0]
                calls += 1
    flat = masks.reshape(B * G, M)
    kept = flat.sum(1).tolist()
    out = torch.empty(B * G, dtype=torch.float32)
    padded = 0
    for t, members in groups.items():
        group_rows = [b * G + g for b in members for g in range(G)]  # all rows when one group
        for bucket in length_buckets([kept[r] for r in group_rows], max_tokens, max_rows):
            rows = [group_rows[i] for i in bucket]
            idx = torch.tensor(rows, dtype=torch.long)
            sample = idx // G
            Xt, rows_side = part(t, sample)
            ce = adapter.score(Xt, flat[idx, : t * n].unsqueeze(1).to(X.device),
                               [prompts[int(s)] for s in sample], [targets[int(s)] for s in sample], side=rows_side)
            out[idx] = ce.float().cpu()[:, 0]
            padded += len(rows) * max(kept[i] for i in rows)
            calls += 1
    stats = {"calls": calls, "padded_visual_tokens": padded, "real_visual_tokens": int(sum(kept))}
    return ce_full.float().cpu(), out.view(B, G), stats


@torch.no_grad()
def rollout(
    adapter: Any,
    policy: ScorePolicy,
    samples: Sequence[Mapping[str, Any]],
    stage_cfg: StageConfig,
    generator: torch.Generator,
    policy_version: int = 0,
    *,
    seed: int = 0,
    cache: MutableMapping[Any, Tensor] | None = None,
    state_dtype: torch.dtype | None = None,
) -> RolloutBatch:
    """Group rollouts for a batch of samples, of one length or several (module doc, *variable
    length*: padded to the longest ``T'``, each sample scored and masked at its own length; one
    length takes exactly the unpadded path). ``generator``: a CPU generator
    (masks are drawn on CPU from CPU logits, the same on every device). ``seed`` picks the QA pair.
    ``cache``: what does not depend on the policy, kept across steps and epochs (a dict or a
    :class:`pipeline.cache.ByteLRU`): ``X`` under the sample id, ``CE_full`` under
    ``("ce_full", sample id, prompt, target)``. ``state_dtype``: the dtype the state ``X`` is
    returned in (what travels to the learner); the policy reads the state in that dtype too, so
    the behaviour logits are the ones the learner recomputes, while the MLLM scores the original
    ``X``."""
    if not samples:
        raise ValueError("rollout: no samples")
    encoded = [encode_sample(adapter, s, cache) for s in samples]
    Xs = [x for x, _ in encoded]
    grids = {tuple(x.shape[1:]) for x in Xs}
    if len(grids) > 1:
        ids = [str(s["sample_id"]) for s in samples]
        raise ValueError(f"rollout: samples {ids} have different token grids / widths (N, D) {sorted(grids)}; "
                         "frames must share one frame size")
    lengths = [int(x.shape[0]) for x in Xs]
    if len(set(lengths)) == 1:
        steps = None
        X = torch.stack(Xs)  # [B, T', N, D]
        side = stack_side([s for _, s in encoded])  # {} unless the family has side features (DeepStack)
    else:  # padded to the longest T'; `steps` says how much of each is real
        steps = torch.tensor(lengths, dtype=torch.long)
        X = pad_steps(Xs)
        side = {k: pad_steps([s[k] for _, s in encoded]) for k in encoded[0][1]}
    B, T, N, _ = X.shape
    valid = token_valid(steps, N, T)  # [B, M] or None
    _, gh, gw = adapter.visual_grid(T)  # (gh, gw) do not depend on the frame count
    pt = [select_target(s, seed, stage_cfg.resample_qa) for s in samples]
    prompts, targets = [p for p, _ in pt], [t for _, t in pt]
    state = X if state_dtype is None else X.to(state_dtype)
    dev = next(policy.parameters()).device
    question = qmask = None
    if question_aware(policy):  # the words travel in the state's dtype, as X does
        question, qmask = pad_words([adapter.question_embeddings(p).to(state.dtype) for p in prompts])
    asked = None if question is None else (question.to(dev), qmask.to(dev))
    logits = padded_logits(policy, state.to(dev), (gh, gw), steps, asked).float().cpu()  # [B, M]
    shift = None
    if stage_cfg.rollout_budget is not None:
        # masks at an inference-like budget: r ~ U[lo, hi] per sample, logits shifted to keep r*M
        # (M: the sample's own token count)
        lo, hi = stage_cfg.rollout_budget
        r = lo + (hi - lo) * torch.rand(B, generator=generator)
        if valid is None:
            shift = budget_shift(logits, r * logits.shape[1])
        else:
            shift = budget_shift(logits, r * valid.sum(-1), valid=valid)
        logits = logits + shift[:, None]
    if valid is not None:
        logits = logits.masked_fill(~valid, 0.0)  # padded tokens: no decision, logit 0 by convention
    G = stage_cfg.group_size
    masks = sample_masks(logits, G, generator, valid)  # [B, G, M] bool, never a padded token
    # CE_full does not depend on the policy: cached per (sample, prompt, target) across epochs
    keys = [("ce_full", str(s["sample_id"]), p, t) for s, p, t in zip(samples, prompts, targets)]
    cached = None
    if cache is not None and all(k in cache for k in keys):
        cached = torch.stack([cache[k] for k in keys])
    ce_full, ce, _ = score_packed(adapter, X, masks, prompts, targets, side=side, ce_full=cached,
                                  max_tokens=stage_cfg.score_max_tokens or None, steps=steps)
    if cache is not None:
        cache.update(zip(keys, ce_full.unbind(0)))
    return RolloutBatch(
        sample_ids=[str(s["sample_id"]) for s in samples],
        policy_version=torch.full((B,), int(policy_version), dtype=torch.long),
        X=state,
        grid=(int(gh), int(gw)),
        masks=pack_masks(masks),
        old_logits=logits,
        dce=delta_ce(ce_full, ce, stage_cfg.tau_abs, stage_cfg.tau_rel).float(),
        rho=sparsity(masks, valid).float(),
        ce_full=ce_full,
        ce=ce,
        prompts=prompts,
        targets=targets,
        shift=shift,
        steps=steps,
        num_frames=(torch.tensor([int(np.shape(s["frames"])[0]) for s in samples], dtype=torch.long)
                    if all("frames" in s for s in samples) else None),
        question=question,
        question_mask=qmask,
    )


# =============================================================================================
# the loop


def train_step(
    adapter: Any,
    policy: ScorePolicy,
    opt: Optimizer,
    samples: Sequence[Mapping[str, Any]],
    stage_cfg: StageConfig,
    step: int,
    *,
    seed: int,
    cache: MutableMapping[Any, Tensor] | None = None,
) -> dict[str, float]:
    """One step: rollout with the current weights (version ``step``) -> :func:`~pipeline.update.ppo_update`
    through ``opt`` (a :class:`~pipeline.update.TorchOptimizer` over ``policy``)."""
    m: dict[str, float] = {}
    lr = lr_at(step, stage_cfg)
    opt.set_lr(lr)
    with timed(m, "rollout"):
        batch = rollout(adapter, policy, samples, stage_cfg, step_generator(seed, step), step, seed=seed, cache=cache)
    with timed(m, "learn"):
        m.update(ppo_update(opt, batch, stage_cfg))
    m[LR] = lr
    m[VERSION] = float(step)
    m[VERSION_LAG] = 0.0
    m[ROLLOUTS_PER_S] = batch.size * batch.group_size / max(m["timing/rollout"] + m["timing/learn"], 1e-9)
    return m


def batched(samples: Iterable[Mapping[str, Any]], batch_size: int) -> Iterator[list[Mapping[str, Any]]]:
    """Consecutive batches of ``batch_size`` samples in arrival order, whatever their frame counts
    (:func:`rollout` pads a batch of several lengths), as the Ray stream re-blocks them. An
    incomplete last batch is dropped at the end of a finite stream."""
    batch: list[Mapping[str, Any]] = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield batch
            batch = []


def weights_sha(policy: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of the policy's state dict bytes: identity of a set of weights."""
    h = hashlib.sha256()
    for k, v in sorted(policy.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def summary_line(s: Mapping[str, Any]) -> str:
    """One line closing a stage, for the single-process trainer and the Ray stage job alike: the
    common figures, then whichever extras the summary carries (versions, weights hash, drops)."""
    f, l = s.get("first") or {}, s.get("last") or {}

    def arrow(k: str) -> str:
        return f"{f.get(k, float('nan')):.3f}->{l.get(k, float('nan')):.3f}"

    seconds = s.get("stage_seconds", s.get("seconds", 0.0))
    parts = [f"[{s['stage']}] {s.get('steps_done', 0)} steps in {seconds:.1f}s ({s.get('rollouts_per_s', 0.0):.1f} rollouts/s)"]
    if "final_version" in s:
        parts.append(f"policy v{s['final_version']}")
    parts.append(f"kept {arrow(KEPT)} safe {arrow(SAFE_FRAC)} reward {arrow(REWARD)} keep_prob {arrow(KEEP_PROB)}")
    if "start_sha" in s:
        parts.append(f"weights {s['start_sha']}->{s['final_sha']}")
    if "dropped_stale" in s or "retries" in s:
        parts.append(f"stale-dropped {s.get('dropped_stale', 0)} retries {s.get('retries', 0)} "
                     f"quarantined {sum((s.get('quarantined') or {}).values())}")
    if s.get("exhausted"):
        parts.append("(data exhausted)")
    if s.get("policy"):
        parts.append(f"-> {s['policy']}")
    return " ".join(parts)


def train_stage(
    adapter: Any,
    policy: ScorePolicy,
    sample_iter: Iterable[Mapping[str, Any]],
    stage_cfg: StageConfig,
    seed: int,
    writer: MetricsWriter | None = None,
    start_step: int = 0,
    *,
    name: str = "stage",
    cache: MutableMapping[Any, Tensor] | None = None,
    optimizer: Optimizer | None = None,
    progress: bool = True,
    log: Callable[[str], Any] | None = print,
    window: int | None = None,
) -> dict[str, Any]:
    """Steps ``start_step .. stage_cfg.steps-1``: batches of samples (any frame counts) from
    ``sample_iter`` -> :func:`train_step`. Writes every step's scalars to ``writer``; shows a tqdm bar with ETA;
    prints one summary line. Returns ``{stage, steps_done, seconds, rollouts_per_s, first, last
    (metric means over the first/last ``window`` steps), start_sha, final_sha, exhausted, history}``."""
    from tqdm.auto import tqdm

    window = window or LearnerConfig().summary_window
    optimizer = optimizer if optimizer is not None else TorchOptimizer(policy, stage_cfg)
    batches = batched(sample_iter, stage_cfg.batch_size)
    start_sha = weights_sha(policy)
    history: list[dict[str, float]] = []
    exhausted = False
    t0 = time.perf_counter()
    bar = tqdm(total=stage_cfg.steps, initial=start_step, desc=name, unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    try:
        for step in range(start_step, stage_cfg.steps):
            dm: dict[str, float] = {}
            with timed(dm, "data"):
                samples = next(batches, None)
            if samples is None:
                exhausted = True
                break
            m = train_step(adapter, policy, optimizer, samples, stage_cfg, step, seed=seed, cache=cache)
            m.update(dm)
            history.append(m)
            if writer is not None:
                writer.log(step, m)
            bar.update(1)
            bar.set_postfix_str(format_metrics(m, (KEPT, SAFE_FRAC, REWARD)), refresh=False)
    finally:
        bar.close()
        if writer is not None:
            writer.flush()
    seconds = time.perf_counter() - t0
    rollouts = sum(stage_cfg.batch_size * stage_cfg.group_size for _ in history)
    summary = {
        "stage": name,
        "start_step": start_step,
        "steps_done": len(history),
        "seconds": round(seconds, 3),
        "rollouts": rollouts,
        "rollouts_per_s": rollouts / seconds if seconds > 0 else 0.0,
        "first": mean_metrics(history[:window]),
        "last": mean_metrics(history[-window:]),
        "start_sha": start_sha,
        "final_sha": weights_sha(policy),
        "exhausted": exhausted,
        "history": history,
    }
    if log is not None:
        log(summary_line(summary))
    return summary


# =============================================================================================
# local data (no Ray): the same samples the Ray Data stream yields


def _count(q: Counter | None, reason: str) -> None:
    if q is not None:
        q[reason] += 1


def iter_pseudo_videos_local(dcfg: DataConfig, seed: int, *, epochs: int | None = None,
                             quarantine: Counter | None = None) -> Iterator[dict[str, Any]]:
    """Stage-1 samples from ``dcfg.image_shards``, cycling epochs. Epoch ``e`` groups each shard's good
    images with ``shard_order(n, seed + e, basename)`` and :func:`group_consecutive` (epoch 0 is
    exactly ``actors.data_stream.pseudo_video_dataset(cfg, seed)``; :func:`stage_samples` passes
    ``run.seed``). Each shard is decoded once and kept in memory (small local data sets; the Ray
    stream is the path for large ones). Bad input is counted in ``quarantine`` by reason and skipped."""
    from pipeline.data import readers
    from pipeline.data.pseudo_video import group_consecutive, make_pseudo_video, shard_order
    from pipeline.data.quarantine import BadSample

    paths = readers.list_image_shards(dcfg.image_shards, dcfg.s3)
    if not paths:
        raise FileNotFoundError(f"no image shards (*.parquet) under data.image_shards={dcfg.image_shards!r}")
    good_by_shard: dict[str, list[dict]] = {}
    for epoch in itertools.count() if epochs is None else range(epochs):
        yielded = 0
        for path in paths:
            if path not in good_by_shard:  # decode each shard once; later epochs regroup
                rows: list[dict] = []
                try:
                    for row in readers.iter_image_shard(path, dcfg.s3):
                        rows.append(row)
                except BadSample as e:
                    _count(quarantine, e.reason)
                good_by_shard[path] = []
                for row in rows:
                    try:
                        good_by_shard[path].append(readers.load_image(row, dcfg.frame_size, dcfg.max_caption_words))
                    except BadSample as e:
                        _count(quarantine, e.reason)
            good = good_by_shard[path]
            order = shard_order(len(good), seed + epoch, os.path.basename(path))
            for group in group_consecutive([good[i] for i in order], dcfg.pseudo_images):
                s = make_pseudo_video([g["image"] for g in group], [g["caption"] for g in group],
                                      [g["id"] for g in group], dcfg.pseudo_repeat, [g["objects"] for g in group])
                s.update(kind="pseudo_video", qa="[]", source=path)
                yielded += 1
                yield s
        if yielded == 0:
            raise ValueError(f"no pseudo-video can be built from {dcfg.image_shards!r} "
                             f"(every shard has fewer than {dcfg.pseudo_images} good images)")


def iter_videos_local(dcfg: DataConfig, *, epochs: int | None = None, quarantine: Counter | None = None,
                      frame_multiple: int | None = None) -> Iterator[dict[str, Any]]:
    """Stage-2 samples from ``dcfg.video_shards`` in annotation order (the Ray stream's order),
    cycling epochs; bad videos are counted once and skipped afterwards. Frames are sampled by
    ``data.sampling`` (``frame_multiple``: the MLLM's temporal patch, over ``data.frame_multiple``)."""
    from pipeline.data import readers
    from pipeline.data.quarantine import BadSample
    from pipeline.data.video import FrameSampling

    sampling = FrameSampling.from_config(dcfg, frame_multiple)

    files = readers.list_video_annotations(dcfg.video_shards, dcfg.s3)
    if not files:
        raise FileNotFoundError(f"no video annotations (*.jsonl) under data.video_shards={dcfg.video_shards!r}")
    index: list[dict] = []
    seen: set[str] = set()
    for path in files:
        try:
            entries = readers.read_video_index(path, dcfg.s3)
        except BadSample as e:
            _count(quarantine, e.reason)
            continue
        for ent in entries:
            if isinstance(ent, BadSample):
                _count(quarantine, ent.reason)
            elif ent["id"] in seen:
                _count(quarantine, "bad_annotation")
            else:
                seen.add(ent["id"])
                index.append(ent)
    bad: set[str] = set()
    for epoch in itertools.count() if epochs is None else range(epochs):
        yielded = 0
        for rec in index:
            if rec["id"] in bad:
                continue
            try:
                v = readers.load_video(rec, sampling, dcfg.frame_size, dcfg.max_caption_words, dcfg.s3)
            except BadSample as e:
                _count(quarantine, e.reason)
                bad.add(rec["id"])
                continue
            yielded += 1
            yield {"sample_id": "vid:" + v["id"], "kind": "video", "frames": v["frames"], "caption": v["caption"],
                   "qa": v["qa"], "objects": v["objects"], "segments": [0], "source_ids": [v["id"]],
                   "source": rec.get("source", ""), "epoch": epoch}
        if yielded == 0:
            raise ValueError(f"no usable video under {dcfg.video_shards!r}")


def iter_world_pseudo_videos(wcfg: WorldConfig, dcfg: DataConfig) -> Iterator[dict[str, Any]]:
    """Endless stage-1 samples generated in-process from the world's ``train`` split (never the
    ``eval`` split that ``generate_world`` writes): clip ``i`` uses images ``i*k .. i*k+k-1``."""
    from pipeline.data.pseudo_video import make_pseudo_video
    from pipeline.data.video import resize_rgb
    from pipeline.data.world import make_image, sample_rng

    k = dcfg.pseudo_images
    for i in itertools.count():
        imgs, caps, ids, objs = [], [], [], []
        for j in range(i * k, i * k + k):
            s = make_image(wcfg, sample_rng(wcfg.seed, "train", "image", j))
            imgs.append(resize_rgb(s["image"], dcfg.frame_size))
            caps.append(s["caption"])
            ids.append(f"img-train-{wcfg.seed}-{j:06d}")
            objs.append(json.dumps(s["objects"], sort_keys=True))
        s = make_pseudo_video(imgs, caps, ids, dcfg.pseudo_repeat, objs)
        s.update(kind="pseudo_video", qa="[]", source="world:train")
        yield s


def iter_world_videos(wcfg: WorldConfig, dcfg: DataConfig, frame_multiple: int | None = None) -> Iterator[dict[str, Any]]:
    """Endless stage-2 samples generated in-process from the world's ``train`` split at
    ``data.frame_size``: uniform sampling renders ``data.video_frames`` frames; fps sampling
    renders the world's own length (``world.frames``, or its range) at ``world.fps`` and samples
    it as a decoded clip would be."""
    from pipeline.data.video import FrameSampling, resize_rgb
    from pipeline.data.world import make_video, sample_rng

    sampling = FrameSampling.from_config(dcfg, frame_multiple)
    if sampling.mode == "fps" and (wcfg.frames_max or wcfg.frames) < sampling.lowest:
        raise ValueError(f"world videos have at most {wcfg.frames_max or wcfg.frames} frames, fewer than "
                         f"data.min_frames ({sampling.lowest}): every one would be too short")
    for i in itertools.count():
        if sampling.mode == "uniform":
            v = make_video(wcfg, sample_rng(wcfg.seed, "train", "video", i), frames=dcfg.video_frames)
            rendered = v["frames"]
        else:
            v = make_video(wcfg, sample_rng(wcfg.seed, "train", "video", i))
            if len(v["frames"]) < sampling.lowest:  # too_short, as a decoded clip would be quarantined
                continue
            rendered = v["frames"][sampling.indices(len(v["frames"]), float(wcfg.fps))]
        frames = np.stack([resize_rgb(f, dcfg.frame_size) for f in rendered])
        vid = f"vid-train-{wcfg.seed}-{i:06d}"
        yield {"sample_id": "vid:" + vid, "kind": "video", "frames": frames, "caption": v["caption"],
               "qa": json.dumps(v["qa"], sort_keys=True), "objects": json.dumps(v["objects"], sort_keys=True),
               "segments": [0], "source_ids": [vid], "source": "world:train"}


DataSource = Literal["auto", "shards", "world"]


def stage_samples(stage: str, cfg: Config, *, source: DataSource = "auto",
                  quarantine: Counter | None = None, log: Callable[[str], Any] | None = print,
                  frame_multiple: int | None = None) -> Iterator[dict[str, Any]]:
    """The sample stream of a stage: ``shards`` (cfg.data paths), ``world`` (generated in-process),
    or ``auto`` (shards when the path holds any, else the world, said in one log line).
    ``frame_multiple``: the MLLM's temporal patch for fps sampling (``data.frame_multiple`` if None)."""
    from pipeline.data import readers

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    d = cfg.data
    if source in ("auto", "shards"):
        _check_native(stage, d)
    if source == "auto":
        listed = (readers.list_image_shards(d.image_shards, d.s3) if stage == "pseudo_video"
                  else readers.list_video_annotations(d.video_shards, d.s3))
        source = "shards" if listed else "world"
        if source == "world" and log is not None:
            where = d.image_shards if stage == "pseudo_video" else d.video_shards
            log(f"[{stage}] no shards under {where!r}: generating world samples in-process (train split)")
    if stage == "pseudo_video":
        if source == "shards":
            return iter_pseudo_videos_local(d, int(cfg.run.seed), quarantine=quarantine)
        return iter_world_pseudo_videos(cfg.world, d)
    if source == "shards":
        return iter_videos_local(d, quarantine=quarantine, frame_multiple=frame_multiple)
    return iter_world_videos(cfg.world, d, frame_multiple)


def _check_native(stage: str, d: DataConfig) -> None:
    """The single-process trainer reads the project's native shards only: other formats are a
    config error here, not a silent fall-back to generated samples."""
    from pipeline import storage
    from pipeline.data import sources

    kind = "image" if stage == "pseudo_video" else "video"
    path = d.image_shards if kind == "image" else d.video_shards
    if d.format == "native" or not (sources.llava.is_mixture(path) or storage.exists(path, d.s3)):
        return
    fmt = sources.format_of(d, kind)
    if fmt != "native":
        raise ConfigError(f"config: data.{kind}_shards: {fmt} data streams through Ray (jobs/train_stage.py, "
                          "jobs/train_curriculum.py); the single-process trainer reads native shards")


def _public(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "history"}


def train_curriculum_local(
    cfg: Config,
    adapter: Any,
    out_dir: str | Path,
    *,
    source: DataSource = "auto",
    progress: bool = True,
    log: Callable[[str], Any] | None = print,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """Both stages in this process. Layout under ``out_dir``: ``<stage>/policy/`` (each stage's final
    policy, ``save_pretrained``), ``final/policy/``, ``tensorboard/<stage>/``, ``summary.json``.
    Stage 2 starts from stage 1's saved policy (reloaded with ``from_pretrained``, as a separate
    stage job would) with a fresh optimizer; with ``grounding.epochs`` from the grounding warm
    start of that policy (:mod:`pipeline.grounding`, saved in ``grounding/policy/``). Returns the
    summary (also written as JSON)."""
    out = Path(out_dir)
    seed = int(cfg.run.seed)
    policy = init_policy(adapter.hidden_size, cfg.policy, seed).to(adapter.device)
    stages: dict[str, Any] = {}
    init_from: str | None = None
    for stage in STAGES:
        scfg: StageConfig = getattr(cfg.stage, stage)
        if init_from is not None:
            policy = ScorePolicy.from_pretrained(init_from, map_location=adapter.device)
        q: Counter = Counter()
        samples = stage_samples(stage, cfg, source=source, quarantine=q, log=log,
                                frame_multiple=adapter._frames_for(1))  # the temporal patch
        writer = MetricsWriter(out / "tensorboard" / stage) if tensorboard else None
        try:
            s = train_stage(adapter, policy, samples, scfg, stage_seed(seed, stage), writer, name=stage,
                            cache=ByteLRU.from_mb(cfg.rollout.cache_mb), progress=progress, log=log)
        finally:
            if writer is not None:
                writer.close()
        path = policy.save_pretrained(out / stage / "policy")
        s = _public(s)
        s.update(init_from=init_from, policy=str(path), quarantined=dict(q))
        stages[stage] = s
        init_from = str(path)
        if stage == "pseudo_video" and cfg.grounding.epochs:  # the warm start of a question-aware policy
            from pipeline.grounding import ground_policy

            g = ground_policy(cfg, adapter, policy, log=log)  # stage 1's policy, in place
            init_from = str(policy.save_pretrained(out / "grounding" / "policy"))
            stages["grounding"] = dict(g, policy=init_from)
    final = policy.save_pretrained(out / "final" / "policy")
    summary = {
        "seed": seed,
        "stages": stages,
        "final_policy": str(final),
        "final_sha": weights_sha(policy),
        "tensorboard": str(out / "tensorboard") if tensorboard else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
    return summary


__all__ = [
    "RolloutBatch", "select_target", "parse_qa", "rollout", "encode_sample", "score_packed", "length_buckets",
    "train_step", "train_stage",
    "train_curriculum_local", "batched", "weights_sha", "stage_seed", "step_generator", "init_policy",
    "iter_pseudo_videos_local", "iter_videos_local", "iter_world_pseudo_videos", "iter_world_videos",
    "stage_samples",
]
