"""Gantt charts of merge plans: one row per worker, one bar per operator part (`--gantt plan.png`).

Owns drawing only; the schedule comes from a `planners.Plan` and its `MergeProblem`. A worker
runs its parts one after another in plan order (`Plan.parts_by_worker()`), each taking
`problem.part_time(op, part.of, worker)` seconds, so a row ends at that worker's load. The
makespan can end later than every row when a node link or remote storage is the bottleneck
(the makespan line's label then names it); it is drawn as a vertical line next to the plan's
lower bound.

Bars are coloured by what the operator's tensor is (`operator_kind`: embed, lm_head, attn, mlp,
norm, other), read from Hugging Face tensor names. matplotlib is optional (the `gantt` extra);
figures are drawn on an Agg canvas without pyplot, so no display is needed and the caller's
matplotlib backend and global state are left alone. Hundreds of workers stay readable: the
figure grows with the number of workers up to a cap, and only every k-th worker is labelled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from planners import MergeProblem, Plan

KIND_COLOURS = {  # matplotlib's tab10 palette
    "embed": "#1f77b4",
    "lm_head": "#9467bd",
    "attn": "#ff7f0e",
    "mlp": "#2ca02c",
    "norm": "#8c564b",
    "other": "#7f7f7f",
}

_KIND_PATTERNS = (  # first match wins: norms inside attention blocks are norms
    ("lm_head", ("lm_head",)),
    ("embed", ("embed", "wte", "wpe", "word_embeddings")),
    ("norm", ("norm", "ln_")),
    ("attn", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "qkv")),
    ("mlp", ("mlp", "gate_proj", "up_proj", "down_proj", "experts", "feed_forward", "ffn", "moe", "fc1", "fc2")),
)

MAX_Y_LABELS = 60
ROW_INCHES = 0.22
MIN_HEIGHT, MAX_HEIGHT = 3.0, 30.0


def operator_kind(name: str) -> str:
    """A short label for an operator (tensor) name: embed, lm_head, attn, mlp, norm or other."""
    lowered = name.lower()
    for kind, needles in _KIND_PATTERNS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError(
            "drawing a Gantt chart needs matplotlib: pip install 'raymerge[gantt]'"
        ) from None
    return Figure, FigureCanvasAgg


def _bottleneck(plan: Plan) -> str:
    """What sets the makespan when no worker's row reaches it: a node link or remote storage."""
    if max(plan.loads.values(), default=0.0) >= plan.makespan * (1 - 1e-9):
        return ""
    if plan.remote_seconds >= plan.makespan * (1 - 1e-9):
        return " (remote storage)"
    node = max(plan.link_seconds, key=plan.link_seconds.get, default=None)
    return f" (link {node})" if node is not None else ""


def draw_gantt(plan: Plan, problem: MergeProblem, path: str | os.PathLike, *, title: Optional[str] = None) -> Path:
    """Draw `plan` as a Gantt chart into `path` (format from its suffix, e.g. .png); return it."""
    Figure, FigureCanvasAgg = _matplotlib()
    by_worker = plan.parts_by_worker()
    workers = [w.name for w in problem.workers]
    bars: dict[str, tuple[list[int], list[float], list[float]]] = {}  # kind -> rows, starts, widths
    for row, name in enumerate(workers):
        worker = problem.worker(name)
        start = 0.0
        for part in by_worker.get(name, []):
            width = problem.part_time(problem.operator(part.operator), part.of, worker)
            rows, starts, widths = bars.setdefault(operator_kind(part.operator), ([], [], []))
            rows.append(row)
            starts.append(start)
            widths.append(width)
            start += width

    height = min(MAX_HEIGHT, max(MIN_HEIGHT, 1.5 + ROW_INCHES * len(workers)))
    fig = Figure(figsize=(12, height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edge = 0.3 if len(plan.assignments) <= 5000 else 0.0  # part boundaries, while they are visible
    for kind, colour in KIND_COLOURS.items():
        if kind in bars:
            rows, starts, widths = bars[kind]
            ax.barh(rows, widths, left=starts, height=0.8, color=colour, edgecolor="white", linewidth=edge,
                    label=kind)
    ax.axvline(plan.makespan, color="#d62728", linewidth=1.5,
               label=f"makespan {plan.makespan:.3g} s{_bottleneck(plan)}")
    ax.axvline(plan.lower_bound, color="black", linestyle="--", linewidth=1.2,
               label=f"lower bound {plan.lower_bound:.3g} s")

    step = max(1, math.ceil(len(workers) / MAX_Y_LABELS))
    ticks = list(range(0, len(workers), step))
    ax.set_yticks(ticks, [workers[i] for i in ticks], fontsize=8 if step == 1 else 7)
    ax.set_ylim(len(workers) - 0.5, -0.5)  # first worker on top
    ax.set_xlim(0, max(plan.makespan, plan.lower_bound, 1e-9) * 1.02)
    ax.set_xlabel("seconds")
    ax.set_ylabel("worker" if step == 1 else f"worker (every {step}th labelled)")
    ax.set_title(title or (
        f"{plan.solver} plan ({plan.status}): {len(plan.assignments)} parts on {len(workers)} workers, "
        f"makespan {plan.makespan:.3g} s, gap {plan.gap:.1%}"
    ), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


__all__ = ["draw_gantt", "operator_kind", "KIND_COLOURS"]
