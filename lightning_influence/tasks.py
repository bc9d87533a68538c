"""Tasks: how a batch turns into a training loss and a query measurement.

A :class:`Task` tells the library three things about a batch:

* ``train_loss(model, batch, sample)``: the training loss summed over the batch's
  examples (not averaged: per-example gradients must be the gradients of each
  example's own loss). With ``sample=True`` the targets are drawn from the model's
  own predictive distribution (true Fisher, the paper's default); with
  ``sample=False`` the dataset's targets are used (empirical Fisher).
* ``measurement(model, batch)``: the query measurement f summed over the batch's
  queries; by default the log-likelihood of the query targets.
* ``token_mask(batch)``: ``[B, T]`` of which token positions exist (padding is
  excluded from every statistic), or ``None`` when every position counts.

Scores follow the sign of ``docs/method.md``, section 1: ``score = grad f^T (G + lambda I)^-1 grad(-L)``,
positive when training on the example made the query's measurement larger.

Batches. The built-in tasks read dicts in the transformers convention with no arguments: every
key but the labels goes to the model as a keyword argument (the attention mask included), outputs
with ``.logits`` are read, and ``attention_mask`` is the token mask of every statistic and score.
Every task names its keys the same way: ``label_key=``, ``input_keys=``, ``mask_key=``.
Classification and regression also read ``(x, y)`` tuples and ``{"x", "y"}`` dicts.
Under the sampled Fisher, non-finite outputs are refused before any label is drawn.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from lightning_influence.errors import TaskInputError

__all__ = ["Task", "ClassificationTask", "RegressionTask", "CausalLMTask", "batch_size_of", "checked_loss",
           "batch_train_loss"]



class Task:
    """Base class (and protocol) for tasks. Subclass and override the three methods."""

    def train_loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The query measurement f summed over the batch (default for built-ins: log-likelihood)."""
        raise NotImplementedError

    def token_mask(self, batch: Any) -> torch.Tensor | None:
        return None

    def batch_size(self, batch: Any) -> int:
        return batch_size_of(batch)

    def query_target_count(self, batch: Any) -> torch.Tensor | None:
        """Per-query number of target positions, to reject queries with nothing to measure."""
        return None


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return v.shape[0]
    if isinstance(batch, (list, tuple)):
        for v in batch:
            if isinstance(v, torch.Tensor):
                return v.shape[0]
    raise TaskInputError(f"cannot tell the batch size of a {type(batch).__name__}; batches must hold tensors")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Losses in at least float32 (bf16/fp16 logits lose too much in log-softmax); float64 stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return _upcast(output)
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None:
        raise TaskInputError(
            f"the model returned a {type(output).__name__}; expected a tensor or an object with `.logits`"
        )
    return _upcast(logits)


_LEGACY_LABEL_KEYS = ("labels", "label", "y")  # transformers' names first, then the {"x", "y"} convention


