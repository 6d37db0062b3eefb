"""Word-level tokenizer for the project's tiny MLLMs (``score-tiny`` and the test models).

:func:`build_word_tokenizer` returns a ``transformers.PreTrainedTokenizerFast`` over a closed
vocabulary: lower-cased words, punctuation and single digits are tokens; anything else maps to
``<unk>``. Every encoded text starts with ``<bos>`` (``add_special_tokens=True``). The visual
placeholders (``<video>``, ``<image>``, ...) are special tokens that are never split. It saves
and loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` like any HF tokenizer.
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
