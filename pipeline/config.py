"""Typed configuration: the one home of every default.

A run is described by :class:`Config`. YAML files under ``configs/`` override the defaults and
``--set a.b.c=value`` overrides the YAML (values parsed as YAML scalars). Everything is validated
before any Ray work starts; an unknown key or a bad value raises :class:`ConfigError` with one line
that names the key.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator


class ConfigError(ValueError):
    """A config problem, phrased as one line naming the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


MotionKind = Literal["static", "linear", "bounce", "appear", "disappear", "color_change"]
Background = Literal["plain", "gradient", "texture", "photo"]


#: the shapes world's objects (pipeline/data/world.py draws them): a scene's objects differ in both
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 190, 40),
    "blue": (30, 70, 240),
    "yellow": (245, 225, 20),
    "purple": (160, 40, 210),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "cross")


class WorldConfig(_Strict):
    """The shapes world: a seeded generator of image-caption pairs and videos with QA."""

    seed: int = 0
    images: int = Field(256, ge=0, description="image-caption pairs (stage-1 material)")
    videos: int = Field(128, ge=0, description="videos with caption and QA (stage-2 material, train split)")
    heldout_videos: int = Field(200, ge=0, description="evaluation videos (eval split, heldout/videos/; never trained on)")
    val_videos: int = Field(0, ge=0, description="validation videos (val split, val/videos/) for choosing the final policy; never trained or evaluated on")
    size: int = Field(64, ge=16, le=1024, description="frame height = width in pixels (even)")
    frames: int = Field(16, ge=2, le=256, description="frames per video (with frames_max: the fewest)")
    frames_max: int | None = Field(None, ge=2, le=256, description="videos of different durations: each video's frame "
                                                                 "count drawn uniformly from [frames, frames_max]")
    fps: int = Field(8, ge=1, le=120)
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(3, ge=1)
    grid: int = Field(4, ge=1, le=64, description="objects sit in (and move between) the cells of this grid; match the MLLM's token grid")
    object_size: float = Field(0.2, gt=0.0, le=1.0, description="object diameter / frame size")
    jitter: float = Field(1.0, ge=0.0, description="max offset of an object from its cell centre, pixels")
    background: Background | list[Background] = Field(
        "texture", description="background kind; a list: each sample draws one (a randomized world)")
    motion: list[MotionKind] = ["static", "linear", "bounce", "appear", "disappear", "color_change"]
    pan: float | tuple[float, float] = Field(
        0.0, description="camera pan over a video, fraction of the frame (0..0.5); [lo, hi]: drawn per video")
    noise: float | tuple[float, float] = Field(
        0.0, description="per-pixel Gaussian noise std (0..1 scale, at most 0.5); [lo, hi]: drawn per sample")
    shard_size: int = Field(64, ge=1, description="records per parquet shard / video jsonl shard")

    @field_validator("size")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (H.264 needs even frame sizes)")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        # a world without a frame range dumps without the key: world.json is the world's cache key
        out = handler(self)
        if isinstance(out, dict) and out.get("frames_max") is None:
            out.pop("frames_max", None)
        return out

    @model_validator(mode="after")
    def _check(self) -> "WorldConfig":
        if self.frames_max is not None and self.frames_max < self.frames:
            raise ValueError(f"frames_max ({self.frames_max}) must be >= frames ({self.frames}): the range is frames..frames_max")
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects must be >= min_objects")
        if self.max_objects > self.grid * self.grid:
            raise ValueError(f"max_objects must fit the {self.grid}x{self.grid} grid")
        if self.max_objects > min(len(SHAPES), len(COLORS)):
            raise ValueError(f"max_objects={self.max_objects}: a scene's objects have distinct shapes and colours, "
                             f"and the world has {len(SHAPES)} shapes and {len(COLORS)} colours")
        if self.object_size * self.size + 2 * self.jitter > self.size / self.grid + 1e-9:
            raise ValueError("object_size * size + 2 * jitter must fit in one grid cell (size / grid)")
        if not self.motion:
            raise ValueError("motion must name at least one kind")
        if isinstance(self.background, list) and not self.background:
            raise ValueError("background: an empty list (name at least one kind)")
        for key, top in (("pan", 0.5), ("noise", 0.5)):
            v = getattr(self, key)
            lo, hi = v if isinstance(v, tuple) else (v, v)
            if not 0.0 <= lo <= hi <= top:
                raise ValueError(f"{key} must be a value or [lo, hi] with 0 <= lo <= hi <= {top}, got {v}")
        moving = {"linear", "bounce"} & set(self.motion)
        if moving and self.grid < 2:
            raise ValueError(f"motion {sorted(moving)} needs grid >= 2: objects move between grid cells")
        # Moving objects need free cells to move into: beyond half of the cells, tracks that never
        # share a cell cannot always be drawn.
        if moving and self.max_objects > self.grid * self.grid // 2:
            raise ValueError(f"max_objects={self.max_objects} with moving objects {sorted(moving)} needs a grid with at "
                             f"least 2 cells per object (grid={self.grid}: at most {self.grid * self.grid // 2})")
        events = {"appear", "disappear", "color_change"} & set(self.motion)
        if events and self.frames < 4:
            raise ValueError(f"motion {sorted(events)} needs frames >= 4: the event must fall strictly inside the video")
        return self


