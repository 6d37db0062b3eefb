"""The headline metric: ``pipeline.evaluation.answer_word`` (how a generation is normalised) and
``evaluate_qa`` (greedy exact match, option accuracy, per-type accuracy, the arithmetic).

``evaluate_qa`` only calls the adapter's ``generate`` and ``option_logprobs`` (and
``visual_grid`` when a selector runs), so the exact-match rules and the arithmetic are checked
with a scripted adapter whose generations and option scores are chosen by hand; one test runs the
real tiny LLaVA-OneVision of conftest through the same function.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.data.prompts import qa_prompt
from pipeline.evaluation import EvalVideo, answer_word, evaluate_qa
from pipeline.select import budget

pytestmark = pytest.mark.unit

T, N, D = 2, 4, 8


# ------------------------------------------------------------------------------------ answer_word
@pytest.mark.parametrize("text, word", [
    ("green", "green"),
    ("green. a", "green"),            # trailing punctuation and what follows are dropped
    ("  Red circle", "red"),          # leading space, case folded, first word only
    ("LEFT!", "left"),
    ("light-blue square", "light-blue"),  # a hyphen stays inside the word
    ("left's", "left"),               # an apostrophe ends the word
    ("3 objects", "3"),
    ("... up", "up"),                 # leading punctuation is skipped
    ("B) left", "b"),                 # a multiple-choice letter is a word of its own, not the option
    ("(a)", "a"),
    ("", ""),                         # empty generation
    ("   ", ""),
    ("?!. ,;", ""),                   # garbled: punctuation only
])
def test_answer_word_normalisation(text, word):
    assert answer_word(text) == word


def test_world_answers_are_in_normal_form():
    """Exact match compares ``answer_word(generation)`` with the reference as written, so a
    reference that is not its own normal form (capitals, two words, punctuation) could never be
    hit. The world's answers and options are all in normal form."""
    from pipeline.config import WorldConfig
    from pipeline.data.world import make_video, sample_rng

    cfg = WorldConfig(frames=4)
    seen = 0
    for i in range(60):
        for q in make_video(cfg, sample_rng(0, "eval", "video", i))["qa"]:
            for word in [q["answer"], *q["options"]]:
                assert answer_word(word) == word, (i, q)
                seen += 1
    assert seen > 100


# ------------------------------------------------------------------------------------ evaluate_qa
class ScriptedAdapter:
    """Duck-typed adapter: ``generate`` returns the scripted text for the prompt, and
    ``option_logprobs`` the scripted scores (records every call)."""

    def __init__(self, texts: dict[str, str], scores: dict[str, list[float]] | None = None):
        self.texts, self.scores = texts, scores or {}
        self.generate_calls: list[tuple] = []
        self.option_calls: list[tuple] = []

    def visual_grid(self, t: int) -> tuple[int, int, int]:
        return (t, 2, 2)

    def generate(self, X, keep, prompt, max_new_tokens=16, side=None):
        self.generate_calls.append((X, keep.clone(), prompt, max_new_tokens))
        return self.texts[prompt]

    def option_logprobs(self, X, keep, prompt, options, side=None):
        self.option_calls.append((X, keep.clone(), prompt, list(options)))
        return torch.tensor(self.scores[prompt], dtype=torch.float32)


def _video(i: int, question: str, answer: str, options=None, type_=None) -> EvalVideo:
    qa = {"question": question, "answer": answer}
    if options is not None:
        qa["options"] = options
    if type_ is not None:
        qa["type"] = type_
    return EvalVideo(id=f"v{i}", X=torch.full((T, N, D), float(i)), qa=qa, objects=[], frame_hw=(16, 16))


def test_exact_match_and_accuracy_arithmetic():
    """Five hand-made videos: three greedy hits (after normalisation), a garbled and an empty
    generation; option accuracy from the highest score; per-type means."""
    videos = [
        _video(0, "what color is the circle", "red", ["red", "blue"], "color"),
        _video(1, "what color is the square", "green", ["green", "blue"], "color"),
        _video(2, "which way does it move", "left", ["left", "right"], "motion"),
        _video(3, "which way does the cross move", "up", ["up", "down"], "motion"),
        _video(4, "which object appears", "circle", ["square", "circle"], "appear"),
    ]
    texts = {
        qa_prompt(videos[0].qa["question"]): "Red.",             # hit: case and punctuation folded
        qa_prompt(videos[1].qa["question"]): " green square",    # hit: first word
        qa_prompt(videos[2].qa["question"]): "left-right",       # miss: the hyphenated word is one word
        qa_prompt(videos[3].qa["question"]): "?!",               # miss: garbled
        qa_prompt(videos[4].qa["question"]): "",                 # miss: empty
    }
    scores = {
        qa_prompt(videos[0].qa["question"]): [-1.0, -2.0],   # red: hit
        qa_prompt(videos[1].qa["question"]): [-3.0, -0.5],   # blue: miss
        qa_prompt(videos[2].qa["question"]): [-0.1, -9.0],   # left: hit
        qa_prompt(videos[3].qa["question"]): [-2.0, -1.0],   # down: miss
        qa_prompt(videos[4].qa["question"]): [-5.0, -4.0],   # circle: hit
    }
    ad = ScriptedAdapter(texts, scores)
    res = evaluate_qa(ad, videos)
    assert res["n"] == 5
    assert res["accuracy"] == pytest.approx(2 / 5)
    assert res["option_accuracy"] == pytest.approx(3 / 5)
    assert res["per_type"] == {"appear": 0.0, "color": 1.0, "motion": 0.0}
    # every video was asked its own primary question with all T*N tokens, two new tokens at most
    assert [c[2] for c in ad.generate_calls] == [qa_prompt(v.qa["question"]) for v in videos]
    assert all(torch.equal(c[1], torch.arange(T * N)) and c[3] == 2 for c in ad.generate_calls)
    assert [c[3] for c in ad.option_calls] == [v.qa["options"] for v in videos]

    # a letter for the right option is not the option's word: a miss
    letter = [_video(0, "which way does it move", "left", ["left", "right"])]
    res = evaluate_qa(ScriptedAdapter({qa_prompt("which way does it move"): "A"}, {qa_prompt("which way does it move"): [0.0, -1.0]}), letter)
    assert res["accuracy"] == 0.0 and res["option_accuracy"] == 1.0


