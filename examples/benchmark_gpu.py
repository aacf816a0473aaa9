"""Benchmark: merges and prunes of a ~1.1B-parameter synthetic llama on a GPU.

    python examples/benchmark_gpu.py             # needs a CUDA GPU; says so and exits 0 without one
    python examples/benchmark_gpu.py --small     # a tiny model, quick: a smoke run (CPU without a GPU)
    python examples/benchmark_gpu.py --ray       # through Ray worker actors (one per GPU) instead of in process

Builds (once, cached under --workdir) a llama with random bf16 weights in TinyLlama-1.1B's shape
(`AutoConfig.for_model("llama", ...)`: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV
heads, vocab 32000: about 1.1B parameters, 2.2 GB), saved with `save_pretrained`, and
--finetunes (default 3) "fine-tunes" of it: the base plus Gaussian noise of 1% of each tensor's
standard deviation. Then it runs, each on the device raymerge picks (in process: the first GPU
torch sees; with --ray: one worker actor per GPU):

- a `linear` and a `ties` merge (density 0.5) of the fine-tunes, in bfloat16;
- a `wanda` and a `sparsegpt` prune (50%) of the base, calibrated on `raymerge.demo.demo_text`.

and prints per job the wall time, the compute time (`timings["merge"]` / `timings["prune"]`:
Ray start, planning and publishing excluded), GB/s (input bytes read / compute seconds for a
merge; model bytes / compute seconds for a prune) and peak GPU memory (merges:
`MergeResult.peak_device_bytes`, the workers' `torch.cuda.max_memory_allocated`; prunes in
process: this process's; prunes with --ray: not reported). No figure is hard-coded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)


def build_models(workdir: Path, shape: dict, finetunes: int) -> tuple[Path, list[Path], int]:
    """The base and its fine-tunes (cached); returns them and the parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raymerge.demo import save_tiny_tokenizer

    base = workdir / "base"
    fts = [workdir / f"ft{i + 1}" for i in range(finetunes)]
    config = AutoConfig.for_model("llama", tie_word_embeddings=False, **shape)
    if all((p / "config.json").exists() for p in [base, *fts]):
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        return base, fts, n
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # random init of 1.1B parameters is much faster on a GPU
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(base))
    save_tiny_tokenizer(base)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    gen = torch.Generator(device=device)
    for i, path in enumerate(fts):
        gen.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                w = original[name].float()
                noise = torch.randn(w.shape, generator=gen, device=device) * (0.01 * w.std())
                p.copy_((w + noise).to(p.dtype))
        model.save_pretrained(str(path))
        save_tiny_tokenizer(path)
    del model, original
    return base, fts, n


def _gpu_peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak() -> int:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}" if n else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a tiny model: a quick smoke run, on the CPU when there is no GPU")
    p.add_argument("--ray", action="store_true", help="run through Ray worker actors (one per GPU) instead of in process")
    p.add_argument("--finetunes", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where the synthetic models are cached")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows for the prunes")
    p.add_argument("--seqlen", type=int, default=None, help="calibration window length")
    args = p.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.small:
        print("benchmark_gpu.py: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to "
              "measure. Run with --small for a quick CPU smoke run of the same jobs.")
        return 0

    import raymerge
    from raymerge.demo import demo_text

    shape = SMALL if args.small else FULL
    nsamples = args.nsamples or (8 if args.small else 64)
    seqlen = args.seqlen or (64 if args.small else 512)
    workdir = Path(args.workdir or os.path.join(tempfile.gettempdir(), f"raymerge-gpu-bench-{'small' if args.small else '1b'}"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, fts, params = build_models(workdir, shape, args.finetunes)
    calib = workdir / "calib.txt"
    calib.write_text(demo_text(max(40, nsamples * seqlen // 150), 200, seed=1))
    device = f"{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    model_bytes = params * 2
    print(f"models: {base} + {len(fts)} fine-tunes, {params / 1e6:,.1f}M parameters ({model_bytes / 1e6:,.1f} MB bf16 each), "
          f"built or found in {time.perf_counter() - t0:.1f} s; device: {device}; {'Ray workers' if args.ray else 'in process'}")
    print(f"{'job':<16} {'wall s':>8} {'compute s':>10} {'GB/s':>8} {'peak GPU GiB':>13}  note")
    out_root = Path(tempfile.mkdtemp(prefix="rm-gpu-bench-", dir=workdir))
    run_opts = {"quiet": True} if args.ray else {"quiet": True, "in_process": True}

    merges = {
        "linear": {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts]},
        "ties": {"merge_method": "ties", "base_model": str(base),
                 "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.5}} for f in fts],
                 "parameters": {"normalize": True}},
    }
    for name, cfg in merges.items():
        cfg["dtype"] = "bfloat16"
        t = time.perf_counter()
        result = raymerge.merge(cfg, out_root / f"merge-{name}", **run_opts)
        wall = time.perf_counter() - t
        compute = result.timings.get("merge", result.seconds)
        print(f"{'merge ' + name:<16} {wall:>8.1f} {compute:>10.2f} {result.bytes_read / 1e9 / compute:>8.2f} "
              f"{_gib(result.peak_device_bytes):>13}  read {result.bytes_read / 1e6:,.1f} MB, "
              f"{result.workers} worker(s)", flush=True)

    for method in ("wanda", "sparsegpt"):
        cfg = {"model": str(base), "method": method, "sparsity": 0.5,
               "calibration": {"dataset": str(calib), "nsamples": nsamples, "seqlen": seqlen, "eval_samples": 4},
               "batch_size": 4}
        _gpu_peak_reset()
        t = time.perf_counter()
        result = raymerge.prune(cfg, out_root / f"prune-{method}", **run_opts)
        wall = time.perf_counter() - t
        compute = result.timings.get("prune", result.seconds)
        peak = "n/a" if args.ray else _gib(_gpu_peak())
        print(f"{'prune ' + method:<16} {wall:>8.1f} {compute:>10.2f} {model_bytes / 1e9 / compute:>8.2f} {peak:>13}  "
              f"sparsity {result.report.achieved_sparsity:.4f}, perplexity {result.report.perplexity_before:.1f} -> "
              f"{result.report.perplexity_after:.1f} (random weights: not meaningful)", flush=True)
    import shutil

    shutil.rmtree(out_root, ignore_errors=True)
    if args.ray:
        raymerge.shutdown_workers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
