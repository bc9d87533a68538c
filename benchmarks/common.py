"""Models, data, losses and measuring helpers shared by the benchmarks.

The losses here are written independently of both libraries (plain
``F.cross_entropy`` with ``reduction="sum"``), and each library is handed the same
functions through its own task interface, so that both differentiate exactly the
same quantities:

* training loss ``L`` = summed negative log-likelihood of the dataset's labels
  (``-100`` = not counted), per example;
* query measurement ``f`` = summed log-likelihood of the query's labels.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]

# Threads for every benchmark process (both libraries alike). One by default: on a shared
# 2-core machine, OpenMP's spin-waiting with 2 threads under outside load made a
# forward+backward ~10x slower in CPU time (measured); set BENCH_THREADS to change it.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


def set_threads(n: int = THREADS) -> None:
    os.environ["BENCH_THREADS"] = str(n)
    torch.set_num_threads(n)
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"


# ----------------------------------------------------------------------------- data sets
class ListDataset(Dataset):
    """A dataset of pre-built items (tuples or dicts of tensors); the default collate stacks them."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def cast_dataset(ds: ListDataset, dtype: torch.dtype) -> ListDataset:
    """The same items with floating-point tensors in ``dtype`` (integer tensors kept)."""
    conv = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    items = [{k: conv(v) for k, v in it.items()} if isinstance(it, dict) else type(it)(conv(v) for v in it)
             for it in ds.items]
    return ListDataset(items)


