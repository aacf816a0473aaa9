"""1bit-Merging (Liu et al., arXiv 2502.10743): task vectors compressed to one bit per element.

Each fine-tune's task vector of a weight matrix becomes sign(delta) * scale, one scale per
tensor (module), except in the modules where that model keeps its full task vector; the
compressed (or kept) task vectors are then merged by task arithmetic. Also here: the storage
size of a compressed task vector, and packing one into bytes and back.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from raymerge.methods import reductions
from raymerge.methods.lowrank import compute_dtype


def onebit_scale(delta: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale mean(|delta|), accumulated in float32 (float64 for float64), as a
    0-d tensor in delta's dtype."""
    return reductions.mean(delta.abs().to(compute_dtype(delta))).to(delta.dtype)


def onebit_signs(delta: torch.Tensor) -> torch.Tensor:
    """+1 where delta >= 0, -1 elsewhere, in delta's dtype. A one-bit code has no zero, so a
    zero delta element maps to +1 (as the packed form stores it)."""
    return torch.where(delta >= 0, 1.0, -1.0).to(delta.dtype)


def onebit_compress(delta: torch.Tensor) -> torch.Tensor:
    """sign(delta) * mean(|delta|), with sign(0) = +1 (see `onebit_signs`)."""
    return onebit_signs(delta) * onebit_scale(delta)


def is_compressible(t: torch.Tensor) -> bool:
    """Tensors the method compresses: weight matrices (2 or more dimensions). Norm weights and
    biases (1-D) keep their full task vectors."""
    return t.dim() >= 2


def onebit(inputs, *, base_index, model_params, params, generator):
    """1bit-Merging: theta = base + lambda * sum_i w_i * c_i, where c_i is model i's task vector
    delta_i = theta_i - base compressed to sign(delta_i) * mean(|delta_i|) (one scale per
    tensor), or delta_i itself where the model keeps its full task vector; divided by sum_i w_i
    with `normalize`.

    Parameters:
    - `weight` (per model, required): scale of this model's (compressed) task vector.
    - `keep_full` (per model, default false): keep this model's full task vector for this
      tensor instead of compressing it. Resolved per tensor, so a filter list picks modules.
      The paper finds chat models' knowledge mainly in the attention layers and math/code
      models' mainly in the MLP layers, so a paper-style setup keeps those modules full::

          - model: chat-model
            parameters: {weight: 1.0, keep_full: [{filter: self_attn, value: true}, {value: false}]}
          - model: math-model
            parameters: {weight: 1.0, keep_full: [{filter: mlp, value: true}, {value: false}]}

    - `lambda` (global, default 1.0): scale of the merged task vector.
    - `normalize` (global, default false): divide by the sum of the weights.

    Choices where the paper leaves room:
    - the scale is mean(|delta|) per tensor (BitDelta's initial scale, which minimises the
      L2 error of a sign code); the paper's exact scale is not verifiable from its abstract;
    - which modules a task type keeps full is the user's choice (`keep_full`); default: none
      (every weight matrix compressed), since the method cannot know a model's task type;
    - sign(0) = +1: a one-bit code has no zero, and the merged weights equal what a stored
      one-bit vector (see `pack_onebit`) reproduces;
    - 1-D tensors (norms, biases) always keep full task vectors (as BitDelta does); matrices,
      embeddings and lm_head included, are compressed unless `keep_full`;
    - the paper's router (choosing one task's vector per input at inference) is out of scope:
      this produces the static merge of the compressed task vectors.
    - writing the compressed task vectors themselves is not wired into the merge (a method
      returns one tensor per output); `pack_onebit` / `unpack_onebit` are the pure building
      blocks and `onebit_storage_bits` reports their size.

    Deterministic, elementwise-cheap (two passes per model plus the sum).
    """
    base = inputs[base_index]
    others = [i for i in range(len(inputs)) if i != base_index]
    if not others:
        return base
    acc = compute_dtype(base)
    merged = torch.zeros(base.shape, dtype=acc, device=base.device)
    total = 0.0
    for i in others:
        w = float(model_params[i]["weight"])
        delta = inputs[i] - base
        if is_compressible(base) and not model_params[i].get("keep_full", False):
            # = onebit_compress(delta) * w, without materialising the compressed vector
            scale = float(onebit_scale(delta))
            merged.add_(onebit_signs(delta).to(acc), alpha=w * scale)
        else:
            merged.add_(delta.to(acc), alpha=w)
        total += w
    if params["normalize"]:
        if abs(total) < 1e-12:
            raise ValueError("weights sum to zero; set normalize: false or change a weight")
        merged /= total
    return (base.to(acc) + params["lambda"] * merged).to(base.dtype)


def onebit_storage_bits(shape: Iterable[int], keep_full: bool = False, value_bits: int = 16, scale_bits: int = 16) -> int:
    """Bits to store one model's task vector of a tensor of `shape` as 1bit-Merging does: one
    bit per element plus one `scale_bits` scale for a compressed weight matrix; `value_bits`
    per element for a tensor kept full (`keep_full`, or 1-D / 0-D tensors)."""
    shape = tuple(shape)
    n = math.prod(shape)
    if keep_full or len(shape) < 2:
        return n * value_bits
    return n + scale_bits


def onebit_total_storage_bits(tensors: Iterable[tuple[Iterable[int], bool]], value_bits: int = 16, scale_bits: int = 16) -> int:
    """`onebit_storage_bits` summed over (shape, keep_full) pairs, e.g. one model's tensors."""
    return sum(onebit_storage_bits(shape, keep, value_bits, scale_bits) for shape, keep in tensors)


def pack_onebit(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits, scale): the signs of `delta` packed 8 per uint8 (bit j of byte b is element
    8 b + j of the flattened delta, 1 for delta >= 0) and its scale mean(|delta|) as a 0-d
    tensor in delta's dtype; `unpack_onebit(bits, scale, delta.shape, delta.dtype)` returns
    `onebit_compress(delta)` exactly."""
    flat = (delta.reshape(-1) >= 0).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.uint8)])
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    bits = (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    return bits, onebit_scale(delta).cpu()


def unpack_onebit(bits: torch.Tensor, scale: torch.Tensor, shape: Iterable[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The compressed task vector sign * scale of `shape` from `pack_onebit`'s output."""
    shape = tuple(shape)
    n = math.prod(shape)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    signs = ((bits.reshape(-1, 1) & weights) != 0).reshape(-1)[:n]
    scale = scale.to(dtype)
    return torch.where(signs, 1.0, -1.0).to(dtype).mul(scale).reshape(shape)
