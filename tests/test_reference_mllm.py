"""score-tiny: a rebuild of a small config learns and passes a small calibration (the full build's bar is in the README)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import MLLMConfig, ReferenceConfig, WorldConfig
from pipeline.mllm.loader import load_mllm
from pipeline.mllm.reference import spec_hash

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "reference.hidden=64", "--set", "reference.layers=2", "--set", "reference.steps=STEPS",
         "--set", "reference.eval_videos=40", "--set", "reference.eval_every=1000", "--set", "reference.min_qa_accuracy=0.0",
         "--set", "reference.tokens_per_batch=1024",
         "--set", "reference.binding_steps=200"]


@pytest.mark.slow
def test_small_rebuild_learns_and_is_cached(tmp_path):
    world = tmp_path / "world"
    subprocess.run([sys.executable, str(ROOT / "jobs/make_world.py"), "--out", str(world), "--images", "0", "--videos", "0", "--heldout-videos", "40",
                    "--size", "32", "--grid", "2", "--frames", "4", "--objects", "1-2", "--motion", "static",
                    "--set", "world.object_size=0.375", "--set", "world.jitter=0", "--quiet"], check=True)
    out = tmp_path / "model"
    args = [sys.executable, str(ROOT / "jobs/build_reference_mllm.py"), "--world", str(world), "--out", str(out),
            *[a.replace("STEPS", "STEPS_N") for a in SMALL]]
    args = [a.replace("STEPS_N", "400") for a in args]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # chance is 1/4 (shape) to 1/6 (colour); the small build must be clearly above it
    assert res["option_accuracy"] >= 0.6, res
    # the calibration, small: at 10% blind selection loses >= 10 points, the oracle (the question's
    # object tokens) at most 5 (measured: random -0.33, uniform -0.25, oracle +0.10 of 0.63)
    full, cal = res["qa_accuracy"], res["calibration"]["0.1"]
    assert cal["random"] <= full - 0.1 and cal["uniform"] <= full - 0.1 and cal["oracle"] >= full - 0.05, res
    assert not res["cached"] and (out / "model.safetensors").is_file() and (out / "build.json").is_file()
    adapter = load_mllm(MLLMConfig(path=str(out)))
    assert adapter.visual_grid(4) == (4, 2, 2)
    # same spec: served from the cache, no training
    r2 = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and json.loads(r2.stdout.strip().splitlines()[-1])["cached"] is True
    # a world that differs only in its sample counts (more training videos) reuses the build; a
    # knob that changes what the model sees does not
    wj = json.loads((world / "world.json").read_text())
    bigger = tmp_path / "world-bigger"
    subprocess.run([sys.executable, str(ROOT / "jobs/make_world.py"), "--out", str(bigger), "--images", "0", "--videos", "8",
                    "--heldout-videos", "48", "--size", "32", "--grid", "2", "--frames", "4", "--objects", "1-2",
                    "--motion", "static", "--set", "world.object_size=0.375", "--set", "world.jitter=0", "--quiet"], check=True)
    r3 = subprocess.run([a if a != str(world) else str(bigger) for a in args], capture_output=True, text=True, timeout=300)
    assert r3.returncode == 0 and json.loads(r3.stdout.strip().splitlines()[-1])["cached"] is True, r3.stderr[-2000:]
    w = WorldConfig(**wj)
    assert spec_hash(ReferenceConfig(), w) == spec_hash(ReferenceConfig(), w.model_copy(update={"videos": 999, "heldout_videos": 7}))
    assert spec_hash(ReferenceConfig(), w) != spec_hash(ReferenceConfig(), w.model_copy(update={"grid": 4}))


@pytest.mark.slow
def test_build_on_a_world_of_several_durations(tmp_path):
    """A randomized world (frame counts, backgrounds, noise drawn per video): the build trains up to
    its longest videos and checks itself on every held-out video at its own length, so the
    calibration's oracle reads each frame's boxes (uniform sampling to the shortest failed it)."""
    world = tmp_path / "world"
    subprocess.run([sys.executable, str(ROOT / "jobs/make_world.py"), "--out", str(world), "--images", "0", "--videos", "0",
                    "--heldout-videos", "12", "--size", "32", "--grid", "2", "--frames", "4-6", "--objects", "1-2",
                    "--background", "plain,texture", "--noise", "0-0.02", "--set", "world.object_size=0.375",
                    "--set", "world.jitter=0", "--quiet"], check=True)
    args = [sys.executable, str(ROOT / "jobs/build_reference_mllm.py"), "--world", str(world), "--out", str(tmp_path / "m"),
            *[a.replace("STEPS", "30") for a in SMALL], "--set", "reference.binding_steps=10", "--set", "reference.eval_videos=12"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["eval_videos"] == 12 and set(res["calibration"]["0.1"]) == {"random", "uniform", "oracle"}


@pytest.mark.unit
def test_direction_labels_and_loss():
    """The dense direction targets sit on a linearly moving object's token once it has left its
    first cell, and a pre-training step with ``direction_aux`` trains the LM on them."""
    from pipeline.data.world import DIRECTIONS, token_directions, token_labels
    from pipeline.mllm.reference import Pretrainer, build_model, build_tokenizer

    box = lambda cx, cy: [cx * 16 + 2, cy * 16 + 2, cx * 16 + 14, cy * 16 + 14]  # noqa: E731
    mover = {"id": 0, "shape": "circle", "color": "red", "direction": "right", "new_color": None, "change_at": None,
             "boxes": [box(0, 1), box(0, 1), box(1, 1), box(2, 1)]}
    still = {"id": 1, "shape": "square", "color": "blue", "direction": None, "new_color": None, "change_at": None,
             "boxes": [box(3, 3)] * 4}
    d = token_directions([mover, still], 4, 64, (4, 4))
    right = list(DIRECTIONS).index("right")
    assert (d[:2] == -1).all() and d[2, 1 * 4 + 1] == right and d[3, 1 * 4 + 2] == right and (d >= 0).sum() == 2
    assert token_labels([mover, still], 4, 64, (4, 4))[0][3, 1 * 4 + 2] >= 0  # the same token as the colour label

    w = WorldConfig(size=32, grid=2, frames=4, motion=["linear"], object_size=0.375, jitter=0, max_objects=2)
    r = ReferenceConfig(hidden=32, layers=1, heads=2, vision_hidden=16, steps=4, binding_steps=0, tokens_per_batch=256,
                        direction_aux=1.0, type_weights={"direction": 5.0})
    tok = build_tokenizer()
    tr = Pretrainer(r, w, build_model(r, w, tok), tok)
    tr.step_idx = 3  # past the short-clip part of the schedule: 4-frame clips, objects move
    m = tr.step()
    assert m["frames"] >= 2 and m["dir_loss"] > 0


@pytest.mark.unit
def test_build_keeps_the_best_checkpoint_on_validation(tmp_path):
    """``select`` scores a candidate every ``eval_every`` steps and at the end; the saved model is
    the best one's weights (here the step-4 candidate), not the last."""
    from pipeline.mllm.reference import pretrain

    w = WorldConfig(size=32, grid=2, frames=4, object_size=0.375, jitter=0, max_objects=1)
    r = ReferenceConfig(hidden=32, layers=1, heads=2, vision_hidden=16, steps=6, binding_steps=0, warmup=0,
                        tokens_per_batch=256, eval_every=2, select_videos=8)
    seen, scores = [], iter([0.5, 0.9, 0.7])  # steps 2, 4 and the end (6)

    def select(adapter):
        seen.append({k: v.clone() for k, v in adapter.model.state_dict().items()})
        return {"accuracy": next(scores), "n": 8}

    summary = pretrain(r, w, tmp_path / "m", progress=False, select=select)
    assert summary["selected_step"] == 4 and [h["step"] for h in summary["history"]] == [2, 4, 6]
    saved = load_mllm(MLLMConfig(path=str(tmp_path / "m"))).model.state_dict()
    assert any(not torch.equal(seen[1][k], seen[2][k]) for k in seen[1])  # training moved on after step 4 ...
    assert all(torch.equal(saved[k], seen[1][k]) for k in seen[1])  # ... and the step-4 weights were saved
    # the choice depends on the candidates: eval_every enters the cache key only with select_videos
    assert spec_hash(r, w) != spec_hash(r.model_copy(update={"eval_every": 3}), w)
    plain = r.model_copy(update={"select_videos": 0})
    assert spec_hash(plain, w) == spec_hash(plain.model_copy(update={"eval_every": 3}), w) != spec_hash(r, w)


