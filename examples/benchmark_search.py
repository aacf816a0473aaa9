"""Benchmark: search trials per hour, evaluated in memory vs written to disk and loaded per trial.

    python examples/benchmark_search.py                  # 6 trials each way, linear merge of 2 fine-tunes
    python examples/benchmark_search.py --trials 10 --method ties
    python examples/benchmark_search.py --params 1000 --trials 4   # a ~1B model: writing and loading weigh more
    python examples/benchmark_search.py --ray        # also in memory on a Ray stage actor (transfer measured)

The model is the ~254M-parameter synthetic bf16 llama of `benchmark_prune.py` (hidden 1024,
16 layers, vocab 32000) plus two seeded fine-tunes of it; `--params N` builds instead a model of
about N million parameters (hidden 2048, intermediate 5632, vocab 32000, as many layers as make N). Both ways score the same trials on the
same held-out windows (perplexity):

- in memory: `raymerge.optimize` (in process, one stage holding every layer): each trial
  recomputes the merge from the input tensors held in memory and runs the held-out windows;
- disk (the approach of mergekit-evolve): per trial, `raymerge.merge` writes the merged model
  (the worker pool kept warm between trials, as a sweep would), `transformers` loads it, and the
  same windows are scored.

Trials per hour exclude one-time setup on both sides (the search's loading of the inputs, the
first merge's worker start); the setup time is printed too. Prints one table, and where the
in-memory trials' time went (`search.study.TrialTimes`: re-merge, forward, Optuna, compile,
transfer/other).
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


def build_sized(workdir: Path, millions: int) -> tuple[Path, int]:
    """A synthetic bf16 llama of about `millions` M parameters (cached under `workdir`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from raymerge.demo import save_tiny_tokenizer, tiny_config

    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = hidden * hidden * 3 + 3 * hidden * inter + 2 * hidden  # q, o, k+v (8 of 16 heads); MLP; norms
    layers = max(1, round((millions * 1e6 - 2 * vocab * hidden) / per_layer))
    path = workdir / f"synthetic-h{hidden}-{layers}l"
    if not (path / "config.json").exists():
        config = tiny_config("llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=16, num_key_value_heads=8, vocab_size=vocab, max_position_embeddings=2048)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(path), safe_serialization=True)
        save_tiny_tokenizer(path)
        del model
    from raymerge.checkpoints import SourceSpec

    src = SourceSpec(str(path)).open()
    try:
        n = sum(math.prod(t.shape) for t in src.tensors().values())
    finally:
        src.close()
    return path, n


def main() -> None:
    from benchmark_prune import build_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "raymerge-prune-bench"))
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--method", default="linear", choices=["linear", "task_arithmetic", "ties"])
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--params", type=int, default=None, help="build a model of about this many million parameters")
    p.add_argument("--ray", action="store_true", help="also search in memory on a Ray stage actor")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import raymerge
    from raymerge.calibration import load_calibration
    from raymerge.config.calibration import CalibrationConfig
    from raymerge.demo import demo_text

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.params:
        base, n_params = build_sized(workdir, args.params)
        ftdir = workdir / f"{base.name}-finetunes"
        ftdir.mkdir(exist_ok=True)
    else:
        base, n_params, ftdir = build_model(workdir, 16), None, workdir
    ft1, ft2 = build_finetunes(base, ftdir)
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
    searches = [("in memory (raymerge search)", mem_setup, result)]
    if args.ray:
        t0 = time.perf_counter()
        ray_result = raymerge.optimize(search, out / "study-ray", quiet=True)  # one stage actor, own local Ray
        searches.append(("in memory, Ray stage actor", time.perf_counter() - t0 - ray_result.seconds, ray_result))

    tok = AutoTokenizer.from_pretrained(str(base))
    windows = load_calibration(CalibrationConfig(dataset=str(text), seqlen=args.seqlen, eval_samples=args.eval_samples, nsamples=1), tok, 2048)
    disk_times, first, model = [], None, None
    for i, w in enumerate(weights):
        model = None  # the previous trial's model is freed before this one is loaded
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
    size = f"{n_params / 1e6:.0f}M" if n_params else "254M"
    print(f"model: {base} + 2 fine-tunes ({size} parameters each, bf16), {args.method}; {args.trials} trials; "
          f"held-out {args.eval_samples} x {args.seqlen} tokens; {os.cpu_count()} CPUs; load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"{'way':<34} {'setup s':>8} {'s/trial':>8} {'trials/hour':>12}")
    for name, setup, r in searches:
        print(f"{name:<34} {setup:>8.1f} {r.seconds / r.trials_run:>8.2f} {r.trials_per_hour:>12.0f}")
    print(f"{'write + load per trial':<34} {first:>8.1f} {sum(disk_times) / len(disk_times):>8.2f} {disk_per_hour:>12.0f}")
    print(f"in memory / disk: {mem_per_hour / disk_per_hour:.1f}x (target 10x)")
    for name, _, r in searches:
        print(f"{name}: {r.timings.summary()}")


if __name__ == "__main__":
    main()
