"""Bergson 2.5.1's side of the index benchmark: a worker run under ``.bergson-venv`` by ``index_bench``.

    .bergson-venv/bin/python -m benchmarks.bergson_side WORK_DIR

``WORK_DIR`` holds what ``index_bench.bergson_second_set`` wrote: ``model/`` (``save_pretrained``,
safetensors), ``tokens.safetensors`` (``train_*`` and ``query_*`` ``input_ids``/``labels``/``attention_mask``)
and ``spec.json`` (tracked modules, batch size, which indexes to build). The worker writes
``bergson-scores.safetensors`` (one ``[Q, N]`` score matrix per configuration) and prints one JSON line.

Facts about Bergson 2.5.1 that this worker relies on (read from its source):

* ``bergson build`` is ``build.build``: it tokenizes the dataset (``setup_data_pipeline``, which needs a
  tokenizer our toy model has not got, and keeps a pre-tokenized ``input_ids`` column as it is), then runs
  ``build.build_worker`` in process for one rank and renames ``<run>.part`` to ``<run>``. We call
  ``build_worker`` on a pre-tokenized ``datasets.Dataset`` and rename, which is the same minus the tokenizer.
  Likewise ``bergson hessian`` is ``approximate_hessians`` around ``hessian_worker``.
* The per-example gradient is that of the *summed* token loss (``IndexConfig.loss_reduction="sum"``, the
  default; ``"mean"`` would divide each example by its token count): the same as our ``lm_train_loss``.
  Labels ``-100`` are not counted, and the model is called without an attention mask (our sequences have no
  padding, which ``main`` checks). The worker compares one stored row with autograd to confirm it.
* The collector hooks the modules of ``model.base_model`` (``LlamaModel``): ``lm_head`` lies outside it, so
  Bergson tracks every ``nn.Linear`` of ours but the head. ``index_bench`` compares with our exact scores
  over all modules and over the same modules.
* ``projection_dim=p`` projects each module's gradient on both sides (``p x p`` per module, Rademacher,
  JL scale); ``0`` (``bergson build``'s default) stores the full gradient. ``bergson trackstar`` defaults
  to 16, the README's index example uses ``--projection_dim 16`` and ``query --unit_norm``.
* Preconditioners (``Attributor(hessian_path=...)``): EK-FAC (``HessianConfig(method="kfac",
  ev_correction=True)``) only on unprojected gradients (``approximate_hessians`` refuses a projection);
  on projected ones the dense per-module autocorrelation Gram ``sum_n g_n g_n^T`` of the projected
  gradients (TrackStar's). Inversion ``damped_inverse``: ``1 / (lambda + 0.1 mean(lambda))``, our rule.
  One-sided (``H^-1`` on the query) for inner products; with ``unit_norm`` two-sided (``H^-1/2`` on both,
  then cosine).
* Query gradients: ``Attributor.trace(model.base_model, k)`` around one backward of the summed query loss
  (``model(x, labels=...).loss``, reduction ``sum`` as Bergson sets it); ``k=None`` returns all ``N``
  scores, sorted, with their indices.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .common import Clock, set_threads

# (label, projection_dim, unit_norm, preconditioner): the configurations scored, grouped by index. Not the
# autocorrelation preconditioner at p=64 or 128: fourteen dense (p^2 x p^2) Grams, eigendecomposed at the fit and
# again when the Attributor inverts them; at p=64 a trial was stopped still fitting after 4.7 CPU minutes at
# 4.4 GB resident, beyond this benchmark's memory share (at p=128 one Gram alone is 1.07 GB in float32).
CONFIGS = [
    ("full gradient, EK-FAC on the query (one-sided)", 0, False, "ekfac"),
    ("full gradient, no preconditioner", 0, False, None),
    ("p=16 (README default), cosine, no preconditioner", 16, True, None),
    ("p=16, autocorrelation (one-sided)", 16, False, "autocorrelation"),
    ("p=16, autocorrelation, cosine (two-sided, TrackStar)", 16, True, "autocorrelation"),
    ("p=64, no preconditioner", 64, False, None),
    ("p=64, cosine, no preconditioner", 64, True, None),
    ("p=128, no preconditioner", 128, False, None),
    ("p=128, cosine, no preconditioner", 128, True, None),
]


def dataset(tokens: dict, prefix: str):
    """A pre-tokenized ``datasets.Dataset`` (``input_ids``, ``labels``, ``length``), as ``build_worker`` reads it."""
    from datasets import Dataset

    ids, labels = tokens[f"{prefix}_input_ids"], tokens[f"{prefix}_labels"]
    if not bool(tokens[f"{prefix}_attention_mask"].bool().all()):
        raise ValueError("Bergson calls the model without an attention mask: padded sequences would differ")
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(),
                              "length": [ids.shape[1]] * ids.shape[0]})


def index_config(run_path: Path, model_dir: Path, projection_dim: int, token_batch: int):
    from bergson.config.config import DistributedConfig, IndexConfig

    return IndexConfig(run_path=str(run_path), model=str(model_dir), projection_dim=projection_dim,
                       token_batch_size=token_batch, precision="fp32", model_kwargs="attn_implementation=eager",
                       distributed=DistributedConfig(nproc_per_node=1))


def finish(cfg) -> None:
    """What ``build`` / ``approximate_hessians`` do after the worker: rename ``<run>.part`` to ``<run>``."""
    shutil.rmtree(cfg.run_path, ignore_errors=True)
    shutil.move(cfg.partial_run_path, cfg.run_path)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def build_index(cfg, ds) -> dict:
    from bergson.build import build_worker
    from bergson.config.config import PreprocessConfig

    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    with Clock() as clock:
        build_worker(0, 0, 1, cfg, PreprocessConfig(), ds)
        finish(cfg)
    grads = Path(cfg.run_path) / "gradients.bin"
    return {"build_cpu_s": clock.cpu, "build_wall_s": clock.wall, "disk_bytes": disk_bytes(cfg.run_path),
            "gradient_bytes_per_example": grads.stat().st_size // len(ds)}


def fit_hessian(cfg, ds, method: str) -> dict:
    from bergson.config.config import HessianConfig
    from bergson.hessians.hessian_approximations import hessian_worker

    # Empirical Fisher (the dataset's labels), as our fit; fp32 accumulation.
    hcfg = HessianConfig(method=method, ev_correction=method == "kfac", use_dataset_labels=True)
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    with Clock() as clock:
        hessian_worker(0, 0, 1, cfg, hcfg, ds)
        finish(cfg)
    return {"fit_cpu_s": clock.cpu, "fit_wall_s": clock.wall, "disk_bytes": disk_bytes(cfg.run_path)}


def check_row(model, index_dir: Path, tokens: dict) -> dict:
    """Training example 0's stored full gradient against autograd of its summed token loss."""
    import torch.nn.functional as F
    from bergson.data import column_offsets, load_gradients

    grad_sizes = json.loads((index_dir / "info.json").read_text())["grad_sizes"]
    row = torch.from_numpy(load_gradients(index_dir)[0].astype("float32"))
    modules = dict(model.base_model.named_modules())
    weights = [modules[n].weight for n in grad_sizes]
    for w in weights:
        w.requires_grad_(True)
    ids, labels = tokens["train_input_ids"][:1], tokens["train_labels"][:1]
    logits = model(ids).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")
    grads = torch.autograd.grad(loss, weights)
    for w in weights:
        w.requires_grad_(False)
    stored = torch.cat([row[lo:hi] for lo, hi in column_offsets(grad_sizes).values()])
    exact = torch.cat([g.flatten() for g in grads])
    err = float((stored - exact).norm() / exact.norm())
    mean_err = float((stored * (labels[:, 1:] != -100).sum() - exact).norm() / exact.norm())
    return {"rel_error_vs_sum_loss": err, "rel_error_vs_mean_loss": mean_err}


