"""The one update path (pipeline/update.py): ``ppo_update`` through the single-process
``TorchOptimizer`` and through the learner's ``DeepSpeedOptimizer`` (a real DeepSpeed engine,
ZeRO 0 and 1, one gloo rank in this process) gives the same weights and metrics, and both skip a
pass whose gradient is not finite without touching the weights."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from pipeline import update as up
from pipeline.config import PolicyConfig, StageConfig
from pipeline.rewards import pack_masks, sample_masks, sparsity
from pipeline.trainer import RolloutBatch, init_policy, weights_sha

SMALL_POLICY = PolicyConfig(hidden=16, layers=1, heads=2, mlp_ratio=2)
D, T, GH, GW, B, G = 8, 2, 2, 3, 3, 4


def scfg(**kw) -> StageConfig:
    return StageConfig(**({"steps": 1, "lr": 1e-2, "group_size": G, "batch_size": B, "ppo_epochs": 2} | kw))


def make_batch(policy: torch.nn.Module, seed: int = 0, nan: bool = False) -> RolloutBatch:
    """A batch as a rollout would make it, with the MLLM's CE values drawn at random: masks from the
    policy's own logits (so the ratio starts at 1), a spread of dCE on both sides of 0."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, T, GH * GW, D, generator=g)
    if nan:
        X[1, 0, 2, 0] = float("nan")  # one bad token: the forward, the loss and the gradient go non-finite
    with torch.no_grad():
        logits = policy(X, (GH, GW)).float()
    masks = sample_masks(logits.nan_to_num(0.0), G, g)
    ce = torch.rand(B, G, generator=g) + 1.0
    ce_full = torch.full((B,), 1.2)
    return RolloutBatch(sample_ids=[f"s{i}" for i in range(B)], policy_version=torch.zeros(B, dtype=torch.long),
                        X=X, grid=(GH, GW), masks=pack_masks(masks), old_logits=logits,
                        dce=(ce_full[:, None] + 0.05 - ce), rho=sparsity(masks).float(), ce_full=ce_full, ce=ce,
                        prompts=["p"] * B, targets=["t"] * B)


@pytest.mark.unit
def test_torch_optimizer_steps_on_a_finite_batch():
    pol = init_policy(D, SMALL_POLICY, 0)
    batch, before = make_batch(pol), weights_sha(pol)
    m = up.ppo_update(up.TorchOptimizer(pol, scfg()), batch, scfg())
    assert weights_sha(pol) != before
    assert m[up.SKIPPED] == 0 and math.isfinite(m[up.GRAD_NORM]) and m[up.GRAD_NORM] > 0
    assert m[up.REWARD] == pytest.approx(float(batch.dce.mean()))


@pytest.mark.unit
def test_torch_optimizer_skips_a_nonfinite_gradient():
    pol = init_policy(D, SMALL_POLICY, 0)
    batch, before = make_batch(pol, nan=True), weights_sha(pol)
    opt = up.TorchOptimizer(pol, scfg())
    m = up.ppo_update(opt, batch, scfg())
    assert m[up.SKIPPED] == scfg().ppo_epochs and not math.isfinite(m.get(up.GRAD_NORM, math.nan))
    assert weights_sha(pol) == before  # no step, and AdamW's state was never touched
    assert all(not s for s in opt.optimizer.state.values())
    m = up.ppo_update(opt, make_batch(pol), scfg())  # a good batch afterwards steps as usual
    assert m[up.SKIPPED] == 0 and weights_sha(pol) != before


@pytest.mark.unit
def test_loss_scale_zero_keeps_the_policy_metrics_but_no_gradient():
    """A rank whose whole batch was stale runs the passes with loss 0: a zero gradient."""
    pol = init_policy(D, SMALL_POLICY, 0)
    m = up.ppo_update(up.TorchOptimizer(pol, scfg()), make_batch(pol), scfg(), loss_scale=0.0)
    assert m[up.GRAD_NORM] == 0.0 and m[up.SKIPPED] == 0 and math.isfinite(m[up.LOSS])


