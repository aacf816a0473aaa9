"""SCE (FuseChat, arXiv 2408.07990): Select, Calculate, Erase over the fine-tunes' task vectors.

For one tensor, with task vectors tau_i = x_i - base (i over the models besides the base):

1. **Select** (only when `select_topk < 1`): keep the positions where the task vectors disagree
   most, by their variance across models; every task vector is zeroed elsewhere.
2. **Calculate**: each model's coefficient is the mean of its (selected) task vector's squares,
   normalised over the models: w_i = mean(tau_i^2) / sum_j mean(tau_j^2).
3. **Erase**: per element, the sign of sum_i tau_i is elected (ties: +), and task vectors with
   the other sign (or zero) are dropped there.

The result is base + sum_i w_i m_i tau_i / sum_i w_i m_i (m_i the erase mask), as in mergekit 0.1.5.

Choices mergekit 0.1.5 makes where the paper leaves room, kept here for equal numbers:
- the top-k of step 1 is `k = int(count_nonzero(var) * select_topk)` positions by population
  variance (`unbiased=False`): a fraction of the positions whose variance is not zero, not of
  all positions (the product is taken in float32, as mergekit's tensor arithmetic does); ties at
  the k-th variance are broken by `torch.topk`. `select_topk <= 0` keeps nothing (the base).
- the coefficients are means over the whole tensor, computed after the selection; when they sum
  to less than 1e-6 every model gets 1/n.
- the erase step's divisor sum_i w_i m_i is clamped to at least 1e-6 (elements no model keeps
  stay at the base).
- `int8_mask` is accepted for compatibility and changes nothing but memory in mergekit; it has
  no effect here.

Determinism: the per-model means reduce over the whole tensor; with two or more models the
reduction has one output per model, which torch never splits across threads, and with one model
it goes through `reductions.mean`. Everything else is per element or across models.
"""

from __future__ import annotations

import torch

from raymerge.methods import reductions
from raymerge.methods.task_arithmetic import sign_consensus


def variance_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """1 at the `select_topk` share (of the nonzero-variance positions) with the highest variance
    across the stacked task vectors, 0 elsewhere; shaped like one task vector."""
    like = task_vectors[0]
    if select_topk <= 0:
        return torch.zeros_like(like)
    if select_topk >= 1:
        return torch.ones_like(like)
    spread = task_vectors.var(dim=0, unbiased=False)
    # count_nonzero is an int64 tensor: times a Python float it becomes float32 (mergekit's k)
    k = int(torch.count_nonzero(spread) * select_topk)
    keep = torch.zeros_like(like)
    if k > 0:
        top = torch.topk(spread.reshape(-1), k=k, largest=True).indices
        keep.view(-1)[top] = 1
    return keep


def energy_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """Per model: mean of its squared task vector, normalised to sum to 1 (uniform when the
    means sum to less than 1e-6)."""
    n = task_vectors.shape[0]
    squares = task_vectors.square().reshape(n, -1)
    energy = squares.mean(dim=1) if n > 1 else reductions.mean(squares).reshape(1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / n
    return energy / total


def sce(inputs, *, base_index, model_params, params, generator):
    base = inputs[base_index]
    others = [x for i, x in enumerate(inputs) if i != base_index]
    if not others:
        return base
    task_vectors = torch.stack([x - base for x in others])
    select_topk = float(params["select_topk"])
    if select_topk < 1:
        task_vectors = task_vectors * variance_mask(task_vectors, select_topk).unsqueeze(0)
    agree = sign_consensus(task_vectors)
    weights = energy_weights(task_vectors).reshape(-1, *([1] * base.dim()))
    kept = weights * agree
    merged = (task_vectors * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
    return base + merged