class S3Config(_Strict):
    """S3 access. Credentials always come from the standard AWS environment/config/role."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL"
    )
    region: str | None = None


FPS_MIN_FRAMES = 4  # qwen-vl-utils' default of min_frames for fps sampling


class DataConfig(_Strict):
    """Where shards live and how samples are built from them."""

    image_shards: str = "runs/world/images"
    video_shards: str = "runs/world/videos"
    frame_size: int = Field(64, ge=16, description="frames are resized to this square size")
    pseudo_images: int = Field(4, ge=1, description="k: images per pseudo-video clip")
    pseudo_repeat: int = Field(4, ge=1, description="F: frames each image is repeated")
    # frame sampling (pipeline/data/video.py, FrameSampling): the rule of the MLLM's own processor
    sampling: Literal["uniform", "fps"] = Field(
        "uniform", description="uniform: video_frames frames per video (LLaVA's linspace); fps: duration * fps frames, "
                               "clamped to [min_frames, max_frames] and rounded to frame_multiple (qwen-vl-utils)")
    video_frames: int = Field(16, ge=1, description="T: frames sampled uniformly from a real video (sampling: uniform)")
    fps: float = Field(2.0, gt=0, description="sampling: fps: frames per second of video sampled")
    max_frames: int = Field(768, ge=1, description="sampling: fps: at most this many frames per video")
    frame_multiple: int = Field(0, ge=0, description="sampling: fps: frame counts are multiples of this; 0: the MLLM's "
                                                     "temporal patch (vision_config.temporal_patch_size; 2 for Qwen)")
    max_caption_words: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1, description="samples per Ray Data batch")
    s3: S3Config = S3Config()
    # bring your own data (docs/data.md): the layout of image_shards / video_shards
    format: Literal["auto", "native", "llava", "webdataset", "hf_parquet"] = Field(
        "auto", description="auto: detected per path (a .yaml/.json/.jsonl with conversations: llava; .tar: webdataset; "
                            "parquet with an image struct column: hf_parquet; else native)")
    image_folder: str | None = Field(None, description="llava/hf_parquet: folder image paths are relative to (default: the JSON's folder)")
    video_folder: str | None = Field(None, description="llava: folder video paths are relative to (default: the JSON's folder)")
    decoder: Literal["pyav", "decord"] = Field("pyav", description="video decoder; decord needs pip install -e '.[decord]'")
    min_frames: int = Field(1, ge=1, description="videos with fewer frames are quarantined (too_short); sampling: fps "
                                                 "samples at least this many (default 4 there, qwen-vl-utils' FPS_MIN_FRAMES)")
    index_rows: int = Field(1024, ge=1, description="llava: indexed image records per stage-1 task (a pseudo-video never crosses one)")

    @model_validator(mode="before")
    @classmethod
    def _fps_min_frames(cls, data: Any) -> Any:
        # min_frames defaults to 1 (uniform: a short video repeats frames) but to
        # qwen-vl-utils' 4 with fps sampling, so an unset value matches the Qwen processors
        if isinstance(data, dict) and data.get("sampling") == "fps" and "min_frames" not in data:
            data = {**data, "min_frames": FPS_MIN_FRAMES}
        return data

    @model_validator(mode="after")
    def _frame_range(self) -> "DataConfig":
        if self.sampling == "fps" and self.min_frames > self.max_frames:
            raise ValueError(f"min_frames ({self.min_frames}) is above max_frames ({self.max_frames})")
        return self


class MLLMConfig(_Strict):
    path: str = ".cache/score-tiny"
    kind: str = Field("auto", description="adapter family (pipeline/mllm/registry.py); auto: config.json's model_type")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    compact_positions: bool = Field(False, description="re-index kept tokens 0..K-1 (default keeps original ids)")
    chat_template: Literal["auto", "plain"] = Field(
        "auto", description="auto: the checkpoint's own chat template when it has one; plain: turn texts as they are"
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        if v == "auto":
            return v
        from pipeline.mllm.registry import kinds  # here, not at the top: the family modules import torch

        if v not in kinds():
            raise ValueError(f"not a registered MLLM kind; known: auto, {', '.join(kinds())}")
        return v


class ReferenceConfig(_Strict):
    """score-tiny: the embedded frozen MLLM, a tiny LLaVA-OneVision pre-trained on the shapes world.

    Its vision tower has no encoder layer (patch embedding only), so each visual token sees only
    its own patch: an object's colour is not spread over every token of the frame.
    """

    hidden: int = Field(128, ge=16)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    vision_hidden: int = Field(64, ge=8)
    patch: int = Field(8, ge=2, description="vision patch size; 2x2 pooling follows (LLaVA-OV video path)")
    steps: int = Field(2600, ge=1)
    binding_steps: int = Field(800, ge=0, description="first steps on single frames (colour/shape questions): the question-object binding forms there")
    lr: float = Field(1e-3, gt=0, description="peak; 2e-3 is too high for the question-object binding to form")
    warmup: int = Field(100, ge=0)
    tokens_per_batch: int = Field(4096, ge=64, description="visual+text tokens per step; batch size follows T")
    max_batch: int = Field(64, ge=1)
    token_dropout: float = Field(0.3, ge=0.0, lt=1.0, description="max random visual-token dropout (half the samples)")
    aux_weight: float = Field(1.0, ge=0.0, description="dense per-token colour/shape loss on the vision side")
    caption_fraction: float = Field(0.15, ge=0.0, le=1.0, description="share of video-caption targets")
    pseudo_fraction: float = Field(0.15, ge=0.0, le=1.0, description="share of pseudo-video targets (k images each repeated T/k frames, captions joined; k=1: an image caption), stage 1's material (rest: QA)")
    target_eos: bool = Field(True, description="end every training target with <eos> so greedy answers stop after the answer")
    balance_types: bool = Field(True, description="QA samples: pick the question type uniformly among the video's types, then a question")
    qa_weight: float = Field(1.0, gt=0.0, description="loss weight of a QA sample relative to a caption sample")
    aux_tied: bool = Field(True, description="auxiliary colour/shape heads are the LM's own word embeddings of those words")
    aux_background: bool = Field(False, description="auxiliary heads also classify background tokens (a 'no object' class)")
    type_weights: dict[Literal["color", "shape", "direction", "change", "order"], float] = Field(
        default_factory=dict,
        description="balance_types: relative weight of a question type when drawing it (missing: 1), e.g. {direction: 3} for the hardest, rarest type")
    direction_aux: float = Field(0.0, ge=0.0, description="weight of an LM-side dense loss: the LM's own head predicts the direction word on a moving object's visual tokens once it has left its first cell")
    direction_layer: int = Field(0, ge=0, description="direction_aux is read after this many LM layers through the final norm and head "
                                 "(0: the last layer), so the direction is formed where later layers' answer positions can still read it")
    position_aux: float = Field(0.0, ge=0.0, description="weight of a vision-side dense loss: a linear head names each visual token's grid cell (the 1-D RoPE LM gets no 2-D position otherwise)")
    binding_aux: float = Field(0.0, ge=0.0, description="weight of an LM-side attention loss: at the answer position, head 0 of the last layer puts its attention "
                               "on the visual tokens of the objects the question names (the question-object binding, which more objects in a frame otherwise dilute)")
    qa_per_sample: int = Field(1, ge=1, description="questions per QA sample: further questions on the same video follow as turns (needs target_eos)")
    codec_aug: float = Field(0.5, ge=0.0, le=1.0, description="share of training videos sent through a 4:2:0 chroma round trip (as the H.264 shards)")
    eval_videos: int = Field(200, ge=1)
    eval_every: int = Field(500, ge=1)
    select_videos: int = Field(0, ge=0, description="validation videos (<world>/val/videos) scored every eval_every steps and at the end: the build keeps the best-scoring weights, not the last (0: the last)")
    seed: int = 0
    min_qa_accuracy: float = Field(0.9, ge=0.0, le=1.0, description="the build fails below this on held-out videos")

    @model_validator(mode="after")
    def _check(self) -> "ReferenceConfig":
        if self.caption_fraction + self.pseudo_fraction > 1:
            raise ValueError("caption_fraction + pseudo_fraction must be at most 1")
        if any(w < 0 for w in self.type_weights.values()):
            raise ValueError(f"type_weights must be >= 0, got {self.type_weights}")
        if self.direction_layer > self.layers:
            raise ValueError(f"direction_layer ({self.direction_layer}) must be at most layers ({self.layers})")
        if self.binding_steps >= self.steps:
            raise ValueError(f"binding_steps ({self.binding_steps}) must be below steps ({self.steps})")
        return self


class PolicyConfig(_Strict):
    hidden: int = Field(256, ge=8)
    layers: int = Field(2, ge=0)
    heads: int = Field(4, ge=1)
    factorized: bool = Field(True, description="spatial then temporal attention instead of full")
    init_keep_logit: float = Field(2.0, description="initial logit of every token: keep prob sigmoid(this)")
    mlp_ratio: int = Field(2, ge=1, description="transformer MLP width = mlp_ratio * hidden")
    min_per_frame: int = Field(0, ge=0, description="inference top-K: best tokens forced per frame first")
    video_scale: bool = Field(False, description="token and residual features are divided by the video's median token norm "
                              "(not LayerNorm'd per token, which discards the scale where a vision tower marks salience) and each "
                              "token's log-norm ratio to that median is an input: on photographic backgrounds it keeps the policy "
                              "on the objects (configs/generalization.yaml; EXPERIMENTS.md)")
    question_aware: bool = Field(False, description="the policy also reads the question (the frozen MLLM's input embeddings "
                                 "of the prompt's words) through cross-attention; selection then happens per question, "
                                 "after it is known (the default, question-agnostic policy compresses a video once for any question)")


class StageConfig(_Strict):
    steps: int = Field(200, ge=1)
    lr: float = Field(3e-4, gt=0)
    group_size: int = Field(8, ge=2, description="G masks per sample")
    batch_size: int = Field(8, ge=1, description="samples per learner step")
    tau_abs: float = Field(0.05, ge=0)
    tau_rel: float = Field(0.05, ge=0)
    penalty: float = Field(1.0, ge=0, description="lambda: sparsity-weighted penalty for violations")
    entropy: float = Field(1e-3, ge=0, description="beta: entropy bonus")
    clip: float = Field(0.2, gt=0)
    adv_eps: float = Field(1e-6, gt=0, description="eps in the safe-zone (rho - mean) / (std + eps)")
    penalty_scale_by_dce: bool = Field(False, description="violations: A = -lambda * rho * |dCE|")
    ppo_epochs: int = Field(1, ge=1, description="optimizer passes over each rollout batch")
    warmup: int = Field(0, ge=0, description="linear learning-rate warmup steps (then constant lr)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clip before each optimizer step")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    score_max_tokens: int = Field(0, ge=0, description="padded visual tokens per adapter.score call when scoring rollouts (0: no limit; bounds activation memory)")
    resample_qa: bool = Field(True, description="draw each video's QA pair again every data epoch (the question-agnostic policy must then keep what any question needs)")
    rollout_budget: tuple[float, float] | None = Field(
        None, description="[lo, hi] retention: shift each sample's logits so its masks keep r*M tokens on average, r ~ U[lo, hi] (the policy learns the ranking top-K reads); null: plain Bernoulli(sigmoid(z))")

    @model_validator(mode="after")
    def _check_budget(self) -> "StageConfig":
        if self.rollout_budget is not None and not 0 < self.rollout_budget[0] <= self.rollout_budget[1] < 1:
            raise ValueError(f"rollout_budget must be [lo, hi] with 0 < lo <= hi < 1, got {list(self.rollout_budget)}")
        return self


class GroundingConfig(_Strict):
    """The grounding warm start of a question-aware policy (pipeline/grounding.py): between the
    stages, a supervised pass over the stage-2 videos' object annotations teaches it which tokens
    each question is about; off (0 epochs) by default."""

    epochs: int = Field(0, ge=0, description="passes over the (video, question) pairs; 0: no warm start")
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1, description="pairs per optimizer step")
    videos: int = Field(0, ge=0, description="read at most this many stage-2 videos (0: all)")


class StagesConfig(_Strict):
    pseudo_video: StageConfig = StageConfig()
    real_video: StageConfig = StageConfig(lr=1e-4)


class RolloutConfig(_Strict):
    """Rollout actor pool: one frozen-MLLM replica per actor."""

    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1)
    num_cpus: float = Field(0.5, gt=0, description="fractional here: a pool of 1-CPU actors cannot grow on 2 CPUs")
    num_gpus: float = Field(0.0, ge=0)
    max_staleness: int = Field(2, ge=0, description="max policy versions a rollout may lag (0, with learner.prefetch_batches 0: on-policy, as the single-process trainer)")
    cache_mb: float = Field(1024.0, ge=0, description="per-actor LRU of the vision features X and CE_full, MiB (0: none)")
    state_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype X travels in to the learner (and the policy reads): auto = the MLLM's own")

    @model_validator(mode="after")
    def _check(self) -> "RolloutConfig":
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        return self


class LearnerConfig(_Strict):
    """Ray Train + DeepSpeed learner (actors/learner.py)."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel DeepSpeed ranks)")
    cpus_per_worker: float = Field(0.5, gt=0, description="fractional here: 2 CPUs are shared with the rollout pool and readers")
    use_gpu: bool = False
    zero_stage: int = Field(1, ge=0, le=2, description="DeepSpeed ZeRO stage (3 would need gathered weights to publish)")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl with GPUs, gloo on CPU")
    health_check_interval_s: float = Field(0.2, gt=0, description="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: each report blocks about this long")
    fit_timeout_s: float = Field(3600.0, gt=0, description="wall-clock limit of one stage's TorchTrainer.fit")
    prefetch_batches: int = Field(1, ge=0, description="rollout batches the learner prefetches (bounds staleness)")
    log_every: int = Field(1, ge=1, description="TensorBoard scalars every N learner steps")
    image_every: int = Field(10, ge=0, description="a mask-overlay image in TensorBoard every N learner steps (0: none)")
    image_size: int = Field(48, ge=8, description="frame thumbnails the rollout records carry for those images (pixels)")
    progress_every_s: float = Field(10.0, gt=0, description="a progress line with ETA at most this often")
    summary_window: int = Field(5, ge=1, description="steps averaged into a stage summary's first/last figures")