def _check_finite(logits: torch.Tensor, what: str) -> None:
    """Raise before sampling from non-finite outputs (torch.distributions would fail with its own message)."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return
    _raise_not_finite(~finite, what)


def _raise_not_finite(bad_rows: torch.Tensor, what: str) -> None:
    bad = bad_rows.reshape(bad_rows.shape[0], -1).any(1).nonzero().flatten().tolist() if bad_rows.dim() else [0]
    raise TaskInputError(
        f"the model's {what} are not finite (NaN or inf) for the examples at positions {bad[:10]} of this batch, "
        "so the sampled Fisher cannot draw labels from them. Check this batch's inputs and the model's weights "
        "(a diverged training run leaves NaN weights; float16 overflows: use precision='bf16-mixed' or '32-true')"
    )


# Rows of logits sampled at a time: the softmax and its running sum are two [rows, vocabulary] float32 temporaries,
# made while the whole forward's activations are held (on GPT-2's 50257-token head: 16 MiB each, not 200).
SAMPLE_CHUNK_ELEMENTS = 1 << 22


def sample_labels(logits: torch.Tensor, what: str = "logits", rows: torch.Tensor | None = None) -> torch.Tensor:
    """One label per row of ``logits`` ``[N, C]``, drawn from ``softmax(logits)`` (the sampled Fisher's labels).

    Inverse-CDF sampling: one uniform draw per row against the row's cumulative probabilities, a
    ``searchsorted`` instead of ``torch.distributions.Categorical`` (which normalises the logits
    twice and runs ``multinomial``: about 10x slower on a 32k-token vocabulary, where it cost more
    than the model's forward). A label of zero probability is never drawn. A row with a NaN or
    +inf logit (or no finite one) raises :class:`TaskInputError`, checked on the row totals rather
    than on every logit. ``rows`` (a boolean mask over the leading axes of ``logits`` ``[..., C]``)
    draws for the selected rows only, in row-major order, without copying them out first. Rows are
    taken a chunk at a time; the uniform draws are made up front, so the labels do not depend on
    the chunking.
    """
    logits = logits.detach()
    if rows is None:
        index = None
        n = logits.shape[0]
    else:
        index = rows.nonzero(as_tuple=True)
        n = index[0].numel()
    step = max(1, SAMPLE_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    u = torch.rand(n, 1, device=logits.device, dtype=torch.float32)
    labels = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        part = logits[start:stop] if index is None else logits[tuple(i[start:stop] for i in index)]
        cdf = torch.softmax(part.float(), dim=-1).cumsum_(dim=-1)
        total = cdf[:, -1]
        bad = ~torch.isfinite(total) | (total <= 0)
        if bool(bad.any()):  # positions counted from the first row, not the chunk's
            _raise_not_finite(torch.cat([torch.zeros(start, dtype=torch.bool, device=bad.device), bad]), what)
        labels.append(torch.searchsorted(cdf, u[start:stop] * total.unsqueeze(1), right=True).squeeze(1)
                      .clamp_(max=cdf.shape[1] - 1))
        del cdf, part
    if not labels:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    return torch.cat(labels) if len(labels) > 1 else labels[0]


class _SupervisedTask(Task):
    """Shared input handling for ``(x, y)`` tuples, ``{"x", "y"}`` dicts and Hugging Face dict batches.

    Args:
        input_key: one input passed positionally: a tuple index, or a dict key (a dict that also holds
            ``mask_key`` is refused: the mask would be dropped; use ``input_keys``).
        target_key: the target's tuple index or dict key (same as ``label_key``; kept for compatibility).
        label_key: the dict key of the targets; default the first of ``labels``, ``label``, ``y`` present.
        input_keys: dict keys passed to the model as keyword arguments; default every key but the label's
            (the transformers convention), or ``x`` positionally for ``{"x", "y"}`` dicts.
        mask_key: the dict key of the ``[B, T]`` padding mask (``attention_mask``), used for every
            statistic and score; ``None`` for no mask.
    """

    def __init__(self, input_key: str | int | None = None, target_key: str | int | None = None, *,
                 label_key: str | int | None = None, input_keys: Sequence[str] | None = None,
                 mask_key: str | None = "attention_mask"):
        if target_key is not None and label_key is not None and target_key != label_key:
            raise TaskInputError(f"target_key={target_key!r} and label_key={label_key!r} name the same thing; give one")
        if input_key is not None and input_keys is not None:
            raise TaskInputError("give input_key= (one positional input) or input_keys= (keyword inputs), not both")
        if isinstance(input_keys, str):
            input_keys = [input_keys]
        self.input_key = input_key
        self.label_key = label_key if label_key is not None else target_key
        self.input_keys = list(input_keys) if input_keys is not None else None
        self.mask_key = mask_key

    def _label_key_of(self, batch: Mapping) -> Any:
        if isinstance(self.label_key, str):
            return self.label_key
        for key in _LEGACY_LABEL_KEYS:
            if key in batch:
                return key
        raise TaskInputError(
            f"{type(self).__name__} found no targets in a batch with keys {sorted(batch)}: expected one of "
            f"{list(_LEGACY_LABEL_KEYS)}; name the key with label_key="
        )

    def _split(self, batch: Any) -> tuple[tuple, dict, torch.Tensor]:
        """``(positional inputs, keyword inputs, targets)`` of a batch."""
        try:
            if isinstance(batch, Mapping):
                label = self._label_key_of(batch)
                if self.input_keys is not None:
                    if self.mask_key in batch and self.mask_key not in self.input_keys:
                        raise TaskInputError(
                            f"input_keys={self.input_keys} leaves the batch's '{self.mask_key}' out of the model's "
                            f"inputs while it masks the statistics; add it to input_keys (or set mask_key=None)"
                        )
                    return (), {k: batch[k] for k in self.input_keys}, batch[label]
                if self.input_key is not None or ("x" in batch and label == "y"):
                    key = self.input_key if isinstance(self.input_key, str) else "x"
                    if self.mask_key is not None and self.mask_key in batch and self.mask_key != key:
                        raise TaskInputError(
                            f"the batch holds '{self.mask_key}', which passing only '{key}' to the model would drop "
                            f"(padding would then change the scores). Drop input_key= to pass every key but the "
                            f"label as keyword arguments, or list them with input_keys=[...]"
                        )
                    return (batch[key],), {}, batch[label]
                return (), {k: v for k, v in batch.items() if k != label}, batch[label]
            if isinstance(batch, (list, tuple)):
                index_in = self.input_key if isinstance(self.input_key, int) else 0
                index_t = self.label_key if isinstance(self.label_key, int) else 1
                return (batch[index_in],), {}, batch[index_t]
        except (KeyError, IndexError) as err:
            raise TaskInputError(
                f"{type(self).__name__} could not read the batch ({err!r}); expected (inputs, targets), "
                "{'x', 'y'} or a dict in the transformers convention (set label_key=/input_keys=)"
            ) from None
        raise TaskInputError(
            f"{type(self).__name__} expects (inputs, targets) tuples or dicts, got {type(batch).__name__}"
        )

    def _call(self, model, batch):
        args, kwargs, y = self._split(batch)
        return _logits(model(*args, **kwargs)), y

    def token_mask(self, batch):
        if self.mask_key is None or not isinstance(batch, Mapping):
            return None
        return batch.get(self.mask_key)


class ClassificationTask(_SupervisedTask):
    """Cross-entropy classification. Batches are ``(x, y)``, ``{"x": ..., "y": ...}``, or dicts in the
    transformers convention (``{"input_ids", "attention_mask", "labels"}``: every key but the label goes
    to the model as a keyword argument, outputs with ``.logits`` are read, and the attention mask
    excludes padding from every statistic and score). See :class:`_SupervisedTask` for the key options.

    The measurement is ``log p(y | x)`` of the query's label.
    """

    def _forward(self, model, batch):
        logits, y = self._call(model, batch)
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TaskInputError(
                f"ClassificationTask needs integer class targets, got {getattr(y, 'dtype', type(y).__name__)}"
            )
        return logits, y.long()

    def train_loss(self, model, batch, sample=False):
        logits, y = self._forward(model, batch)
        if sample:
            with torch.no_grad():
                y = sample_labels(logits, "logits")
        return F.cross_entropy(logits, y, reduction="sum")

    def measurement(self, model, batch):
        logits, y = self._forward(model, batch)
        return -F.cross_entropy(logits, y, reduction="sum")


class RegressionTask(_SupervisedTask):
    """Gaussian regression with unit variance: ``L = 0.5 * ||y - f(x)||^2`` summed.

    Sampling draws ``y ~ N(f(x), I)``; the measurement is the Gaussian log-likelihood
    of the query target (up to its constant). Batches and key options as :class:`ClassificationTask`.
    """

    def _forward(self, model, batch):
        pred, y = self._call(model, batch)
        y = y.to(pred.dtype)
        if y.shape != pred.shape:
            if y.numel() == pred.numel():
                y = y.reshape(pred.shape)
            else:
                raise TaskInputError(f"RegressionTask: target shape {tuple(y.shape)} != prediction {tuple(pred.shape)}")
        return pred, y

    def train_loss(self, model, batch, sample=False):
        pred, y = self._forward(model, batch)
        if sample:
            _check_finite(pred, "predictions")
            with torch.no_grad():
                y = pred.detach() + torch.randn_like(pred)
        return 0.5 * ((pred - y) ** 2).sum()

    def measurement(self, model, batch):
        pred, y = self._forward(model, batch)
        return -0.5 * ((pred - y) ** 2).sum()


class CausalLMTask(Task):
    """Causal language modelling for transformers-style models.

    Batches are dicts with ``input_ids`` ``[B, T]``, ``attention_mask`` ``[B, T]`` and
    ``labels`` ``[B, T]`` (-100 on positions that do not count: prompt and padding).
    Every key but the labels goes to the model as a keyword argument (``input_keys`` to choose);
    ``label_key`` and ``mask_key`` rename the other two, as on every task.
    Labels are shifted inside, as in transformers (position t predicts token t+1).
    The measurement is ``log p(completion | prompt)``: the summed log-probability of
    the label tokens.
    """

    def __init__(self, ignore_index: int = -100, *, label_key: str = "labels", input_keys: Sequence[str] | None = None,
                 mask_key: str | None = "attention_mask"):
        self.ignore_index = ignore_index
        self.label_key = label_key
        self.input_keys = [input_keys] if isinstance(input_keys, str) else (
            list(input_keys) if input_keys is not None else None)
        self.mask_key = mask_key

    def _read(self, batch):
        if not isinstance(batch, Mapping):
            raise TaskInputError(
                f"CausalLMTask expects dict batches with 'input_ids', 'attention_mask', 'labels'; got {type(batch).__name__}"
            )
        wanted = [self.label_key] + (self.input_keys if self.input_keys is not None else [])
        missing = [k for k in wanted if k not in batch]
        if missing:
            raise TaskInputError(
                f"CausalLMTask batch lacks {missing}; it has {sorted(batch.keys())}. Provide 'input_ids', "
                "'attention_mask' and 'labels' (-100 where a token does not count), or name the keys with "
                "label_key=/input_keys=/mask_key="
            )
        if self.input_keys is not None:
            if self.mask_key in batch and self.mask_key not in self.input_keys:
                raise TaskInputError(
                    f"input_keys={self.input_keys} leaves the batch's '{self.mask_key}' out of the model's inputs "
                    "while it masks the statistics; add it to input_keys (or set mask_key=None)"
                )
            inputs = {k: batch[k] for k in self.input_keys}
        else:
            inputs = {k: v for k, v in batch.items() if k != self.label_key}
        labels = batch[self.label_key]
        ids = inputs.get("input_ids")
        if labels.dtype.is_floating_point or (isinstance(ids, torch.Tensor) and ids.dtype.is_floating_point):
            raise TaskInputError(f"CausalLMTask: 'input_ids' and '{self.label_key}' must be integer tensors")
        mask = batch.get(self.mask_key) if self.mask_key is not None else None
        return inputs, mask, labels

    def _token_logprobs(self, model, batch, sample: bool):
        inputs, _, labels = self._read(batch)
        logits = _logits(model(**inputs))[:, :-1]
        targets = labels[:, 1:]
        valid = targets != self.ignore_index
        if sample:
            # Draw only at the positions that count, in row-major order: the random stream then
            # does not depend on how much padding (or prompt) surrounds them, so the sampled
            # factors of a batch are the same whatever length it is padded to.
            with torch.no_grad():
                targets = targets.clone()
                if valid.any():
                    targets[valid] = sample_labels(logits, "logits (at the positions that count)", rows=valid)
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        # Fused log-softmax + gather: no [B, T, vocab] log-probability tensor is kept for backward.
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none")
        return -nll.view_as(safe) * valid

    def train_loss(self, model, batch, sample=False):
        return -self._token_logprobs(model, batch, sample).sum()

    def measurement(self, model, batch):
        return self._token_logprobs(model, batch, sample=False).sum()

    def token_mask(self, batch):
        _, mask, _ = self._read(batch)
        return mask

    def query_target_count(self, batch):
        _, _, labels = self._read(batch)
        return (labels[:, 1:] != self.ignore_index).sum(dim=1)


def checked_loss(loss: Any, batch_index: int, what: str = "training loss") -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise TaskInputError(
            f"the task's {what} for batch {batch_index} is {shape}, not a scalar tensor; "
            "return the loss SUMMED over the batch's examples"
        )
    if not torch.isfinite(loss):
        raise TaskInputError(
            f"the task's {what} for batch {batch_index} is {loss.item()}; influence needs finite losses. "
            "Check the batch's data and the model's numerical stability (precision, learning rate)."
        )
    return loss


def batch_train_loss(task: Task, model: nn.Module, batch: Any, batch_index: int, sample: bool = False) -> torch.Tensor:
    """The task's training loss for one batch, checked by :func:`checked_loss`; the task's own input errors
    (an unreadable batch, non-finite outputs under the sampled Fisher) are re-raised naming the batch."""
    try:
        loss = task.train_loss(model, batch, sample=sample)
    except TaskInputError as err:
        raise TaskInputError(f"training batch {batch_index}: {err}") from None
    return checked_loss(loss, batch_index)
