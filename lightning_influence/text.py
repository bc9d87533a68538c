"""Language-model datasets and collators for training sequences and influence queries.

Encoding conventions, shared by training sequences and queries so that the measurement
on a query is computed the same way as the loss on a training sequence:

- special tokens are the tokenizer's own: a training text is encoded as the tokenizer
  encodes it for training (``tokenizer.encode(text)``, with its post-processor: a Llama
  tokenizer adds BOS, GPT-2's adds nothing), and a query gets the same tokens before its
  prompt (see :func:`special_tokens_around`). The demo's tokenizer adds BOS and EOS; that is
  the demo's convention, set in :mod:`lightning_influence.demo.tokenizer`;
- a query is ``prefix + prompt + completion`` with NO trailing special token: the
  completion is measured as a continuation inside a document, and only completion tokens
  carry labels. Its text follows one rule, :func:`join_query`, wherever a query is shown,
  matched (TF-IDF) or tokenized;
- queries are never cut: one longer than ``max_length`` (default: the tokenizer's
  ``model_max_length`` when it is set) is an error naming the option.

Prompt and completion are tokenized separately and concatenated. With a byte-level
tokenizer this gives the same ids as tokenizing the joined text, because the completion
starts a new word (" clockmaker").

Batches are right-padded with ``tokenizer.pad_token_id``; ``labels`` are ``-100`` on
padding (and, for queries, on the prefix and prompt tokens). Labels are NOT shifted: as in
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
    "join_query",
    "query_text",
    "query_max_length",
    "special_tokens_around",
    "texts",
    "decode",
    "token_strings",
    "read_jsonl_queries",
    "write_jsonl_queries",
]

IGNORE_INDEX = -100
# Completions starting with these attach to the prompt without a space ("Hi" + "!").
_NO_SPACE_BEFORE = tuple(".,;:!?)]}'\"")
# transformers sets model_max_length to int(1e30) when a tokenizer does not know its model's context.
_UNSET_MODEL_MAX_LENGTH = 10 ** 18


def texts(data: Any) -> list[str]:
    """Texts of a corpus: accepts a ``Corpus``, a list of records or a list of strings."""
    return [d if isinstance(d, str) else d["text"] for d in data]


def join_query(prompt: str, completion: str) -> tuple[str, int]:
    """A query's text and where its completion starts: ``(text, prompt_length)``.

    The one rule for a query's text (reports, TF-IDF matching, tokenization): whitespace at
    the boundary is normalised, and the completion carries its separator, a space unless it
    starts with punctuation (``"Hi" + "!"``). ``text[:prompt_length]`` is the prompt and
    ``text[prompt_length:]`` the completion with its separator.
    """
    prompt, completion = prompt.rstrip(), completion.strip()
    if prompt and completion and not completion.startswith(_NO_SPACE_BEFORE):
        completion = " " + completion
    return prompt + completion, len(prompt)


def query_text(query: Mapping[str, Any] | str) -> str:
    """The display text of a query record: a string as it is, else its non-empty ``"text"``,
    else its ``"prompt"`` and ``"completion"`` joined by :func:`join_query`."""
    if isinstance(query, str):
        return query
    if query.get("text"):
        return str(query["text"])
    return join_query(str(query.get("prompt", "")), str(query.get("completion", "")))[0]


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text when it encodes one for training
    (``add_special_tokens=True``): ``([BOS], [])`` for a Llama tokenizer, ``([], [])`` for GPT-2's."""
    probe = "a"
    bare = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    raise QueryFileError(
        f"cannot tell which special tokens {type(tokenizer).__name__} adds: its encoding of {probe!r} with "
        f"special tokens ({full}) does not contain the one without ({bare})"
    )


def query_max_length(tokenizer, max_length: int | None = None) -> tuple[int | None, str]:
    """The longest query allowed, and where that limit comes from (for error messages).

    An explicit ``max_length`` wins; else the tokenizer's ``model_max_length`` when it is a
    real value (transformers' placeholder for "unknown" is not); else no limit.
    """
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise QueryFileError(f"max_length must be a positive integer or None, got {max_length!r}")
        return max_length, f"max_length={max_length}"
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < _UNSET_MODEL_MAX_LENGTH:
        return limit, f"the tokenizer's model_max_length ({limit})"
    return None, "no limit"


