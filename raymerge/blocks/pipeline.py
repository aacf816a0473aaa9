"""Micro-batches through a pipeline of decoder blocks held by several actors.

A prune, a search's resident pipelines and a guided merge's statistics pass all cut a model's
decoder layers into contiguous blocks (`even_stages`, or the planner's pipeline problem for a
prune), one per stage actor, and push calibration or evaluation windows through them in
micro-batches: the first stage embeds, each stage runs its layers and hands the hidden states
on, the last stage computes the loss, logits or features. `Pipeline` is that flow, written once
against the stages' typed calls (`runtime.pool_actor.ActorRef`): each call returns a handle (a
Ray object reference, or the value itself in process), handles are passed straight on to the
next stage (Ray moves the tensors between actors; the driver never holds activations), and the
driver's `get` waits for them (`map`: one call per micro-batch, with a progress bar on Ray and in
process alike). No Ray here: the driver object supplies `get` and `map`.

Overlap. A stage actor runs its calls one at a time in the order the driver submitted them, so
a chain of handles submitted without waiting is a pipeline: stage k runs micro-batch b while
stage k+1 runs b-1. The same holds across passes: a pass called with `wait=False` returns its
handles instead of waiting for them, so the next pass is queued behind it on every stage, and
stage k starts pruning its block (or the next pass's first micro-batches) while stage k+1 still
works through the previous pass's last micro-batches. A driver waits once, for everything it
queued (`runtime.prune`); only a value the driver itself needs (OWL's outlier ratios) is a
barrier. The order of the calls on each stage is the same whether the driver waits between
passes or not, so the results are too.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch


class Pipeline:
    """Micro-batches through a driver's stages (module docstring). `driver` turns handles into
    values (`get(handles, desc, quiet)`, `map(call, items, desc, quiet)`: a
    `runtime.actor_pool.ActorPool`)."""

    def __init__(self, driver: Any, stages: list[Any], batch_size: int, quiet: bool) -> None:
        self.d, self.stages, self.batch_size, self.quiet = driver, stages, batch_size, quiet

    def batches(self, windows: torch.Tensor) -> list[torch.Tensor]:
        return list(windows.split(self.batch_size))

    def forward(self, ids: torch.Tensor, collect: Sequence[str] = (), emit: bool = True) -> Any:
        """Embed a micro-batch and push it through every stage; the handle of the hidden states
        leaving the last layer (`emit=False`: the last stage keeps them, a statistics-only pass)."""
        h = self.stages[0].embed(ids)
        last = len(self.stages) - 1
        for k, s in enumerate(self.stages):
            h = s.forward(h, tuple(collect), emit or k < last)
        return h

    def dense_pass(self, windows: torch.Tensor, collect: Sequence[str] = (), desc: str = "dense pass",
                   wait: bool = True) -> Optional[list[Any]]:
        """Push windows through all stages, collecting statistics; keep no outputs. `wait=False`:
        the handles, not waited for (module docstring: overlap)."""
        handles = [self.forward(ids, collect, emit=False) for ids in self.batches(windows)]
        return self._finish(handles, desc, wait)

    def nll_parts(self, windows: torch.Tensor) -> list[Any]:
        """Handles of each micro-batch's (summed NLL, tokens) on the last stage (not waited for)."""
        return [self.stages[-1].loss(self.forward(ids), ids) for ids in self.batches(windows)]

    @staticmethod
    def nll_total(parts: Sequence[tuple[float, int]]) -> tuple[float, int]:
        """Summed NLL and tokens of `nll_parts`' values (added in micro-batch order)."""
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def nll(self, windows: torch.Tensor, desc: str) -> tuple[float, int]:
        return self.nll_total(self.d.get(self.nll_parts(windows), desc, self.quiet))

    def features(self, windows: torch.Tensor) -> torch.Tensor:
        last = self.stages[-1]
        return torch.cat(self.d.map(lambda ids: last.features(self.forward(ids)), self.batches(windows),
                                    "curation features", self.quiet))

    def keep_reference(self, windows: torch.Tensor, first_key: int = 0, desc: Optional[str] = None) -> None:
        """Have the last stage keep the logits of each micro-batch under keys first_key, +1, ...
        (a progress bar `desc` unless quiet)."""
        last = self.stages[-1]
        self.d.map(lambda item: last.keep_reference(self.forward(item[1]), first_key + item[0]),
                   list(enumerate(self.batches(windows))), desc, self.quiet)

    def prune_sequential(self, windows: torch.Tensor, sparsities: list[list[dict[int, float]]],
                         wait: bool = True) -> Optional[list[Any]]:
        """The papers' order: each stage prunes its layers over all stored micro-batches, then
        hands its pruned outputs on (stage k+1 starts when stage k is done; it may still be
        finishing an earlier pass meanwhile). `wait=False`: the handles, not waited for."""
        for ids in self.batches(windows):
            self.stages[0].store(self.stages[0].embed(ids))
        prev = None
        handles = []
        last = len(self.stages) - 1
        for k, s in enumerate(self.stages):
            if prev is not None:
                s.store_all(prev)
            prev = s.prune_sequential(sparsities[k], k < last)
            handles.append(prev)
        return self._finish(handles, "pruning stages", wait)

    def prune_collected(self, sparsities: list[dict[int, float]], wait: bool = True) -> Optional[list[Any]]:
        """Every stage prunes its block from the statistics it collected, all at once (each right
        after its own part of the calibration pass). `wait=False`: the handles, not waited for."""
        handles = [s.prune_collected(sp) for s, sp in zip(self.stages, sparsities)]
        return self._finish(handles, "pruning stages", wait)

    def _finish(self, handles: list[Any], desc: str, wait: bool) -> Optional[list[Any]]:
        if not wait:
            return handles
        self.d.get(handles, desc, self.quiet)
        return None


def even_stages(num_layers: int, n: int) -> list[tuple[int, int]]:
    """(first, last) layer of each of min(n, num_layers) contiguous blocks of near-equal size."""
    n = max(1, min(n, num_layers))
    return [(k * num_layers // n, (k + 1) * num_layers // n - 1) for k in range(n)]
