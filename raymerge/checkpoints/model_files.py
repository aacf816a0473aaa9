"""The small files published next to the weights: `config.json`, tokenizer files, model card.

- `config.json` comes from the donor model (mergekit: the base model, else the first one). Its
  dtype key is set to the merge's output dtype; when slices change the layer stack, the layer
  count and every per-layer list (e.g. `layer_types`) are rebuilt from the layers actually used.
- Tokenizer and generation files are copied byte for byte from one model.
- `README.md` is a short model card; `mergekit_config.yml` holds the config as run, under the
  name mergekit uses, so tools that look for it find it.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from raymerge.checkpoints.source import TOKENIZER_FILES, CheckpointError, CheckpointSource

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def merged_model_config(
    donor: dict[str, Any],
    *,
    dtype: Optional[str],
    layer_sources: Optional[Sequence[tuple[dict[str, Any], int]]] = None,
) -> dict[str, Any]:
    """The output config: `donor` with dtype and (for slices) the layer stack updated.

    `layer_sources` lists, per output layer, (config of the model it came from, its layer there).
    """
    config = json.loads(json.dumps(donor))  # deep copy
    if dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for k in keys:
            config[k] = dtype
    if layer_sources is not None:
        n_donor = next((config[k] for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), None)
        for k in LAYER_COUNT_KEYS:
            if isinstance(config.get(k), int):
                config[k] = len(layer_sources)
        if n_donor is not None:
            for key, value in donor.items():
                if isinstance(value, list) and len(value) == n_donor and key not in ("architectures",):
                    config[key] = [_layer_value(src, key, layer, value) for src, layer in layer_sources]
    return config


def _layer_value(src: dict[str, Any], key: str, layer: int, fallback: list) -> Any:
    values = src.get(key)
    if isinstance(values, list) and layer < len(values):
        return values[layer]
    return fallback[min(layer, len(fallback) - 1)]


def tokenizer_files(source: CheckpointSource) -> dict[str, bytes]:
    """The tokenizer and generation files of a model that exist, by file name."""
    out: dict[str, bytes] = {}
    for name in TOKENIZER_FILES:
        data = source.read_bytes(name)
        if data is not None:
            out[name] = data
    return out


def model_card(*, method: str, models: Sequence[str], base: Optional[str], config_yaml: str, version: str) -> str:
    """A short README.md for the merged model."""
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- raymerge",
        "---",
        "# Merged model",
        "",
        f"Made with [raymerge](https://github.com/raymerge/raymerge) {version} using the **{method}** merge method.",
        "",
    ]
    if base:
        lines += [f"Base model: `{base}`", ""]
    lines += ["Models merged:", ""] + [f"- `{m}`" for m in models] + ["", "## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def load_tokenizer(source: CheckpointSource) -> Any:
    """The `transformers` tokenizer of a model, from its tokenizer files (read through the
    source, so a Hub, S3 or DeepSpeed model works like a local folder); `CheckpointError` when
    it has none."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    files = tokenizer_files(source)
    if not any(name.startswith("tokenizer") or name in ("vocab.json",) for name in files):
        raise CheckpointError(f"{source.location}: no tokenizer files (needed to tokenize the calibration text)")
    with tempfile.TemporaryDirectory(prefix="raymerge-tok-") as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)
