"""Benchmark: what the thread-count-independent reductions cost (`raymerge.methods.reductions`).

    python examples/benchmark_determinism.py                 # 4096 x 4096 bf16 tensors, 1 and all threads
    python examples/benchmark_determinism.py --rows 8192 --methods dare_ties,della

Each method runs on one tensor of a base model and three fine-tunes (two models for slerp), as a
merge worker runs it, twice: as shipped, with the whole-tensor sums and norms of
`methods.reductions` (fixed-order float64 row sums, the same bits for any thread count); and with
those functions swapped for torch's own (`x.sum()`, `torch.linalg.vector_norm`, ...), whose bits
change with the thread count. The cost of determinism is the relative difference of the best of
`--repeat` runs. Methods that call none of these reductions (TIES without rescale, linear, task
arithmetic) cost nothing by construction and are listed as such.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from typing import Any

import torch

from raymerge.methods import reductions
from raymerge.methods.registry import get_method

PARAMS: dict[str, tuple[dict[str, Any], dict[str, Any], int]] = {
    # method: (per-model params, method params, models incl. base)
    "ties": ({"weight": 0.5, "density": 0.5}, {}, 4),
    "ties_rescale": ({"weight": 0.5, "density": 0.5}, {"rescale": True}, 4),
    "dare_ties": ({"weight": 0.5, "density": 0.5}, {}, 4),
    "dare_linear": ({"weight": 0.5, "density": 0.5}, {}, 4),
    "della": ({"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}, 4),
    "slerp": ({}, {"t": 0.5}, 2),
}


def torch_reductions() -> dict[str, Any]:
    """Torch's own versions of the reductions (thread-count dependent bits)."""
    return {
        "total": lambda x, dtype=None: x.sum(dtype=dtype),
        "mean": lambda x, dtype=None: x.mean(dtype=dtype),
        "vector_norm": lambda x: torch.linalg.vector_norm(x),
        "dot": lambda a, b: (a * b).sum(),
        "sum_dim": lambda x, dim, keepdim=False: x.sum(dim=dim, keepdim=keepdim),
        "norm_dim": lambda x, dim=-1, keepdim=False: torch.norm(x, dim=dim, keepdim=keepdim),
    }


@contextmanager
def swapped(functions: dict[str, Any]):
    before = {name: getattr(reductions, name) for name in functions}
    for name, fn in functions.items():
        setattr(reductions, name, fn)
    try:
        yield
    finally:
        for name, fn in before.items():
            setattr(reductions, name, fn)


def calls_reductions(name: str, inputs, kwargs) -> bool:
    """Whether the method calls one of the swapped reductions on a tensor large enough for them."""
    seen = []
    counting = {fname: (lambda *a, _f=fn, **k: seen.append(1) or _f(*a, **k)) for fname, fn in torch_reductions().items()}
    with swapped(counting):
        get_method(name).fn(inputs, **kwargs)
    return bool(seen)


def best_seconds(name: str, inputs, kwargs, repeat: int) -> float:
    spec = get_method(name)
    spec.fn(inputs, **kwargs)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        spec.fn(inputs, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="tensor shape rows x rows (default 4096: 16.8M elements)")
    parser.add_argument("--methods", default=",".join(PARAMS), help=f"comma-separated, of: {', '.join(PARAMS)}")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per variant (best is reported)")
    parser.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="torch thread counts to try")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.rows, args.rows, generator=g)
    print(f"{os.cpu_count()} CPUs; tensors {args.rows} x {args.rows} bf16 ({args.rows * args.rows / 1e6:.1f}M elements); "
          f"best of {args.repeat}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'method':14} {'threads':>7} {'deterministic s':>16} {'torch s':>9} {'cost':>7}")
    worst = 0.0
    for key in args.methods.split(","):
        per_model, params, models = PARAMS[key]
        name = "ties" if key == "ties_rescale" else key
        spec = get_method(name)
        full = {p.name: p.default for p in spec.params if not p.per_model}
        full.update(params)
        inputs = [(base + 0.01 * torch.randn(base.shape, generator=g)).to(torch.bfloat16) for _ in range(models)]
        model_params = [{**{p.name: p.default for p in spec.params if p.per_model}, **per_model} for _ in range(models)]
        base_index = None if spec.base == "none" else 0
        kwargs = dict(base_index=base_index, model_params=model_params, params=full,
                      generator=torch.Generator().manual_seed(1))
        if not calls_reductions(name, inputs, kwargs):
            print(f"{key:14} {'-':>7} {'-':>16} {'-':>9} {'0%':>7}  (calls no whole-tensor reduction)")
            continue
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            ours = best_seconds(name, inputs, kwargs, args.repeat)
            with swapped(torch_reductions()):
                theirs = best_seconds(name, inputs, kwargs, args.repeat)
            cost = ours / theirs - 1
            worst = max(worst, cost)
            print(f"{key:14} {threads:>7} {ours:>16.3f} {theirs:>9.3f} {cost:>+7.1%}")
    print(f"largest cost of determinism: {worst:+.1%} (target < 10%: {'MET' if worst < 0.10 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