@pytest.mark.unit
def test_direction_loss_at_a_middle_layer():
    """``direction_layer`` reads the dense direction loss after that many LM layers, through the
    LM's own final norm and head: equal to the same loss on the LM's own ``output_hidden_states``."""
    from pipeline.mllm.reference import Pretrainer, build_model, build_tokenizer

    w = WorldConfig(size=32, grid=2, frames=4, motion=["linear"], object_size=0.375, jitter=0, max_objects=2)
    r = ReferenceConfig(hidden=32, layers=2, heads=2, vision_hidden=16, steps=4, binding_steps=0, tokens_per_batch=256,
                        direction_aux=1.0, direction_layer=1,
                        type_weights={"direction": 5.0})
    tok = build_tokenizer()
    tr = Pretrainer(r, w, build_model(r, w, tok), tok)
    tr.step_idx = 3  # 4-frame clips: objects move
    torch.manual_seed(0)
    pixels, keep, prompts, targets, labels = tr.batch()
    from pipeline.mllm.llava_onevision import video_features

    X = video_features(tr.model, pixels)[:, :-1].reshape(*pixels.shape[:2], -1, r.hidden)
    batch = tr.adapter._masked_batch(X, keep, prompts, targets, side={"direction": labels["direction"] + 1})
    out = tr.adapter.language_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, output_hidden_states=True)
    d = batch.side["direction"]
    assert (d > 0).any()
    own = torch.nn.functional.cross_entropy(tr.adapter.lm_head(tr.adapter.language_model.norm(out.hidden_states[1])[d > 0]),
                                            tr.direction_words[d[d > 0] - 1])
    last = torch.nn.functional.cross_entropy(tr.adapter.lm_head(out.last_hidden_state[d > 0]), tr.direction_words[d[d > 0] - 1])
    assert torch.allclose(tr._direction_loss(out.last_hidden_state, batch), own) and not torch.allclose(own, last)
    with pytest.raises(ValueError, match="direction_layer"):
        ReferenceConfig(layers=2, direction_layer=3)


