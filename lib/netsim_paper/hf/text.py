"""A real text corpus without a hub: the Python standard library's own documentation.

The documents are pydoc's topic pages (`pydoc_data.topics`, the language reference as `help()`
shows it), then the docstrings of the top-level pure-Python modules of the standard library (module,
class and function docstrings, read with `ast`, never imported), at least `MIN_CHARS` long, in
file and source order. They depend on the Python version: `corpus_digest` says which text was used.

A byte-level BPE tokenizer is trained here on those documents (`tokenizers`), the documents are
joined with an end-of-text token and cut into windows of a fixed number of tokens, each window
remembering the document it starts in.

Example:
    >>> docs = python_docs()
    >>> tokenizer = train_tokenizer(docs[:20], vocab_size=500)
    >>> windows = token_windows(docs[:20], tokenizer, length=32)
    >>> windows.ids.shape[1], windows.ids.dtype
    (32, torch.int64)
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

#: Special tokens, in id order: padding, unknown, end of text (the document separator).
SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>")
PAD_ID, EOS_ID = 0, 2
#: Docstrings shorter than this (one-liners) are left out.
MIN_CHARS = 40


@dataclass(frozen=True)
class Document:
    """One document: `source` ("topic:<name>" or "<module>.py:<qualified name>") and its text."""

    source: str
    text: str


def python_docs() -> list[Document]:
    """pydoc's topics (sorted by name), then the standard library's docstrings (see the module)."""
    from pydoc_data.topics import topics

    docs = [Document(f"topic:{name}", topics[name]) for name in sorted(topics)]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):   # a test file with deliberate errors
            continue
        docs += [Document(f"{path.name}:{name}", text) for name, text in _docstrings(tree)]
    return docs


def _docstrings(tree: ast.Module) -> list[tuple[str, str]]:
    """(qualified name, docstring) of the module, its classes and functions, in source order."""
    out = []

    def visit(node, prefix: str) -> None:
        text = ast.get_docstring(node)
        if text and len(text) >= MIN_CHARS:
            out.append((prefix or "<module>", text))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{prefix}.{child.name}" if prefix else child.name)

    visit(tree, "")
    return out


def corpus_digest(docs: list[Document]) -> str:
    """SHA-256 of the documents' sources and texts: which corpus a result came from."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.source.encode() + b"\0" + doc.text.encode() + b"\0")
    return h.hexdigest()


def train_tokenizer(docs: list[Document], vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` of `vocab_size` tokens trained on the documents (the
    `SPECIAL_TOKENS` first; any byte string can be encoded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([doc.text for doc in docs], trainer)
    return tokenizer


@dataclass
class Windows:
    """Token windows of the corpus.

    Attributes:
        ids: `(N, length)` token ids (each window full: the last partial one is dropped).
        document: `(N,)` index of the document each window starts in.
    """

    ids: Tensor
    document: Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def subset(self, rows: Tensor) -> Windows:
        return Windows(self.ids[rows], self.document[rows])


def token_windows(docs: list[Document], tokenizer, length: int) -> Windows:
    """The documents encoded, each followed by `EOS_ID`, joined and cut into windows of `length` tokens."""
    ids, starts = [], []
    for doc in docs:
        starts.append(len(ids))
        ids += tokenizer.encode(doc.text).ids + [EOS_ID]
    ids = torch.tensor(ids, dtype=torch.long)
    n = len(ids) // length
    if n == 0:
        raise ValueError(f"the corpus holds {len(ids)} tokens, fewer than one window of {length}")
    first_token = torch.arange(n) * length
    document = torch.searchsorted(torch.tensor(starts), first_token, right=True) - 1
    return Windows(ids[:n * length].reshape(n, length), document)


def split(windows: Windows, n_train: int, n_test: int, seed: int) -> tuple[Windows, Windows]:
    """Disjoint training and test windows drawn by a seeded permutation (each in corpus order)."""
    if n_train + n_test > len(windows):
        raise ValueError(f"{n_train} + {n_test} windows asked for, the corpus has {len(windows)}")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return windows.subset(order[:n_train].sort().values), windows.subset(order[n_train:n_train + n_test].sort().values)


def decode(tokenizer, ids: Tensor) -> str:
    """The text of token ids (special tokens shown as they are)."""
    return tokenizer.decode(ids.tolist(), skip_special_tokens=False)
