"""Model Stock (arXiv 2403.19522): interpolate between the base and the average of the
fine-tunes by t = N cos / (1 + (N - 1) cos), cos being the mean pairwise cosine between the
fine-tunes' task vectors (over the whole tensor, or per row with `filter_wise`)."""

from __future__ import annotations

import torch

from raymerge.methods import reductions


def model_stock(inputs, *, base_index, model_params, params, generator):
    w0 = inputs[base_index]
    ws = [x for i, x in enumerate(inputs) if i != base_index]
    shape = w0.shape
    if params["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = (reductions.norm_dim(a, dim=-1) * reductions.norm_dim(b, dim=-1)).clamp(min=1e-6)
            cosines.append((reductions.sum_dim(a * b, dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite estimate there: keep the base
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)
