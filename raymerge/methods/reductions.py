"""Reductions whose bits never depend on the torch thread count, the worker count or the node.

Why this module exists: on CPU, torch reduces a tensor to a *single* value (`x.sum()`,
`torch.linalg.vector_norm(x)`, `(a * b).sum()`) by splitting the input across its intra-op
threads once the input has at least 32768 elements (`at::internal::GRAIN_SIZE`), and adds the
per-thread partial sums at the end. The split follows `torch.get_num_threads()`, which a worker
sets from its CPU share, so the same merge on 1 or 2 workers rounded differently (and in 16-bit
dtypes the partials are rounded to 16 bits). LAPACK factorisations (`svd`, `cholesky`) from MKL
likewise block their work by thread count.

The mechanisms, chosen per kind of operation:

- **Whole-tensor sums, norms, dot products and means: fixed-order chunked accumulation.** The
  tensor is cut into rows of `CHUNK` elements; each row is summed by `sum(dim=1)`, whose CPU
  kernel gives every output element to exactly one thread (torch splits reductions with more
  than one output over the *outputs*, never over the reduced dimension), so a row's sum is the
  same whatever the thread count. The row sums are accumulated in float64 and added the same
  way (recursively when there are many), then cast to the dtype torch itself would return.
  Within a row, 16- and 32-bit floats accumulate in float32, like torch's own sum, by the same
  vectorised kernel (a float64 accumulation was 25x slower and cost DARE and SLERP 20-70%:
  `examples/benchmark_determinism.py`). This keeps all threads busy (no single-threaded
  determinism) and is as accurate as torch's own reduction. Below 32768 elements torch reduces
  serially, so those calls go to torch unchanged and keep matching other tools (mergekit) bit
  for bit.
- **Reductions with many outputs** (per row, per column, across stacked models) are already
  thread-count independent for the reason above; only a reduction that collapses to a single
  output element takes the chunked path (`sum_dim`).
- **Matrix products** (`@`, Hessians X^T X): MKL's GEMM splits the output, not the inner
  dimension, for the shapes we use; `tests/test_determinism.py` checks it on 1M-element operands.
- **LAPACK factorisations** (SVD, Cholesky): no chunked form exists, so they run inside
  `fixed_threads()`, a fixed per-operation thread count (`LAPACK_THREADS`), then the worker's
  own count is restored. They are a small part of any job except the SVD methods.

On CUDA, reductions use different kernels (and atomics in places): results on a GPU equal each
other for a fixed GPU model, not the CPU's (see the README's determinism section).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch

GRAIN = 32768  # torch's at::internal::GRAIN_SIZE: below it, CPU reductions run on one thread
CHUNK = 16384  # elements summed per row: below GRAIN, so a single leftover row is serial too
BLOCK_ROWS = 256  # rows converted into `_row_sums`'s buffer at a time (4M elements)
LAPACK_THREADS = 1  # threads for the factorisations run in `fixed_threads`

_threads_lock = threading.RLock()


def _result_dtype(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is not None:
        return dtype
    return x.dtype if x.is_floating_point() or x.is_complex() else torch.int64


def _deterministic_already(x: torch.Tensor) -> bool:
    return x.numel() < GRAIN or x.device.type != "cpu"


_FLOAT32_ROWS = (torch.float32, torch.bfloat16, torch.float16)


def _row_sums(flat: torch.Tensor, square: bool = False) -> torch.Tensor:
    """float64 sums (of squares, with `square`) of consecutive CHUNK-element rows of 1-D `flat`
    (the last row may be shorter). 16- and 32-bit floats are summed within a row in float32,
    BLOCK_ROWS rows at a time converted into one reused buffer, by torch's vectorised kernel (as
    accurate as torch's own whole-tensor sum, which accumulates in float32 the same way, and as
    fast); other dtypes (float64, integers) in float64. Either way each row is one output of a
    many-output reduction, so its bits do not depend on the thread count."""
    acc = torch.float32 if flat.dtype in _FLOAT32_ROWS else torch.float64
    n = flat.numel()
    whole = n - n % CHUNK
    step = CHUNK * BLOCK_ROWS
    buffer: Optional[torch.Tensor] = None
    parts = []
    for start in range(0, whole, step):
        end = min(start + step, whole)
        block = flat[start:end]
        if block.dtype != acc or square:
            if buffer is None:
                buffer = torch.empty(min(step, whole), dtype=acc, device=flat.device)
            block = buffer[: end - start].copy_(block)
            if square:
                block.square_()
        parts.append(block.reshape(-1, CHUNK).sum(dim=1).to(torch.float64))
    if whole < n:
        tail = flat[whole:].to(torch.float64)  # fewer than CHUNK elements: summed serially
        parts.append((tail.square() if square else tail).sum().reshape(1))
    return torch.cat(parts)


def _sum64(flat: torch.Tensor) -> torch.Tensor:
    """float64 0-d sum of 1-D `flat`, in an order fixed by its length alone."""
    while flat.numel() >= GRAIN:
        flat = _row_sums(flat)
    return flat.sum(dtype=torch.float64)


def total(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`x.sum(dtype=dtype)` (a 0-d tensor) with the same bits for any thread count."""
    if _deterministic_already(x):
        return x.sum(dtype=dtype)
    return _sum64(x.reshape(-1)).to(_result_dtype(x, dtype))


