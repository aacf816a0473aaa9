"""The lm-evaluation-harness objective of a search (`objective: {kind: lm_eval, lm_eval: {...}}`).

lm-eval runs a Hugging Face model from a folder, so a trial's model is written once: the stage
workers hand over the parameters they hold (the trial's merged or re-masked weights, exactly
what the in-memory objectives evaluate), the driver writes them as one safetensors file in the
compute dtype with the donor's config.json and tokenizer into a temporary folder under OUT,
calls `lm_eval.simple_evaluate(model="hf", ...)` on `device` (default cpu: the GPUs belong to
the stage workers) without bootstrapped error bars, and deletes the folder. The objective is the
mean of `metric` over `tasks`. It is much slower than the in-memory objectives: a write and a
load per trial, plus lm-eval itself in the driver process.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from raymerge.checkpoints import CheckpointSource
from raymerge.checkpoints.model_files import tokenizer_files
from raymerge.config.search_config import LmEvalSettings


class LmEvalError(RuntimeError):
    """lm-eval did not return the metric asked for."""


def donor_files(donor: CheckpointSource) -> dict[str, Any]:
    """What a written trial model takes from the donor: config.json, tokenizer, tensor names, and
    (`_source`) the donor itself for tensors that are not parameters (buffers saved in the
    checkpoint; trials never change them)."""
    return {"config.json": json.dumps(donor.config(), indent=2) + "\n", **tokenizer_files(donor),
            "_names": sorted(donor.tensors()), "_source": donor}


def write_model(folder: Path, state: dict[str, torch.Tensor], files: dict[str, Any]) -> None:
    tensors = {n: (state[n] if n in state else files["_source"].read(n)).contiguous() for n in files["_names"]}
    save_file(tensors, str(folder / "model.safetensors"))
    for name, data in files.items():
        if not name.startswith("_"):
            (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)


def lm_eval_value(settings: LmEvalSettings, gather: Callable[[list[str]], dict[str, torch.Tensor]], files: dict[str, Any], out: Path) -> float:
    """Write the trial's model (`gather(names)` returns its tensors), run lm-eval, return the mean metric."""
    import lm_eval

    with tempfile.TemporaryDirectory(prefix="lm-eval-trial-", dir=out) as tmp:
        write_model(Path(tmp), gather(files["_names"]), files)
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": tmp, "dtype": "float32"}, tasks=list(settings.tasks),
            num_fewshot=settings.num_fewshot, limit=settings.limit, batch_size=settings.batch_size,
            device=settings.device, bootstrap_iters=0,
        )
    values = []
    for task in settings.tasks:
        got = (results or {}).get("results", {}).get(task, {})
        if settings.metric not in got:
            raise LmEvalError(f"lm-eval returned no {settings.metric!r} for task {task!r} (it has: {', '.join(sorted(got)) or 'nothing'})")
        values.append(float(got[settings.metric]))
    return sum(values) / len(values)
