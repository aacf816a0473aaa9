"""Recognising decoder layers in tensor names, without per-architecture tables.

Hugging Face decoders name layer tensors `<prefix>.<layers|h|blocks|layer>.<i>.<rest>`
(`model.layers.3.mlp.up_proj.weight`, `transformer.h.3.attn.c_attn.weight`). Everything else is
either before the layers (embeddings: taken from a slice config's first slice, as mergekit
does) or after them (final norm, `lm_head`: taken from the last slice). Tensors outside layers
are "post" when they follow the layers in the model, which we recognise by name: the final
norm and the output head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer))\.(?P<idx>\d+)\.(?P<rest>.+)$")
_POST = re.compile(r"(^|\.)(lm_head|embed_out|output|norm|final_layernorm|final_layer_norm|ln_f|final_norm)(\.|$)")

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    rest: str

    def with_index(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


def parse_layer_name(name: str) -> Optional[LayerName]:
    m = _LAYER.match(name)
    if m is None:
        return None
    return LayerName(m["prefix"], int(m["idx"]), m["rest"])


def is_post_weight(name: str) -> bool:
    """True for non-layer tensors that come after the decoder layers (final norm, output head)."""
    return parse_layer_name(name) is None and _POST.search(name) is not None


@dataclass(frozen=True)
class ModelLayout:
    """A model's tensors split into pre-layer, per-layer and post-layer groups."""

    pre: tuple[str, ...]
    layers: dict[int, tuple[str, ...]]  # layer index -> tensor names (sorted)
    post: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else 0


def split_layout(names: Iterable[str]) -> ModelLayout:
    pre, post = [], []
    layers: dict[int, list[str]] = {}
    for name in names:
        parsed = parse_layer_name(name)
        if parsed is not None:
            layers.setdefault(parsed.index, []).append(name)
        elif is_post_weight(name):
            post.append(name)
        else:
            pre.append(name)
    return ModelLayout(tuple(sorted(pre)), {i: tuple(sorted(v)) for i, v in sorted(layers.items())}, tuple(sorted(post)))


def layer_count(config: dict) -> Optional[tuple[str, int]]:
    """The (key, value) of the layer-count entry of a config.json, if it has one."""
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return key, config[key]
    text = config.get("text_config")
    if isinstance(text, dict):
        return layer_count(text)
    return None


GAP_FACTOR = 2  # layer indices may skip at most as many indices as are present


def layer_index_problem(layout: ModelLayout, config: Optional[dict]) -> Optional[tuple[str, str]]:
    """(tensor name, problem) when a layer index is past the model's layers, else None.

    A model's layers are the indices its tensors use, counted from 0; planning walks every index
    up to the largest, so one tensor named `model.layers.16000000.x` would make it loop sixteen
    million times. The largest index must be below both the number of distinct indices present
    and config.json's layer count, whichever is larger (DeepSeek-V3's multi-token-prediction
    layer sits one past `num_hidden_layers`, and is present, so it passes). config.json is the
    same file's author, so its count is believed only up to `GAP_FACTOR` times the indices
    present: the work planning does stays proportional to the tensors listed, whatever it says.
    """
    if not layout.layers:
        return None
    present = len(layout.layers)
    counted = layer_count(config) if isinstance(config, dict) else None
    limit = max(present, min(counted[1], GAP_FACTOR * present) if counted else 0)
    top = max(layout.layers)
    if top < limit:
        return None
    if counted is None:
        said = "config.json gives no layer count"
    elif counted[1] > top:
        said = f"config.json {counted[0]}: {counted[1]}, believed only up to {GAP_FACTOR} x the indices present"
    else:
        said = f"config.json {counted[0]}: {counted[1]}"
    return layout.layers[top][0], (f"has layer index {top}, past the model's {present} layers ({said}); "
                                   "layer indices count up from 0")