def mean(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`x.mean(dtype=dtype)` with the same bits for any thread count."""
    if _deterministic_already(x):
        return x.mean(dtype=dtype)
    return (_sum64(x.reshape(-1)) / x.numel()).to(_result_dtype(x, dtype))


def vector_norm(x: torch.Tensor) -> torch.Tensor:
    """The L2 norm of all of `x` (as `torch.linalg.vector_norm(x)`), thread-count independent."""
    if _deterministic_already(x):
        return torch.linalg.vector_norm(x)
    flat = x.reshape(-1)
    sq = _sum64_squares(flat)
    return sq.sqrt().to(x.dtype)


def _sum64_squares(flat: torch.Tensor) -> torch.Tensor:
    """float64 sum of squares of 1-D `flat`, in an order fixed by its length alone."""
    if flat.numel() < CHUNK:
        return flat.to(torch.float64).square().sum()
    return _sum64(_row_sums(flat, square=True))


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over all elements (same shape), thread-count independent; in a's dtype."""
    if _deterministic_already(a):
        return (a * b).sum()
    return total(a * b)


def sum_dim(x: torch.Tensor, dim: Union[int, Sequence[int]], keepdim: bool = False) -> torch.Tensor:
    """`x.sum(dim, keepdim)`; the chunked path only where the result is a single element."""
    reduced = {d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim)}
    outputs = 1
    for d in range(x.dim()):
        outputs *= 1 if d in reduced else x.shape[d]
    if outputs != 1 or _deterministic_already(x):
        return x.sum(dim=dim, keepdim=keepdim)
    shape = [1 if d in reduced else x.shape[d] for d in range(x.dim())] if keepdim else [1] * (x.dim() - len(reduced))
    return total(x).reshape(shape)


def norm_dim(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """`torch.norm(x, dim=dim, keepdim=keepdim)`; the chunked path only for a single output."""
    if x.numel() // max(1, x.shape[dim]) > 1 or _deterministic_already(x):
        return torch.norm(x, dim=dim, keepdim=keepdim)
    shape = list(x.shape)
    if keepdim:
        shape[dim] = 1
    else:
        del shape[dim]
    return vector_norm(x).reshape(shape)


@contextmanager
def fixed_threads(n: int = LAPACK_THREADS) -> Iterator[None]:
    """Run the block with exactly `n` torch intra-op threads (for LAPACK factorisations, whose
    blocking follows the thread count), restoring the caller's count afterwards."""
    with _threads_lock:
        before = torch.get_num_threads()
        if before != n:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if before != n:
                torch.set_num_threads(before)
