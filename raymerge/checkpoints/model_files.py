"""The small files published next to the weights: `config.json`, tokenizer files, model card.

- `config.json` comes from the donor model (mergekit: the base model, else the first one). Its
  dtype key is set to the merge's output dtype; when slices change the layer stack, the layer
  count and every per-layer list (e.g. `layer_types`) are rebuilt from the layers actually used.
- Tokenizer and generation files are copied byte for byte from one model (with a tokenizer
  choice, `runtime.vocabulary` builds and saves the merged tokenizer instead).
- `README.md` is a model card (`huggingface_hub.ModelCard`: `base_model` lists the Hub inputs,
  tags `merge` and `raymerge`); `mergekit_config.yml` holds the config as run, under the name
  mergekit uses, so tools that look for it find it. Both can be turned off (`write_model_card`).
- `PROCESSOR_FILES` (a vision or audio model's image/video/feature processor settings) are copied
  from the donor, as mergekit copies an architecture's "tag-along" files.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from raymerge.checkpoints.source import TOKENIZER_FILES, CheckpointError, CheckpointSource

# A vision/audio model's processor settings, copied from the donor model whether or not the
# tokenizer is (mergekit copies these as its architectures' "tag-along" files).
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "normalizer.json",
)

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def merged_model_config(
    donor: dict[str, Any],
    *,
    dtype: Optional[str],
    layer_sources: Optional[Sequence[tuple[dict[str, Any], int]]] = None,
    untie: bool = False,
) -> dict[str, Any]:
    """The output config: `donor` with dtype and (for slices) the layer stack updated.

    `layer_sources` lists, per output layer, (config of the model it came from, its layer there).
    `untie`: the output stores its own output head although the donor ties it to the embedding
    (a tied model merged with untied ones): `tie_word_embeddings` is set to false, so that
    transformers loads the merged head instead of replacing it with the embedding.
    """
    config = json.loads(json.dumps(donor))  # deep copy
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
            config["text_config"]["tie_word_embeddings"] = False
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


def processor_files(source: CheckpointSource) -> dict[str, bytes]:
    """The processor files (`PROCESSOR_FILES`) of a model that exist, by file name."""
    return tokenizer_files(source, PROCESSOR_FILES)


def tokenizer_files(source: CheckpointSource, names: Sequence[str] = TOKENIZER_FILES) -> dict[str, bytes]:
    """The tokenizer and generation files of a model that exist, by file name."""
    out: dict[str, bytes] = {}
    for name in names:
        data = source.read_bytes(name)
        if data is not None:
            out[name] = data
    return out


def model_card(*, method: str, models: Sequence[str], base: Optional[str], config_yaml: str, version: str,
               name: Optional[str] = None) -> str:
    """README.md of a merged model, built with `huggingface_hub.ModelCard`.

    Metadata: `base_model` lists every input that is a Hugging Face Hub id (`org/name`, its
    revision dropped): the Hub refuses a card whose `base_model` holds anything else, so local
    folders and `s3://` inputs are named in the text only; `tags: [merge, raymerge]`;
    `library_name: transformers`. The text names the merge method, the base model, every input and
    the config as run. (mergekit 0.1.5 writes the same metadata with tags `[mergekit, merge]`.)
    """
    from huggingface_hub import ModelCard, ModelCardData

    from raymerge.checkpoints.hub_id import is_hub_reference

    def hub_id(ref: str) -> Optional[str]:
        path = ref.rsplit("@", 1)[0] if "@" in ref and not ref.startswith(("/", ".", "s3://")) else ref
        return path if is_hub_reference(path) else None

    # a `model+adapter` reference contributes both (as mergekit's card does)
    hub_models = list(dict.fromkeys(h for h in (hub_id(p) for m in models for p in m.split("+")) if h))
    data = ModelCardData(library_name="transformers", base_model=hub_models or None, tags=["merge", "raymerge"])

    def named(ref: str) -> str:
        h = hub_id(ref)
        return f"[{ref}](https://huggingface.co/{h})" if h else f"`{ref}`"

    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {name or 'Merged model'}", "",
        f"Made with [raymerge](https://github.com/raymerge/raymerge) {version} using the **{method}** merge method"
        + (f", with {named(base)} as the base model." if base else "."),
        "",
        "## Models merged", "",
    ]
    lines += [f"- {named(m)}" for m in models if m != base] or ["- (the base model only)"]
    lines += ["", "## Configuration", "", "The following YAML configuration (mergekit format) produced this model:",
              "", "```yaml", config_yaml.rstrip(), "```", ""]
    return str(ModelCard("\n".join(lines)))


def load_tokenizer(source: CheckpointSource, *, trust_remote_code: bool = False) -> Any:
    """The `transformers` tokenizer of a model, from its tokenizer files (read through the
    source, so a Hub, S3 or DeepSpeed model works like a local folder); `CheckpointError` when
    it has none. `trust_remote_code`: a tokenizer whose auto_map names code shipped with the
    model is built from that code (`checkpoints.remote_code`); without it, no code file is read,
    and one that cannot be loaded otherwise is a `CheckpointError` naming the flag."""
    from raymerge.checkpoints.remote_code import tokenizer_auto_map, tokenizer_code_files

    files = tokenizer_files(source, (*TOKENIZER_FILES, "config.json"))
    if not any(name.startswith("tokenizer") or name in ("vocab.json",) for name in files):
        raise CheckpointError(f"{source.location}: no tokenizer files (needed to tokenize the calibration text)")
    names_code = bool(tokenizer_auto_map(files))
    code = tokenizer_code_files(files, source.read_bytes, source.location) if trust_remote_code and names_code else {}
    files.pop("config.json", None)  # read for its auto_map only: the tokenizer loads as before
    return tokenizer_from_files({**files, **code}, source.location, trust_remote_code=trust_remote_code,
                                names_code=names_code)


def tokenizer_from_files(files: dict[str, bytes], where: str, *, trust_remote_code: bool = False,
                         names_code: bool = False, use_fast: Optional[bool] = None) -> Any:
    """A `transformers` tokenizer from a model's tokenizer files (with `trust_remote_code`, also
    the code files its auto_map names, which the caller read: `remote_code.tokenizer_code_files`),
    loaded from a temporary folder named after the files (`remote_code.code_folder`: the same code
    is one module in transformers' cache). A tokenizer whose auto_map names code (`names_code`)
    that transformers cannot load without it is a `CheckpointError` naming `where` and the flag."""
    from transformers import AutoTokenizer

    from raymerge.checkpoints.remote_code import code_folder, needs_code_error

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if use_fast is not None:
        kwargs["use_fast"] = use_fast
    with code_folder(files) as folder:
        try:
            return AutoTokenizer.from_pretrained(str(folder), **kwargs)
        except (ValueError, OSError, ImportError) as err:
            if names_code:
                raise needs_code_error(where, "tokenizer", err) from None
            raise
