"""Benchmark the placement planner on shape-only Llama merges: MILP vs LPT vs the lower bound.

    python examples/benchmark_planner.py                 # 7B/70B/405B on 8/32/128 workers
    python examples/benchmark_planner.py --time-limit 10 --gap 0.001 --json out.json

The problems are built from model shapes alone (no weights): one operator per output tensor of
a TIES merge of `--models` bf16 checkpoints (plus the base) read from remote storage, on nodes
of 8 workers. Cost constants (documented in `llama_problem`) are round numbers for a GPU worker
reading a shared filesystem; the point is the planner's behaviour, not a hardware prediction.
Only `planners` (pulp) is imported: no torch, no Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "planners" / "__init__.py").exists() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout: use its planners/ (an install may be stale)

import planners  # noqa: E402

from planners import MergeProblem, Node, Operator, Worker  # noqa: E402

# hidden, intermediate, layers, attention heads, kv heads, vocab (Llama-2-7B, Llama-3-70B, Llama-3.1-405B)
SHAPES = {
    "7B": (4096, 11008, 32, 32, 32, 32000),
    "70B": (8192, 28672, 80, 64, 8, 128256),
    "405B": (16384, 53248, 126, 128, 8, 128256),
}
GB = 1e9


def llama_tensors(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama checkpoint of this size, in checkpoint order."""
    h, inter, n_layers, heads, kv_heads, vocab = SHAPES[size]
    kv = h // heads * kv_heads
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return out


def llama_problem(
    size: str = "70B",
    workers: int = 32,
    per_node: int = 8,
    models: int = 3,
    worker_memory: float = 24 * GB,
    read_bandwidth: float = 2 * GB,
    network_bandwidth: float = 25 * GB,
    remote_bandwidth: float | None = None,
    seconds_per_element_input: float = 5e-10,
    split_penalty: float = 1e-3,
) -> MergeProblem:
    """A shape-only TIES merge of `models` fine-tunes plus the base, bf16, inputs on remote storage.

    Per tensor of n elements: reads (models + 1) * 2n bytes, writes 2n bytes, computes
    `seconds_per_element_input * n * (models + 1)` seconds on a speed-1.0 worker, and peaks at
    (models + 1) * 2n bytes of inputs plus 3 fp32 working copies (12n). Matrices split row-wise
    1/2/4/8 ways, 1-D tensors not at all. Nodes hold `per_node` workers each.
    """
    inputs = models + 1
    ops = []
    for name, shape in llama_tensors(size):
        n = 1
        for d in shape:
            n *= d
        ops.append(Operator(
            name=name,
            bytes_read=2.0 * n * inputs,
            bytes_written=2.0 * n,
            compute_s=seconds_per_element_input * n * inputs,
            peak_memory=(2.0 * inputs + 12.0) * n,
            split_degrees=(1, 2, 4, 8) if len(shape) == 2 else (1,),
        ))
    n_nodes = (workers + per_node - 1) // per_node
    nodes = [Node(f"node{j}", network_bandwidth) for j in range(n_nodes)]
    ws = [Worker(f"node{k // per_node}/gpu{k % per_node}", f"node{k // per_node}", worker_memory, 1.0, read_bandwidth)
          for k in range(workers)]
    return MergeProblem(ops, ws, nodes, remote_bandwidth=remote_bandwidth, split_penalty=split_penalty)


def run(cases, time_limit: float, gap: float) -> list[dict]:
    rows = []
    for size, n_workers in cases:
        problem = llama_problem(size, n_workers)
        t0 = time.perf_counter()
        lb = planners.lower_bound(problem)
        greedy = planners.lpt(problem)
        t_lpt = time.perf_counter() - t0
        plan = planners.solve(problem, time_limit=time_limit, gap=gap)
        planners.validate(problem, plan)
        milp = plan.info.get("milp")
        rows.append({
            "model": size,
            "workers": n_workers,
            "operators": len(problem.operators),
            "classes": milp.get("classes"),  # None: the MILP was skipped (LPT within the gap)
            "int_vars": milp.get("integer_variables"),
            "lower_bound_s": max(lb, plan.lower_bound),
            "lpt_s": greedy.makespan,
            "lpt_gap": (greedy.makespan - plan.lower_bound) / greedy.makespan,
            "lpt_solve_s": t_lpt,
            "plan_s": plan.makespan,
            "plan_gap": plan.gap,
            "solver": plan.solver,
            "status": plan.status,
            "extra_parts": plan.extra_parts,
            "lpt_extra_parts": greedy.extra_parts,
            "objective_gap": (plan.objective - plan.info["objective_bound"]) / plan.objective,
            "solve_s": plan.solve_seconds,
        })
    return rows


def print_table(rows: list[dict]) -> None:
    """bound: makespan lower bound; gap: (makespan - bound) / makespan; splits: extra parts;
    obj gap: the objective (makespan + penalty * splits) against its bound."""
    head = (f"{'model':>5} {'workers':>7} {'ops':>5} {'classes':>7} {'int vars':>8} {'bound s':>9} "
            f"{'LPT s':>9} {'LPT gap':>8} {'splits':>6} {'plan s':>9} {'gap':>7} {'splits':>6} "
            f"{'obj gap':>7} {'solver':>6} {'status':>10} {'solve s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:>5} {r['workers']:>7} {r['operators']:>5} {str(r['classes'] or '-'):>7} "
              f"{str(r['int_vars'] or '-'):>8} {r['lower_bound_s']:>9.3f} {r['lpt_s']:>9.3f} "
              f"{r['lpt_gap']:>8.2%} {r['lpt_extra_parts']:>6} {r['plan_s']:>9.3f} {r['plan_gap']:>7.2%} "
              f"{r['extra_parts']:>6} {r['objective_gap']:>7.2%} {r['solver']:>6} {r['status']:>10} "
              f"{r['solve_s']:>7.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="7B,70B,405B")
    ap.add_argument("--workers", default="8,32,128")
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--gap", type=float, default=1e-3)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    cases = [(s, int(w)) for s in args.sizes.split(",") for w in args.workers.split(",")]
    print(f"solvers: {planners.available_solvers()}; time limit {args.time_limit:g} s, gap {args.gap:g}")
    rows = run(cases, args.time_limit, args.gap)
    print_table(rows)
    print("bound: makespan lower bound; gap: (plan - bound) / plan; splits: extra parts (LPT, plan); "
          "obj gap: makespan + penalty * splits against its proven bound")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
