"""TF-IDF candidate filtering: score each query only against its most similar training texts.

``docs/method.md``, section 5: the paper scores only the top-k training
sequences most similar to the query under TF-IDF. :class:`TfidfCandidates` is fitted once
on the training texts (scikit-learn's ``TfidfVectorizer``) and cached next to the factors
(``<factors_dir>/tfidf/``) as one bundle of the persistence layer, without pickle: the
parameters go to the JSON manifest, the vocabulary, idf weights and the training documents'
TF-IDF matrix (CSR) to safetensors; the identity is the texts' fingerprint and the parameters.
Loading rebuilds the vectorizer and checks that it transforms the stored probe texts exactly
as before.

:func:`filtered_scores` then scores only the union of the candidates, each training example
once, against the queries that selected it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

from lightning_influence.store import BundleFormat, new_tensor_name, read_bundle, texts_fingerprint, write_bundle
from lightning_influence.text import query_text  # the text a query is matched with (one rule)
from lightning_influence.scoring.engine import InfluenceScorer
from lightning_influence.scoring.queries import QueryGradients
from lightning_influence.errors import ScoringError
from lightning_influence.errors import TfidfError

__all__ = [
    "TfidfCandidates", "filtered_scores",
    "query_text",
    "tfidf_cache_dir",
    "DEFAULT_TFIDF_PARAMS",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "lightning-influence-tfidf"
FORMAT_VERSION = 2  # 2: the store's bundle layout; the vocabulary moved into the tensor file
MANIFEST = "manifest.json"
TFIDF_FORMAT = BundleFormat(
    FORMAT_NAME, FORMAT_VERSION, TfidfError, "TF-IDF index", prefix="tfidf",
    make="Build it with TfidfCandidates.fit(texts).save(dir) or TfidfCandidates.load_or_fit.",
    redo="delete the directory to rebuild the index",
)
NUM_PROBES = 16

# Parameters of TfidfVectorizer that can be written to JSON and restored; callables cannot.
_JSON_PARAMS = (
    "lowercase", "strip_accents", "stop_words", "token_pattern", "ngram_range", "analyzer", "max_df", "min_df",
    "max_features", "binary", "norm", "use_idf", "smooth_idf", "sublinear_tf",
)
DEFAULT_TFIDF_PARAMS: dict[str, Any] = {"stop_words": "english", "sublinear_tf": True}



def tfidf_cache_dir(factors_dir: str | os.PathLike) -> Path:
    """Where the TF-IDF index of a training set lives, next to its factors."""
    return Path(factors_dir) / "tfidf"




class TfidfCandidates:
    """A TF-IDF index over the training texts that proposes candidates for each query.

    Build with :meth:`fit` (or :meth:`load_or_fit` to cache next to the factors); the row
    ``i`` of the index is training example ``i`` of the dataset the texts came from.
    """

    def __init__(self, vectorizer: TfidfVectorizer, matrix: sp.csr_matrix, texts_sha256: str,
                 probe_texts: list[str] | None = None):
        self.vectorizer = vectorizer
        self.matrix = sp.csr_matrix(matrix)
        self.texts_sha256 = texts_sha256
        self.probe_texts = list(probe_texts or [])

    # ------------------------------------------------------------ building
    @classmethod
    def fit(cls, texts: Sequence[str], **vectorizer_params: Any) -> "TfidfCandidates":
        """Fit the vectorizer on the training ``texts`` (``DEFAULT_TFIDF_PARAMS`` unless overridden)."""
        texts = _check_texts(texts)
        params = {**DEFAULT_TFIDF_PARAMS, **vectorizer_params}
        unknown = [k for k in params if k not in _JSON_PARAMS and k != "dtype"]
        if unknown:
            raise TfidfError(
                f"TF-IDF parameters {unknown} cannot be saved without pickle; use only {', '.join(_JSON_PARAMS)}"
            )
        vec = TfidfVectorizer(**params)
        try:
            matrix = vec.fit_transform(texts)
        except ValueError as err:  # e.g. "empty vocabulary; perhaps the documents only contain stop words"
            raise TfidfError(f"cannot fit TF-IDF on the training texts: {err}") from None
        return cls(vec, matrix.tocsr(), texts_fingerprint(texts), texts[:NUM_PROBES])

    @property
    def num_documents(self) -> int:
        return self.matrix.shape[0]

    def similarities(self, query_texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarities ``[Q, N]`` (float64) of each query to every training text."""
        q = self.vectorizer.transform(_check_texts(query_texts, what="query_texts"))
        return torch.from_numpy(np.asarray((q @ self.matrix.T).todense(), dtype=np.float64))

    def top_k(self, query_texts: Sequence[str], k: int, chunk_size: int | None = None) -> torch.Tensor:
        """``LongTensor[Q, min(k, N)]``: training indices, most similar first (ties: lower index first).

        Queries sharing no term with the training texts get the first ``k`` indices.
        """
        if not isinstance(k, int) or k < 1:
            raise TfidfError(f"k must be a positive integer, got {k!r}")
        query_texts = _check_texts(query_texts, what="query_texts")
        k = min(k, self.num_documents)
        if chunk_size is None:  # keep the dense [chunk, N] similarity block near 256 MB
            chunk_size = max(1, (1 << 25) // max(1, self.num_documents))
        out = []
        for i in range(0, len(query_texts), chunk_size):
            sims = self.similarities(query_texts[i:i + chunk_size])
            # Stable descending sort: equal similarities keep ascending index order.
            out.append(torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k])
        return torch.cat(out).to(torch.long)

    # ---------------------------------------------------------- persistence
    def params(self) -> dict[str, Any]:
        """The vectorizer's parameters as JSON (what the manifest stores)."""
        return _json_params(self.vectorizer)

    def identity(self) -> dict[str, Any]:
        """What the index was fitted from: the training texts' fingerprint and the vectorizer's parameters."""
        return {"texts": self.texts_sha256, "params": self.params()}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to ``directory`` as one bundle (tensor file first, manifest last)."""
        directory = Path(directory)
        vocab = sorted(self.vectorizer.vocabulary_.items(), key=lambda kv: kv[1])
        terms = [t for t, _ in vocab]
        if [i for _, i in vocab] != list(range(len(terms))):
            raise TfidfError("the vectorizer's vocabulary indices are not 0..V-1; refit it")
        # The vocabulary as UTF-8 bytes and offsets: tensors, so that one checksummed file holds it.
        encoded = [t.encode("utf-8") for t in terms]
        offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        m = self.matrix
        tensors = {
            "idf": torch.from_numpy(np.asarray(self.vectorizer.idf_, dtype=np.float64).copy()),
            "data": torch.from_numpy(np.asarray(m.data, dtype=np.float64).copy()),
            "indices": torch.from_numpy(np.asarray(m.indices, dtype=np.int64).copy()),
            "indptr": torch.from_numpy(np.asarray(m.indptr, dtype=np.int64).copy()),
            "terms_utf8": torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8),
            "terms_offsets": torch.from_numpy(offsets),
        }
        tensor_file = new_tensor_name(TFIDF_FORMAT)
        write_bundle(TFIDF_FORMAT, directory, {
            "tensor_file": tensor_file,
            "params": self.params(),
            "num_documents": int(m.shape[0]),
            "num_terms": len(terms),
            "texts_sha256": self.texts_sha256,
            "probe_texts": self.probe_texts,
        }, identity=self.identity(), tensors={tensor_file: tensors})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, texts: Sequence[str] | None = None) -> "TfidfCandidates":
        """Rebuild a saved index. With ``texts``, also check it was fitted on exactly those texts."""
        directory = Path(directory)
        bundle = read_bundle(TFIDF_FORMAT, directory)
        manifest = bundle.manifest
        if texts is not None:
            texts = _check_texts(texts)
            fingerprint = texts_fingerprint(texts)
            if fingerprint != bundle.identity.get("texts"):
                raise TfidfError(
                    f"the TF-IDF index at '{directory}' was fitted on other training texts "
                    f"({manifest['num_documents']} documents) than the {len(texts)} given; delete it "
                    "(or call load_or_fit) to rebuild it for this dataset",
                    differences={"texts": (bundle.identity.get("texts"), fingerprint)},
                )
        t = bundle.tensors(manifest["tensor_file"])
        raw, offsets = bytes(t["terms_utf8"].numpy()), t["terms_offsets"].tolist()
        terms = [raw[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
        params = dict(manifest["params"])
        params["ngram_range"] = tuple(params["ngram_range"])
        params["dtype"] = np.dtype(params["dtype"]).type
        vec = TfidfVectorizer(**params)
        vec.vocabulary_ = {term: i for i, term in enumerate(terms)}
        if vec.use_idf:
            vec.idf_ = t["idf"].numpy()
        n = int(manifest["num_documents"])
        matrix = sp.csr_matrix((t["data"].numpy(), t["indices"].numpy(), t["indptr"].numpy()),
                               shape=(n, len(terms)))
        out = cls(vec, matrix, manifest["texts_sha256"], manifest.get("probe_texts"))
        out._verify_probes()
        return out

    def _verify_probes(self) -> None:
        """The rebuilt vectorizer must reproduce the stored rows of the probe texts."""
        if not self.probe_texts:
            return
        again = self.vectorizer.transform(self.probe_texts)
        stored = self.matrix[: len(self.probe_texts)]
        diff = abs(again - stored)
        if diff.nnz and diff.max() > 1e-12:
            raise TfidfError(
                f"the rebuilt TF-IDF vectorizer does not reproduce the stored index (max diff {diff.max():.3g}), "
                "probably another scikit-learn version; delete the tfidf directory to rebuild it"
            )

    @classmethod
    def load_or_fit(cls, directory: str | os.PathLike, texts: Sequence[str], **vectorizer_params: Any
                    ) -> "TfidfCandidates":
        """Load the index cached in ``directory`` if it was fitted on ``texts`` with these parameters,
        else fit it and save it there (e.g. ``tfidf_cache_dir(factors_dir)``)."""
        directory = Path(directory)
        texts = _check_texts(texts)
        wanted = {"texts": texts_fingerprint(texts),
                  "params": _json_params(TfidfVectorizer(**{**DEFAULT_TFIDF_PARAMS, **vectorizer_params}))}
        if (directory / MANIFEST).is_file():
            try:
                diffs = read_bundle(TFIDF_FORMAT, directory).differences(wanted)
                if not diffs:
                    return cls.load(directory)
                log.info("refitting the TF-IDF index in %s: it was fitted from other texts or parameters (%s)",
                         directory, ", ".join(diffs))
            except TfidfError as err:
                log.warning("refitting the TF-IDF index in %s: %s", directory, err)
        fitted = cls.fit(texts, **vectorizer_params)
        fitted.save(directory)
        return fitted


# --------------------------------------------------------------- scoring
def filtered_scores(
    scorer: InfluenceScorer,
    queries: QueryGradients,
    candidates: torch.Tensor,
    train_dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], Any],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of each query against its own candidate training examples only.

    Args:
        scorer: the :class:`InfluenceScorer` (model, task, factors).
        queries: preconditioned query gradients ``Q`` (full or low rank).
        candidates: ``LongTensor[Q, k]`` of training indices per query (e.g. from
            :meth:`TfidfCandidates.top_k`).
        train_dataset: indexable training set (``train_dataset[i]`` is example ``i``).
        collate_fn: turns a list of examples into a batch for the scorer's task.
        batch_size: training examples per forward/backward pass.
        progress: called with the number of training examples scored after each batch.

    The union of all candidates is scored in ascending index order, each training example
    once, against the queries that selected some example of its batch. Returns
    ``(scores [Q, k], indices [Q, k])`` with ``indices == candidates`` (original training
    indices) and ``scores[q, j]`` the score of training example ``indices[q, j]`` for query ``q``,
    equal to the full matrix's ``scores[q, indices[q, j]]``.
    """
    candidates = torch.as_tensor(candidates)
    if candidates.dim() != 2 or candidates.shape[0] != queries.num_queries:
        raise ScoringError(
            f"candidates must be LongTensor[Q, k] with Q={queries.num_queries} (the number of queries); "
            f"got shape {tuple(candidates.shape)}"
        )
    if candidates.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ScoringError(f"candidates must hold integer training indices, got {candidates.dtype}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ScoringError(f"batch_size must be a positive integer, got {batch_size!r}")
    candidates = candidates.to("cpu", torch.long)
    q, k = candidates.shape
    n = len(train_dataset)
    if candidates.numel() and (candidates.min() < 0 or candidates.max() >= n):
        raise ScoringError(
            f"candidate indices must lie in [0, {n}) (the training set's size); got "
            f"{int(candidates.min())}..{int(candidates.max())}. Build the TF-IDF index on this training set"
        )
    flat = candidates.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # positions in flat, grouped by training index
    sorted_idx = flat[order]
    union = torch.unique_consecutive(sorted_idx)
    scores_flat = torch.full((q * k,), float("nan"), dtype=torch.float64)
    out_dtype = None
    for b, start in enumerate(range(0, len(union), batch_size)):
        chunk = union[start:start + batch_size]
        lo = int(torch.searchsorted(sorted_idx, chunk[0], right=False))
        hi = int(torch.searchsorted(sorted_idx, chunk[-1], right=True))
        pos = order[lo:hi]  # flat positions (q * k + j) whose candidate lies in this chunk
        rows = pos // k
        wanted = torch.unique(rows)  # the queries that selected an example of this batch
        batch = collate_fn([train_dataset[int(i)] for i in chunk])
        s = scorer.score_batch(queries.select(wanted), batch, batch_index=b).sum(0).cpu()  # [len(wanted), B]
        out_dtype = s.dtype
        row_in = torch.searchsorted(wanted, rows)
        col_in = torch.searchsorted(chunk, flat[pos])
        scores_flat[pos] = s[row_in, col_in].to(torch.float64)
        if progress is not None:
            progress(len(chunk))
    scores = scores_flat.reshape(q, k)
    if out_dtype is not None:
        scores = scores.to(out_dtype)
    return scores, candidates.clone()


# ------------------------------------------------------------------ helpers
def _json_params(vectorizer: TfidfVectorizer) -> dict[str, Any]:
    p = vectorizer.get_params()
    out = {k: p[k] for k in _JSON_PARAMS}
    out["ngram_range"] = list(out["ngram_range"])
    if isinstance(out["stop_words"], (list, tuple, set, frozenset)):
        out["stop_words"] = sorted(out["stop_words"])
    out["dtype"] = np.dtype(p["dtype"]).name
    return out


def _check_texts(texts: Sequence[str], what: str = "texts") -> list[str]:
    if isinstance(texts, str):
        raise TfidfError(f"{what} must be a list of strings, not one string")
    out = list(texts)
    bad = [i for i, t in enumerate(out) if not isinstance(t, str)]
    if bad:
        raise TfidfError(f"{what} must all be strings; items {bad[:5]} are not")
    if not out:
        raise TfidfError(f"{what} is empty")
    return out