class CheckpointConfig(_Strict):
    """Stage checkpoints (pipeline/checkpoint.py): cadence, retention, upload retries."""

    every: int = Field(10, ge=0, description="learner steps between checkpoints (0: none; the stage's end always saves)")
    keep_last: int = Field(2, ge=1, description="committed checkpoints kept, newest first")
    keep_best: int = Field(1, ge=0, description="plus this many best by best_metric")
    keep_every: int = Field(0, ge=0, description="plus every checkpoint at a multiple of this many steps (0: none): the candidates jobs/select_policy.py chooses among")
    best_metric: str = Field("objective/safe_sparsity", description="a learner metric (mean over the steps since the last checkpoint)")
    best_mode: Literal["max", "min"] = "max"
    async_upload: bool = Field(True, description="upload in a background thread (the learner only stalls to stage files locally)")
    upload_attempts: int = Field(6, ge=1, description="tries per file before a checkpoint is given up (logged, training goes on)")
    upload_backoff_s: float = Field(0.5, gt=0, description="first retry delay; doubles each retry")
    upload_max_backoff_s: float = Field(8.0, gt=0)
    commit_timeout_s: float = Field(300.0, gt=0, description="rank 0 waits this long for the other ranks' parts before giving up a commit")


class ValidationConfig(_Strict):
    """Choosing the run's final policy (jobs/select_policy.py): greedy QA accuracy at top-K on
    validation videos, over the last stage's kept checkpoints, instead of simply its last step."""

    video_shards: str | None = Field(None, description="validation video shards, disjoint from the training and the evaluation videos; null: the final policy is the last stage's last")
    videos: int = Field(256, ge=1, description="validation videos read (the first N)")
    retentions: list[float] = Field([0.05, 0.1], min_length=1, description="a candidate's score: mean accuracy at these top-K retentions")
    average_last: int = Field(0, ge=0, description="0: the final policy is the kept checkpoint with the best score; k >= 1: the weight "
                              "average of the stage's last checkpoint and the k-1 before it at multiples of checkpoint.keep_every "
                              "(scored on the validation videos for the record, not chosen against the single checkpoints)")

    @field_validator("retentions")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < r <= 1.0 for r in v):
            raise ValueError("every retention must be in (0, 1]")
        return v


