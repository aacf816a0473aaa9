"""Activation-space curation of calibration windows (COLA, arXiv 2510.10618).

COLA finds that calibration data works best when it is representative of, and diverse in, the
model's activation space. Given activation features of `c` candidate windows (computed by the
caller, e.g. `mean_pooled_features` of a hidden layer), `curate` clusters the L2-normalised
features with k-means (pure torch, seeded k-means++ initialisation, capped Lloyd iterations,
float64, deterministic) and picks windows round-robin over the clusters, largest cluster first,
each cluster's windows nearest-to-centroid first, until `nsamples` are chosen. Every cluster is
represented as long as `nsamples >= clusters`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from raymerge.calibration.text import CalibrationError

KMEANS_MAX_ITERATIONS = 100


def mean_pooled_features(hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tensor[c, seqlen, h] -> float32 Tensor[c, h]: the mean over positions (masked ones excluded)."""
    if hidden_states.dim() != 3:
        raise CalibrationError(f"hidden_states must be [candidates, seqlen, hidden], got shape {tuple(hidden_states.shape)}")
    hs = hidden_states.float()
    if attention_mask is None:
        return hs.mean(dim=1)
    mask = attention_mask.to(hs.dtype).unsqueeze(-1)
    return (hs * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def kmeans(
    points: torch.Tensor, clusters: int, seed: int, max_iterations: int = KMEANS_MAX_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded k-means (k-means++ init, Lloyd steps); return (labels LongTensor[n], centroids [k, d])."""
    x = points.to(torch.float64)
    centroids = _kmeans_pp_init(x, clusters, torch.Generator().manual_seed(seed))
    labels = _assign(x, centroids)
    for _ in range(max_iterations):
        centroids = _update(x, labels, centroids)
        new_labels = _assign(x, centroids)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels, centroids


def _kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    chosen = [int(torch.randint(0, n, (1,), generator=gen))]
    nearest = _sq_dist(x, x[chosen[0]].unsqueeze(0)).squeeze(1)
    while len(chosen) < k:
        weights = nearest.clamp_min(0.0)
        if float(weights.sum()) <= 0.0:  # fewer distinct points than clusters: take unused ones
            weights = torch.ones(n, dtype=x.dtype)
            weights[chosen] = 0.0
        nxt = int(torch.multinomial(weights, 1, generator=gen))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, _sq_dist(x, x[nxt].unsqueeze(0)).squeeze(1))
    return x[chosen].clone()


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b).pow(2)


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, centroids).argmin(dim=1)


def _update(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cluster means; an empty cluster keeps its previous centroid."""
    k = centroids.shape[0]
    sums = torch.zeros_like(centroids).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(x.dtype).unsqueeze(1)
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), centroids)


def curate(
    candidates: torch.Tensor, features: torch.Tensor, nsamples: int, clusters: int, seed: int
) -> torch.Tensor:
    """Pick `nsamples` of the candidate windows spread over `clusters` activation clusters.

    `candidates`: LongTensor[c, seqlen]; `features`: Tensor[c, d]. Returns LongTensor[nsamples]
    of distinct row indices into `candidates`, in selection order.
    """
    _check_curation_inputs(candidates, features, nsamples, clusters)
    x = F.normalize(features.detach().to(torch.float64), dim=1)
    labels, centroids = kmeans(x, clusters, seed)
    distance = (x - centroids[labels]).norm(dim=1)
    members = _members_nearest_first(labels, distance, clusters)
    return _round_robin(members, nsamples)


def _check_curation_inputs(candidates: torch.Tensor, features: torch.Tensor, nsamples: int, clusters: int) -> None:
    if features.dim() != 2:
        raise CalibrationError(f"curation features must be [candidates, dim], got shape {tuple(features.shape)}")
    c = candidates.shape[0]
    if features.shape[0] != c:
        raise CalibrationError(f"curation got {c} candidate windows but features for {features.shape[0]}")
    if not torch.isfinite(features).all():
        raise CalibrationError("curation features contain NaN or infinite values")
    if not 0 < nsamples <= c:
        raise CalibrationError(f"calibration.nsamples={nsamples} must be between 1 and the {c} candidates")
    if not 0 < clusters <= c:
        raise CalibrationError(f"calibration.curate.clusters={clusters} must be between 1 and the {c} candidates")


def _members_nearest_first(labels: torch.Tensor, distance: torch.Tensor, clusters: int) -> list[list[int]]:
    """Each non-empty cluster's indices nearest-to-centroid first; clusters largest first (ties by id)."""
    groups: list[list[int]] = []
    for k in range(clusters):
        idx = torch.nonzero(labels == k).squeeze(1)
        if idx.numel() == 0:
            continue
        order = sorted(range(idx.numel()), key=lambda i: (float(distance[idx[i]]), int(idx[i])))
        groups.append([int(idx[i]) for i in order])
    groups.sort(key=len, reverse=True)  # stable: equal sizes keep cluster-id order
    return groups


def _round_robin(groups: list[list[int]], nsamples: int) -> torch.Tensor:
    picked: list[int] = []
    depth = 0
    while len(picked) < nsamples:
        for group in groups:
            if depth < len(group):
                picked.append(group[depth])
                if len(picked) == nsamples:
                    break
        depth += 1
    return torch.tensor(picked, dtype=torch.long)
