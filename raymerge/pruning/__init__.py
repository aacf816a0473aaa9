"""Post-training pruning of linear layers: masks, scores, calibration statistics, SparseGPT and
layerwise (OWL) sparsity targets.

Pure torch: no Ray, no file I/O, no transformers. Functions run on the device of their tensors
and raise `PruningError` (a `ValueError`) on bad input. Weights are `[out_features,
in_features]` like `nn.Linear.weight`; masks are True where a weight is pruned (set to zero).
"""

from raymerge.pruning.layerwise import (
    explicit_sparsities,
    mean_weighted_sparsity,
    outlier_ratio,
    owl_sparsities,
    uniform_sparsities,
)
from raymerge.pruning.masks import (
    PruningError,
    achieved_sparsity,
    apply_mask,
    check_sparsity,
    follows_nm,
    matrix_mask,
    nm_mask,
    parse_pattern,
    row_mask,
)
from raymerge.pruning.scores import magnitude_scores, wanda_scores
from raymerge.pruning.sparsegpt import sparsegpt_prune
from raymerge.pruning.statistics import FeatureNormStats, HessianStats

__all__ = [
    "FeatureNormStats",
    "HessianStats",
    "PruningError",
    "achieved_sparsity",
    "apply_mask",
    "check_sparsity",
    "explicit_sparsities",
    "follows_nm",
    "magnitude_scores",
    "matrix_mask",
    "mean_weighted_sparsity",
    "nm_mask",
    "outlier_ratio",
    "owl_sparsities",
    "parse_pattern",
    "row_mask",
    "sparsegpt_prune",
    "uniform_sparsities",
    "wanda_scores",
]
