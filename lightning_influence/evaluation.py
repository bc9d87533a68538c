"""Linear datamodeling score (LDS): how well influence scores predict retraining.

The LDS (Park et al., 2023, "TRAK: Attributing Model Behavior at Scale") checks
attribution scores against the ground truth they approximate: what happens to a
query's measurement when the model is retrained on a different subset of the data.

1. Draw ``S`` random subsets of the training set, each holding a fraction (usually
   half) of the examples: :func:`lds_subsets`.
2. Retrain a fresh model on each subset, with everything else (seed, schedule,
   hyper-parameters) held fixed, and record the measurement ``f_q`` of every query:
   :func:`retrain_measurements` -> ``[S, Q]``.
3. Score the training examples once, with the model trained on the full data:
   ``scores = InfluenceModule(...).pairwise_scores(query_loader, train_loader)``
   -> ``[Q, N]``.
4. Influence scores are additive predictions: the predicted measurement of query
   ``q`` after training on subset ``s`` is ``sum_{i in s} scores[q, i]``. The LDS of a
   query is the Spearman rank correlation, across the ``S`` subsets, between these
   predictions and the measured values; the reported LDS is its mean over queries:
   :func:`linear_datamodeling_score`.

This library's scores are positive when training on the example raises the query's
measurement (``Task.measurement``, by default the query's log-likelihood), so a
subset whose summed score is higher should give a higher measurement, and good
scores have an LDS near 1 (0: no better than chance; negative: the sign is wrong).

Example::

    subsets = lds_subsets(len(train_set), num_subsets=50, seed=0)
    measured = retrain_measurements(MyModule, train_set, query_loader, task, subsets,
                                    trainer_kwargs=dict(max_epochs=5, accelerator="cpu"),
                                    batch_size=64, seed=0)                     # [S, Q]
    model = train_on_everything()                                              # same recipe, all data
    factors = fit_factors(model, task, train_loader, strategy="ekfac")
    scores = InfluenceModule(model, task=task, factors=factors).pairwise_scores(
        query_loader, train_loader)                                            # [Q, N], dataset order
    lds, per_query = linear_datamodeling_score(scores, subsets, measured)

``train_loader`` must not shuffle for the scores' columns to follow dataset order
(pairwise_scores returns them in dataset order for an unshuffled loader), matching the
columns of ``subsets``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_influence.tasks import Task, batch_size_of

__all__ = ["lds_subsets", "query_measurements", "retrain_measurements", "linear_datamodeling_score"]


def lds_subsets(num_train: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Random training subsets ``BoolTensor[num_subsets, num_train]``, deterministic in ``seed``.

    Each row holds exactly ``round(fraction * num_train)`` examples (at least one), drawn
    without replacement independently of the other rows.
    """
    if num_train < 1 or num_subsets < 1:
        raise ValueError(f"num_train and num_subsets must be positive, got {num_train} and {num_subsets}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    size = max(1, int(round(fraction * num_train)))
    g = torch.Generator().manual_seed(seed)
    subsets = torch.zeros(num_subsets, num_train, dtype=torch.bool)
    for s in range(num_subsets):
        subsets[s, torch.randperm(num_train, generator=g)[:size]] = True
    return subsets


def _slice_batch(batch: Any, i: int) -> Any:
    """Example ``i`` of a batch, kept as a batch of one: every tensor in the (nested) batch is cut to
    ``[i:i+1]``; other leaves (strings, numbers) are kept whole."""
    return apply_to_collection(batch, torch.Tensor, lambda t: t[i:i + 1])


@torch.no_grad()
def query_measurements(model: torch.nn.Module, query_loader: Iterable, task: Task) -> torch.Tensor:
    """Per-query measurements ``[num_queries]`` of ``model``, in the loader's order.

    ``Task.measurement`` sums over a batch, so each batch is cut into batches of one.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device  # lazy: importing Lightning is slow

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    values = []
    try:
        for batch in query_loader:
            batch = move_data_to_device(batch, device)
            size = task.batch_size(batch) if hasattr(task, "batch_size") else batch_size_of(batch)
            for i in range(size):
                values.append(float(task.measurement(model, _slice_batch(batch, i))))
    finally:
        model.train(was_training)
    return torch.tensor(values, dtype=torch.float64)


def retrain_measurements(
    make_module: Callable[[], Any],
    train_dataset: Any,
    query_loader: Iterable,
    task: Task,
    subsets: torch.Tensor,
    trainer_kwargs: dict,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    collate_fn: Callable | None = None,
) -> torch.Tensor:
    """Retrain on each subset and measure every query: ``Tensor[num_subsets, num_queries]``.

    For each row of ``subsets`` (from :func:`lds_subsets`): ``lightning.seed_everything(seed)``
    (the same seed every time, so only the training subset differs between runs), a fresh
    module from ``make_module()``, ``L.Trainer(**trainer_kwargs).fit`` on
    ``Subset(train_dataset, indices)`` with a ``DataLoader(batch_size, shuffle)``, then
    ``task.measurement`` of each query, one at a time (the task sums over a batch).

    ``trainer_kwargs`` defaults ``logger``, ``enable_checkpointing`` and
    ``enable_progress_bar`` to ``False`` unless given. Returned values are float64.
    """
    import lightning as L
    from torch.utils.data import DataLoader, Subset

    subsets = torch.as_tensor(subsets, dtype=torch.bool)
    if subsets.dim() != 2:
        raise ValueError(f"subsets must be [num_subsets, num_train], got shape {tuple(subsets.shape)}")
    if subsets.shape[1] != len(train_dataset):
        raise ValueError(f"subsets have {subsets.shape[1]} columns but the training set has {len(train_dataset)} examples")
    kwargs = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    kwargs.update(trainer_kwargs)
    rows = []
    for mask in subsets:
        indices = mask.nonzero().flatten().tolist()
        if not indices:
            raise ValueError("an LDS subset is empty")
        L.seed_everything(seed, verbose=False)
        module = make_module()
        loader = DataLoader(Subset(train_dataset, indices), batch_size=batch_size, shuffle=shuffle,
                            collate_fn=collate_fn)
        L.Trainer(**kwargs).fit(module, train_dataloaders=loader)
        rows.append(query_measurements(module, query_loader, task))
    return torch.stack(rows)


def linear_datamodeling_score(
    scores: torch.Tensor, subsets: torch.Tensor, measurements: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """The LDS of attribution ``scores`` ``[Q, N]`` against retraining ``measurements`` ``[S, Q]``.

    The predicted measurement of query ``q`` for subset ``s`` is ``scores[q, subsets[s]].sum()``;
    the LDS of query ``q`` is the Spearman correlation over the ``S`` subsets of predicted and
    measured values (``torchmetrics.functional.spearman_corrcoef``). Returns ``(mean, per_query)``
    with ``per_query`` of shape ``[Q]``; a query whose predictions or measurements are constant
    across subsets has an undefined (NaN) correlation and is left out of the mean.
    """
    from torchmetrics.functional import spearman_corrcoef

    scores = torch.as_tensor(scores).detach().cpu().to(torch.float64)
    subsets = torch.as_tensor(subsets).detach().cpu().bool()
    measurements = torch.as_tensor(measurements).detach().cpu().to(torch.float64)
    if scores.dim() == 1:
        scores = scores[None]
    if measurements.dim() == 1:
        measurements = measurements[:, None]
    q, n = scores.shape
    s = subsets.shape[0]
    if subsets.dim() != 2 or subsets.shape[1] != n:
        raise ValueError(f"subsets {tuple(subsets.shape)} do not match scores over {n} training examples")
    if measurements.shape != (s, q):
        raise ValueError(f"measurements must be [num_subsets={s}, num_queries={q}], got {tuple(measurements.shape)}")
    if s < 2:
        raise ValueError("the LDS needs at least two subsets")
    predictions = subsets.to(torch.float64) @ scores.T  # [S, Q]
    per_query = torch.empty(q, dtype=torch.float64)
    for j in range(q):
        pred, meas = predictions[:, j], measurements[:, j]
        if torch.all(pred == pred[0]) or torch.all(meas == meas[0]):
            per_query[j] = float("nan")
        else:
            per_query[j] = spearman_corrcoef(pred, meas)
    finite = per_query[~per_query.isnan()]
    mean = float(finite.mean()) if finite.numel() else float("nan")
    return mean, per_query
