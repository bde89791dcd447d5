"""Paragraph tokenisation for LF-VILA from a LOCAL BERT vocabulary (the ``bert-base-uncased`` layout); nothing is
downloaded.

The official code tokenises every sentence with ``BertTokenizer.from_pretrained('bert-base-uncased')`` as
``[CLS] wordpieces [SEP]`` truncated to ``max_length=50`` and padded with ``[PAD]``; a paragraph is first reduced to
``M = 4`` sentences by the shortest-adjacent-pair merge rule (:func:`lfvila.data.sampling.merge_segments`), and a
missing (padding) sentence is all-zero ids and an all-zero mask. Layout: ids ``int64 (M, L)``, mask ``int64 (M, L)``
(1 on real tokens, as BERT's ``attention_mask``), ``real`` ``bool (M,)`` (False on padding sentences).

The default backend is the ``tokenizers`` library (``BertWordPieceTokenizer``: BERT's basic tokenizer with lowercasing
and accent stripping, then WordPiece). ``backend="transformers"`` builds ``BertTokenizerFast`` instead when
``transformers`` is installed, and :func:`tokenize_paragraph` also accepts a ready ``transformers`` BERT tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lfvila.data.sampling import Segment, merge_segments

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TextTokenizer:
    """A WordPiece tokenizer plus the special-token ids LF-VILA needs; picklable (DataLoader workers).

    ``backend``: a ``tokenizers`` tokenizer (anything with ``encode_batch``) or a ``transformers`` tokenizer (called
    on a list of texts, returning ``input_ids``). ``encode(texts)`` returns the word-piece ids of each text WITHOUT
    special tokens and without truncation; :func:`encode_sentences` adds ``[CLS]`` / ``[SEP]``, truncates and pads.
    ``vocab`` maps token -> id.
    """

    def __init__(self, backend, vocab: dict[str, int], source: str = "<memory>"):
        _check_special_tokens(vocab, source)
        self.backend = backend
        self.vocab = vocab
        self.source = source
        self.pad_id = vocab["[PAD]"]
        self.unk_id = vocab["[UNK]"]
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.mask_id = vocab["[MASK]"]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text, no special tokens, no truncation."""
        texts = list(texts)
        if hasattr(self.backend, "encode_batch"):
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return [list(ids) for ids in self.backend(texts, add_special_tokens=False)["input_ids"]]

    def __repr__(self) -> str:
        return f"TextTokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def _check_special_tokens(vocab: dict[str, int], source: str) -> None:
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"vocabulary {source} lacks the special token(s) {', '.join(missing)} "
                         f"(a BERT vocab.txt needs all of {', '.join(SPECIAL_TOKENS)})")


def _read_vocab(vocab_path: Path) -> dict[str, int]:
    """``vocab.txt``: one token per line, the line number (from 0) is the id."""
    if not vocab_path.is_file():
        raise FileNotFoundError(f"vocabulary file not found: {vocab_path} (a BERT vocab.txt, e.g. the one shipped "
                                f"with bert-base-uncased; nothing is downloaded)")
    try:
        text = vocab_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"vocabulary file {vocab_path} is not UTF-8: {err}") from err
    # split on "\n" only: str.splitlines would also split inside tokens such as "\x85" and shift every later id
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        token = line.removesuffix("\r")
        if token in vocab:
            raise ValueError(f"vocabulary file {vocab_path}: token {token!r} on line {i + 1} repeats line "
                             f"{vocab[token] + 1}")
        vocab[token] = i
    if not vocab:
        raise ValueError(f"vocabulary file {vocab_path} is empty")
    return vocab