def loader(ds: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


# ----------------------------------------------------------------------------- digits MLP
def digits_datasets(num_query: int = 100, seed: int = 0, dtype=torch.float64):
    """scikit-learn's bundled 8x8 digits (no download): (train, query) ListDatasets of (x, y)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    x = torch.tensor(x[perm] / 16.0, dtype=dtype)
    y = torch.tensor(y[perm], dtype=torch.long)
    q_x, q_y, t_x, t_y = x[:num_query], y[:num_query], x[num_query:], y[num_query:]
    train = ListDataset([(t_x[i], t_y[i]) for i in range(len(t_x))])
    query = ListDataset([(q_x[i], q_y[i]) for i in range(len(q_x))])
    return train, query


def digits_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))


def train_classifier(model: nn.Module, ds: Dataset, epochs: int = 30, batch_size: int = 64, lr: float = 3e-3,
                     seed: int = 0) -> float:
    """Plain Adam training; returns the final mean training loss."""
    g = torch.Generator().manual_seed(seed)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        total, n = 0.0, 0
        for x, y in dl:
            loss = F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(y)
            n += len(y)
    model.eval()
    return total / n


def accuracy(model: nn.Module, ds: Dataset) -> float:
    x = torch.stack([it[0] for it in ds.items])
    y = torch.stack([it[1] for it in ds.items])
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


# ----------------------------------------------------------------------------- the losses
def classification_train_loss(model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    if sample:
        with torch.no_grad():
            y = torch.distributions.Categorical(logits=logits.detach()).sample()
    return F.cross_entropy(logits, y, reduction="sum")


def classification_measurement(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return -F.cross_entropy(model(x), y, reduction="sum")


def lm_train_loss(model: nn.Module, batch: dict, sample: bool = False) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    if sample:
        with torch.no_grad():
            drawn = torch.distributions.Categorical(logits=logits.detach()).sample()
            labels = torch.where(labels == -100, labels, drawn)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


def lm_measurement(model: nn.Module, batch: dict) -> torch.Tensor:
    return -lm_train_loss(model, batch, sample=False)


# ----------------------------------------------------------------------------- tiny LM
def markov_chain(vocab: int, branching: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A sparse random bigram chain: every token has ``branching`` likely successors."""
    rng = np.random.default_rng(seed)
    succ = np.stack([rng.choice(vocab, size=branching, replace=False) for _ in range(vocab)])
    probs = np.array([0.55, 0.25, 0.12, 0.08][:branching])
    return succ, probs / probs.sum()


def markov_sequences(n: int, vocab: int, seq_len: int, min_len: int | None = None, prompt_len: int = 0,
                     seed: int = 0, chain_seed: int = 0) -> ListDataset:
    """``n`` sequences from the chain, right-padded to ``seq_len`` (pad id 0, attention 0, label -100).

    With ``min_len`` the true lengths are drawn in ``[min_len, seq_len]``; the first
    ``prompt_len`` tokens get label -100 (a prompt whose likelihood is not measured).
    """
    succ, probs = markov_chain(vocab, seed=chain_seed)
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        length = seq_len if min_len is None else int(rng.integers(min_len, seq_len + 1))
        toks = np.zeros(seq_len, dtype=np.int64)
        toks[0] = rng.integers(1, vocab)
        for t in range(1, length):
            toks[t] = succ[toks[t - 1], rng.choice(len(probs), p=probs)]
        ids = torch.tensor(toks)
        mask = torch.zeros(seq_len, dtype=torch.long)
        mask[:length] = 1
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[:prompt_len] = -100
        items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return ListDataset(items)


def tiny_llama(vocab: int = 128, hidden: int = 64, intermediate: int = 128, layers: int = 2, heads: int = 4,
               max_len: int = 64, seed: int = 0) -> nn.Module:
    """A Llama-architecture LM (every projection is an ``nn.Linear``, no biases, untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_len, tie_word_embeddings=False, attention_dropout=0.0,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def train_lm(model: nn.Module, ds: Dataset, epochs: int = 2, batch_size: int = 32, lr: float = 3e-3,
             seed: int = 0, device: torch.device | str = "cpu") -> float:
    """Adam on the mean token NLL (on ``device``); returns the last epoch's mean token loss."""
    g = torch.Generator().manual_seed(seed)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        total, tokens = 0.0, 0
        for batch in dl:
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss = lm_train_loss(model, batch) / n
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * n
            tokens += n
    model.eval()
    return total / tokens


def linear_module_names(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` of the model, in module order: the set tracked on both sides."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# ----------------------------------------------------------------------------- statistics
def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double().flatten() - a.double().mean()
    b = b.double().flatten() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def rank(x):
        x = x.double().flatten()
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(len(x), dtype=torch.float64)
        return r

    return pearson(rank(a), rank(b))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- memory and time
def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


class Clock:
    """CPU seconds (this process, all threads) and wall seconds of a block."""

    def __enter__(self):
        self.c0, self.w0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu = time.process_time() - self.c0
        self.wall = time.perf_counter() - self.w0


class PeakRSS:
    """Wall time, CPU time (user+sys, all threads) and peak resident memory of a block, in this process.

    On entry the kernel's high-water mark is reset (``/proc/self/clear_refs``), so the
    peak is that of the block alone; ``baseline`` is the RSS just before it (imports,
    model, data), ``increment`` = peak - baseline.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def __enter__(self):
        if self.device.type == "cuda":  # GPU memory too: peak allocated during the block, above what it started with
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.gpu_baseline = torch.cuda.memory_allocated(self.device)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.baseline = _status()["VmRSS"]
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gpu_peak = torch.cuda.max_memory_allocated(self.device)
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start
        self.peak = _status()["VmHWM"]
        self.increment = self.peak - self.baseline
        return False

    def as_dict(self) -> dict:
        out = {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "peak_rss": self.peak, "baseline_rss": self.baseline,
               "increment_rss": self.increment, "hwm_reset": self.reset}
        if self.device.type == "cuda":
            out.update(gpu_peak=self.gpu_peak, gpu_increment=self.gpu_peak - self.gpu_baseline)
        return out


def run_worker(module: str, args: list[str], timeout: float = 1800, env: dict | None = None,
               python: str | None = None) -> dict:
    """Run ``python -m module args`` in a fresh interpreter (``env``: extra variables; ``python``: another
    environment's interpreter, this one by default); it prints one JSON line last."""
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(THREADS),
               MKL_NUM_THREADS=str(THREADS), BENCH_THREADS=os.environ.get("BENCH_THREADS", str(THREADS)),
               **(env or {}))
    proc = subprocess.run([python or sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the machine
def loadavg_now() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        flags = set(fields.get("flags", "").split())
        simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
        cpu = (f"{fields.get('model name', cpu)} (family {fields.get('cpu family')}, model {fields.get('model')}; "
               f"{', '.join(simd) or 'no AVX2'})")
    except OSError:
        pass
    mem = None
    try:
        mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    for pkg in ("kronfluence", "transformers", "numpy", "scikit-learn"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is reported as such
            info[pkg] = "not installed"
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lightning_influence"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        info["library_uncommitted_changes"] = bool(dirty)
    except OSError:
        info["git_commit"] = "unknown"
    info["library_fingerprint"] = library_fingerprint()
    return info


def library_fingerprint() -> str:
    """A hash of the library's source files, to tell whether the library changed during a run."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((ROOT / "lightning_influence").rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def save_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path


@contextmanager
def timed_finishes():
    """CPU seconds of each pass's finishing step (K-FAC's eigendecompositions) during the block, in a list:
    a cost that does not grow with the data, reported apart from the passes."""
    import lightning_influence.passes as passes_module

    seconds: list[float] = []
    untimed = passes_module.finish_layers

    def timed(*a, **k):
        start = time.process_time()
        try:
            return untimed(*a, **k)
        finally:
            seconds.append(time.process_time() - start)

    passes_module.finish_layers = timed
    try:
        yield seconds
    finally:
        passes_module.finish_layers = untimed
