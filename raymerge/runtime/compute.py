"""Computing one operator: read its inputs, run the merge method, cast the result.

Pure torch plus checkpoint reads — no Ray — so a worker actor, a single-process run and the
tests all go through exactly the same code.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from raymerge.checkpoints import CheckpointSource
from raymerge.checkpoints.safetensors_format import torch_dtype
from raymerge.errors import RaymergeError
from raymerge.methods import get_method
from raymerge.methods.guided import relax_columns, scale_deltas
from raymerge.runtime.operators import MergeOperator, resolve_work_dtype


class OperatorError(RaymergeError, RuntimeError):
    """A merge method failed on one tensor; the message names the tensor."""


def compute_operator(
    op: MergeOperator,
    sources: Sequence[CheckpointSource],
    device: torch.device | str = "cpu",
    rows: Optional[tuple[int, int]] = None,
) -> torch.Tensor:
    """The merged output tensor of `op` (or its rows [start, stop) for a part of a row-split
    operator, which only elementwise methods allow), on CPU, in the operator's output dtype."""
    out_dtype = torch_dtype(op.out_dtype)
    if op.vocab is not None:
        # an embedding or head under a tokenizer choice: each input's rows gathered into the
        # output vocabulary (permuted, defaults for missing tokens, padding), on the CPU
        from raymerge.runtime.vocabulary import gather_inputs

        tensors = gather_inputs(op, sources, torch_dtype(op.work_dtype), rows)
    else:
        tensors = [sources[i.model].read(i.name, rows=rows) for i in op.inputs]
    if not all(t.is_floating_point() for t in tensors):
        first = tensors[0]
        if any(t.dtype != first.dtype or not torch.equal(t, first) for t in tensors[1:]):
            raise OperatorError(f"non-floating tensor {op.name!r} differs between input models; cannot merge it")
        return first
    work = work_dtype(op, [t.dtype for t in tensors])
    tensors = [t.to(device=device, dtype=work) for t in tensors]
    generator = None
    if op.seed is not None:
        # Always a CPU generator, on every device: random methods draw their masks from it on the
        # CPU and move them to the tensors' device (`methods.sparsify.draw_bernoulli`), so a GPU
        # worker keeps exactly the elements a CPU worker keeps (a CUDA generator's stream differs).
        generator = torch.Generator(device="cpu").manual_seed(op.seed)
    spec = get_method(op.method)
    guide = op.guide
    if guide is not None and guide.input_scales is not None:
        tensors = scale_deltas(tensors, _base(op), guide.input_scales)
    try:
        result = spec.fn(
            tensors,
            base_index=op.base_index,
            model_params=list(op.model_params),
            params=dict(op.params),
            generator=generator,
        )
        if guide is not None and guide.importance is not None:
            result = relax_columns(tensors[_base(op)], result, guide.importance, guide.omega)
    except OperatorError:
        raise
    except Exception as err:  # noqa: BLE001 - reported with the tensor's name
        raise OperatorError(f"merge_method {op.method!r} failed on tensor {op.name!r}: {type(err).__name__}: {err}") from err
    expected = op.shape if rows is None else (rows[1] - rows[0], *op.shape[1:])
    if tuple(result.shape) != expected:
        raise OperatorError(f"merge_method {op.method!r} returned shape {list(result.shape)} for {op.name!r}, expected {list(expected)}")
    return result.to(device="cpu", dtype=out_dtype)


def work_dtype(op: MergeOperator, input_dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype `op` is computed in: the config's `dtype`, else the promotion of its inputs'
    (`operators.resolve_work_dtype`, already resolved into `op.work_dtype` by the compile step)."""
    return resolve_work_dtype(op.work_dtype, input_dtypes)


def _base(op: MergeOperator) -> int:
    if op.base_index is None:
        raise OperatorError(f"{op.name}: a guided merge needs a base model")
    return op.base_index