def test_per_type_rounding_default_type_and_missing_options():
    """Accuracy is the exact mean; per-type values are rounded to 4 places; a question without
    a type counts as "qa"; a question without options scores the answer alone (always a hit)."""
    videos = [_video(i, f"q{i}", "red") for i in range(3)]
    texts = {"q0": "red", "q1": "red", "q2": "blue"}
    ad = ScriptedAdapter({qa_prompt(k): v for k, v in texts.items()}, {qa_prompt(f"q{i}"): [0.0] for i in range(3)})
    res = evaluate_qa(ad, videos)
    assert res["accuracy"] == pytest.approx(2 / 3, abs=1e-12)
    assert res["per_type"] == {"qa": 0.6667}
    assert res["option_accuracy"] == 1.0
    assert [c[3] for c in ad.option_calls] == [["red"]] * 3


def test_options_off_and_no_videos():
    videos = [_video(0, "q", "red", ["red", "blue"])]
    ad = ScriptedAdapter({qa_prompt("q"): "red"})
    res = evaluate_qa(ad, videos, options=False)
    assert res == {"accuracy": 1.0, "option_accuracy": None, "per_type": {"qa": 1.0}, "n": 1, "asked_share": None,
                   "asked_n": 0}
    assert ad.option_calls == []  # no option scoring at all
    assert evaluate_qa(ad, []) == {"accuracy": 0.0, "option_accuracy": 0.0, "per_type": {}, "n": 0, "asked_share": None,
                                   "asked_n": 0}


def test_selector_gets_the_budget_and_its_tokens_are_the_ones_scored():
    """With a selector, K = budget(retention, T*N) is asked for, and the kept indices it returns
    are exactly what generation and option scoring see; contexts get distinct seeds per video."""
    videos = [_video(i, f"q{i}", "red", ["red", "blue"]) for i in range(2)]
    ad = ScriptedAdapter({qa_prompt(f"q{i}"): "red" for i in range(2)}, {qa_prompt(f"q{i}"): [0.0, -1.0] for i in range(2)})
    asked: list[tuple[int, int]] = []

    def last_k(X, k, ctx):
        asked.append((k, ctx.seed))
        assert ctx.grid == (T, 2, 2) and ctx.prompt == qa_prompt(f"q{len(asked) - 1}")
        return torch.arange(T * N - k, T * N)

    res = evaluate_qa(ad, videos, last_k, retention=0.25, seed=3)
    k = budget(0.25, T * N)
    assert [a[0] for a in asked] == [k, k] and asked[0][1] != asked[1][1]
    assert all(torch.equal(c[1], torch.arange(T * N - k, T * N)) for c in ad.generate_calls + ad.option_calls)
    assert res["accuracy"] == 1.0 and res["option_accuracy"] == 1.0


def test_real_tiny_adapter_greedy_words_are_scored(tiny_mllm):
    """The real adapter (tiny random LLaVA-OneVision): reference answers set to what its greedy
    decoding says for three videos and to another word for the fourth give accuracy 3/4; option
    accuracy counts the videos whose answer has the highest log-likelihood among its options."""
    import numpy as np

    adapter = tiny_mllm("llava_onevision")
    rng = np.random.default_rng(0)
    questions = ["what color is the circle", "which way does the square move", "what shape is it", "which object appears"]
    videos, opt_hits = [], 0
    for i, q in enumerate(questions):
        X = adapter.encode_video(rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
        full = torch.arange(X.shape[0] * X.shape[1])
        word = answer_word(adapter.generate(X, full, qa_prompt(q), max_new_tokens=2))
        assert word == answer_word(adapter.generate(X, full, qa_prompt(q), max_new_tokens=2))  # greedy: deterministic
        if i < 3:
            assert word, "the tiny model says a word here"
            answer = word
        else:
            answer = "circle" if word != "circle" else "square"
        options = list(dict.fromkeys([answer, "red", "left"]))
        opt_hits += int(torch.argmax(adapter.option_logprobs(X, full, qa_prompt(q), options))) == 0
        videos.append(EvalVideo(f"v{i}", X, {"question": q, "answer": answer, "options": options}, [], (16, 16)))
    res = evaluate_qa(adapter, videos)
    assert res["n"] == 4 and res["accuracy"] == pytest.approx(3 / 4)
    assert res["option_accuracy"] == pytest.approx(opt_hits / 4)
    assert res["per_type"] == {"qa": 0.75}