def score(attr, model, tokens: dict, batch: int) -> torch.Tensor:
    """``[Q, N]`` scores of every query: one traced backward of the summed query loss per batch."""
    ids, labels = tokens["query_input_ids"], tokens["query_labels"]
    rows = []
    for lo in range(0, ids.shape[0], batch):
        with attr.trace(model.base_model, None) as result:
            model(ids[lo:lo + batch], labels=labels[lo:lo + batch]).loss.backward()
            model.zero_grad()
        full = torch.empty_like(result.scores)
        full.scatter_(1, result.indices, result.scores)  # back from sorted order to training order
        rows.append(full)
    return torch.cat(rows)


def main() -> None:
    set_threads()
    work = Path(sys.argv[1])
    spec = json.loads((work / "spec.json").read_text())
    from safetensors.torch import load_file, save_file

    from bergson import Attributor
    from bergson.utils.worker_utils import setup_model_and_peft

    tokens = load_file(work / "tokens.safetensors")
    train, batch = dataset(tokens, "train"), spec["batch"]
    token_batch = batch * tokens["train_input_ids"].shape[1]  # our batch of sequences, in Bergson's token budget
    only = os.environ.get("BERGSON_CONFIGS")  # e.g. "0,2": a subset of CONFIGS by position, for trial runs
    wanted = [CONFIGS[int(i)] for i in only.split(",")] if only else CONFIGS
    out = {"bergson": __import__("bergson").__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "configs": [], "indexes": {}, "hessians": {}}
    scores = {}
    model = None
    for p in sorted({c[1] for c in wanted}):
        cfg = index_config(work / f"index-p{p}", work / "model", p, token_batch)
        out["indexes"][p] = build_index(cfg, train)
        out.setdefault("modules", list(json.loads((Path(cfg.run_path) / "info.json").read_text())["grad_sizes"]))
        print(f"[bergson] index p={p}: {out['indexes'][p]}", file=sys.stderr, flush=True)
        if model is None:
            model, _ = setup_model_and_peft(cfg)
            model.eval()
        if p == 0:
            out["gradient_check"] = check_row(model, Path(cfg.run_path), tokens)
        for label, _, unit_norm, precond in (c for c in wanted if c[1] == p):
            hessian = None
            if precond:
                hessian = work / f"hessian-{precond}-p{p}"
                if not hessian.exists():
                    out["hessians"][f"{precond}, p={p}"] = fit_hessian(
                        index_config(hessian, work / "model", p, token_batch), train,
                        "kfac" if precond == "ekfac" else precond)
            with Clock() as load:
                attr = Attributor(cfg.run_path, unit_norm=unit_norm, hessian_path=hessian,
                                  ev_correction=precond == "ekfac")
            with Clock() as query:
                s = score(attr, model, tokens, batch)
            del attr
            key = f"config{len(out['configs'])}"
            scores[key] = s.contiguous()
            row = {"config": label, "key": key, "projection_dim": p, "unit_norm": unit_norm, "preconditioner": precond,
                   "load_cpu_s": load.cpu, "query_cpu_s": query.cpu, "query_wall_s": query.wall,
                   "bytes_per_example": out["indexes"][p]["gradient_bytes_per_example"]}
            out["configs"].append(row)
            print(f"[bergson] {row}", file=sys.stderr, flush=True)
        shutil.rmtree(cfg.run_path, ignore_errors=True)  # the full index is ~1.3 GB
    save_file(scores, work / "bergson-scores.safetensors")
    out["max_rss_bytes"] = _max_rss()
    print(json.dumps(out))


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if os.name == "posix" else 0


if __name__ == "__main__":
    main()
