"""netsim_paper.hf.text: the standard library's documentation as a corpus, its tokenizer and windows."""

from __future__ import annotations

import pytest
import torch

from netsim_paper.hf.text import (
    EOS_ID,
    MIN_CHARS,
    Document,
    corpus_digest,
    decode,
    python_docs,
    split,
    token_windows,
    train_tokenizer,
)

DOCS = [Document("a", "the cat sat on the mat " * 4), Document("b", "def f(x): return x + 1  # a function"),
        Document("c", "Ünïcode text, and tabs\tand newlines\n" * 3)]


def test_the_corpus_is_the_topics_then_long_docstrings_and_its_digest_names_it():
    docs = python_docs()
    topics = [d for d in docs if d.source.startswith("topic:")]
    assert len(topics) > 50 and docs[:len(topics)] == topics
    assert [d.source for d in topics] == sorted(d.source for d in topics)
    assert all(len(d.text) >= MIN_CHARS for d in docs[len(topics):]) and len(docs) > 1000
    assert corpus_digest(docs) == corpus_digest(python_docs())
    assert corpus_digest(docs[:-1]) != corpus_digest(docs)


def test_the_tokenizer_round_trips_any_text_and_windows_know_their_document():
    tokenizer = train_tokenizer(DOCS, vocab_size=300)
    for doc in DOCS:
        assert tokenizer.decode(tokenizer.encode(doc.text).ids) == doc.text
    windows = token_windows(DOCS, tokenizer, length=4)
    flat = torch.cat([torch.tensor(tokenizer.encode(d.text).ids + [EOS_ID]) for d in DOCS])
    n = len(flat) // 4
    assert torch.equal(windows.ids.flatten(), flat[:4 * n])
    ends = torch.cumsum(torch.tensor([len(tokenizer.encode(d.text).ids) + 1 for d in DOCS]), 0)
    expected = torch.searchsorted(ends, torch.arange(n) * 4, right=True)   # the document holding the first token
    assert torch.equal(windows.document, expected)
    assert decode(tokenizer, windows.ids[0]).startswith("the cat")
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(DOCS[:1], tokenizer, length=10_000)


def test_the_split_is_disjoint_seeded_and_in_corpus_order():
    tokenizer = train_tokenizer(DOCS, vocab_size=300)
    windows = token_windows(DOCS, tokenizer, length=2)
    train, test = split(windows, 5, 3, seed=0)
    rows = {tuple(r) for r in windows.ids.tolist()}
    assert len(train) == 5 and len(test) == 3 and all(tuple(r) in rows for r in train.ids.tolist())
    assert torch.equal(split(windows, 5, 3, seed=0)[1].ids, test.ids)
    assert (train.document.diff() >= 0).all()
    with pytest.raises(ValueError, match="windows asked for"):
        split(windows, len(windows), 1, seed=0)