def encode_text(tokenizer, text: str, *, max_length: int | None = None) -> list[int]:
    """``text`` as the tokenizer encodes it for training (its special tokens included),
    cut on the right to ``max_length``."""
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    if max_length is not None and len(ids) > max_length:
        ids = ids[:max_length]
    return ids


def encode_query(tokenizer, prompt: str, completion: str, *,
                 max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Encode one prompt/completion pair.

    Returns ``(input_ids, labels)`` of equal length: the tokenizer's leading special tokens
    (:func:`special_tokens_around`), the prompt, then the completion, with labels ``-100``
    on everything before the completion. Nothing is cut: a query longer than the limit of
    :func:`query_max_length` raises :class:`~lightning_influence.errors.QueryFileError`.
    """
    text, cut = join_query(prompt, completion)
    prefix, _ = special_tokens_around(tokenizer)
    p = tokenizer.encode(text[:cut], add_special_tokens=False) if cut else []
    c = tokenizer.encode(text[cut:], add_special_tokens=False)
    if not c:
        raise QueryFileError("query completion is empty")
    if not prefix and not p:
        raise QueryFileError(
            "the query has an empty prompt and the tokenizer adds no leading special token (BOS), so the "
            "completion's first token has nothing to be predicted from; give the query a prompt"
        )
    ids = list(prefix) + p + c
    limit, source = query_max_length(tokenizer, max_length)
    if limit is not None and len(ids) > limit:
        raise QueryFileError(
            f"the query has {len(ids)} tokens ({len(prefix)} special, {len(p)} prompt, {len(c)} completion), "
            f"more than {source} allows; queries are never cut: shorten it, or pass a larger max_length= "
            "(QueryDataset) up to the model's context length"
        )
    labels = [IGNORE_INDEX] * (len(prefix) + len(p)) + c
    return ids, labels


class LMDataset(Dataset):
    """Tokenized training sequences for causal-LM training and influence scoring.

    Args:
        data: a ``Corpus``, a list of records (``{"text": ...}``) or a list of strings.
            Item ``i`` is sequence ``i`` in that order (for the generated corpus, the
            record with ``index == i``).
        tokenizer: a Hugging Face tokenizer; texts are encoded with its special tokens
            (:func:`encode_text`).
        max_length: cut longer sequences on the right, as the training run must (``None``:
            the tokenizer's ``model_max_length`` when it is set, else keep all).

    Items are ``{"input_ids": LongTensor[T]}``; batch them with :class:`LMCollator`.
    """

    def __init__(self, data: Any, tokenizer, max_length: int | None = None):
        self.texts = texts(data)
        self.tokenizer = tokenizer
        if max_length is None:
            max_length = query_max_length(tokenizer)[0]
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
            :func:`~lightning_influence.demo.corpus.make_queries` or
            :func:`read_jsonl_queries`); other keys are kept in ``self.queries``.
        tokenizer: as for :class:`LMDataset`.
        max_length: the longest query in tokens (``None``: the tokenizer's
            ``model_max_length`` when it is set, else no limit). A longer query is an
            error, never cut (see :func:`encode_query`).

    Items are ``{"input_ids": LongTensor[T], "labels": LongTensor[T]}`` with labels
    ``-100`` except on completion tokens; batch them with :class:`QueryCollator`.
    """

    def __init__(self, queries: Sequence[Mapping[str, Any]], tokenizer,
                 max_length: int | None = None):
        self.queries = [dict(q) for q in queries]
        self.tokenizer = tokenizer
        self.encoded = []
        for n, q in enumerate(self.queries):
            try:
                self.encoded.append(
                    encode_query(tokenizer, q["prompt"], q["completion"], max_length=max_length)
                )
            except QueryFileError as e:
                raise QueryFileError(f"query {q.get('query_id', n)!r}: {e}") from None

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
