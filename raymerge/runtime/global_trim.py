"""Whole-model magnitude trimming for TIES (`trim_scope: model`), as in the TIES paper.

mergekit trims each tensor's task vector to its own top `density`; the paper keeps the top
`density` of each model's *whole* task vector, so layers with larger updates keep more. That
needs one magnitude threshold per model, over every tensor, before any tensor is merged:

1. every worker histograms |x_m - base| of its tensors by the top 16 bits of the float32 bit
   pattern (for non-negative floats the bit pattern orders like the value);
2. the driver finds the bin holding the k-th largest magnitude (k = int(density * elements));
3. a second pass histograms the low 16 bits inside that bin, which pins the k-th largest
   float32 magnitude exactly.

Elements with |delta| >= threshold are kept (all elements tied with the k-th largest are kept).
Each pass reads the inputs once more, so `trim_scope: model` costs two extra reads of the models.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from raymerge.checkpoints import CheckpointSource
from raymerge.config import ConfigError
from raymerge.methods import get_method
from raymerge.runtime.operators import MergeOperator, resolve_work_dtype

HIGH_BINS = 1 << 15  # sign bit is 0 for magnitudes
LOW_BINS = 1 << 16
BATCH_BYTES = 256 * 1024 * 1024


def uses_model_trim(ops: Sequence[MergeOperator]) -> bool:
    return any(op.params.get("trim_scope") == "model" for op in ops)


def _trim_key(op: MergeOperator) -> str:
    """The per-model parameter through which `op`'s method takes its model's threshold (the
    method spec's `model_trim_key`)."""
    key = get_method(op.method).model_trim_key
    if key is None:
        raise ConfigError(f"merge_method {op.method} has no whole-model trim (trim_scope: model), tensor {op.name}")
    return key


def model_densities(ops: Sequence[MergeOperator], model_names: Sequence[str], label: str) -> dict[int, float]:
    """The single density of each non-base model; an error if one varies across tensors."""
    seen: dict[int, set[float]] = {}
    for op in ops:
        if op.params.get("trim_scope") != "model":
            continue
        for k, inp in enumerate(op.inputs):
            if k != op.base_index:
                seen.setdefault(inp.model, set()).add(float(op.model_params[k]["density"]))
    out = {}
    for m, values in seen.items():
        if len(values) > 1:
            raise ConfigError(
                f"{label}: trim_scope: model keeps one fraction of each model's whole task vector, but "
                f"{model_names[m]} has several densities ({', '.join(map(str, sorted(values)))}); use one value"
            )
        out[m] = values.pop()
    return out


def magnitude_bits(op: MergeOperator, k: int, sources: Mapping[int, CheckpointSource]) -> Optional[torch.Tensor]:
    """|x_k - base| of one operator's input k as int32 float32 bit patterns (None: not floating)."""
    if op.vocab is not None:  # an embedding under a tokenizer choice: the rows the merge sees
        from raymerge.checkpoints.safetensors_format import torch_dtype
        from raymerge.runtime.vocabulary import gather_inputs

        gathered = gather_inputs(op, sources, torch_dtype(op.work_dtype))
        base, x = gathered[op.base_index], gathered[k]
    else:
        base = sources[op.inputs[op.base_index].model].read(op.inputs[op.base_index].name)
        x = sources[op.inputs[k].model].read(op.inputs[k].name)
    if not (base.is_floating_point() and x.is_floating_point()):
        return None
    work = resolve_work_dtype(op.work_dtype, [base.dtype, x.dtype])  # the workers' rule (compile resolved it)
    delta = (x.to(work) - base.to(work)).abs().float().reshape(-1)
    return delta.view(torch.int32)


def histogram_batch(
    ops: Sequence[MergeOperator],
    sources_for: Callable[[MergeOperator], Mapping[int, CheckpointSource]],
    high_bins: Optional[dict[int, int]] = None,
) -> dict[int, torch.Tensor]:
    """Per model, counts of magnitudes by high 16 bits, or (with `high_bins`) by low 16 bits
    among the magnitudes whose high bits equal that model's chosen bin. `sources_for(op)` gives
    the open sources by model number (the worker's own, opened once per job)."""
    counts: dict[int, torch.Tensor] = {}
    for op in ops:
        sources = sources_for(op)
        for k, inp in enumerate(op.inputs):
            if k == op.base_index or (high_bins is not None and inp.model not in high_bins):
                continue
            bits = magnitude_bits(op, k, sources)
            if bits is None:
                continue
            if high_bins is None:
                c = torch.bincount(bits >> 16, minlength=HIGH_BINS)
            else:
                low = bits[(bits >> 16) == high_bins[inp.model]] & 0xFFFF
                c = torch.bincount(low, minlength=LOW_BINS)
            counts[inp.model] = counts[inp.model] + c if inp.model in counts else c
    return counts


def _bin_of_kth_largest(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest, how many of the k lie in that bin)."""
    from_top = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor(k)).item())
    above = int(from_top[j - 1]) if j > 0 else 0
    return counts.numel() - 1 - j, k - above


def _run_batches(ops: Sequence[MergeOperator], pool: Any, high_bins: Optional[dict[int, int]]) -> dict[int, torch.Tensor]:
    """Histogram batches spread round-robin over the merge's pool (`runtime.actor_pool.ActorPool`,
    its actors already begun; in process, one after another in this process)."""
    batches: list[list[MergeOperator]] = [[]]
    size = 0
    for op in ops:
        if batches[-1] and size + op.bytes_in > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(op)
        size += op.bytes_in
    totals: dict[int, torch.Tensor] = {}
    work = [b for b in batches if b]
    workers = pool.workers
    parts = pool.get([workers[i % len(workers)].histogram(b, high_bins) for i, b in enumerate(work)])
    for part in parts:
        for m, c in part.items():
            totals[m] = totals[m] + c if m in totals else c
    return totals


def apply_model_trim(
    ops: list[MergeOperator], pool: Any, model_names: Sequence[str], label: str
) -> tuple[list[MergeOperator], dict[int, float]]:
    """Find each model's whole-model threshold on the merge worker actors (their job begun with
    this merge's sources); return operators carrying it."""
    densities = model_densities(ops, model_names, label)
    trimmed = [op for op in ops if op.params.get("trim_scope") == "model"]
    high = _run_batches(trimmed, pool, None)
    thresholds: dict[int, float] = {}
    wanted: dict[int, int] = {}
    chosen: dict[int, int] = {}
    for m, density in densities.items():
        total = int(high[m].sum()) if m in high else 0
        if density >= 1 or total == 0:
            thresholds[m] = 0.0
        elif density <= 0:
            thresholds[m] = math.inf
        else:
            k = max(1, int(density * total))
            chosen[m], wanted[m] = _bin_of_kth_largest(high[m], k)
    if chosen:
        low = _run_batches(trimmed, pool, chosen)
        for m, hb in chosen.items():
            lb, _ = _bin_of_kth_largest(low[m], wanted[m])
            thresholds[m] = struct.unpack("<f", struct.pack("<i", (hb << 16) | lb))[0]
    out = []
    for op in ops:
        if op.params.get("trim_scope") != "model":
            out.append(op)
            continue
        mps = tuple(
            mp if k == op.base_index else {**mp, _trim_key(op): thresholds[op.inputs[k].model]}
            for k, mp in enumerate(op.model_params)
        )
        out.append(dataclasses.replace(op, model_params=mps))
    return out, thresholds