class EvaluationConfig(_Strict):
    """``jobs/evaluate.py``: every method at every retention on the world's held-out videos (its
    command-line flags default to these)."""

    retentions: list[float] = Field([0.05, 0.1, 0.25], min_length=1, description="top-K retention ratios")
    videos: int = Field(200, ge=1, description="held-out videos evaluated (the first N)")
    fastv_layer: int = Field(2, ge=0, description="decoder layer (0-based) whose last-token attention FastV reads")
    timing_videos: int = Field(4, ge=0, description="videos timed in the deployment order")
    timing_repeats: int = Field(5, ge=1, description="timing rounds per timed video")
    overlay_retention: float = Field(0.1, gt=0, le=1, description="retention drawn in the selection overlays")
    seed: int = 0
    shifts: dict[str, dict[str, Any]] = Field(
        {}, description="jobs/generalization.py: shifted worlds by name, each world.* settings over the run's world "
                        "(settings outside the training ranges); evaluated next to the world's own held-out videos")

    @field_validator("retentions")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        if not all(0 < r <= 1 for r in v):
            raise ValueError("every retention must be in (0, 1]")
        return v


class RunConfig(_Strict):
    name: str = Field("score-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str = "runs"
    seed: int = 0
    ray_address: str | None = Field(None, description="existing cluster; default starts a local one")
    call_timeout_s: float = Field(120.0, gt=0, description="deadline of every blocking Ray call (ray.get, actor lookups)")
    job_timeout_s: float = Field(7200.0, gt=0, description="curriculum: max seconds one stage job may take")


class Config(_Strict):
    run: RunConfig = RunConfig()
    world: WorldConfig = WorldConfig()
    data: DataConfig = DataConfig()
    mllm: MLLMConfig = MLLMConfig()
    reference: ReferenceConfig = ReferenceConfig()
    policy: PolicyConfig = PolicyConfig()
    grounding: GroundingConfig = GroundingConfig()
    stage: StagesConfig = StagesConfig()
    rollout: RolloutConfig = RolloutConfig()
    learner: LearnerConfig = LearnerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    validation: ValidationConfig = ValidationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> "Config":
        if self.grounding.epochs and not self.policy.question_aware:
            raise ValueError("grounding.epochs: the grounding warm start teaches a question-aware policy; "
                             "set policy.question_aware: true or grounding.epochs: 0")
        # every batch the learner prefetches is rolled out that many versions before it is used:
        # a tighter bound would drop every rollout as stale, and the stage would learn nothing
        if self.rollout.max_staleness < self.learner.prefetch_batches:
            raise ValueError(f"rollout.max_staleness ({self.rollout.max_staleness}) is below learner.prefetch_batches "
                             f"({self.learner.prefetch_batches}): every rollout would arrive that stale and be dropped; "
                             "for on-policy rollouts set both to 0")
        for name, shift in self.evaluation.shifts.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"evaluation.shifts: world name {name!r} must be letters, digits, '_', '.', '-'")
            try:
                WorldConfig.model_validate({**self.world.model_dump(), **shift})
            except ValidationError as e:
                raise ValueError(f"evaluation.shifts.{name}: {_format_error(e).removeprefix('config: ')}") from None
        k, ck = self.validation.average_last, self.checkpoint
        if k and not self.validation.video_shards:
            raise ValueError(f"validation.average_last ({k}) is done by the selection job, which needs validation.video_shards")
        if k > ck.keep_last and ck.keep_every == 0:
            raise ValueError(f"validation.average_last ({k}) averages more checkpoints than checkpoint.keep_last ({ck.keep_last}) keeps; "
                             "set checkpoint.keep_every (the grid it averages on) or raise keep_last")
        return self


