"""The cost model: what one merge operator costs, as the planner's `planners.Operator`.

An operator's cost has three parts, which `planners.problem` combines with a worker's figures:

- bytes read (its inputs, as stored) and bytes written (its output);
- compute seconds on a speed-1.0 worker: `elements x seconds_per_element(method, inputs, dtype)`.
  Every method here is linear in the tensor's elements (elementwise merges are memory-bound;
  TIES/DARE/breadcrumbs add a selection or random mask per model, SLERP and model stock a few
  reductions), so one coefficient per (method, number of inputs, working dtype) describes it.
  Offline (`raymerge plan`) the coefficients come from each method's spec (`MethodSpec.cost_ns`),
  measured on one core of the development VM (speed 1.0 in `clusters/` profiles). When merging
  for real, every worker first *calibrates*: it runs each (method, inputs, dtype) of the job on
  synthetic tensors (`measure_seconds_per_element`), and the planner uses those figures.
- peak memory: the inputs in the working dtype, the output, and method-specific temporaries
  (`MethodSpec.extra_copies`: full-size working copies a method holds at once; estimates from
  the code).

The working dtype is the one the workers compute in (`operators.resolve_work_dtype`: the config's
`dtype`, else the promotion of the inputs' dtypes, resolved into `MergeOperator.work_dtype` at
compile time), so the planner times and sizes each operator in the dtype it will really run in.

SVD methods (`MethodSpec.extra["svd"]`: tsv, lore) are the exception: a thin SVD of an m x n
matrix costs O(m n min(m, n)), so their cost per element grows with min(m, n). Their
coefficient (table or calibration) is measured on the smaller `SVD_CALIBRATION_SHAPE`
(64 x 1024: LoRE's 20 rounds of SVDs would take seconds per worker on the usual shape), and
`shape_factor` scales it by min(m, n) / 64 for the operator's own matrix (a 1-D tensor counts
as a 1 x n matrix: a small factor for what these methods only average). Large SVDs run more
efficiently than small ones, so this overestimates big matrices somewhat (by up to ~2x on CPU);
it keeps their relative order right, which is what placement needs. `lore`'s coefficient is
for its default 20 iterations: calibration times the job's own setting, the offline table
does not rescale.

Row splits: an operator may be split row-wise into 2, 4 or 8 parts when its method is
elementwise and deterministic (`MethodSpec.elementwise`, no random seed): each part then reads
and computes only its rows and writes them at their offset, so the output bytes are identical.
Only operators of at least `SPLIT_MIN_BYTES` are offered splits (smaller ones gain nothing).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import planners

from raymerge.checkpoints.safetensors_format import FLOAT_CODES, NAME_CODES, element_size, torch_dtype
from raymerge.methods import get_method
from raymerge.methods.catalog import TASK_VECTOR_EXTRA
from raymerge.runtime.operators import MergeOperator

if TYPE_CHECKING:
    import torch

SPLIT_DEGREES = (1, 2, 4, 8)
SPLIT_MIN_BYTES = 64 * 1024 * 1024

# `MethodSpec.cost_ns`: nanoseconds per element of each input tensor on one core of the
# reference machine (the 2-core development VM; torch 2.13 CPU, 1 thread), bfloat16 working dtype,
# three fine-tunes plus a base where the method takes one (slerp/nuslerp: two models). Measured
# with `python -m raymerge.runtime.costs` and rounded; repeated runs on the VM vary by about 20%.
DEFAULT_NS_PER_INPUT_ELEMENT = 20.0  # methods without a measurement (registered later)
OPERATOR_OVERHEAD_S = 1e-3  # per operator: opening inputs, a Python call or two, a ranged write

# Full-size working copies (in the working dtype) a method holds besides its inputs and output
# come from `MethodSpec.extra_copies`; without one, a task-vector method's (TASK_VECTOR_EXTRA + n).
# SVD methods hold, in float32, a delta per model, its thin SVD factors (U and V^T, at most
# one tensor's size each) and the stacked / rebuilt matrices: per-model plus fixed copies.
SVD_EXTRA_PER_INPUT = 3.0
SVD_EXTRA = 4.0

CALIBRATION_SHAPE = (256, 4096)  # 1M elements: long enough to time; smaller jobs time their own shape
SVD_CALIBRATION_SHAPE = (64, 1024)  # SVD methods (see the module docstring)


@dataclass(frozen=True)
class CostKey:
    """Operators that cost the same per element: method, number of inputs, working dtype."""

    method: str
    inputs: int
    dtype: str  # safetensors code, e.g. "BF16"


def working_dtype_code(op: MergeOperator, input_dtypes: Optional[Sequence[str]] = None) -> str:
    """The dtype an operator computes in, as a safetensors code: `op.work_dtype` (resolved at
    compile time by the workers' rule, `operators.resolve_work_dtype`); an operator built without
    one (by hand) is taken to compute in its output dtype."""
    if op.work_dtype is not None:
        return NAME_CODES[op.work_dtype]
    return op.out_dtype


def cost_key(op: MergeOperator) -> CostKey:
    return CostKey(op.method, len(op.inputs), working_dtype_code(op))


def elements(op: MergeOperator) -> int:
    return math.prod(op.shape) if op.shape else 1


def offline_seconds_per_element(key: CostKey) -> float:
    """Seconds per output element on the reference core, from the measured table."""
    ns = get_method(key.method).cost_ns
    if ns is None:
        ns = DEFAULT_NS_PER_INPUT_ELEMENT
    return ns * 1e-9 * key.inputs


def is_svd_method(method: str) -> bool:
    return bool(get_method(method).extra.get("svd"))


def calibration_shape(method: str) -> tuple[int, int]:
    """The synthetic tensor shape a method's cost per element is measured on (at most: see
    `job_calibration_shape`)."""
    return SVD_CALIBRATION_SHAPE if is_svd_method(method) else CALIBRATION_SHAPE


def job_calibration_shape(op: MergeOperator) -> tuple[int, ...]:
    """The shape calibration times `op`'s method on (`op`: the largest operator of its cost key,
    `representative_ops`): `calibration_shape`, or `op`'s own shape when that has fewer elements.
    A job of small tensors is timed on what it really computes (the per-call overhead included),
    not on 1M-element tensors it never sees: three runs of a slow method on 1M elements took longer
    than a whole small merge. SVD methods keep their shape (`shape_factor` scales from it)."""
    shape = calibration_shape(op.method)
    if is_svd_method(op.method) or elements(op) >= math.prod(shape):
        return shape
    return tuple(op.shape)


def shape_factor(op: MergeOperator) -> float:
    """Multiplier of the per-element cost for `op`'s shape: min(m, n) / min(SVD_CALIBRATION_SHAPE)
    for SVD methods (m = shape[0], n = the other dimensions; 1-D: m = 1), else 1."""
    if not is_svd_method(op.method):
        return 1.0
    rows = op.shape[0] if len(op.shape) >= 2 else 1
    cols = math.prod(op.shape[1:]) if len(op.shape) >= 2 else math.prod(op.shape)
    return max(1, min(rows, cols)) / min(SVD_CALIBRATION_SHAPE)


def split_degrees(op: MergeOperator) -> tuple[int, ...]:
    """Row splits allowed for `op` (always includes 1)."""
    spec = get_method(op.method)
    if not spec.elementwise or op.seed is not None or len(op.shape) < 2:
        return (1,)
    if op.bytes_in + op.bytes_out < SPLIT_MIN_BYTES:
        return (1,)
    return tuple(d for d in SPLIT_DEGREES if d <= op.shape[0])


def part_rows(op: MergeOperator, part: int, of: int) -> Optional[tuple[int, int]]:
    """Rows [start, stop) of part `part` of `op` split `of` ways (None: the whole tensor)."""
    if of == 1:
        return None
    rows = op.shape[0]
    return (rows * part // of, rows * (part + 1) // of)


def peak_memory(op: MergeOperator) -> float:
    """Estimated bytes a worker holds while computing `op` (see the module docstring)."""
    n = elements(op)
    work = element_size(working_dtype_code(op))
    spec = get_method(op.method)
    if spec.extra.get("svd"):
        f32 = max(work, 4)
        return len(op.inputs) * n * work + (SVD_EXTRA_PER_INPUT * len(op.inputs) + SVD_EXTRA) * n * f32 + op.bytes_out
    copies = spec.extra_copies or (lambda n: TASK_VECTOR_EXTRA + n)
    extra = copies(len(op.inputs))
    return (len(op.inputs) + extra) * n * work + op.bytes_out


def planner_operator(
    op: MergeOperator, seconds_per_element: Mapping[CostKey, float], input_location: Optional[str] = None,
    overhead_s: float = OPERATOR_OVERHEAD_S,
) -> planners.Operator:
    """`op` as the planner sees it; `seconds_per_element` on a speed-1.0 worker by cost key;
    `overhead_s`: the fixed seconds of one part (measured by the workers when merging)."""
    key = cost_key(op)
    per_element = seconds_per_element.get(key)
    if per_element is None:
        per_element = offline_seconds_per_element(key)
    return planners.Operator(
        name=op.name,
        bytes_read=float(op.bytes_in),
        bytes_written=float(op.bytes_out),
        compute_s=overhead_s + elements(op) * per_element * shape_factor(op),
        peak_memory=peak_memory(op),
        split_degrees=split_degrees(op),
        input_location=input_location,
    )


def representative_ops(ops: Sequence[MergeOperator]) -> dict[CostKey, MergeOperator]:
    """One operator per cost key (the largest), whose parameters calibration uses."""
    out: dict[CostKey, MergeOperator] = {}
    for op in ops:
        key = cost_key(op)
        if key not in out or elements(op) > elements(out[key]):
            out[key] = op
    return out


# A timed calibration run at least this long is not repeated: its noise (a scheduler tick, a
# page fault) is small next to it, and a second run of an expensive method (DELLA's per-row
# sorts over 1M elements: 0.1-0.3 s) would add a third to the calibration of every merge using it.
CALIBRATION_ENOUGH_S = 0.05


def measure_seconds_per_element(op: MergeOperator, device: "torch.device | str" = "cpu", repeats: int = 2) -> float:
    """Time `op`'s method on synthetic inputs of `job_calibration_shape(op)` in its working
    dtype (best of up to `repeats`, after one warm-up run; no more once a timed run took
    CALIBRATION_ENOUGH_S); seconds per output element, net of the method's fixed cost per call.

    The fixed cost (Python, torch dispatch: what the method takes on a few elements, timed the
    same way on `tiny_shape`) is part of every part's measured overhead already
    (`runtime.worker.MergeWorkerImpl.measure_io` runs a whole small part); left in the per-element
    figure it was counted twice, and for a job of small tensors it was most of that figure: the
    demo's TIES merge was predicted at 1.6x its measured makespan."""
    import torch  # on the workers: calibration runs the method

    code = working_dtype_code(op)
    if code not in FLOAT_CODES:
        return 0.0
    dtype = torch_dtype(code)
    shape = job_calibration_shape(op)
    seconds, n = _time_method(op, shape, dtype, device, repeats), math.prod(shape)
    tiny = tiny_shape(shape)
    if math.prod(tiny) < n:
        try:
            fixed = _time_method(op, tiny, dtype, device, repeats)
        except Exception:  # noqa: BLE001 - a method that needs more elements: keep the gross figure
            return seconds / n
        # The slope between the two sizes; at least a tenth of the gross figure, as the read probe's
        # bandwidth (`worker.MergeWorkerImpl.measure_io`): on a few hundred elements the two
        # timings can be within noise of each other, and no method computes for free.
        return max(seconds - fixed, seconds / 10) / (n - math.prod(tiny))
    return seconds / n


