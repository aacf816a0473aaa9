"""Held-out perplexity of the guided merges (AIM, ACM, Sens) vs plain task arithmetic and TIES.

Tiny trained models, built here (offline, ~2 minutes on 2 cores):

- two "tasks": two second-order Markov languages over the same words (`demo_text(language=...)`);
- a base trained on a mixture of both, then two fine-tunes of it, each trained further on one task;
- every merge below from the same three models, evaluated on held-out text of each task.

It prints a table and reports; it asserts no winner (on a model this small the ranking can go
either way, and says little about 7B models).

    python examples/benchmark_guided.py [--workdir DIR] [--steps 250] [--ft-steps 120]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

import raymerge
from raymerge.demo import build_trained_model, demo_text

TASKS = {"A": 101, "B": 202}  # task name -> Markov chain ("language") seed


def perplexity(model_dir: Path, text: str, seqlen: int = 32) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor(tok(text.replace("\n\n", " </s> "))["input_ids"])
    n = (len(ids) // seqlen) * seqlen
    windows = ids[:n].view(-1, seqlen)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows.split(16):
            logits = model(w).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
            count += w[:, 1:].numel()
    return math.exp(total / count)


def build(root: Path, steps: int, ft_steps: int) -> dict[str, Path]:
    mixed = "\n\n".join(demo_text(100, 200, seed=s, language=lang) for s, lang in enumerate(TASKS.values()))
    paths = {"base": build_trained_model(root / "base", mixed, steps=steps, seed=0)}
    for i, (task, lang) in enumerate(TASKS.items()):
        text = demo_text(150, 200, seed=10 + i, language=lang)
        paths[task] = build_trained_model(root / f"ft{task}", text, steps=ft_steps, seed=1 + i, start_from=paths["base"], lr=1e-3)
    for i, (task, lang) in enumerate(TASKS.items()):
        (root / f"calib{task}.txt").write_text(demo_text(16, 200, seed=50 + i, language=lang))
        (root / f"heldout{task}.txt").write_text(demo_text(20, 200, seed=90 + i, language=lang))
    (root / "calib.txt").write_text((root / "calibA.txt").read_text() + "\n" + (root / "calibB.txt").read_text())
    return paths


def merges(paths: dict[str, Path], root: Path) -> dict[str, dict]:
    calib = {"dataset": str(root / "calib.txt"), "nsamples": 16, "seqlen": 32, "eval_samples": 0}

    def cfg(method: str, guidance: dict | None = None, **params) -> dict:
        c = {
            "merge_method": method,
            "base_model": str(paths["base"]),
            "models": [{"model": str(paths[t]), "parameters": {"weight": 1.0 if method == "ties" else 0.7}} for t in TASKS],
            "dtype": "float32",
        }
        if method == "ties":
            c["parameters"] = {"density": 0.5}
        c["parameters"] = {**c.get("parameters", {}), **params}
        if guidance:
            c["raymerge"] = {"guidance": {"calibration": calib, **guidance}}
        return c

    task_cal = {str(paths[t]): {**calib, "dataset": str(root / f"calib{t}.txt")} for t in TASKS}
    return {
        "task_arithmetic": cfg("task_arithmetic"),
        "ties": cfg("ties"),
        "AIM + ties": cfg("ties", {"method": "aim", "omega": 0.4}),
        "ACM + task_arithmetic": cfg("task_arithmetic", {"method": "acm"}),
        "ACM + ties": cfg("ties", {"method": "acm"}),
        "Sens + task_arithmetic": cfg("task_arithmetic", {"method": "sens", "task_calibration": task_cal}),
        "Sens + ties": cfg("ties", {"method": "sens", "task_calibration": task_cal}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="where models and merges go (default: a temp folder)")
    ap.add_argument("--steps", type=int, default=250, help="training steps of the base")
    ap.add_argument("--ft-steps", type=int, default=120, help="training steps of each fine-tune")
    ap.add_argument("--stages", type=int, default=2, help="stage workers of the statistics pass")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="raymerge-guided-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = build(root, args.steps, args.ft_steps)
    print(f"built base and fine-tunes in {time.perf_counter() - t0:.0f} s under {root}")
    held = {t: (root / f"heldout{t}.txt").read_text() for t in TASKS}
    rows = [(name, None, {t: perplexity(p, held[t]) for t in TASKS}) for name, p in paths.items()]
    for name, cfg in merges(paths, root).items():
        if "raymerge" in cfg:
            cfg["raymerge"]["guidance"]["stages"] = args.stages
        t1 = time.perf_counter()
        out = raymerge.merge(cfg, root / name.replace(" ", "").replace("+", "-"), overwrite=True, quiet=True).output
        rows.append((name, time.perf_counter() - t1, {t: perplexity(out, held[t]) for t in TASKS}))
    print(f"\nheld-out perplexity (tasks {', '.join(TASKS)}; lower is better; no winner is asserted)")
    print(f"{'model':<26}{'merge s':>9}" + "".join(f"{'ppl ' + t:>10}" for t in TASKS) + f"{'mean':>10}")
    for name, secs, ppl in rows:
        mean = sum(ppl.values()) / len(ppl)
        print(f"{name:<26}{'' if secs is None else f'{secs:.1f}':>9}" + "".join(f"{ppl[t]:>10.2f}" for t in TASKS) + f"{mean:>10.2f}")


if __name__ == "__main__":
    main()