# ---------------------------------------------------------------------------------------------
# Loading


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config: {dotted}: '{k}' is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``'a.b=3'`` -> ``('a.b', 3)``; the value is parsed as a YAML scalar/list."""
    if "=" not in item:
        raise ConfigError(f"config: override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"config: override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {key}: cannot parse value {raw!r}: {e.__class__.__name__}") from None
    return key, value


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    # a union's member tag ("literal['a','b']", "tuple[float,float]") is not a key
    key = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and "[" in p or p in ("float", "int", "str"))) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"config: unknown key '{key}'"
    msg = first["msg"].removeprefix("Value error, ")
    if not first["loc"]:  # a whole-config rule: its message names the keys
        return f"config: {msg}"
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"config: {key}: {msg}{shown}"


def _unshared(x: Any) -> Any:
    """A copy with no shared containers: a YAML alias (``real_video: *stage``) loads as the SAME dict
    as its anchor, and an override of one stage would silently change the other too."""
    if isinstance(x, dict):
        return {k: _unshared(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unshared(v) for v in x]
    return x


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides, validated. Raises :class:`ConfigError`."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {p}: not valid YAML ({e.__class__.__name__})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {p}: top level must be a mapping")
        tree = _unshared(loaded)
    for item in overrides or []:
        _set_dotted(tree, *parse_override(item))
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    parser.add_argument("--config", default=default, help="YAML config file (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, e.g. --set stage.real_video.steps=200 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Load and validate, or exit (status 1) with the one-line error, before any Ray work."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Run-layout and resume flags of jobs/train_stage.py and jobs/train_curriculum.py."""
    p.add_argument("--run", default=None, help="run name (default: run.name)")
    p.add_argument("--storage", default=None, help="storage root, local or s3:// (default: run.storage)")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="resume from this checkpoint directory (default: the newest complete one of the run)")
    p.add_argument("--fresh", action="store_true", help="start the run over; refuses if it exists unless --force")
    p.add_argument("--force", action="store_true", help="with --fresh: delete the existing run first")