@pytest.mark.unit
def test_binding_loss_is_the_models_own_attention_on_the_named_object():
    """``binding_aux``: the asked labels cover the tokens of the objects the question names, and the
    loss is ``-log`` of the attention mass head 0 of the last layer puts on them from the position
    that predicts the answer: equal to the same mass in the LM's own eager ``output_attentions``."""
    from pipeline.mllm.llava_onevision import video_features
    from pipeline.mllm.reference import Pretrainer, build_model, build_tokenizer

    w = WorldConfig(size=32, grid=2, frames=4, motion=["static"], object_size=0.375, jitter=0, min_objects=2, max_objects=2)
    r = ReferenceConfig(hidden=32, layers=2, heads=2, vision_hidden=16, steps=4, binding_steps=0, tokens_per_batch=256,
                        caption_fraction=0.0, pseudo_fraction=0.0, binding_aux=1.0)
    tok = build_tokenizer()
    tr = Pretrainer(r, w, build_model(r, w, tok), tok)
    torch.manual_seed(0)
    pixels, keep, prompts, targets, labels = tr.batch()
    asked = labels["asked"]
    # two objects, one named: the named one's tokens only, a strict subset of the object tokens
    assert asked.any() and ((labels["shape"] >= 0) & ~asked).any() and not (asked & (labels["shape"] < 0)).any()
    X = video_features(tr.model, pixels)[:, :-1].reshape(*pixels.shape[:2], -1, r.hidden)
    batch = tr.adapter._masked_batch(X, keep, prompts, targets, side={"asked": asked.long()})
    tr.adapter._lm(batch)
    loss = tr._binding_loss(batch)
    tr.model.set_attn_implementation("eager")
    out = tr.adapter.language_model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, output_attentions=True)
    A = out.attentions[-1][:, 0]  # [R, L, L], head 0
    pos = batch.target_mask.float().argmax(1) - 1
    on = batch.side["asked"] > 0
    rows = on.any(1)
    mass = torch.stack([A[i, pos[i]][on[i]].sum() for i in range(A.shape[0])])
    assert rows.any() and torch.allclose(loss, -mass[rows].log().mean(), atol=1e-5)
    m = tr.step()  # the training step adds it
    assert m["bind_loss"] > 0
    assert spec_hash(r, w) != spec_hash(r.model_copy(update={"binding_aux": 0.0}), w)  # a different build
