"""Tokenisation from a local BERT-layout vocab: shapes, [CLS]/[SEP], truncation, padding, official zero sentences."""

import importlib.util
import pickle

import pytest
import torch

from lfvila.data.sampling import Segment, merge_segments
from lfvila.data.text import (
    SPECIAL_TOKENS,
    TextTokenizer,
    as_text_tokenizer,
    encode_sentences,
    load_tokenizer,
    tokenize_paragraph,
)

WORDS = ["the", "man", "dog", "a", "jump", "run", "ball", "play", "with", "red", ".", ",", "##s", "##ing", "##ed"]


def write_vocab(path, specials=SPECIAL_TOKENS, words=WORDS):
    path.write_text("\n".join([*specials, *words]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def vocab(tmp_path):
    return write_vocab(tmp_path / "vocab.txt")


@pytest.fixture
def tok(vocab):
    return load_tokenizer(vocab)


def ids_of(tok, *tokens):
    return [tok.vocab[t] for t in tokens]


def test_special_ids_follow_the_bert_layout(tok):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(WORDS) == len(tok)


def test_wordpiece_lowercase_accents_and_unknown_words(tok):
    assert tok.encode(["The MAN jumps"]) == [ids_of(tok, "the", "man", "jump", "##s")]
    assert tok.encode(["thé dog"]) == [ids_of(tok, "the", "dog")]  # uncased BERT strips accents
    assert tok.encode(["zebra, playing."]) == [ids_of(tok, "[UNK]", ",", "play", "##ing", ".")]


def test_tokenizer_pickles_for_dataloader_workers(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(["The man jumps"]) == tok.encode(["The man jumps"]) and again.pad_id == tok.pad_id


def test_lowercase_false_keeps_case(vocab):
    cased = load_tokenizer(vocab, lowercase=False)
    assert cased.encode(["The man"]) == [[cased.unk_id, cased.vocab["man"]]]


def test_paragraph_shapes_dtypes_and_official_zero_padding(tok):
    out = tokenize_paragraph(tok, [Segment("The man runs", 0.0, 2.0), Segment("a dog jumped", 2.0, 5.0)])
    assert out["ids"].shape == (4, 50) and out["mask"].shape == (4, 50) and out["real"].shape == (4,)
    assert out["ids"].dtype == torch.int64 and out["mask"].dtype == torch.int64 and out["real"].dtype == torch.bool
    first = [tok.cls_id, *ids_of(tok, "the", "man", "run", "##s"), tok.sep_id]
    assert out["ids"][0, : len(first)].tolist() == first
    assert out["ids"][0, len(first):].eq(tok.pad_id).all()
    assert out["mask"][0].tolist() == [1] * len(first) + [0] * (50 - len(first))
    assert out["real"].tolist() == [True, True, False, False]
    assert out["ids"][2:].eq(0).all() and out["mask"][2:].eq(0).all()  # missing sentences: all-zero ids and mask


def test_truncation_keeps_cls_and_sep(tok):
    ids, mask = encode_sentences(tok, ["the man " * 30], max_len=10)
    assert ids.shape == (1, 10)
    assert ids[0].tolist() == [tok.cls_id] + ids_of(tok, "the", "man") * 4 + [tok.sep_id]
    assert mask.eq(1).all()


def test_exact_fit_and_empty_pieces(tok):
    ids, mask = encode_sentences(tok, ["the man", "   "], max_len=4)
    assert ids[0].tolist() == [tok.cls_id, *ids_of(tok, "the", "man"), tok.sep_id]
    assert ids[1].tolist() == [tok.cls_id, tok.sep_id, 0, 0] and mask[1].tolist() == [1, 1, 0, 0]


def test_more_sentences_than_m_are_merged_by_the_official_rule(tok):
    segs = [Segment(t) for t in ["the man runs", "a dog", "the ball", "play with a red ball", "the dog jumps", "a"]]
    out = tokenize_paragraph(tok, segs, m=4, max_len=20)
    merged = [s.text for s in merge_segments(segs, 4)]
    expected, _ = encode_sentences(tok, merged, max_len=20)
    assert torch.equal(out["ids"], expected)
    assert out["real"].all()


def test_plain_strings_and_other_m_and_length(tok):
    out = tokenize_paragraph(tok, ["the man", ""], m=3, max_len=8)
    assert out["ids"].shape == (3, 8)
    assert out["real"].tolist() == [True, False, False]
    assert out["mask"][1:].eq(0).all()


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="max_len"):
        encode_sentences(tok, ["the"], max_len=1)
    with pytest.raises(ValueError, match="m must be"):
        tokenize_paragraph(tok, ["the"], m=0)
    with pytest.raises(TypeError, match=r"texts\[0\]"):
        encode_sentences(tok, [3])
    with pytest.raises(TypeError, match="not a tokenizer"):
        tokenize_paragraph(object(), ["the"])


def test_missing_vocab_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match="nope/vocab.txt"):
        load_tokenizer(missing)


@pytest.mark.parametrize("lacking", SPECIAL_TOKENS)
def test_vocab_without_a_special_token_is_refused(tmp_path, lacking):
    path = write_vocab(tmp_path / "vocab.txt", specials=[t for t in SPECIAL_TOKENS if t != lacking])
    with pytest.raises(ValueError, match=lacking.replace("[", r"\[").replace("]", r"\]")):
        load_tokenizer(path)


def test_vocab_ids_are_line_numbers_even_with_unicode_line_separators(tmp_path):
    tok = load_tokenizer(write_vocab(tmp_path / "vocab.txt", words=["\x85", "\u2028x", "the"]))
    assert tok.vocab["the"] == len(SPECIAL_TOKENS) + 2 and tok.vocab_size == len(SPECIAL_TOKENS) + 3


def test_vocab_with_a_repeated_token_or_empty_is_refused(tmp_path):
    with pytest.raises(ValueError, match="repeats line"):
        load_tokenizer(write_vocab(tmp_path / "v1.txt", words=["the", "man", "the"]))
    (tmp_path / "v2.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer(tmp_path / "v2.txt")
    with pytest.raises(ValueError, match="backend"):
        load_tokenizer(write_vocab(tmp_path / "v3.txt"), backend="sentencepiece")


def test_wrapping_a_raw_tokenizers_object_and_a_transformers_like_one(tok, vocab):
    from tokenizers import BertWordPieceTokenizer

    raw = BertWordPieceTokenizer(str(vocab), lowercase=True)
    a = tokenize_paragraph(raw, ["The man runs"], max_len=12)
    b = tokenize_paragraph(tok, ["The man runs"], max_len=12)
    assert torch.equal(a["ids"], b["ids"])

    class FakeHF:  # the duck-typed surface of a transformers tokenizer
        def get_vocab(self):
            return dict(tok.vocab)

        def __call__(self, texts, add_special_tokens=True):
            assert add_special_tokens is False
            return {"input_ids": tok.encode(texts)}

    wrapped = as_text_tokenizer(FakeHF())
    assert isinstance(wrapped, TextTokenizer) and as_text_tokenizer(wrapped) is wrapped
    assert torch.equal(tokenize_paragraph(wrapped, ["The man runs"], max_len=12)["ids"], b["ids"])


def test_transformers_backend(vocab, tok):
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(ImportError, match="transformers"):
            load_tokenizer(vocab, backend="transformers")
        return
    hf = load_tokenizer(vocab, backend="transformers")
    text = ["The MAN jumps, playing with a red ball."]
    assert torch.equal(encode_sentences(hf, text)[0], encode_sentences(tok, text)[0])
