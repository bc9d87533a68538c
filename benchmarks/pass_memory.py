"""Peak memory of one statistics pass and of the factor file's write, for a layer with a 4096 x 4096 covariance.

Each measurement runs in a fresh interpreter (peak RSS above the RSS just before the block,
``benchmarks.common.PeakRSS``) with the library taken from ``--library`` (default: this checkout),
so that two versions of the library can be compared on the same machine:

    python benchmarks/pass_memory.py                        # this checkout
    python benchmarks/pass_memory.py --library /path/to/other/checkout

The layer is ``Linear(4095, 4096)`` with a bias (both sides 4096 wide), K-FAC, float64
statistics: each covariance sum is 128 MiB, the pair 256 MiB; the eigendecomposition adds the
eigenbases (another 256 MiB) and LAPACK's workspace. Run as a script, not with ``-m``, so that
the library on ``PYTHONPATH`` is the one imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MiB = 1 << 20


def worker(what: str) -> dict:
    import torch
    from torch import nn

    sys.path.append(str(ROOT))  # benchmarks.common; the library comes from PYTHONPATH, which is earlier
    from benchmarks.common import PeakRSS
    from lightning_influence import ClassificationTask, InfluenceFactors
    from lightning_influence.capture import find_tracked_layers
    from lightning_influence.passes import run_phase

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4095, 4096))
    batches = [(torch.randn(32, 4095), torch.randint(0, 4096, (32,))) for _ in range(4)]
    layers = find_tracked_layers(model)
    factors = InfluenceFactors("kfac", layers, fisher="empirical")
    # one warm-up batch outside the measurement: allocator pools, lazy imports, first kernels
    warm = InfluenceFactors("kfac", find_tracked_layers(nn.Sequential(nn.Linear(15, 16))), fisher="empirical")
    run_phase("covariance", warm, nn.Sequential(nn.Linear(15, 16)), ClassificationTask(),
              [(torch.randn(2, 15), torch.randint(0, 16, (2,)))])
    out = {"library": str(Path(sys.modules["lightning_influence"].__file__).parent.parent)}
    with PeakRSS() as pass_mem:
        run_phase("covariance", factors, model, ClassificationTask(), batches)
    out["pass"] = pass_mem.as_dict()
    with tempfile.TemporaryDirectory() as d, PeakRSS() as save_mem:
        factors.save(d)
        out["file_bytes"] = sum(p.stat().st_size for p in Path(d).iterdir() if p.suffix == ".safetensors")
    out["save"] = save_mem.as_dict()
    out["factor_bytes"] = sum(t.numel() * t.element_size() for t in factors.tensors["0"].values())
    return out


def measure(library: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(library), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path, default=ROOT, help="checkout whose lightning_influence is measured")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker("all")))
        return
    r = measure(args.library)
    print(json.dumps(r))
    print(f"{r['library']}: covariance pass peak +{r['pass']['increment_rss'] / MiB:.0f} MiB "
          f"({r['pass']['seconds']:.1f} s), save peak +{r['save']['increment_rss'] / MiB:.0f} MiB for a "
          f"{r['file_bytes'] / MiB:.0f} MiB file; factors hold {r['factor_bytes'] / MiB:.0f} MiB", file=sys.stderr)


if __name__ == "__main__":
    main()
