"""The prune-method registry: one `PruneMethodSpec` per method name (magnitude, wanda, sparsegpt).

Same shape as the merge-method registry (`raymerge.methods.registry`): a frozen spec, `register`,
`get_prune_method(name)` raising the package's user error (`PruningError`) that lists the known
names, and `available_prune_methods()`. Everything the rest of raymerge needs to know about a
prune method lives on its spec, so adding one is one module that calls `register` (plus its
tests); the config, the stages, the stage planner and the search read the spec:

- `prune(weight, original, sparsity, stats, settings, name) -> (pruned, mask)` prunes one linear
  module. `weight` is the module's weight in the compute dtype (what the block runs with),
  `original` the checkpoint's own tensor on the same device (an empty tensor of the checkpoint's
  dtype when `reads_original` is False), `stats` the module's calibration statistic (None when
  `statistic` is None), `settings` the job's `PruneSettings` (N:M pattern, blocksize, exponents,
  ...). It returns the pruned weight in `original`'s dtype and the mask (True = pruned).
- `statistic`: which calibration statistic of each module's inputs the method scores with
  (`"norms"`: per-feature sums of squares; `"hessian"`: X^T X; None: no calibration pass). A
  method with a statistic needs `calibration:` in the prune config.
- `search_exponents(cfg)`: for methods a prune search can reproduce with the metric
  |W|^a * ||X||^b, the (a, b) of the configured method; None: the search refuses the method.

Methods are looked up by name in every process (Ray stage actors included), so a method added at
run time must be registered by a module the workers import too; built-ins are registered below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from raymerge.pruning.masks import PruningError, matrix_mask, nm_mask, row_mask
from raymerge.pruning.scores import magnitude_scores, wanda_scores
from raymerge.pruning.sparsegpt import sparsegpt_prune
from raymerge.pruning.statistics import STATISTICS
from raymerge.registries import Registry

PruneFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PruneMethodSpec:
    """One prune method (see the module docstring)."""

    name: str
    prune: PruneFn
    statistic: Optional[str] = None  # "norms" | "hessian" | None
    reads_original: bool = True  # False: only the checkpoint tensor's dtype is needed
    search_exponents: Optional[Callable[[Any], tuple[float, float]]] = None
    doc: str = ""

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None


REGISTRY: Registry[PruneMethodSpec] = Registry("prune method", PruningError)


def register(spec: PruneMethodSpec) -> PruneMethodSpec:
    if spec.statistic is not None and spec.statistic not in STATISTICS:
        raise ValueError(f"prune method {spec.name!r}: statistic must be one of {', '.join(STATISTICS)} or None")
    return REGISTRY.register(spec)


def get_prune_method(name: str) -> PruneMethodSpec:
    return REGISTRY.get(name)


def check_config_method(method: str, calibrated: bool, where: str) -> PruneMethodSpec:
    """The spec of a prune config's `method`; `ConfigError` naming `where` (the config file) when
    it is not registered, or when it scores weights with activations and the config gives no
    calibration text. Run by the jobs (prune, a prune search) on the loaded config: the config
    package itself knows no registry."""
    from raymerge.errors import ConfigError

    try:
        spec = get_prune_method(method)
    except PruningError as err:
        raise ConfigError(f"invalid prune config {where}: method: {err}") from None
    if spec.needs_calibration and not calibrated:
        raise ConfigError(f"invalid prune config {where}: calibration: required for method {method} "
                          "(it scores weights with activations)")
    return spec


def available_prune_methods() -> list[str]:
    return REGISTRY.names()


def scored_mask(scores: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]], name: str, *, per_row: bool) -> torch.Tensor:
    """The mask of the lowest `scores`: within N:M groups, each row (`per_row`) or the whole matrix."""
    if nm:
        return nm_mask(scores, *nm, name=name)
    return row_mask(scores, sparsity, name=name) if per_row else matrix_mask(scores, sparsity, name=name)


# -- built-ins ------------------------------------------------------------------------------------------
def _magnitude(weight, original, sparsity, stats, settings, name):
    mask = scored_mask(magnitude_scores(original, name=name), sparsity, settings.nm, name, per_row=False)
    return original.masked_fill(mask, 0), mask


def _wanda(weight, original, sparsity, stats, settings, name):
    scores = wanda_scores(weight, stats.sq_sum, weight_exponent=settings.weight_exponent,
                          norm_exponent=settings.norm_exponent, name=name)
    mask = scored_mask(scores, sparsity, settings.nm, name, per_row=True)
    return original.masked_fill(mask, 0), mask


def _sparsegpt(weight, original, sparsity, stats, settings, name):
    updated, mask = sparsegpt_prune(weight.float(), stats.hessian(), sparsity, pattern=settings.nm,
                                    blocksize=settings.blocksize, dampening=settings.dampening, name=name)
    return updated.to(original.dtype), mask


register(PruneMethodSpec(
    "magnitude", _magnitude, search_exponents=lambda cfg: (1.0, 0.0),
    doc="|W| compared over the whole matrix; needs no calibration text",
))
register(PruneMethodSpec(
    "wanda", _wanda, statistic="norms",
    search_exponents=lambda cfg: (cfg.wanda.weight_exponent, cfg.wanda.norm_exponent),
    doc="|W| x ||X_j|| compared within each output row (arXiv 2306.11695)",
))
register(PruneMethodSpec(
    "sparsegpt", _sparsegpt, statistic="hessian", reads_original=False,
    doc="OBS-style pruning with weight updates in 128-column blocks (arXiv 2301.00774)",
))
