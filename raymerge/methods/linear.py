"""Linear (model soup) and passthrough: weighted averages and plain copies."""

from __future__ import annotations

import torch


# Elements accumulated at once. Each chunk costs a handful of torch calls per input, and each
# call holds the GIL while it dispatches: with 64K-element chunks two merge threads spent much of
# their time waiting for each other (2 threads, 4 bf16 inputs of 16M elements: 2.6-2.8 GB/s of
# input; 256K-element chunks: 4.1 GB/s; 1M: 2.9 GB/s, the 4 MB float32 accumulator no longer
# stays in a core's cache). Results do not depend on it (every step is per element).
CHUNK = 1 << 18


def linear(inputs, *, base_index, model_params, params, generator):
    """sum_i w_i * x_i, divided by sum_i w_i when `normalize`; computed in float32 (float64 for
    float64 inputs) and returned in the input dtype, as mergekit does."""
    first = inputs[0]
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = [float(mp["weight"]) for mp in model_params]
    total = sum(weights)
    if params["normalize"] and abs(total) < 1e-12:
        raise ValueError(f"weights {weights} sum to zero; set normalize: false or change a weight")
    divisor = torch.tensor(weights, dtype=work).sum() if params["normalize"] else None
    flat = [t.reshape(-1) for t in inputs]
    out = torch.empty_like(flat[0])
    acc = torch.empty(min(CHUNK, out.numel()), dtype=work, device=first.device)
    for a in range(0, out.numel(), CHUNK):
        b = min(a + CHUNK, out.numel())
        part = acc[: b - a].zero_()
        for tensor, weight in zip(flat, weights):
            part.add_(tensor[a:b], alpha=weight)
        if divisor is not None:
            part.div_(divisor)
        out[a:b] = part
    return out.reshape(first.shape)


def passthrough(inputs, *, base_index, model_params, params, generator):
    """Copy the single input, optionally multiplied by `scale`."""
    scale = model_params[0].get("scale")
    return inputs[0] if scale is None else inputs[0] * scale