# ------------------------------------------------------------------------------ the DeepSpeed side


@pytest.fixture(scope="module")
def one_rank():
    """torch.distributed with one gloo rank in this process, as DeepSpeed needs; torn down after."""
    import torch.distributed as dist

    from actors.ray_utils import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def deepspeed_optimizer(policy: torch.nn.Module, zero_stage: int, stage_cfg: StageConfig):
    import deepspeed

    from actors.learner import DeepSpeedOptimizer

    engine, _, _, _ = deepspeed.initialize(
        model=policy, optimizer=up.make_optimizer(policy, stage_cfg),
        config={"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
                "gradient_clipping": stage_cfg.max_grad_norm, "zero_optimization": {"stage": zero_stage},
                "steps_per_print": 10**9})
    return DeepSpeedOptimizer(engine)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_deepspeed_and_torch_take_the_same_update(one_rank, zero_stage):
    cfg = scfg(max_grad_norm=0.01)  # small enough that clipping binds: both paths must clip alike
    ref = init_policy(D, SMALL_POLICY, 0)
    pol = copy.deepcopy(ref)
    batches = [make_batch(ref, seed=s) for s in range(3)]
    torch_opt, ds_opt = up.TorchOptimizer(ref, cfg), deepspeed_optimizer(pol, zero_stage, cfg)
    for step, b in enumerate(batches):
        torch_opt.set_lr(up.lr_at(step, cfg))
        ds_opt.set_lr(up.lr_at(step, cfg))
        m_ref, m_ds = up.ppo_update(torch_opt, b, cfg), up.ppo_update(ds_opt, b, cfg)
        for k in (up.LOSS, up.GRAD_NORM, up.KEEP_PROB, up.APPROX_KL, up.REWARD, up.ADV_STD):
            assert m_ds[k] == pytest.approx(m_ref[k], rel=1e-4, abs=1e-6), (step, k)
        assert m_ref[up.GRAD_NORM] > cfg.max_grad_norm
    # atol 1e-5 against updates of lr 1e-2: the attention key biases get a gradient of ~0 (softmax
    # ignores them), which Adam turns into round-off-sized steps of either sign
    for (k, a), b in zip(ref.state_dict().items(), ds_opt.engine.module.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert weights_sha(ref) != weights_sha(init_policy(D, SMALL_POLICY, 0))


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_deepspeed_skips_a_nonfinite_gradient(one_rank, zero_stage):
    pol = init_policy(D, SMALL_POLICY, 0)
    opt = deepspeed_optimizer(pol, zero_stage, scfg())
    before = weights_sha(opt.engine.module)
    m = up.ppo_update(opt, make_batch(pol, nan=True), scfg())
    assert m[up.SKIPPED] == scfg().ppo_epochs and not math.isfinite(m.get(up.GRAD_NORM, math.nan))
    assert weights_sha(opt.engine.module) == before
    m = up.ppo_update(opt, make_batch(pol), scfg())
    assert m[up.SKIPPED] == 0 and weights_sha(opt.engine.module) != before


# ------------------------------------------------------------------------------ variable lengths


def make_mixed_batch(policy: torch.nn.Module, seed: int = 0) -> RolloutBatch:
    """:func:`make_batch` with samples of T' = 2, 1, 3: X zero-padded to 3 steps, masks drawn from
    each sample's own logits (pipeline.policy.padded_logits), never on a padded token. A
    question-aware policy also gets questions of 3, 5 and 0 words."""
    from pipeline.policy import padded_logits
    from pipeline.trainer import pad_steps, pad_words, question_aware, token_valid

    g = torch.Generator().manual_seed(seed)
    steps = torch.tensor([2, 1, 3])
    X = pad_steps([torch.randn(int(t), GH * GW, D, generator=g) for t in steps])
    valid = token_valid(steps, GH * GW, 3)
    Q = qm = None
    if question_aware(policy):
        Q, qm = pad_words([torch.randn(n, D, generator=g) for n in (3, 5, 0)])
    with torch.no_grad():
        logits = padded_logits(policy, X, (GH, GW), steps, None if Q is None else (Q, qm)).float().masked_fill(~valid, 0.0)
    masks = sample_masks(logits, G, g, valid)
    ce = torch.rand(B, G, generator=g) + 1.0
    ce_full = torch.full((B,), 1.2)
    return RolloutBatch(sample_ids=[f"s{i}" for i in range(B)], policy_version=torch.zeros(B, dtype=torch.long),
                        X=X, grid=(GH, GW), masks=pack_masks(masks), old_logits=logits,
                        dce=(ce_full[:, None] + 0.05 - ce), rho=sparsity(masks, valid).float(), ce_full=ce_full, ce=ce,
                        prompts=["p"] * B, targets=["t"] * B, steps=steps,
                        num_frames=steps * 2, question=Q, question_mask=qm)


@pytest.mark.unit
@pytest.mark.parametrize("video_scale", [False, True])
def test_torch_optimizer_on_a_mixed_length_batch(video_scale):
    pol = init_policy(D, SMALL_POLICY.model_copy(update={"video_scale": video_scale}), 0)
    batch, before = make_mixed_batch(pol), weights_sha(pol)
    m = up.ppo_update(up.TorchOptimizer(pol, scfg()), batch, scfg())
    assert weights_sha(pol) != before and m[up.SKIPPED] == 0 and math.isfinite(m[up.GRAD_NORM])
    assert (m[up.FRAMES_MIN], m[up.FRAMES_MAX]) == (2.0, 6.0)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,policy_cfg", [(0, SMALL_POLICY), (1, SMALL_POLICY),
                                                   (0, SMALL_POLICY.model_copy(update={"question_aware": True})),
                                                   (0, SMALL_POLICY.model_copy(update={"video_scale": True}))],
                         ids=["zero0", "zero1", "zero0-question-aware", "zero0-video-scale"])
