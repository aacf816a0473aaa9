"""A guidance stage worker: one block of decoder layers that gathers a guided merge's statistics.

It is a search stage worker (same loading, embedding, forward, reference-logit code) that can
also attach the collectors of `raymerge.pruning.activations` (AIM's input statistics, ACM's
activation mutual information) and run Sens-Merging's backward passes
(`raymerge.pruning.gradients`). `reload` swaps the block for the same layers of another model,
keeping what was recorded, so one set of workers visits the base and every fine-tune in turn.
The driver side is `raymerge.runtime.guidance`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from raymerge.checkpoints import SourceSpec
from raymerge.pruning.activations import InputAbsMean, OutputRecorder, layer_keys
from raymerge.runtime.search_worker import SearchWorkerImpl


class GuidanceWorkerImpl(SearchWorkerImpl):
    """See the module docstring."""

    def __init__(self, worker_id: int, threads: Optional[int] = None) -> None:
        super().__init__(worker_id, threads)
        self._aim: Optional[InputAbsMean] = None
        self._acm: Optional[OutputRecorder] = None
        self._recorded: dict[int, list[torch.Tensor]] = {}
        self._grads: Any = None
        self._load_args: tuple = ()

    def load(self, config, spec, first, last, settings, embed, head, staging, layout) -> int:  # type: ignore[override]
        self._load_args = (config, first, last, settings, embed, head)
        return super().load(config, spec, first, last, settings, embed, head, staging, layout)

    def reload(self, spec: SourceSpec) -> int:
        """The same layers, from another model's checkpoint (collectors are detached)."""
        self._detach()
        config, first, last, settings, embed, head = self._load_args
        self.close()
        return super().load(config, spec, first, last, settings, embed, head, None, None)

    def _detach(self) -> None:
        for c in (self._aim, self._acm):
            if c is not None:
                c.remove()
        if self._acm is not None:
            self._recorded = self._acm.recorded
        self._aim = self._acm = None
        self._grads = None

    def head(self, hidden: torch.Tensor) -> None:
        """Run the final norm and head on the last stage (so their collectors see inputs)."""
        for h in hidden.split(1):
            self._stage().block.logits(h.to(self.device))

    # -- AIM ---------------------------------------------------------------------------------
    def aim_begin(self) -> None:
        self._detach()
        self._aim = InputAbsMean(self._stage().block)

    def aim_end(self) -> dict[str, torch.Tensor]:
        """Per weighted module: the sum over windows of the per-channel mean |input|."""
        assert self._aim is not None, "aim_begin() first"
        sums = self._aim.sums
        self._detach()
        return sums

    # -- ACM ---------------------------------------------------------------------------------
    def acm_begin(self, mode: str) -> None:
        """Attach the recorder: `record` (the base) or `compare` (a fine-tune, against the base)."""
        self._detach()
        self._acm = OutputRecorder(self._stage().block)
        if mode == "record":
            self._recorded = {}
        self._acm.recorded = self._recorded
        self._acm.start(mode)

    def acm_end(self) -> dict[int, float]:
        """Mean normalised mutual information per layer key (compare mode)."""
        assert self._acm is not None, "acm_begin() first"
        out = self._acm.mean_nmi()
        self._detach()
        return out

    def layer_keys(self) -> dict[str, Optional[int]]:
        return layer_keys(self._stage().block)

    # -- Sens-Merging ------------------------------------------------------------------------
    def _gradient_stage(self):
        from raymerge.pruning.gradients import GradientStage

        if self._grads is None:
            self._grads = GradientStage(self._stage().block)
        return self._grads

    def grad_begin(self) -> None:
        self._detach()
        self._gradient_stage()

    def grad_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._timed(self._gradient_stage().forward, hidden.to(self.device)).cpu()

    def grad_loss_backward(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        grad, _ = self._timed(self._gradient_stage().loss_backward, hidden.to(self.device), input_ids.to(self.device))
        return grad.cpu()

    def grad_backward(self, grad: torch.Tensor) -> torch.Tensor:
        return self._timed(self._gradient_stage().backward, grad.to(self.device)).cpu()

    def grad_end(self) -> dict[int, float]:
        """Per decoder layer: mean over windows of Σ|θ ⊙ ∇θ L|."""
        out = self._gradient_stage().sensitivities()
        self._grads = None
        return out

    def logit_distance(self, hidden: torch.Tensor, key: int) -> tuple[float, int]:
        """Sum over tokens of the L2 distance between these logits and the kept reference's."""
        total = sum((float(e.norm(dim=-1).sum()) for e in self._logit_errors(hidden, key)), 0.0)
        ref = self._reference[key]
        return total, ref.shape[0] * ref.shape[1]

    def drop_references(self) -> None:
        self._reference.clear()