def config_with_run_args(args: argparse.Namespace) -> Config:
    """The config (``--run``/``--storage`` folded in); probes ``s3://`` run storage
    (:func:`pipeline.storage.probe`); applies ``--fresh``/``--force``. Exits 1 with one line on a
    bad config, a store that cannot be used, a refused ``--fresh`` or ``--resume`` together with
    ``--fresh``: all before any Ray work."""
    from pipeline import storage

    if args.run:
        args.overrides.append(f"run.name={args.run}")
    if args.storage:
        args.overrides.append(f"run.storage={args.storage}")
    cfg = config_from_args(args)
    if args.force and not args.fresh:
        sys.exit("error: --force only goes with --fresh")
    try:
        storage.probe(storage.join(cfg.run.storage, cfg.run.name), cfg.data.s3)
    except storage.StoreError as e:
        sys.exit(f"error: {e}")
    from pipeline.data.sources import check_sources

    try:
        check_sources(cfg.data)  # a data mixture naming a missing file, a decoder not installed
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.fresh:
        if args.resume:
            sys.exit("error: --fresh and --resume exclude each other")
        from pipeline.checkpoint import fresh_run

        try:
            if fresh_run(storage.join(cfg.run.storage, cfg.run.name), args.force, cfg.data.s3):
                print(f"--fresh --force: deleted run {cfg.run.name} under {cfg.run.storage}")
        except FileExistsError as e:
            sys.exit(f"error: {e}")
    return cfg