def tiny_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The few elements (at most 4 per dimension) a method's fixed cost per call is timed on."""
    return tuple(min(d, 4) for d in shape)


def _time_method(op: MergeOperator, shape: tuple[int, ...], dtype: "torch.dtype", device: "torch.device | str", repeats: int) -> float:
    """Best seconds of `op`'s method on synthetic inputs of `shape` (see `measure_seconds_per_element`)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(shape, generator=g)
    inputs = [(base + 0.01 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype) for _ in op.inputs]
    spec = get_method(op.method)
    params: dict[str, Any] = dict(op.params)
    best = math.inf
    for i in range(repeats + 1):
        generator = torch.Generator(device="cpu").manual_seed(i) if op.seed is not None else None
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        spec.fn(inputs, base_index=op.base_index, model_params=list(op.model_params), params=params, generator=generator)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            best = min(best, time.perf_counter() - start)
            if best >= CALIBRATION_ENOUGH_S:
                break
    return best


def _print_reference_table() -> None:  # pragma: no cover - a measuring tool, run by hand
    """Measure every method's `cost_ns` on this machine (1 thread, bf16, 3 fine-tunes + base)."""
    import torch

    from raymerge.methods import available_methods
    from raymerge.runtime.operators import TensorInput

    torch.set_num_threads(1)
    for name in available_methods():
        spec = get_method(name)
        n = 1 if spec.max_models == 1 else (2 if name in ("slerp", "nuslerp") else 4)
        base_index = 0 if spec.base == "required" else None
        model_params = tuple(
            {p.name: (0.5 if p.name in ("weight", "density", "t") else p.default) for p in spec.params if p.per_model}
            for _ in range(n)
        )
        params = {p.name: (0.5 if p.name == "t" else p.default) for p in spec.params if not p.per_model}
        op = MergeOperator(
            index=0, name="calibration", method=name,
            inputs=tuple(TensorInput(i, "calibration", 0) for i in range(n)),
            base_index=base_index, model_params=model_params, params=params,
            work_dtype="bfloat16", out_dtype="BF16", shape=calibration_shape(name),
            seed=0 if spec.random else None,
        )
        ns = measure_seconds_per_element(op) * 1e9 / n
        print(f'    "{name}": {ns:.1f},')


if __name__ == "__main__":  # pragma: no cover
    _print_reference_table()