def test_deepspeed_and_torch_take_the_same_update_on_mixed_lengths(one_rank, zero_stage, policy_cfg):
    """The DeepSpeed engine runs one forward per length group (padded_logits) and one backward:
    the same update as the torch path, on batches whose samples differ in T' (and, for a
    question-aware policy, in question length)."""
    cfg = scfg(max_grad_norm=0.01)
    ref = init_policy(D, policy_cfg, 0)
    pol = copy.deepcopy(ref)
    torch_opt, ds_opt = up.TorchOptimizer(ref, cfg), deepspeed_optimizer(pol, zero_stage, cfg)
    for step, seed in enumerate(range(3)):
        b = make_mixed_batch(ref, seed)
        torch_opt.set_lr(up.lr_at(step, cfg))
        ds_opt.set_lr(up.lr_at(step, cfg))
        m_ref, m_ds = up.ppo_update(torch_opt, b, cfg), up.ppo_update(ds_opt, b, cfg)
        for k in (up.LOSS, up.GRAD_NORM, up.KEEP_PROB, up.APPROX_KL, up.REWARD, up.ADV_STD):
            assert m_ds[k] == pytest.approx(m_ref[k], rel=1e-4, abs=1e-6), (step, k)
    # Adam divides by sqrt(v): where a gradient is near zero, a float32 summation-order difference
    # between the two backwards (it depends on the thread count) moves a weight by ~1e-5
    for (k, a), b in zip(ref.state_dict().items(), ds_opt.engine.module.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=5e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert weights_sha(ref) != weights_sha(init_policy(D, policy_cfg, 0))
    if policy_cfg.question_aware:  # the words reached the update: the zero-initialised read-out moved
        assert float(ref.cross.out.weight.detach().abs().sum()) > 0

