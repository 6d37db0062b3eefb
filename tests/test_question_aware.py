"""The question-aware policy option (``policy.question_aware``): it reads the prompt's words, is
trained by the same rollouts and update, and selects per question at inference.

The learning check uses a frozen stand-in MLLM with two objects per frame whose CE depends only on
the tokens of the object the question names: a question-aware policy can keep that object alone
(a quarter of the tokens), a question-agnostic one has to keep both.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import trainer as tr
from pipeline import update as up
from pipeline.config import PolicyConfig, StageConfig
from pipeline.data.prompts import qa_prompt
from pipeline.policy import ScorePolicy, padded_logits
from pipeline.select import SelectionContext, make_score_selector, topk_keep

AWARE = PolicyConfig(hidden=16, layers=1, heads=2, mlp_ratio=2, question_aware=True)
AGNOSTIC = AWARE.model_copy(update={"question_aware": False})
COLOURS = ("red", "green")


class TwoObjectMLLM:
    """A frozen stand-in: each frame has a red and a green object token (features 0 and 2 mark
    them); ``CE = 1 + 2 * (dropped tokens of the asked object) / (its tokens)``. Its word
    embeddings are a fixed random table, except that the colour words lie along the features that
    mark their objects (as an MLLM's projector aligns visual tokens with the words for them)."""

    hidden_size = 8
    device = torch.device("cpu")

    def __init__(self) -> None:
        self._g = torch.Generator().manual_seed(1)
        self.words: dict[str, torch.Tensor] = {c: 3.0 * torch.eye(self.hidden_size)[i] for c, i in zip(COLOURS, (0, 2))}

    def visual_grid(self, t: int) -> tuple[int, int, int]:
        return (t, 2, 2)

    def encode_video_with_side(self, frames) -> tuple[torch.Tensor, dict]:
        f = torch.as_tensor(np.asarray(frames)).float() / 255.0  # [T, 16, 16, 3]
        cells = f.reshape(f.shape[0], 2, 8, 2, 8, 3).mean((2, 4))  # [T, 2, 2, 3]
        red = (cells[..., 0] > 0.5) & (cells[..., 1] < 0.5)
        green = (cells[..., 1] > 0.5) & (cells[..., 0] < 0.5)
        X = 0.1 * torch.randn(f.shape[0], 4, self.hidden_size, generator=torch.Generator().manual_seed(0))
        X[..., 0] += 3.0 * red.flatten(1).float()
        X[..., 2] += 3.0 * green.flatten(1).float()
        return X, {}

    def question_embeddings(self, prompt: str) -> torch.Tensor:
        out = []
        for w in prompt.replace("<video>", " ").split():
            if w not in self.words:
                self.words[w] = torch.randn(self.hidden_size, generator=self._g)
            out.append(self.words[w])
        return torch.stack(out) if out else torch.zeros(0, self.hidden_size)

    def score(self, X, keep, prompts, targets, side=None) -> torch.Tensor:
        feat = torch.tensor([0 if "red" in p else 2 for p in prompts])
        obj = (X[torch.arange(X.shape[0]), ..., feat] > 1.5).flatten(1)  # [B, M] the asked object's tokens
        dropped = (obj[:, None, :] & ~keep).float().sum(-1)
        return 1.0 + 2.0 * dropped / obj.float().sum(-1, keepdim=True).clamp(min=1)


def two_object_videos(seed: int = 0):
    """4-frame videos: a red and a green quadrant at random distinct places per frame; the video's
    one question asks about either, at random."""
    rng = np.random.default_rng(seed)
    i = 0
    while True:
        f = np.full((4, 16, 16, 3), 30, dtype=np.uint8)
        for t in range(4):
            a, b = rng.permutation(4)[:2]
            for q, rgb in ((a, (230, 30, 30)), (b, (30, 230, 30))):
                r, c = divmod(int(q), 2)
                f[t, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = rgb
        qa = [{"question": f"where is the {COLOURS[rng.integers(2)]} object ?", "answer": "here"}]
        yield {"sample_id": f"vid:{i}", "kind": "video", "frames": f, "caption": "two squares", "qa": json.dumps(qa)}
        i += 1


def _train(cfg: PolicyConfig, seed: int = 0, steps: int = 800) -> tuple[ScorePolicy, dict, TwoObjectMLLM]:
    # lr 5e-4: at 1e-2 both policies saturate on one object within ~60 steps, before the aware one
    # has learnt to read the question. Measured over seeds 0-3: the aware policy learns it in 3 of
    # 4 (seed 2 locks onto one object early, as the agnostic one does); at lr 1e-3, 2 of 4.
    ad = TwoObjectMLLM()
    pol = tr.init_policy(ad.hidden_size, cfg, seed)
    scfg = StageConfig(steps=steps, lr=5e-4, group_size=8, batch_size=4, tau_abs=0.05, tau_rel=0.0, penalty=2.0)
    return pol, tr.train_stage(ad, pol, two_object_videos(seed), scfg, seed, progress=False, log=None), ad


def _topk_hits(policy: ScorePolicy, ad: TwoObjectMLLM, videos: int = 10) -> float:
    """Share of top-K tokens (K = one per frame) on the asked object, over both questions."""
    select, hits = make_score_selector(policy), []
    for v in [next(two_object_videos(seed=1000 + i)) for i in range(videos)]:
        X, _ = ad.encode_video_with_side(v["frames"])
        for colour, feat in zip(COLOURS, (0, 2)):
            ctx = SelectionContext(grid=(4, 2, 2), prompt=qa_prompt(f"where is the {colour} object ?"), adapter=ad)
            hits.append((X.flatten(0, 1)[select(X, 4, ctx), feat] > 1.5).float().mean())
    return float(torch.stack(hits).mean())


@pytest.mark.slow
def test_question_aware_policy_keeps_only_the_asked_object():
    # one thread: a run's trajectory depends on float summation order, and the measured seeds
    # (EXPERIMENTS.md) are single-threaded; the aware policy learns the question in 3 of 4 seeds
    # (seed 2 locks onto one object early), so two of seeds 0, 1, 3 must
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        aware = [_train(AWARE, seed) for seed in (0, 1, 3)]
        agnostic, s_agnostic, ad = _train(AGNOSTIC, 0)
        agnostic_hits = _topk_hits(agnostic, ad)
    finally:
        torch.set_num_threads(threads)
    # each object is a quarter of the tokens: the aware policy gets down to the asked one alone
    # while staying safe, and its top-K (one token per frame) is the asked object whichever is
    # asked; the agnostic one keeps both or drops the asked one about half the time, and its
    # ranking can be right for one of the two questions at most (measured: 0.25 kept at 0.99-1.0
    # safe, hits 1.0; agnostic 0.25 at 0.5, hits 0.5)
    learnt = [a for pol, a, ad_ in aware
              if a["last"][up.KEPT] < 0.3 and a["last"][up.SAFE_FRAC] >= 0.9 and _topk_hits(pol, ad_) >= 0.95]
    assert len(learnt) >= 2, [(round(a["last"][up.KEPT], 3), round(a["last"][up.SAFE_FRAC], 3)) for _, a, _ in aware]
    g = s_agnostic["last"]
    assert (g[up.KEPT] > 0.4 or g[up.SAFE_FRAC] < 0.8) and agnostic_hits <= 0.6, (g, agnostic_hits)


@pytest.mark.unit
def test_each_video_reads_its_own_question_and_never_the_padding():
    aware = tr.init_policy(8, AWARE, 0)
    with torch.no_grad():  # the head starts at zero (every logit init_keep_logit): give it weights
        aware.head.weight.normal_()
    X = torch.randn(2, 3, 4, 8)
    Q, m = tr.pad_words([torch.randn(5, 8), torch.randn(2, 8)])
    z1 = aware(X, (2, 2), question=(Q, m))
    Q2 = Q.clone()
    Q2[1, 1] += 1.0
    z2 = aware(X, (2, 2), question=(Q2, m))
    assert torch.equal(z1[0], z2[0]) and not torch.allclose(z1[1], z2[1])
    Q3 = Q.clone()
    Q3[1, 3:] = 99.0  # padded words are never read
    torch.testing.assert_close(aware(X, (2, 2), question=(Q3, m)), z1)
    empty = aware(X, (2, 2), question=(Q[:, :0], m[:, :0]))  # a prompt of no words: the null slot only
    assert empty.shape == z1.shape and torch.isfinite(empty).all()


@pytest.mark.unit
def test_question_is_required_exactly_when_the_policy_reads_it():
    aware, agnostic = tr.init_policy(8, AWARE, 0), tr.init_policy(8, AGNOSTIC, 0)
    X = torch.randn(3, 4, 8)
    q = (torch.randn(4, 8), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="question-aware .*pass the question"):
        aware(X, (2, 2))
    with pytest.raises(ValueError, match="question-agnostic: it takes no question"):
        agnostic(X, (2, 2), question=q)
    with pytest.raises(ValueError, match=r"question must be \(Q\[1, L, 8\], mask\[1, L\]\)"):
        aware(X, (2, 2), question=(torch.randn(4, 7), torch.ones(4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="needs the prompt and the MLLM adapter"):
        make_score_selector(aware)(X, 2, SelectionContext(grid=(3, 2, 2)))
    assert aware(X, (2, 2), question=q).shape == (12,)


@pytest.mark.unit
def test_mixed_lengths_and_question_lengths_score_each_sample_alone():
    pol = tr.init_policy(8, AWARE, 0)
    with torch.no_grad():
        pol.head.weight.normal_()
    steps = torch.tensor([2, 3, 2])
    xs = [torch.randn(int(t), 4, 8) for t in steps]
    words = [torch.randn(n, 8) for n in (4, 1, 6)]
    Q, m = tr.pad_words(words)
    z = padded_logits(pol, tr.pad_steps(xs), (2, 2), steps, (Q, m))
    for b in range(3):
        alone = pol(xs[b], (2, 2), question=(words[b], torch.ones(len(words[b]), dtype=torch.bool)))
        torch.testing.assert_close(z[b, : alone.numel()], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_rollout_records_carry_the_question_to_the_learner():
    ad = TwoObjectMLLM()
    pol = tr.init_policy(ad.hidden_size, AWARE, 0)
    vids = two_object_videos()
    samples = [next(vids) for _ in range(3)]
    scfg = StageConfig(steps=1, group_size=4, batch_size=3)
    rb = tr.rollout(ad, pol, samples, scfg, torch.Generator().manual_seed(0), state_dtype=torch.bfloat16)
    assert rb.question is not None and rb.question.dtype == torch.bfloat16 and rb.question_mask.all()
    back = tr.RolloutBatch.from_records(rb.to_records())
    assert torch.equal(back.question, rb.question) and torch.equal(back.question_mask, rb.question_mask)
    # the learner recomputes the behaviour logits from the records alone
    with torch.no_grad():
        z = padded_logits(pol, back.X, back.grid, back.steps, back.question_input()).float()
    torch.testing.assert_close(z, rb.old_logits)
    recs = rb.to_records()
    recs[1]["question"] = recs[1]["question"][:2]  # different question lengths pad with a mask
    mixed = tr.RolloutBatch.from_records(recs)
    assert mixed.question_mask.sum(1).tolist() == [rb.question_mask.shape[1], 2, rb.question_mask.shape[1]]
    del recs[0]["question"]
    with pytest.raises(ValueError, match="some records carry a question and some do not"):
        tr.RolloutBatch.from_records(recs)


@pytest.mark.unit
def test_save_load_and_cost():
    pol = tr.init_policy(8, AWARE, 0)
    with torch.no_grad():
        pol.head.weight.normal_()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        back = ScorePolicy.from_pretrained(pol.save_pretrained(d))
    X, q = torch.randn(3, 4, 8), (torch.randn(5, 8), torch.ones(5, dtype=torch.bool))
    assert back.cfg.question_aware and torch.equal(back(X, (2, 2), question=q), pol(X, (2, 2), question=q))
    agnostic = tr.init_policy(8, AGNOSTIC, 0)
    assert pol.flops(3, 4, L=5) > agnostic.flops(3, 4) and pol.flops(3, 4, L=9) > pol.flops(3, 4, L=5)
    assert pol.flops(3, 4) - agnostic.flops(3, 4) > 0 and topk_keep(pol(X, (2, 2), question=q), k=3).numel() == 3


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["llava_onevision", "qwen2_5_vl"])
def test_real_adapters_feed_their_own_word_embeddings_to_the_selector_and_inference(tiny_mllm, kind):
    """The words a question-aware policy reads are the MLLM's input embeddings of the prompt's user
    text (no placeholder, no chat markup), and evaluation and inference select per question."""
    from pipeline.inference import CompressedMLLM
    from pipeline.mllm.chat import ChatPrompt

    ad = tiny_mllm(kind)
    q = "what color is the circle ?"
    ids = ad.tokenizer(f"question : {q} answer :", add_special_tokens=False)["input_ids"]
    words = ad.question_embeddings(qa_prompt(q))
    torch.testing.assert_close(words, ad.embed_tokens(torch.tensor(ids)).float())
    chat = ChatPrompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": f"<video> {q}"}])
    torch.testing.assert_close(ad.question_embeddings(chat),
                               ad.embed_tokens(torch.tensor(ad.tokenizer(q, add_special_tokens=False)["input_ids"])).float())
    pol = tr.init_policy(ad.hidden_size, AWARE, 0)
    with torch.no_grad():
        pol.head.weight.normal_()
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    X, _ = ad.encode_video_with_side(frames)
    t, gh, gw = (X.shape[0], *ad.visual_grid(4)[1:])
    select = make_score_selector(pol)
    keeps = [select(X, 3, SelectionContext(grid=(t, gh, gw), prompt=qa_prompt(p), adapter=ad))
             for p in (q, "which way does the red square move ?")]
    words2 = ad.question_embeddings(qa_prompt("which way does the red square move ?"))
    for keep, w in zip(keeps, (words, words2)):
        z = pol(X, (gh, gw), question=(w, torch.ones(len(w), dtype=torch.bool)))
        assert torch.equal(keep, topk_keep(z, k=3))
    out = CompressedMLLM(ad, pol, retention=0.25, num_frames=4).generate(frames, q, max_new_tokens=2)
    assert out["kept"] == int(np.ceil(0.25 * X.shape[0] * X.shape[1]))
