"""The compressed task vectors of a 1bit-Merging merge, written next to the merged model.

With `raymerge: {export_task_vectors: true}` in an `onebit` config, each fine-tuned model's
task vectors are published as `task_vectors-<k>.onebit` (safetensors format; load it with
`safetensors.torch.load_file`): for a compressed weight matrix `<tensor>.bits` (uint8, the signs
packed 8 per byte, `raymerge.methods.onebit.pack_onebit`) and `<tensor>.scale` (0-d); for a
tensor the model keeps full (`keep_full`, or 1-D) `<tensor>.delta`. `task_vectors.json` lists
the files with each model's storage size against its full task vector at 16 bits per value.
The files are computed in the driver, one tensor at a time (the compressed vectors of a 7B model
are ~1/16 of its size, held in memory until written). They are published with the merged model,
through the merge's staged output (`runtime.output.JobOutput`): counted in its disk-space check,
written into its staging folder, and published with it — to a local folder or an `s3://` prefix
alike, never half-written.
"""

from __future__ import annotations

import json
from typing import Sequence

import torch
from safetensors.torch import save
from raymerge.progress import bar as tqdm  # tqdm with raymerge.progress.bar_kwargs

from raymerge.checkpoints import SourceSpec
from raymerge.methods.onebit import is_compressible, onebit_storage_bits, pack_onebit
from raymerge.runtime.compute import work_dtype
from raymerge.runtime.operators import MergeProgram


def task_vector_files(program: MergeProgram, specs: Sequence[SourceSpec], *, quiet: bool = False) -> dict[str, bytes]:
    """File name -> bytes for every fine-tuned model's compressed task vectors (module docstring)."""
    sources = [s.open() for s in specs]
    try:
        per_model: dict[int, dict[str, torch.Tensor]] = {}
        bits: dict[int, list[int]] = {}
        for op in tqdm(program.operators, desc="1bit task vectors", unit="tensor", disable=quiet, leave=False):
            if op.base_index is None:
                continue
            raws = [sources[t.model].read(t.name) for t in op.inputs]
            if not raws[0].is_floating_point():
                continue  # integer buffers are not merged (equal across models) and have no task vector
            work = work_dtype(op, [r.dtype for r in raws])
            base = raws[op.base_index].to(work)  # the merge's own working dtype, so scales match it
            for i, t in enumerate(op.inputs):
                if i == op.base_index:
                    continue
                raw = raws[i]
                delta = raw.to(work) - base
                full = bool(op.model_params[i].get("keep_full", False)) or not is_compressible(delta)
                out = per_model.setdefault(t.model, {})
                if full:
                    out[f"{op.name}.delta"] = delta.to(raw.dtype).contiguous()
                else:
                    packed, scale = pack_onebit(delta)
                    out[f"{op.name}.bits"], out[f"{op.name}.scale"] = packed, scale
                stats = bits.setdefault(t.model, [0, 0])
                stats[0] += onebit_storage_bits(delta.shape, keep_full=full)
                stats[1] += delta.numel() * 16
    finally:
        for s in sources:
            s.close()
    files: dict[str, bytes] = {}
    summary = {}
    for k in sorted(per_model):
        name = f"task_vectors-{k}.onebit"
        files[name] = save(per_model[k], metadata={"model": str(program.models[k]), "format": "raymerge-onebit-1"})
        summary[str(program.models[k])] = {
            "file": name, "storage_bytes": (bits[k][0] + 7) // 8, "full_bf16_bytes": bits[k][1] // 8,
            "ratio": bits[k][0] / bits[k][1] if bits[k][1] else 0.0,
        }
    files["task_vectors.json"] = (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode()
    return files
