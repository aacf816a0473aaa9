"""Gantt charts of merge plans: one row per worker, one bar per operator part (`--gantt plan.png`).

Owns drawing only; the schedule comes from a `planners.Plan` and its `MergeProblem`. A worker
runs its parts one after another in plan order (`Plan.parts_by_worker()`), each taking
`problem.part_time(op, part.of, worker)` seconds, so a row ends at that worker's load. Below
the workers, one row per node link (the seconds its network carries: reads from off the node and
the output written, shared by the node's workers) and one for remote storage when used: the makespan can end later than every worker's row when one of
them is the bottleneck. The makespan is a vertical line whose label names what sets it (a worker,
a link or remote storage), next to the plan's lower bound.

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
            "drawing a Gantt chart needs matplotlib: pip install matplotlib"
        ) from None
    return Figure, FigureCanvasAgg


LINK_COLOUR = "#bdbdbd"  # a node's network link: the bytes its workers read from other nodes
REMOTE_COLOUR = "#e7ba52"


def makespan_setter(plan: Plan) -> str:
    """What sets the makespan: the busiest worker ("worker gpu-0/w3"), a node's link
    ("link gpu-1") or remote storage, whichever of them reaches it (the largest)."""
    candidates = [(secs, f"worker {name}") for name, secs in plan.loads.items()]
    candidates += [(secs, f"link {node}") for node, secs in plan.link_seconds.items()]
    if plan.remote_seconds:
        candidates.append((plan.remote_seconds, "remote storage"))
    if not candidates:
        return ""
    # Ties go to a link or storage (they are what more workers would not fix), then by name.
    return max(candidates, key=lambda c: (c[0] * (1 + 1e-9), not c[1].startswith("worker"), c[1]))[1]


def draw_gantt(plan: Plan, problem: MergeProblem, path: str | os.PathLike, *, title: Optional[str] = None) -> Path:
    """Draw `plan` as a Gantt chart into `path` (format from its suffix, e.g. .png); return it."""
    fig = gantt_figure(plan, problem, title=title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def gantt_figure(plan: Plan, problem: MergeProblem, *, title: Optional[str] = None):
    """The chart as a matplotlib `Figure` (Agg canvas): one row per worker with its parts (compute,
    coloured by kind), then one row per node link (network seconds) and one for remote storage
    when it is used; the makespan line names what sets it. Parts too short to see (norms, next to
    70B matrices) are drawn at a minimum width so that every legend entry has bars to point at;
    the legend gives each kind's part count and seconds."""
    Figure, FigureCanvasAgg = _matplotlib()
    by_worker = plan.parts_by_worker()
    workers = [w.name for w in problem.workers]
    bars: dict[str, tuple[list[int], list[float], list[float]]] = {}  # kind -> rows, starts, widths
    totals: dict[str, float] = {}
    for row, name in enumerate(workers):
        worker = problem.worker(name)
        start = 0.0
        for part in by_worker.get(name, []):
            width = problem.part_time(problem.operator(part.operator), part.of, worker)
            kind = operator_kind(part.operator)
            rows, starts, widths = bars.setdefault(kind, ([], [], []))
            rows.append(row)
            starts.append(start)
            widths.append(width)
            totals[kind] = totals.get(kind, 0.0) + width
            start += width
    links = [(f"link {node}", secs) for node, secs in sorted(plan.link_seconds.items()) if secs > 0]
    if plan.remote_seconds:
        links.append(("remote storage", plan.remote_seconds))
    labels = workers + [name for name, _ in links]

    xmax = max(plan.makespan, plan.lower_bound, max(plan.loads.values(), default=0.0), 1e-9) * 1.02
    least = xmax * 0.002  # narrowest bar drawn (about a pixel and a half at 12 inches)
    height = min(MAX_HEIGHT, max(MIN_HEIGHT, 1.5 + ROW_INCHES * len(labels)))
    fig = Figure(figsize=(12, height))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edge = 0.3 if len(plan.assignments) <= 5000 else 0.0  # part boundaries, while they are visible
    for kind, colour in KIND_COLOURS.items():
        if kind in bars:
            rows, starts, widths = bars[kind]
            ax.barh(rows, [max(w, least) for w in widths], left=starts, height=0.8, color=colour, edgecolor="white",
                    linewidth=edge, label=f"{kind}: {len(rows)} part(s), {totals[kind]:.3g} s compute")
    for k, (name, secs) in enumerate(links):
        ax.barh([len(workers) + k], [max(secs, least)], height=0.8, hatch="//", edgecolor="#636363", linewidth=0.5,
                color=REMOTE_COLOUR if name == "remote storage" else LINK_COLOUR,
                label="node link / remote storage: seconds of the bytes read off the node and written" if k == 0 else None)
    setter = makespan_setter(plan)
    ax.axvline(plan.makespan, color="#d62728", linewidth=1.5,
               label=f"makespan {plan.makespan:.3g} s" + (f", set by {setter}" if setter else ""))
    ax.axvline(plan.lower_bound, color="black", linestyle="--", linewidth=1.2,
               label=f"lower bound {plan.lower_bound:.3g} s")
    if links:
        ax.axhline(len(workers) - 0.5, color="#636363", linewidth=0.8)

    step = max(1, math.ceil(len(labels) / MAX_Y_LABELS))
    ticks = sorted(set(range(0, len(workers), step)) | set(range(len(workers), len(labels))))
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=8 if step == 1 else 7)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first worker on top, links below
    ax.set_xlim(0, xmax)
    ax.set_xlabel("seconds (predicted)")
    ax.set_ylabel("worker (compute) / node link" if step == 1 else f"worker (every {step}th labelled) / node link")
    ax.set_title(title or (
        f"{plan.solver} plan ({plan.status}): {len(plan.assignments)} parts on {len(workers)} workers, "
        f"makespan {plan.makespan:.3g} s, gap {plan.gap:.1%}"
    ), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


__all__ = ["draw_gantt", "gantt_figure", "makespan_setter", "operator_kind", "KIND_COLOURS"]
