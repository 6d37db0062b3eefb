"""Word-level tokenizer for the project's tiny MLLMs (``score-tiny`` and the test models).

:func:`build_word_tokenizer` returns a ``transformers.PreTrainedTokenizerFast`` over a closed
vocabulary: lower-cased words, punctuation and single digits are tokens; anything else maps to
``<unk>``. Every encoded text starts with ``<bos>`` (``add_special_tokens=True``). The visual
placeholders (``<video>``, ``<image>``, ...) are special tokens that are never split. It saves
and loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any HF tokenizer.

:func:`build_byte_bpe_tokenizer` is the byte-level BPE counterpart for families whose tokenizer
class rebuilds a byte-level BPE on load (Qwen3.5's ``Qwen3_5Tokenizer``): Qwen's pre-tokenizer,
256 byte symbols plus merges learned from a word list, no unknown token.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
BASE_SPECIAL = [PAD, BOS, EOS, UNK]
DIGITS = [str(i) for i in range(10)]
PUNCT = list(".,?!:;'\"-()/")


def build_word_tokenizer(words: list[str], extra_special: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ids 0..3 are ``<pad> <bos> <eos> <unk>``, then ``extra_special``
    (e.g. ``["<video>", "<image>"]``), then the digits 0-9 and common punctuation, then ``words`` (lower-cased,
    de-duplicated, in first-seen order).

    Pre-tokenization splits on whitespace, isolates punctuation and single digits, so
    ``"a red circle, 2 squares."`` -> ``a red circle , 2 squares .``. Decoding joins words with
    spaces and removes the space before punctuation.
    """
    if not words:
        raise ValueError("build_word_tokenizer: the word list is empty")
    for s in extra_special:
        if not s or any(c.isspace() for c in s):
            raise ValueError(f"build_word_tokenizer: bad special token {s!r} (empty or contains whitespace)")
    vocab: dict[str, int] = {}
    for tok in [*BASE_SPECIAL, *extra_special, *DIGITS, *PUNCT, *(w.lower() for w in words)]:
        if tok and tok not in vocab:
            vocab[tok] = len(vocab)
    specials = [*BASE_SPECIAL, *[s for s in extra_special if s not in BASE_SPECIAL]]

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(specials)

    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[s for s in extra_special if s not in BASE_SPECIAL],
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    return out


# ---------------------------------------------------------------- byte-level BPE (Qwen-style)
#: Qwen2 / Qwen3 / Qwen3.5's pre-tokenizer split (``tokenization_qwen3_5.PRETOKENIZE_REGEX``)
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _qwen_pipeline(tok: Tokenizer) -> Tokenizer:
    """Qwen's normalizer / pre-tokenizer / decoder (what ``Qwen3_5Tokenizer.__init__`` sets)."""
    from tokenizers import Regex

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def build_byte_bpe_tokenizer(
    words: list[str], special: list[str], *, eos_token: str, pad_token: str
) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer in Qwen's layout: ids ``0..255`` are the 256 byte symbols
    (GPT-2's byte-to-unicode alphabet), then the merged symbols in merge order, then ``special``
    (never split). Pre-tokenization, normalizer and decoder are Qwen's, and there is no BOS.

    The merges are learned (``tokenizers``' BPE trainer) from ``words``, each alone and after a
    space, so every word and `` word`` is one token; any other text still encodes (byte by
    byte), nothing maps to an unknown token. Why byte-level: a checkpoint directory of a Qwen3.5
    model reloads its tokenizer as ``Qwen3_5Tokenizer``, which rebuilds a byte-level BPE from
    ``tokenizer.json``'s vocab and merges whatever class wrote it; this tokenizer is that
    pipeline, so ``save_pretrained`` + ``AutoTokenizer.from_pretrained`` give the same ids.
    """
    from tokenizers import trainers

    words = [w for w in dict.fromkeys(words) if w]
    if not words:
        raise ValueError("build_byte_bpe_tokenizer: the word list is empty")
    missing = [t for t in (eos_token, pad_token) if t not in special]
    if missing:
        raise ValueError(f"build_byte_bpe_tokenizer: eos/pad token(s) {missing} are not among the special tokens {special}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_order = sorted(alphabet, key=lambda c: _BYTE_OF[c])  # id = GPT-2 order, as in Qwen's vocab
    learner = _qwen_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=1 << 20, min_frequency=1, initial_alphabet=byte_order, show_progress=False)
    learner.train_from_iterator([w for w in words] + [" " + w for w in words], trainer)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _model_json(learner)["merges"]]
    vocab = {c: i for i, c in enumerate(byte_order)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = _qwen_pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)))
    tok.add_special_tokens(list(dict.fromkeys(special)))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=[s for s in dict.fromkeys(special) if s not in (eos_token, pad_token)],
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def _model_json(tok: Tokenizer) -> dict:
    import json

    return json.loads(tok.to_str())["model"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}
