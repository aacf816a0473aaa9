"""Formulas of the activation- and sensitivity-guided merges: AIM, ACM and Sens-Merging.

These are modifiers on top of an ordinary merge method, not methods of their own: the statistics
(gathered on calibration text by the layer-stage workers, see `raymerge.runtime.guidance`) turn
into per-tensor adjustments, and the adjustments into two operations a merge worker applies to
one tensor (`scale_deltas` before the merge method, `relax_columns` after it). Everything here is
pure torch and works on one tensor or one small vector of statistics at a time.

AIM (activation-informed merging, Nobari et al., arXiv 2502.02421)
    From the base model's calibration activations, per module and input channel j, s_j = sum
    over windows of the mean over tokens of |x_j|; importance a = |s| / max|s|. The merged
    tensor is relaxed towards the base: θ = θ₀ + (θ_merged − θ₀) ⊙ (1 − a (1 − ω)), the factor
    broadcast over the input (last) dimension. Applied to every weight of a module that has an
    input (linear layers, norms, the output head); embeddings and biases keep the merged value,
    as in the authors' code. Default ω = 0.4 (the authors recommend 0.2–0.6).

ACM (activation-guided consensus merging, Yao et al., arXiv 2505.14009)
    Per fine-tuned model i and per layer l, NMI_{i,l} is the normalised mutual information
    between the base's and model i's activations at the layer's output (the MLP output of each
    decoder layer; the embeddings, final norm and head outputs as three more "layers"), computed
    per calibration window over the activations rounded to bfloat16 and treated as categories,
    then averaged over windows. Coefficient c_{i,l} = 1 − σ(θ (NMI_{i,l} − max_l NMI_{i,l})),
    and model i's task vector in layer l is scaled by c_{i,l} before the inner merge
    (task arithmetic, TIES, ...). Higher MI (the layer barely changed) gives a smaller
    coefficient; the layer with the highest MI gets 0.5, and a fine-tune identical to the base
    (NMI = 1 everywhere) gets 0.5 in every layer: the documented limit.
    Choice made where the paper text was not available to us: the only code found normalises
    MI across calibration samples within a layer; we normalise across layers (what the paper's
    description, "layer-specific coefficients, higher MI smaller coefficient", implies) and use
    normalised MI so that θ has the same meaning for every layer width. Default θ = 10.

Sens-Merging (Liu et al., arXiv 2502.12420)
    Per fine-tuned model i and decoder layer l, the sensitivity S_{i,l} = mean over model i's own
    calibration windows of Σ |θ ⊙ ∇θ L| over the layer's parameters, L2-normalised over layers:
    α_{i,l} = S_{i,l} / ||S_{i,·}||₂. Cross-task transferability: g_{i,j} = mean per-token L2
    distance between model i's and model j's logits on model j's calibration text;
    τ_i = Σ_{j≠i} g_{i,j}, L1-normalised over models. Coefficients σ_{i,l} = softmax over
    models of α_{i,l} τ_i / T, and model i's task vector in layer l is scaled by K σ_{i,l}
    (K models, so the scales average 1) before the inner merge. Tensors outside the decoder
    layers (embeddings, final norm, head) keep scale 1. Default T = 2.0 (the L2S study's 7B
    setting). Choice made where the paper is ambiguous: τ uses the distance itself (the
    reading of the only implementation found), not its inverse.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


# -- applying guidance to one tensor --------------------------------------------------------------
def scale_deltas(inputs: list[torch.Tensor], base_index: int, scales: Sequence[float]) -> list[torch.Tensor]:
    """θ_i ← θ₀ + s_i (θ_i − θ₀) for every input but the base (scale 1 leaves an input as it is)."""
    base = inputs[base_index]
    out = []
    for i, (t, s) in enumerate(zip(inputs, scales)):
        out.append(t if i == base_index or s == 1.0 else base + (t - base) * s)
    return out


def relax_columns(base: torch.Tensor, merged: torch.Tensor, importance: torch.Tensor, omega: float) -> torch.Tensor:
    """AIM: θ₀ + (θ_merged − θ₀) ⊙ (1 − a (1 − ω)), the factor over the last dimension."""
    if importance.numel() != merged.shape[-1]:
        raise ValueError(f"AIM importance has {importance.numel()} channels, the tensor's last dimension is {merged.shape[-1]}")
    factor = (1.0 - importance.to(merged.dtype) * (1.0 - omega)).to(merged.device)
    return base + (merged - base) * factor


# -- AIM --------------------------------------------------------------------------------------------
def aim_importance(channel_sums: torch.Tensor) -> torch.Tensor:
    """a = |s| / max|s| (all zeros when s is zero)."""
    s = channel_sums.abs().double()
    top = s.max()
    return s / top if top > 0 else torch.zeros_like(s)


# -- ACM --------------------------------------------------------------------------------------------
def discrete_mutual_information(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """Mutual information I(x; y) and entropies H(x), H(y), in nats, of two equally long tensors
    whose exact values are category labels (a contingency table over their unique values)."""
    if x.numel() != y.numel():
        raise ValueError(f"mutual information of tensors with {x.numel()} and {y.numel()} elements")
    _, ix = torch.unique(x.flatten(), return_inverse=True)
    _, iy = torch.unique(y.flatten(), return_inverse=True)
    n = x.numel()
    ny = int(iy.max()) + 1 if n else 1
    _, joint = torch.unique(ix * ny + iy, return_counts=True)
    px = torch.bincount(ix).double() / n
    py = torch.bincount(iy).double() / n
    pxy = joint.double() / n

    def entropy(p: torch.Tensor) -> float:
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    hx, hy, hxy = entropy(px), entropy(py), entropy(pxy)
    return max(0.0, hx + hy - hxy), hx, hy


def normalized_mutual_information(x: torch.Tensor, y: torch.Tensor) -> float:
    """I(x; y) / ((H(x) + H(y)) / 2), in [0, 1] (scikit-learn's default normalisation); 1 when
    both are constant."""
    mi, hx, hy = discrete_mutual_information(x, y)
    if hx == 0.0 and hy == 0.0:
        return 1.0
    return min(1.0, mi / ((hx + hy) / 2))


def acm_coefficients(nmi: dict[int, float], theta: float) -> dict[int, float]:
    """Per layer: 1 − σ(θ (NMI_l − max NMI)); in [0.5, 1), smaller for higher MI."""
    if not nmi:
        return {}
    top = max(nmi.values())
    return {k: 1.0 - 1.0 / (1.0 + math.exp(-theta * (v - top))) for k, v in nmi.items()}


# -- Sens-Merging -----------------------------------------------------------------------------------
def sens_layer_scores(sensitivities: Sequence[float]) -> list[float]:
    """α_l = S_l / ||S||₂ over a model's layers."""
    norm = math.sqrt(sum(s * s for s in sensitivities))
    return [s / norm if norm > 0 else 0.0 for s in sensitivities]


def sens_transferability(distances: Sequence[Sequence[Optional[float]]]) -> list[float]:
    """τ_i = Σ_{j≠i} g_{i,j}, L1-normalised; `distances[i][j]` = g_{i,j} (the diagonal is ignored)."""
    k = len(distances)
    raw = [sum(float(distances[i][j]) for j in range(k) if j != i) for i in range(k)]
    total = sum(abs(v) for v in raw)
    return [v / total if total > 0 else 1.0 / k for v in raw]


def sens_scales(layer_scores: Sequence[Sequence[float]], transfer: Sequence[float], temperature: float) -> list[list[float]]:
    """K softmax_i(α_{i,l} τ_i / T) per layer: `layer_scores[i][l]` = α_{i,l}; returns [model][layer]."""
    k = len(layer_scores)
    n_layers = len(layer_scores[0]) if k else 0
    out = [[0.0] * n_layers for _ in range(k)]
    for layer in range(n_layers):
        logits = torch.tensor([layer_scores[i][layer] * transfer[i] / temperature for i in range(k)], dtype=torch.float64)
        weights = torch.softmax(logits, dim=0)
        for i in range(k):
            out[i][layer] = k * float(weights[i])
    return out
