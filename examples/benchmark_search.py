"""Benchmark: search trials per hour, evaluated in memory vs written to disk and loaded per trial.

    python examples/benchmark_search.py                  # 6 trials each way, linear merge of 2 fine-tunes
    python examples/benchmark_search.py --trials 10 --method ties

The model is the ~254M-parameter synthetic bf16 llama of `benchmark_prune.py` (hidden 1024,
16 layers, vocab 32000) plus two seeded fine-tunes of it. Both ways score the same trials on the
same held-out windows (perplexity):

- in memory: `raymerge.optimize` (in process, one stage holding every layer): each trial
  recomputes the merge from the input tensors held in memory and runs the held-out windows;
- disk (the approach of mergekit-evolve): per trial, `raymerge.merge` writes the merged model
  (the worker pool kept warm between trials, as a sweep would), `transformers` loads it, and the
  same windows are scored.

Trials per hour exclude one-time setup on both sides (the search's loading of the inputs, the
first merge's worker start); the setup time is printed too. Prints one table.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build_finetunes(model: Path, workdir: Path) -> list[Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from raymerge.demo import save_tiny_tokenizer

    paths = []
    for i in (1, 2):
        path = workdir / f"ft{i}"
        paths.append(path)
        if (path / "config.json").exists():
            continue
        m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_((torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype))
        m.save_pretrained(str(path))
        save_tiny_tokenizer(path)
    return paths


def main() -> None:
    from benchmark_prune import build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "raymerge-prune-bench"))
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--method", default="linear", choices=["linear", "task_arithmetic", "ties"])
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=4)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import raymerge
    from raymerge.calibration import load_calibration
    from raymerge.config.calibration import CalibrationConfig
    from raymerge.demo import demo_text

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base = build_model(workdir, 16)
    ft1, ft2 = build_finetunes(base, workdir)
    text = workdir / "heldout.txt"
    text.write_text(demo_text(40, 200, seed=3))
    rng = random.Random(0)
    weights = [round(rng.uniform(0.0, 1.0), 4) for _ in range(args.trials)]

    def merge_config(w: float) -> dict:
        cfg = {"merge_method": args.method, "models": [
            {"model": str(ft1), "parameters": {"weight": w}}, {"model": str(ft2), "parameters": {"weight": 1.0 - w}}],
            "dtype": "bfloat16"}
        if args.method != "linear":
            cfg["base_model"] = str(base)
            if args.method == "ties":
                for m in cfg["models"]:
                    m["parameters"]["density"] = 0.5
        return cfg

    evaluation = {"dataset": str(text), "seqlen": args.seqlen, "eval_samples": args.eval_samples}
    search = {
        "merge": {**merge_config(0.5), "models": [
            {**m, "parameters": {**m["parameters"], "weight": {"choices": weights} if i == 0 else 1.0}}
            for i, m in enumerate(merge_config(0.5)["models"])]},
        "evaluation": evaluation,
        "study": {"n_trials": args.trials, "sampler": "grid"},
    }
    out = Path(tempfile.mkdtemp(prefix="rm-search-bench-"))
    t0 = time.perf_counter()
    result = raymerge.optimize(search, out / "study", in_process=True, quiet=True)
    total = time.perf_counter() - t0
    mem_per_hour = result.trials_per_hour
    mem_setup = total - result.seconds

    tok = AutoTokenizer.from_pretrained(str(base))
    windows = load_calibration(CalibrationConfig(dataset=str(text), seqlen=args.seqlen, eval_samples=args.eval_samples, nsamples=1), tok, 2048)
    disk_times, first = [], None
    for i, w in enumerate(weights):
        t = time.perf_counter()
        res = raymerge.merge(merge_config(w), out / "trial-model", overwrite=True, quiet=True, keep_workers=True)
        model = AutoModelForCausalLM.from_pretrained(str(res.output), dtype=torch.float32).eval()
        with torch.no_grad():
            nll = sum(model(input_ids=ids, labels=ids).loss.item() * ids.shape[0] * (ids.shape[1] - 1)
                      for ids in windows.heldout.split(8))
        math.exp(nll / (windows.heldout.shape[0] * (windows.heldout.shape[1] - 1)))
        elapsed = time.perf_counter() - t
        if i == 0:
            first = elapsed
        else:
            disk_times.append(elapsed)
    raymerge.shutdown_workers()
    disk_per_hour = 3600.0 / (sum(disk_times) / len(disk_times))
    print(f"model: {base} + 2 fine-tunes (254M parameters each, bf16), {args.method}; {args.trials} trials; "
          f"held-out {args.eval_samples} x {args.seqlen} tokens; {os.cpu_count()} CPUs")
    print(f"{'way':<34} {'setup s':>8} {'s/trial':>8} {'trials/hour':>12}")
    print(f"{'in memory (raymerge search)':<34} {mem_setup:>8.1f} {result.seconds / result.trials_run:>8.2f} {mem_per_hour:>12.0f}")
    print(f"{'write + load per trial':<34} {first:>8.1f} {sum(disk_times) / len(disk_times):>8.2f} {disk_per_hour:>12.0f}")
    print(f"in memory / disk: {mem_per_hour / disk_per_hour:.1f}x (target 10x)")


if __name__ == "__main__":
    main()