def load_tokenizer(vocab_path, lowercase: bool = True, backend: str = "tokenizers") -> TextTokenizer:
    """Build a BERT WordPiece tokenizer from a local ``vocab.txt`` (bert-base-uncased layout: ``[PAD]`` = 0 and the
    special tokens ``[UNK] [CLS] [SEP] [MASK]`` present). ``lowercase`` also strips accents, as the uncased BERT.

    ``backend``: ``"tokenizers"`` (default) or ``"transformers"`` (``BertTokenizerFast``; imported only here).
    Raises ``FileNotFoundError`` naming the file when it is missing and ``ValueError`` naming any missing special token.
    """
    vocab_path = Path(vocab_path)
    vocab = _read_vocab(vocab_path)
    _check_special_tokens(vocab, str(vocab_path))
    if backend == "tokenizers":
        from tokenizers import BertWordPieceTokenizer

        return TextTokenizer(BertWordPieceTokenizer(vocab, lowercase=lowercase), vocab, str(vocab_path))
    if backend == "transformers":
        try:
            from transformers import BertTokenizerFast
        except ImportError as err:
            raise ImportError("backend='transformers' needs the transformers package; "
                              "use backend='tokenizers'") from err
        hf = BertTokenizerFast(vocab_file=str(vocab_path), do_lower_case=lowercase)
        if len(hf.get_vocab()) != len(vocab):  # transformers 5 ignores vocab_file: it takes the vocabulary as `vocab`
            hf = BertTokenizerFast(vocab=dict(vocab), do_lower_case=lowercase)
        return as_text_tokenizer(hf)
    raise ValueError(f"backend must be 'tokenizers' or 'transformers', got {backend!r}")


def as_text_tokenizer(tokenizer) -> TextTokenizer:
    """Wrap ``tokenizer`` as a :class:`TextTokenizer`: one already is; a ``tokenizers.Tokenizer`` (its vocab must hold
    the special tokens); or a ``transformers`` BERT tokenizer (anything with ``get_vocab`` and ``__call__`` returning
    ``input_ids``)."""
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer
    if hasattr(tokenizer, "get_vocab") and (hasattr(tokenizer, "encode_batch") or callable(tokenizer)):
        return TextTokenizer(tokenizer, dict(tokenizer.get_vocab()), type(tokenizer).__name__)
    raise TypeError(f"not a tokenizer: {type(tokenizer).__name__} (use load_tokenizer(vocab_path))")


def encode_sentences(tokenizer, texts: Sequence[str], max_len: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise each text as ``[CLS] pieces [SEP]``, truncated to ``max_len`` tokens (the pieces are cut, ``[SEP]`` is
    kept, as BERT's ``truncation=True``) and padded with ``[PAD]``. An empty text ``""`` is a padding sentence: all
    ``[PAD]`` ids (0 in the BERT layout) and an all-zero mask, the official missing-sentence behaviour.

    Returns ``ids int64 (N, max_len)`` and ``mask int64 (N, max_len)``.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
    tok = as_text_tokenizer(tokenizer)
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
    ids = torch.full((len(texts), max_len), tok.pad_id, dtype=torch.int64)
    mask = torch.zeros((len(texts), max_len), dtype=torch.int64)
    real = [i for i, t in enumerate(texts) if t != ""]
    pieces = tok.encode([texts[i] for i in real]) if real else []
    for i, p in zip(real, pieces):
        row = [tok.cls_id, *p[: max_len - 2], tok.sep_id]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, : len(row)] = 1
    return ids, mask


def tokenize_paragraph(tokenizer, segments: Sequence[Segment | str], m: int = 4, max_len: int = 50) -> dict:
    """Tokenise a paragraph as LF-VILA does: merge ``segments`` to exactly ``m`` sentences (shortest adjacent pair
    first, padding with empty segments; see :func:`merge_segments`), then :func:`encode_sentences` each. Plain
    strings are taken as untimed segments.

    Returns ``{"ids": int64 (m, max_len), "mask": int64 (m, max_len), "real": bool (m,)}``; a padding sentence has
    all-zero ids and mask (BERT layout, ``[PAD]`` = 0) and ``real`` False.
    """
    segs = merge_segments([Segment(s) if isinstance(s, str) else s for s in segments], m)
    texts = [s.text for s in segs]
    ids, mask = encode_sentences(tokenizer, texts, max_len)
    real = torch.tensor([t != "" for t in texts], dtype=torch.bool)
    return {"ids": ids, "mask": mask, "real": real}
