"""Language-model datasets and collators for training sequences and influence queries.

Encoding conventions, shared by training sequences and queries so that the measurement
on a query is computed the same way as the loss on a training sequence:

- every sequence starts with BOS (``tokenizer.bos_token_id``, the GPT-2
  ``<|endoftext|>``), so that the first real token is predicted from a fixed context;
- a training sequence ends with EOS (the same token): a document ends there;
- a query is ``BOS + prompt + " " + completion`` with NO trailing EOS: the completion is
  measured as a continuation inside a document (training sentences continue with "."
  after the fact, not with EOS), and only completion tokens carry labels.

Prompt and completion are tokenized separately and concatenated. With the byte-level
tokenizer of :mod:`.tokenizer` this gives the same ids as tokenizing the joined text,
because the completion starts a new word (" clockmaker").

Batches are right-padded with ``tokenizer.pad_token_id``; ``labels`` are ``-100`` on
padding (and, for queries, on BOS and prompt tokens). Labels are NOT shifted: as in
Hugging Face causal LMs, the model shifts them internally.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.utils.data import Dataset
from lightning_influence.errors import QueryFileError

__all__ = [
    "IGNORE_INDEX", "LMDataset",
    "QueryDataset",
    "LMCollator",
    "QueryCollator",
    "collate_lm",
    "collate_queries",
    "encode_query",
    "encode_text",
    "texts",
    "decode",
    "token_strings",
    "read_jsonl_queries",
    "write_jsonl_queries",
]

IGNORE_INDEX = -100
# Completions starting with these attach to the prompt without a space ("Hi" + "!").
_NO_SPACE_BEFORE = tuple(".,;:!?)]}'\"")


def texts(data: Any) -> list[str]:
    """Texts of a corpus: accepts a ``Corpus``, a list of records or a list of strings."""
    return [d if isinstance(d, str) else d["text"] for d in data]


def encode_text(tokenizer, text: str, *, max_length: int | None = None,
                add_eos: bool = True) -> list[int]:
    """``[BOS] + tokens(text) (+ [EOS])``, truncated on the right to ``max_length``."""
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    if add_eos:
        ids.append(tokenizer.eos_token_id)
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
    return ids


def _join_completion(prompt: str, completion: str) -> tuple[str, str]:
    """Normalise whitespace at the boundary: the completion carries its separator."""
    prompt, completion = prompt.rstrip(), completion.strip()
    if prompt and completion and not completion.startswith(_NO_SPACE_BEFORE):
        completion = " " + completion
    return prompt, completion


def encode_query(tokenizer, prompt: str, completion: str, *,
                 max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Encode one prompt/completion pair.

    Returns ``(input_ids, labels)`` of equal length: ``BOS + prompt + completion``, with
    labels ``-100`` on BOS and the prompt. If too long, prompt tokens are dropped from
    the left (BOS is kept); a completion that alone does not fit is an error.
    """
    prompt, completion = _join_completion(prompt, completion)
    p = tokenizer.encode(prompt, add_special_tokens=False)
    c = tokenizer.encode(completion, add_special_tokens=False)
    if not c:
        raise ValueError("query completion is empty")
    if max_length is not None:
        room = max_length - 1 - len(c)
        if room < 0:
            raise ValueError(
                f"query completion has {len(c)} tokens, more than max_length={max_length} allows"
            )
        p = p[len(p) - room:] if len(p) > room else p
    ids = [tokenizer.bos_token_id] + p + c
    labels = [IGNORE_INDEX] * (1 + len(p)) + c
    return ids, labels


class LMDataset(Dataset):
    """Tokenized training sequences for causal-LM training and influence scoring.

    Args:
        data: a ``Corpus``, a list of records (``{"text": ...}``) or a list of strings.
            Item ``i`` is sequence ``i`` in that order (for the generated corpus, the
            record with ``index == i``).
        tokenizer: a tokenizer with ``bos/eos/pad`` ids (see :mod:`.tokenizer`).
        max_length: truncate longer sequences on the right (``None``: keep all).

    Items are ``{"input_ids": LongTensor[T]}``; batch them with :class:`LMCollator`.
    """

    def __init__(self, data: Any, tokenizer, max_length: int | None = 64):
        self.texts = texts(data)
        self.tokenizer = tokenizer
        self.max_length = max_length
        # Tokenize once up front: the corpus is small and every pass reuses it.
        self.input_ids = [encode_text(tokenizer, t, max_length=max_length) for t in self.texts]

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor(self.input_ids[i], dtype=torch.long)}


