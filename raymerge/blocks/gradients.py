"""Per-layer gradient sensitivities of a model, computed one pipeline stage at a time.

Sens-Merging (arXiv 2502.12420) weighs each decoder layer l of a fine-tuned model by

    S^l = mean_k  sum_{p in layer l}  sum_elements |p * dL(x_k)/dp|

where L(x_k) is the causal-LM loss of calibration window k (the mean next-token cross-entropy,
as transformers computes it for `labels=input_ids`). The absolute value is taken per window, so
windows are back-propagated one at a time.

The model is cut into blocks of consecutive layers (`DecoderBlock`s) that may live in different
processes; only hidden states and their gradients travel between them. This module owns what one
block does for the backward pass, with no Ray and no knowledge of the other blocks: a
`GradientStage` runs its block forward without autograd and remembers the block's input; later
it recomputes the block from that input with autograd on (so a stage holds one window's
activations only while recomputing it), back-propagates the gradient it is handed, adds
|p * grad| of every parameter of each of its layers to float64 per-layer sums, and returns the
gradient with respect to its input for the stage before it. Per window, a driver does

    h_0 = first.embed(ids)                       # hidden states entering layer 0
    h_k = stage_k.forward(h_{k-1})               # every stage but the last
    g = last.loss_backward(h_{K-2}, ids)         # the last stage: loss, backward
    g = stage_k.backward(g)                      # stages K-2 .. 0, in that order

(a single-block model calls `loss_backward(stage.embed(ids), ids)` only). Parameters require
gradients only during a backward pass, and their gradients are dropped after it, so nothing
carries over between windows. Embeddings, the final norm and the head get no gradients: only
the decoder layers' parameters count.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Hashable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from raymerge.methods import reductions
from raymerge.blocks.decoder import DecoderBlock


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `input_ids` [batch, seqlen] under `logits` [batch,
    seqlen, vocab] (in float32 at least), as transformers' `labels=input_ids` loss."""
    predicted = logits[:, :-1, :]
    if predicted.dtype not in (torch.float32, torch.float64):
        predicted = predicted.float()
    targets = input_ids[:, 1:].to(logits.device)
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1))


class GradientStage:
    """Backward passes through one DecoderBlock, accumulating per-layer |θ ⊙ ∇θ L| sums."""

    def __init__(self, block: DecoderBlock) -> None:
        self.block = block
        self.layers = range(block.first, block.last + 1)
        self._params: dict[int, list[nn.Parameter]] = {i: _unique(block.layer(i).parameters()) for i in self.layers}
        self._sums: dict[int, float] = {i: 0.0 for i in self.layers}
        self.windows = 0
        self._inputs: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()
        self._next_key = 0

    # -- forward ------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer 0 (first stage only)."""
        return self.block.embed(input_ids)

    def forward(self, hidden: torch.Tensor, key: Optional[Hashable] = None) -> torch.Tensor:
        """Run the block without autograd and remember its input for `backward`. Inputs are
        taken back first in, first out, or by `key` where one is given."""
        if key is None:
            key = ("fifo", self._next_key)
            self._next_key += 1
        if key in self._inputs:
            raise KeyError(f"a window with key {key!r} is already waiting for its backward pass")
        self._inputs[key] = hidden
        return self.block.forward(hidden)

    @property
    def pending(self) -> int:
        """Windows run forward whose backward pass has not come yet."""
        return len(self._inputs)

    # -- backward -----------------------------------------------------------------------------
    def loss_backward(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Last stage: from the hidden states entering this block's first layer, recompute the
        layers, final norm and head with autograd, take the causal-LM loss of `input_ids` and
        back-propagate it. Returns the gradient with respect to `hidden`, and the loss."""
        if not self.block.has_head:
            raise RuntimeError("loss_backward needs the last block (built with head=True)")
        with self._recording() as params:
            x = hidden.detach().to(self.block.device).requires_grad_(True)
            logits = self.block.logits(self.block.forward(x, grad=True), grad=True)
            with torch.enable_grad():
                loss = causal_lm_loss(logits, input_ids)
            grad_in = _backward(loss, None, x, params)
            self._accumulate()
        return grad_in, float(loss.detach())

    def backward(self, grad_out: torch.Tensor, key: Optional[Hashable] = None) -> torch.Tensor:
        """Middle or first stage: recompute the block with autograd from the input remembered by
        `forward` (the oldest, or the one stored under `key`), back-propagate `grad_out` (the
        gradient with respect to the block's output) and return the gradient with respect to the
        block's input."""
        if not self._inputs:
            raise RuntimeError("backward without a forward: no remembered input")
        hidden = self._inputs.pop(key) if key is not None else self._inputs.popitem(last=False)[1]
        with self._recording() as params:
            x = hidden.detach().to(self.block.device).requires_grad_(True)
            out = self.block.forward(x, grad=True)
            grad_in = _backward(out, grad_out.to(device=out.device, dtype=out.dtype), x, params)
            self._accumulate()
        return grad_in

    # -- results ------------------------------------------------------------------------------
    def sensitivities(self) -> dict[int, float]:
        """Layer index -> sum over its parameters of |p * grad|, averaged over the windows."""
        n = max(self.windows, 1)
        return {i: s / n for i, s in self._sums.items()}

    def totals(self) -> tuple[dict[int, float], int]:
        """The float64 per-layer sums and the number of windows (to combine across replicas)."""
        return dict(self._sums), self.windows

    def reset(self) -> None:
        """Forget the sums and any remembered inputs."""
        self._sums = {i: 0.0 for i in self.layers}
        self.windows = 0
        self._inputs.clear()

    # -- internals ----------------------------------------------------------------------------
    @contextmanager
    def _recording(self) -> Iterator[list[nn.Parameter]]:
        """The layers' parameters require gradients inside; afterwards they do not, and their
        gradients are dropped (also when the backward fails)."""
        params = [p for i in self.layers for p in self._params[i]]
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        try:
            yield params
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    def _accumulate(self) -> None:
        for i in self.layers:
            total = torch.zeros((), dtype=torch.float64)
            for p in self._params[i]:
                if p.grad is not None:
                    total += _abs_product_sum(p.detach(), p.grad).cpu()
            self._sums[i] += float(total)
        self.windows += 1


def _backward(
    output: torch.Tensor, grad_output: Optional[torch.Tensor], inputs: torch.Tensor, params: list[nn.Parameter]
) -> torch.Tensor:
    """Back-propagate `output` (weighted by `grad_output`) into the parameters' `.grad` and
    return the gradient with respect to `inputs`."""
    with torch.enable_grad():
        torch.autograd.backward(output, grad_output, inputs=[inputs, *params])
    assert inputs.grad is not None
    return inputs.grad


def _abs_product_sum(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum |p * g| in float64 (the product in float32 at least)."""
    if p.dtype not in (torch.float32, torch.float64):
        p, g = p.float(), g.float()
    return reductions.total(torch.abs(p * g), dtype=torch.float64)


def _unique(params: Iterator[nn.Parameter]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


__all__ = ["GradientStage", "causal_lm_loss"]
