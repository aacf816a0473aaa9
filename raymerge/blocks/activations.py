"""Activation statistics of one `DecoderBlock` for the guided merges (AIM and ACM).

Pure torch and hooks, no Ray: a stage worker attaches one of these to its block, the calibration
windows flow through the pipeline as usual (`DecoderBlock.embed`, `forward`, and `logits` on the
last block so that the final norm and head run too), and the collector is read afterwards.

- `InputAbsMean` (AIM): for every module with a weight that takes an input (linear layers,
  norms, the output head; not the input embeddings), the sum over windows of the mean over the
  window's tokens of |input| per input channel, in float64, keyed by the weight's tensor name.
- `OutputRecorder` (ACM): the outputs of each decoder layer's MLP (and of the input embeddings,
  the final norm and the head on the blocks that run them) per window, rounded to bfloat16. In
  `record` mode it keeps them (the base model's pass); in `compare` mode it computes, per window,
  the normalised mutual information against what was recorded for that window (a fine-tune's
  pass), and averages per layer key. Keys: layer index; -1 embeddings, -2 final norm, -3 head.

`layer_keys(block)` maps each parameter name the block holds to the key whose ACM coefficient
applies to it (None for parameters outside all of them).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from raymerge.methods.guided import normalized_mutual_information
from raymerge.blocks.decoder import DecoderBlock

EMBED_KEY, NORM_KEY, HEAD_KEY = -1, -2, -3


def _materialised(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and not w.is_meta


def weighted_modules(block: DecoderBlock) -> dict[str, nn.Module]:
    """Tensor name of the weight -> module, for every materialised module with an input channel
    dimension (everything with a weight except the input embeddings). A head tied to the input
    embeddings (one matrix, stored once as the embedding) is keyed by the embedding's tensor
    name: the head's inputs are that stored matrix's input channels (its columns), so AIM
    relaxes the shared matrix by them — there is no `lm_head.weight` tensor to guide."""
    embed = block.model.get_input_embeddings()
    head = block.model.get_output_embeddings()
    tied_name = None
    if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", False):
        tied_name = next((f"{n}.weight" for n, m in block.model.named_modules() if m is embed), None)
    out: dict[str, nn.Module] = {}
    for name, module in block.model.named_modules():
        if module is embed or not _materialised(module) or "weight" not in module._parameters:
            continue
        key = tied_name if module is head and tied_name is not None else (f"{name}.weight" if name else "weight")
        out[key] = module
    return out


def _final_norm(block: DecoderBlock) -> Optional[nn.Module]:
    decoder = block.model.get_decoder() if hasattr(block.model, "get_decoder") else None
    norm = getattr(decoder, "norm", None) if decoder is not None else None
    return norm if isinstance(norm, nn.Module) and _materialised(norm) else None


def acm_modules(block: DecoderBlock) -> dict[int, nn.Module]:
    """Layer key -> the module whose output ACM compares (see the module docstring)."""
    out: dict[int, nn.Module] = {}
    for i in range(block.first, block.last + 1):
        layer = block.layer(i)
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise RuntimeError(f"decoder layer {i} ({type(layer).__name__}) has no `mlp` submodule to compare activations at")
        out[i] = mlp
    if block.has_embed:
        out[EMBED_KEY] = block.model.get_input_embeddings()
    if block.has_head:
        norm = _final_norm(block)
        if norm is not None:
            out[NORM_KEY] = norm
        out[HEAD_KEY] = block.model.get_output_embeddings()
    return out


def layer_keys(block: DecoderBlock) -> dict[str, Optional[int]]:
    """Parameter name -> ACM layer key (tied embeddings count as embeddings)."""
    keys: dict[str, Optional[int]] = {}
    embed_ids = {id(p) for p in block.model.get_input_embeddings().parameters()}
    head = block.model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    norm = _final_norm(block)
    norm_ids = {id(p) for p in norm.parameters()} if norm is not None else set()
    root = block.layers_path + "."
    for name, p in block.held_parameters().items():
        if name.startswith(root):
            keys[name] = int(name[len(root):].split(".", 1)[0])
        elif id(p) in embed_ids:
            keys[name] = EMBED_KEY
        elif id(p) in norm_ids:
            keys[name] = NORM_KEY
        elif id(p) in head_ids:
            keys[name] = HEAD_KEY
        else:
            keys[name] = None
    return keys


class _Hooks:
    def __init__(self) -> None:
        self.handles: list[Any] = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class InputAbsMean(_Hooks):
    """AIM's per-channel input statistic of every weighted module (see the module docstring)."""

    def __init__(self, block: DecoderBlock) -> None:
        super().__init__()
        self.sums: dict[str, torch.Tensor] = {}
        for name, module in weighted_modules(block).items():
            self.handles.append(module.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            per_window = x.abs().double().reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1).sum(dim=0)
            prev = self.sums.get(name)
            self.sums[name] = per_window if prev is None else prev + per_window

        return hook


class OutputRecorder(_Hooks):
    """ACM's per-window activations and mutual information (see the module docstring)."""

    def __init__(self, block: DecoderBlock) -> None:
        super().__init__()
        self.mode = "record"
        self.recorded: dict[int, list[torch.Tensor]] = {}
        self._seen: dict[int, int] = {}
        self.nmi_sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}
        for key, module in acm_modules(block).items():
            self.handles.append(module.register_forward_hook(self._hook(key)))

    def start(self, mode: str) -> None:
        """`record` (base pass) or `compare` (a fine-tune's pass against the recorded base)."""
        if mode not in ("record", "compare"):
            raise ValueError(f"unknown mode {mode!r}")
        self.mode = mode
        self._seen = {}
        self.nmi_sums, self.counts = {}, {}

    def _hook(self, key: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            windows = out.detach().to(torch.bfloat16).cpu().split(1)
            if self.mode == "record":
                self.recorded.setdefault(key, []).extend(windows)
                return
            start = self._seen.get(key, 0)
            base = self.recorded.get(key, [])
            for j, w in enumerate(windows):
                if start + j >= len(base):
                    raise RuntimeError(f"ACM: more windows in the comparison pass than recorded for the base (layer key {key})")
                nmi = normalized_mutual_information(base[start + j], w)
                self.nmi_sums[key] = self.nmi_sums.get(key, 0.0) + nmi
                self.counts[key] = self.counts.get(key, 0) + 1
            self._seen[key] = start + len(windows)

        return hook

    def mean_nmi(self) -> dict[int, float]:
        return {k: self.nmi_sums[k] / self.counts[k] for k in self.nmi_sums}
