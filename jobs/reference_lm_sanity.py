"""LM-only binding check for score-tiny (EXPERIMENTS.md): the real LM and adapter path, but
synthetic "perfect" visual tokens (a colour vector + a shape vector on the object cells, noise
elsewhere), single frames, colour/shape questions. Does the LM learn to answer about the object
the question names, and how fast, at a given learning rate?

    OMP_NUM_THREADS=1 python jobs/reference_lm_sanity.py LR SCALE STEPS [qfirst]
"""
import _bootstrap  # noqa: F401
import sys, time, torch, numpy as np
from pipeline.mllm.reference import build_model, build_tokenizer
from pipeline.mllm.loader import adapter_for
from pipeline.config import ReferenceConfig, WorldConfig
from pipeline.data.world import make_video, sample_rng, token_labels, COLORS, SHAPES
from pipeline.data.prompts import qa_prompt
PROMPT = (lambda q: f"<bos> question : {q} <video> answer :".replace("<bos> ", "")) if len(sys.argv) > 4 and sys.argv[4] == "qfirst" else qa_prompt
lr = float(sys.argv[1]); scale = float(sys.argv[2]); steps = int(sys.argv[3])
r = ReferenceConfig(lr=lr); w = WorldConfig(motion=["static"])
tok = build_tokenizer(); m = build_model(r, w, tok); ad = adapter_for(m, tok)
for p in m.parameters(): p.requires_grad_(True)
m.train()
g = torch.Generator().manual_seed(0)
D = 128
cvec = torch.randn(len(COLORS), D, generator=g); svec = torch.randn(len(SHAPES), D, generator=g)
opt = torch.optim.AdamW(m.model.language_model.parameters(), lr=lr, weight_decay=0.01)
rng = np.random.default_rng(0)
def sample(i, split):
    v = make_video(w, sample_rng(0, split, "video", i), frames=1)
    c, s = token_labels(v["objects"], 1, 64, (4, 4))
    X = torch.randn(1, 16, D, generator=g) * 0.5
    obj = c[0] >= 0
    X[0, obj] += cvec[c[0][obj]] + svec[s[0][obj]]
    return X * scale, v["qa"]
t0 = time.time()
for step in range(steps):
    lr_now = lr * min(1, (step + 1) / 50)
    for gr in opt.param_groups: gr["lr"] = lr_now
    Xs, P, T = [], [], []
    for b in range(64):
        X, qa = sample(step * 64 + b, "train")
        q = qa[rng.integers(len(qa))]
        Xs.append(X); P.append(PROMPT(q["question"])); T.append(q["answer"] + " <eos>")
    X = torch.stack(Xs)
    loss = ad.target_ce(X, torch.ones(64, 1, 16, dtype=torch.bool), P, T).mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
    if (step + 1) % 100 == 0:
        m.eval(); hits = {}
        with torch.no_grad():
            for i in range(100):
                X, qa = sample(i, "test")
                for q in qa:
                    lg = ad.prefill(X, torch.arange(16), PROMPT(q["question"])).logits
                    hits.setdefault(q["type"], []).append(tok.convert_ids_to_tokens(int(lg.argmax())) == q["answer"])
        m.train()
        print(step + 1, round(time.time() - t0), round(float(loss), 3), {k: round(np.mean(v), 2) for k, v in hits.items()}, flush=True)