class QueryDataset(Dataset):
    """Tokenized influence queries (prompt/completion pairs).

    Args:
        queries: dicts with ``"prompt"`` and ``"completion"`` (e.g. from
            :func:`~lightning_influence.data.corpus.make_queries` or
            :func:`read_jsonl_queries`); other keys are kept in ``self.queries``.
        tokenizer: as for :class:`LMDataset`.
        max_length: see :func:`encode_query`.

    Items are ``{"input_ids": LongTensor[T], "labels": LongTensor[T]}`` with labels
    ``-100`` except on completion tokens; batch them with :class:`QueryCollator`.
    """

    def __init__(self, queries: Sequence[Mapping[str, Any]], tokenizer,
                 max_length: int | None = 64):
        self.queries = [dict(q) for q in queries]
        self.tokenizer = tokenizer
        self.encoded = []
        for n, q in enumerate(self.queries):
            try:
                self.encoded.append(
                    encode_query(tokenizer, q["prompt"], q["completion"], max_length=max_length)
                )
            except ValueError as e:
                raise ValueError(f"query {q.get('query_id', n)!r}: {e}") from None

    @property
    def query_ids(self) -> list[str]:
        return [str(q.get("query_id", f"q{n}")) for n, q in enumerate(self.queries)]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.encoded[i]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


def _pad(seqs: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.long)


def collate_lm(batch: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad training items. Returns ``input_ids``, ``attention_mask`` and ``labels``,
    each ``LongTensor[B, T]``; labels equal ``input_ids`` except ``-100`` on padding."""
    ids = [_as_tensor(b["input_ids"]) for b in batch]
    input_ids = _pad(ids, pad_token_id)
    attention_mask = _pad([torch.ones_like(s) for s in ids], 0)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_queries(batch: Sequence[Mapping[str, Any]],
                    pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad query items; labels keep the item's prompt mask and are ``-100`` on
    padding. Same keys and shapes as :func:`collate_lm`."""
    ids = [_as_tensor(b["input_ids"]) for b in batch]
    return {
        "input_ids": _pad(ids, pad_token_id),
        "attention_mask": _pad([torch.ones_like(s) for s in ids], 0),
        "labels": _pad([_as_tensor(b["labels"]) for b in batch], IGNORE_INDEX),
    }


class LMCollator:
    """Picklable ``collate_fn`` for :class:`LMDataset` (safe with DataLoader workers)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, batch):
        return collate_lm(batch, self.pad_token_id)


class QueryCollator(LMCollator):
    """Picklable ``collate_fn`` for :class:`QueryDataset`."""

    def __call__(self, batch):
        return collate_queries(batch, self.pad_token_id)


def _id_list(input_ids, attention_mask=None) -> list[int]:
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if ids and isinstance(ids[0], list):
        raise ValueError("expected the ids of ONE sequence (1-D), got a batch")
    if attention_mask is not None:
        mask = attention_mask.tolist() if isinstance(attention_mask, torch.Tensor) else attention_mask
        ids = [i for i, m in zip(ids, mask) if m]
    return ids


def decode(tokenizer, input_ids, attention_mask=None, *, skip_special_tokens: bool = True) -> str:
    """Text of one sequence (1-D ids), dropping padding and, by default, BOS/EOS."""
    return tokenizer.decode(_id_list(input_ids, attention_mask),
                            skip_special_tokens=skip_special_tokens)


def token_strings(tokenizer, input_ids, attention_mask=None) -> list[str]:
    """One readable string per token of one sequence, e.g.
    ``["<|endoftext|>", "Oswin", " Pelleck", " works", ...]``.

    Each id is decoded on its own, so leading spaces are real spaces (not ``Ġ``) and
    ``"".join(...)`` reproduces the text. A character split over several byte-level
    tokens shows as ``"\\ufffd"`` pieces. Positions where ``attention_mask`` is 0 are
    dropped.
    """
    return [tokenizer.decode([i], skip_special_tokens=False)
            for i in _id_list(input_ids, attention_mask)]



def read_jsonl_queries(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Load queries from a JSONL file, one JSON object per line.

    Required keys: ``"prompt"`` and ``"completion"`` (non-empty strings). Optional:
    ``"query_id"`` (defaults to ``"q<N>"`` with N the 0-based query number; must be
    unique); any other keys are kept. Blank lines are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        QueryFileError: with ``path:line N: ...`` for invalid JSON, a non-object line, a
            missing key, a wrong type, a duplicate query id, or a file with no queries.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"query file not found: {path}")
    queries: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise QueryFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise QueryFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in ("prompt", "completion"):
                if key not in obj:
                    raise QueryFileError(f"{where}: missing required key {key!r}")
                if not isinstance(obj[key], str):
                    raise QueryFileError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
            if not obj["completion"].strip():
                raise QueryFileError(f"{where}: 'completion' is empty")
            qid = str(obj.get("query_id", f"q{len(queries)}"))
            if qid in seen:
                raise QueryFileError(f"{where}: duplicate query_id {qid!r} (first on line {seen[qid]})")
            seen[qid] = lineno
            queries.append({**obj, "query_id": qid})
    if not queries:
        raise QueryFileError(f"{path}: no queries in file")
    return queries


def write_jsonl_queries(queries: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write queries as JSONL (one object per line, UTF-8); creates parent folders.
    Returns the path. Reading it back with :func:`read_jsonl_queries` gives the same dicts
    (plus a ``query_id`` where one was missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps(dict(q), ensure_ascii=False) + "\n")
    return path
