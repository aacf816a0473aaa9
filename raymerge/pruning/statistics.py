"""Calibration statistics of a linear layer's inputs: per-feature sums of squares (Wanda, OWL)
and the Hessian proxy sum of x x^T (SparseGPT).

Pure torch. Both accumulators are fed the layer inputs `x` of shape `[..., in_features]` (any
leading dims are flattened into tokens), are *sums* plus a token count (so they add up across
data-parallel workers with `merge`), and travel between processes as `state()` dicts of plain
tensors and ints.

Precision:
- `FeatureNormStats` accumulates in float64. It is one vector, so the cost is nil, and sums of
  squares over millions of tokens (outlier features reach 1e3..1e4 in LLMs) keep ~16 digits.
- `HessianStats` accumulates in float32 by default, the precision of SparseGPT and
  llm-compressor: the matrix is in_features^2 (float32 is already ~3 GiB for a 28672-wide
  down_proj) and float64 matmuls are many times slower on GPUs. Pass `dtype=torch.float64`
  when memory allows. Keep TF32 matmuls off on CUDA (PyTorch's default) while accumulating.

Determinism: the result depends only on the tensors added, their order and the order of merges
(no atomics: sums and matmuls on a fixed device and shape are reproducible). Adding the data in
parts and merging equals adding it at once up to float rounding; the reducer should merge in a
fixed order (e.g. by shard index) to be bit-reproducible.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from raymerge.pruning.masks import PruningError

Device = Union[str, torch.device, None]


def _check_width(in_features: object) -> int:
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise PruningError(f"in_features must be a positive integer, got {in_features!r}")
    return in_features


def _tokens(x: torch.Tensor, in_features: int, what: str) -> torch.Tensor:
    """`x` as [tokens, in_features]."""
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise PruningError(f"{what}: input shape {tuple(x.shape)} does not end in in_features={in_features}")
    return x.detach().reshape(-1, in_features)


def _check_state(state: dict[str, Any], key: str, cls: str) -> tuple[int, torch.Tensor, int]:
    missing = {"in_features", key, "tokens"} - set(state)
    if missing:
        raise PruningError(f"{cls} state lacks {sorted(missing)}")
    in_features = _check_width(state["in_features"])
    tokens = state["tokens"]
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise PruningError(f"{cls} state: tokens must be a non-negative integer, got {tokens!r}")
    tensor = state[key]
    if not isinstance(tensor, torch.Tensor):
        raise PruningError(f"{cls} state: {key} must be a tensor, got {type(tensor).__name__}")
    return in_features, tensor, tokens


class FeatureNormStats:
    """Running sum over tokens of x_j^2 per input feature j (float64), and the token count.

    sqrt(sq_sum) is ||X_j||_2, the activation norm of Wanda's score |W_ij| * ||X_j||_2.
    """

    def __init__(self, in_features: int, *, device: Device = None) -> None:
        self.in_features = _check_width(in_features)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> "FeatureNormStats":
        """Accumulate a batch of layer inputs `[..., in_features]` (computed on x's device)."""
        rows = _tokens(x, self.in_features, "FeatureNormStats.add")
        part = rows.to(torch.float64).square().sum(dim=0)
        self.sq_sum += part.to(self.sq_sum.device)
        self.tokens += rows.shape[0]
        return self

    def merge(self, other: "FeatureNormStats") -> "FeatureNormStats":
        """Add another worker's statistic into this one (in place; returns self)."""
        if not isinstance(other, FeatureNormStats) or other.in_features != self.in_features:
            raise PruningError(f"cannot merge {other!r} into FeatureNormStats(in_features={self.in_features})")
        self.sq_sum += other.sq_sum.to(self.sq_sum.device)
        self.tokens += other.tokens
        return self

    def state(self) -> dict[str, Any]:
        """Plain tensors and ints; `sq_sum` shares storage with this object (clone to keep it
        while adding more)."""
        return {"in_features": self.in_features, "sq_sum": self.sq_sum, "tokens": self.tokens}

    @classmethod
    def from_state(cls, state: dict[str, Any], *, device: Device = None) -> "FeatureNormStats":
        """Rebuild from `state()` (a copy: later adds never touch `state`), on `device` if given."""
        in_features, sq_sum, tokens = _check_state(state, "sq_sum", cls.__name__)
        if tuple(sq_sum.shape) != (in_features,):
            raise PruningError(f"FeatureNormStats state: sq_sum shape {tuple(sq_sum.shape)}, expected ({in_features},)")
        stats = cls.__new__(cls)
        stats.in_features = in_features
        stats.sq_sum = sq_sum.to(device if device is not None else sq_sum.device, torch.float64, copy=True)
        stats.tokens = tokens
        return stats

    def __repr__(self) -> str:
        return f"FeatureNormStats(in_features={self.in_features}, tokens={self.tokens})"


class HessianStats:
    """Running sum of x^T x over tokens (`[in, in]`, float32 unless `dtype` says otherwise) and
    the token count; `hessian()` is their ratio."""

    def __init__(self, in_features: int, *, dtype: torch.dtype = torch.float32, device: Device = None) -> None:
        self.in_features = _check_width(in_features)
        if dtype not in (torch.float32, torch.float64):
            raise PruningError(f"HessianStats dtype must be torch.float32 or torch.float64, got {dtype}")
        self.xtx = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.tokens = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.xtx.dtype

    def add(self, x: torch.Tensor) -> "HessianStats":
        """Accumulate a batch of layer inputs `[..., in_features]` (the matmul runs on x's device)."""
        rows = _tokens(x, self.in_features, "HessianStats.add").to(self.dtype)
        if rows.device == self.xtx.device:
            self.xtx.addmm_(rows.T, rows)
        else:
            self.xtx += (rows.T @ rows).to(self.xtx.device)
        self.tokens += rows.shape[0]
        return self

    def merge(self, other: "HessianStats") -> "HessianStats":
        """Add another worker's statistic into this one (in place; returns self)."""
        if not isinstance(other, HessianStats) or other.in_features != self.in_features:
            raise PruningError(f"cannot merge {other!r} into HessianStats(in_features={self.in_features})")
        self.xtx += other.xtx.to(self.xtx.device, self.dtype)
        self.tokens += other.tokens
        return self

    def hessian(self) -> torch.Tensor:
        """sum(x^T x) / tokens. SparseGPT uses (2 / n_sequences) * sum(x^T x); the scale does not
        matter to it (dampening is relative to mean(diag), and both the saliency w^2 / U_cc^2 and
        the update err / U_ii * U[i, :] are invariant to scaling H)."""
        if self.tokens == 0:
            raise PruningError("HessianStats.hessian(): no calibration tokens were added")
        return self.xtx / self.tokens

    def state(self) -> dict[str, Any]:
        """Plain tensors and ints; `xtx` shares storage with this object."""
        return {"in_features": self.in_features, "xtx": self.xtx, "tokens": self.tokens}

    @classmethod
    def from_state(cls, state: dict[str, Any], *, device: Device = None) -> "HessianStats":
        """Rebuild from `state()` (a copy: later adds never touch `state`), on `device` if given."""
        in_features, xtx, tokens = _check_state(state, "xtx", cls.__name__)
        if tuple(xtx.shape) != (in_features, in_features):
            raise PruningError(
                f"HessianStats state: xtx shape {tuple(xtx.shape)}, expected ({in_features}, {in_features})"
            )
        dtype = xtx.dtype if xtx.dtype in (torch.float32, torch.float64) else torch.float32
        stats = cls.__new__(cls)
        stats.in_features = in_features
        stats.xtx = xtx.to(device if device is not None else xtx.device, dtype, copy=True)  # one copy, never shared
        stats.tokens = tokens
        return stats

    def __repr__(self) -> str:
        return f"HessianStats(in_features={self.in_features}, tokens={self.tokens}, dtype={self.dtype})"


# The statistic kinds a prune method can ask for (`PruneMethodSpec.statistic`): the accumulator
# of each, and the bytes it keeps for one module of input width `width` (the stage planner's
# memory estimate).
STATISTICS: dict[str, type] = {"norms": FeatureNormStats, "hessian": HessianStats}


def statistic_bytes(kind: str, width: int) -> int:
    """Bytes of one module's `kind` statistic: a float64 vector (norms) or a float32 matrix (hessian)."""
    return width * 8 if kind == "norms" else width * width * 4
