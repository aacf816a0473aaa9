"""Benchmark: Wanda and SparseGPT on a ~250M-parameter synthetic model, one process vs stage actors.

    python examples/benchmark_prune.py                       # wanda + sparsegpt, 1 process vs 2 stages
    python examples/benchmark_prune.py --methods wanda --modes parallel --stages 2 4
    python examples/benchmark_prune.py --modes parallel --stages 1 2 --threads 1   # pipeline overlap

Builds (once, cached under --workdir) a llama-style model with random bf16 weights: hidden 1024,
intermediate 2816, 16 layers, vocab 32000 (about 264M parameters), and calibration text from
`raymerge.demo.demo_text`. Each measurement runs in a fresh Python process, so peak RSS is that
run's own: for a single-process prune the process's peak, for stage actors the largest actor's
peak (the driver holds no weights). Wall time is the whole `raymerge.prune` call, Ray start
included for stage runs; "prune s" is the part after the stages are loaded (calibration passes,
pruning, perplexity). Prints one table; no numbers are hard-coded anywhere.

`--threads T` gives each stage actor T torch threads: the run's own local Ray is started with
stages x T CPUs, so the resource rule (`runtime.actor_resources`) hands each actor T CPUs and T
threads (a single process sets T threads itself). Without it a single stage actor on a 2-core
machine already uses both cores, and 1 vs 2 stages compares threads, not the pipeline. With
`--stages 1 2 --threads 1` the comparison is the pipeline's overlap: micro-batches flow through
the stages as Ray object references, so stage k runs micro-batch b while stage k+1 runs b-1;
"tok/s" is calibration and held-out tokens per second of the prune phase, and "util" is each
stage's utilisation from the prune report (time inside its calls / the driver's wall time over
the stage's lifetime, loading included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_model(workdir: Path, layers: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from raymerge.demo import save_tiny_tokenizer, tiny_config

    path = workdir / f"synthetic-{layers}l"
    if (path / "config.json").exists():
        return path
    config = tiny_config(
        "llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(str(path), safe_serialization=True)
    save_tiny_tokenizer(path)
    return path


def run_one(args: argparse.Namespace) -> None:
    """One measurement (in this fresh process); prints a JSON line."""
    import raymerge

    cfg = {
        "model": args.model, "method": args.method, "sparsity": 0.5, "mode": args.mode,
        "calibration": {"dataset": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_samples": 4},
        "batch_size": args.batch_size,
    }
    out = Path(tempfile.mkdtemp(prefix="rm-prune-bench-")) / "out"
    if args.threads:
        if args.stages == 0:
            import torch

            torch.set_num_threads(args.threads)
        else:
            from raymerge.runtime.executor import ensure_ray

            ensure_ray(None, num_cpus=args.stages * args.threads)  # each stage actor: T CPUs, T threads
    t0 = time.perf_counter()
    result = raymerge.prune(cfg, out, workers=args.stages or None, in_process=args.stages == 0, quiet=True)
    wall = time.perf_counter() - t0
    cal = result.report.calibration
    tokens = cal["nsamples"] * cal["seqlen"] + result.report.eval_tokens
    print(json.dumps({
        "wall_s": wall, "prune_s": result.timings["prune"], "peak_rss": result.peak_worker_rss_bytes,
        "tokens_per_s": tokens / result.timings["prune"],
        "util": [s.get("utilisation", s["busy_seconds"] / wall) for s in result.stages],
        "ppl_before": result.report.perplexity_before, "ppl_after": result.report.perplexity_after,
        "sparsity": result.report.achieved_sparsity, "stages": [s["layers"] for s in result.stages],
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "raymerge-prune-bench"))
    p.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    p.add_argument("--modes", nargs="+", default=["sequential", "parallel"])
    p.add_argument("--stages", nargs="+", type=int, default=[0, 2], help="0 = single process (no Ray)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per stage (0 = the resource rule's default)")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (noisy machines: take the best)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_one:
        args.stages = args.stages[0]
        run_one(args)
        return

    from raymerge.demo import demo_text

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(workdir, args.layers)
    calib = workdir / "calib.txt"
    calib.write_text(demo_text(200, 200, seed=1))
    from raymerge.checkpoints import open_source

    src = open_source(str(model))
    params = sum(t.numel for t in src.tensors().values())
    src.close()
    print(f"model: {model} ({params / 1e6:.0f}M parameters, bf16); calibration {args.nsamples} x {args.seqlen} tokens; "
          f"{os.cpu_count()} CPUs")
    threads = f" x {args.threads} thread{'s' if args.threads != 1 else ''}" if args.threads else ""
    print(f"{'method':<10} {'mode':<11} {'run':<26} {'wall s':>7} {'prune s':>8} {'tok/s':>7} {'util':<12} "
          f"{'peak RSS GiB':>13} {'sparsity':>9} {'ppl before->after':>20}")
    for method in args.methods:
        for mode in args.modes:
            for stages in args.stages:
                cmd = [sys.executable, __file__, "--run-one", "--model", str(model), "--calib", str(calib),
                       "--method", method, "--mode", mode, "--stages", str(stages), "--nsamples", str(args.nsamples),
                       "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
                runs = []
                for _ in range(max(1, args.repeat)):
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
                    if proc.returncode != 0 or not lines:
                        print(f"{method:<10} {mode:<11} stages={stages}: FAILED\n{proc.stderr[-2000:]}")
                        break
                    runs.append(json.loads(lines[-1]))
                if not runs:
                    continue
                r = min(runs, key=lambda x: x["prune_s"])  # the best of --repeat runs
                run = ("single process" if stages == 0 else f"{len(r['stages'])} stage actor{'s' if len(r['stages']) != 1 else ''}") + threads
                util = "/".join(f"{u:.2f}" for u in r["util"])
                print(f"{method:<10} {mode:<11} {run:<26} {r['wall_s']:>7.1f} {r['prune_s']:>8.1f} {r['tokens_per_s']:>7.0f} "
                      f"{util:<12} {r['peak_rss'] / 2**30:>13.2f} {r['sparsity']:>9.4f} "
                      f"{r['ppl_before']:>9.1f} -> {r['ppl_after']:<8.1f}", flush=True)


if __name__ == "__main__":
    main()
