"""A resident search worker: one block of decoder layers that re-merges or re-masks itself per trial.

It is a prune stage worker (same loading, embedding, forward and loss code) that also keeps,
for its own layers only, what trials vary:

- merge searches: every input model's tensors that its layers' operators read, in memory
  (`MemorySource`s); `apply_merge(operators)` recomputes those operators with the merge's own
  code (`compute_operator`) and puts the results into the block's parameters, cast through the
  merge's output dtype, so the model evaluated is exactly the model a merge would write;
- prune searches: the dense weights of the pruned modules and their input statistics from one
  dense calibration pass; `apply_prune` re-masks them with per-layer sparsities and the metric
  |W|^a * ||X||^b (a = b = 1: Wanda, b = 0: magnitude; OptiShear searches a and b).

Reconstruction objectives keep the reference model's logits per evaluation batch on the last
stage (`keep_reference`) and return the squared error against them (`reconstruction`).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from raymerge.checkpoints import SourceSpec
from raymerge.checkpoints.memory import MemorySource
from raymerge.checkpoints.safetensors_format import DTYPES as CODE_DTYPES
from raymerge.pruning.masks import row_mask
from raymerge.pruning.scores import wanda_scores
from raymerge.runtime.compute import compute_operator
from raymerge.runtime.operators import MergeOperator
from raymerge.runtime.prune_worker import PruneWorkerImpl


class SearchWorkerImpl(PruneWorkerImpl):
    """A stage that stays resident across trials (see the module docstring)."""

    def __init__(self, worker_id: int, threads: Optional[int] = None) -> None:
        super().__init__(worker_id, threads)
        self._inputs: list[MemorySource] = []
        self._dense: dict[str, torch.Tensor] = {}
        self._reference: dict[int, torch.Tensor] = {}

    # -- merge searches ---------------------------------------------------------------------
    def hold_inputs(self, specs: Sequence[SourceSpec], needed: Sequence[Sequence[str]]) -> int:
        """Read, once, the tensors of each input model this stage's operators need; return bytes."""
        total = 0
        self._inputs = []
        for spec, names in zip(specs, needed):
            src = spec.open()
            try:
                infos = src.tensors()
                tensors = {n: src.read(n) for n in names}
            finally:
                src.close()
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            self._inputs.append(MemorySource(f"{spec.path} (held by search worker {self.worker_id})", tensors, infos))
        return total

    def held_parameters(self) -> list[str]:
        """Names of the parameters this stage holds (tied names included)."""
        return sorted(self._stage().block.held_parameters())

    def apply_merge(self, operators: Sequence[MergeOperator]) -> int:
        """Recompute `operators` into this stage's parameters; return how many were applied."""
        params = self._stage().block.held_parameters()
        for op in operators:
            target = params.get(op.name)
            if target is None:
                raise RuntimeError(f"search worker {self.worker_id}: {op.name} is not a parameter of its block")
            merged = compute_operator(op, self._inputs, self.device)
            with torch.no_grad():
                target.copy_(merged.to(CODE_DTYPES[op.out_dtype]).to(target.dtype))
        return len(operators)

    # -- prune searches ---------------------------------------------------------------------
    def keep_dense(self) -> None:
        """Remember the pruned modules' dense weights (trials re-mask from them)."""
        stage = self._stage()
        for i in stage.layers:
            for name in stage.settings.modules:
                self._dense[f"{i}.{name}"] = stage.block.linear(i, name).weight.detach().clone()

    def apply_prune(self, sparsities: dict[int, float], weight_exponent: float = 1.0, norm_exponent: float = 1.0) -> float:  # noqa: E501
        """Re-mask every pruned module; return the fraction of zeros over them."""
        stage = self._stage()
        zeros = total = 0
        for i in stage.layers:
            stats = stage._collector(i, "norms").stats
            for name in stage.settings.modules:
                dense = self._dense[f"{i}.{name}"]
                scores = wanda_scores(dense, stats[name].sq_sum, weight_exponent=weight_exponent,
                                      norm_exponent=norm_exponent, name=name)
                mask = row_mask(scores, sparsities[i], name=name)
                with torch.no_grad():
                    stage.block.linear(i, name).weight.copy_(dense.masked_fill(mask, 0))
                zeros += int(mask.sum())
                total += mask.numel()
        return zeros / total if total else 0.0

    def outlier_ratios(self, m: float) -> dict[int, float]:
        """OWL's outlier ratios from the dense weights (the block's own are a trial's pruned ones)."""
        return self._stage().outlier_ratios(m, lambda i, n: self._dense[f"{i}.{n}"])

    # -- reconstruction objective -----------------------------------------------------------
    def keep_reference(self, hidden: torch.Tensor, key: int) -> None:
        """Keep the reference logits of an evaluation batch (in host memory, bf16 would lose digits)."""
        self._reference[key] = torch.cat([self._stage().block.logits(h.to(self.device)).float().cpu() for h in hidden.split(1)])

    def _logit_errors(self, hidden: torch.Tensor, key: int) -> Iterator[torch.Tensor]:
        """Per window (one window's logits at a time): float64 logits minus the kept reference's."""
        ref = self._reference[key]
        for j, h in enumerate(hidden.split(1)):
            logits = self._stage().block.logits(h.to(self.device)).float()
            yield (logits - ref[j : j + 1].to(logits.device)).double()

    def reconstruction(self, hidden: torch.Tensor, key: int) -> tuple[float, int]:
        """Summed squared error of the logits against the reference's, and the element count."""
        total = sum((float(e.square().sum()) for e in self._logit_errors(hidden, key)), 0.0)
        return total, self._reference[key].numel()

    def state_dict(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The held parameters among `names` as they are now (a trial's weights), on CPU."""
        held = self._stage().block.held_parameters()
        return {n: held[n].detach().cpu().clone() for n in names if n in held}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._stage().block.logits(hidden.to(self.device)).float().cpu()
