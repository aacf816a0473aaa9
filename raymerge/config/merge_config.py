"""Pydantic models of mergekit's merge YAML, and loading it with errors that name key and file.

The accepted format is mergekit 0.1.5's: exactly one of `models:`, `slices:` or `modules:`;
`merge_method`, `base_model`, `parameters`, `dtype`, `out_dtype`, `tokenizer_source`,
`tokenizer`, `chat_template`. Parameter values are scalars, gradients (lists of numbers,
interpolated over layers) or filter lists (`[{filter: mlp, value: ...}, {value: ...}]`).

Lenient where mergekit is and it is harmless: a numeric string (`weight: 5e-1`, which YAML 1.1
reads as a string) is a number in `parameters`; `dtype: torch.bfloat16` is `bfloat16`; a model
reference may be mergekit's dict form `{model: PATH[@REV] | {path, revision}, lora: ...}` besides
raymerge's `{path, revision, config_from}` (its `override_architecture` is refused, clearly); a
LoRA adapter is `MODEL+ADAPTER` or `lora:` there (applied lazily: `checkpoints.lora`).

Unlike mergekit, unknown keys are errors (mergekit ignores them silently, so a typo such as
`densty:` changes nothing and goes unnoticed). raymerge-only settings live under an optional
top-level `raymerge:` key so that the rest of the file stays valid for mergekit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from raymerge.errors import ConfigError, RaymergeError  # noqa: F401  (ConfigError: raised and exported here)

ScalarParameter = Union[bool, int, float, str]
ScalarOrGradient = Union[ScalarParameter, list[ScalarParameter]]




class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConditionalParameter(_Strict):
    value: ScalarOrGradient
    filter: Optional[str] = None


ParameterSetting = Union[list[ConditionalParameter], ConditionalParameter, ScalarOrGradient]


# A number written as a string: YAML 1.1 (PyYAML) reads `5e-1` and `1e3` (no dot) as strings, and
# a quoted "0.5" is one too. mergekit validates such a string as a number wherever the parameter
# is numeric; so does raymerge (no parameter of any method takes a numeric-looking label).
# `inf` and `nan` stay strings (and are then refused as not a finite number).
_NUMERIC_STRING = re.compile(r"^\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$")


def numeric_string(value: Any) -> Any:
    """`value` as an int or float when it is a string spelling a finite number, else unchanged."""
    if isinstance(value, str) and _NUMERIC_STRING.match(value):
        text = value.strip()
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    return value


def _coerce_setting(setting: Any) -> Any:
    """Numeric strings -> numbers in a setting: a scalar, a gradient list, a filter entry or list."""
    if isinstance(setting, list):
        return [_coerce_setting(e) for e in setting]
    if isinstance(setting, dict):
        return {k: (_coerce_setting(v) if k == "value" else v) for k, v in setting.items()}
    return numeric_string(setting)


def _parameters_in(v: Any) -> Any:
    """Numeric strings become numbers (as mergekit reads them). `density: []` (or a filter
    entry's `value: []`) has no value at any layer: refused, where mergekit would fail later
    inside the merge."""
    if isinstance(v, dict):
        for name, setting in v.items():
            values = setting if isinstance(setting, list) else [setting]
            if setting == [] or any(isinstance(e, dict) and e.get("value") == [] for e in values):
                raise ValueError(f"{name}: an empty list is not a value (give a number, a list of numbers "
                                 "(a gradient over layers) or a filter list)")
        return {name: _coerce_setting(setting) for name, setting in v.items()}
    return v


Parameters = Annotated[dict[str, ParameterSetting], BeforeValidator(_parameters_in)]


class ModelRef(_Strict):
    """A model reference: a local directory, `s3://bucket/prefix`, or a Hub id (`org/name[@rev]`),
    optionally with a LoRA adapter: `MODEL+ADAPTER` (each `[@rev]`), as in mergekit.

    `config_from` (raymerge only, written as `model: {path: ..., config_from: ...}`): for a
    DeepSpeed ZeRO checkpoint folder, the local Hugging Face model directory whose config.json
    and tokenizer files to use when the checkpoint has none.
    `lora` / `lora_revision`: a PEFT LoRA adapter (a local folder or a Hub id) applied to the
    model's tensors as they are read (`checkpoints.lora`).
    """

    path: str
    revision: Optional[str] = None
    config_from: Optional[str] = None
    lora: Optional[str] = None
    lora_revision: Optional[str] = None

    @classmethod
    def parse(cls, value: Any, *, allow_lora: bool = True) -> "ModelRef":
        """A reference from the config (a string or a dict); `allow_lora=False` where only a plain
        model can be read (a prune's `model:`: merge the adapter with a `merge:` instead)."""
        ref = cls._parse(value)
        if ref.lora is not None and not allow_lora:
            raise ValueError(f"a LoRA reference ({ref}) is not accepted here; apply it in a merge config "
                             f"(e.g. `merge: {{merge_method: passthrough, models: [{{model: {ref}}}]}}`)")
        return ref

    @classmethod
    def _parse(cls, value: Any) -> "ModelRef":
        if isinstance(value, ModelRef):
            return value
        if isinstance(value, dict):
            if "model" in value:
                return cls._parse_mergekit_dict(value)
            return cls(**value)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"a model reference must be a non-empty string, got {value!r}")
        text = value.strip()
        lora = lora_rev = None
        if "+" in text and not Path(text).expanduser().exists():  # a local folder may have a + in its name
            parts = text.split("+")
            if len(parts) != 2 or not all(p.strip() for p in parts):
                raise ValueError(f"cannot parse model reference {text!r}: use MODEL[@REV] or MODEL[@REV]+LORA[@REV]")
            text, (lora, lora_rev) = parts[0].strip(), _path_and_revision(parts[1].strip())
        path, revision = _path_and_revision(text)
        return cls(path=path, revision=revision, lora=lora, lora_revision=lora_rev)

    @classmethod
    def _parse_mergekit_dict(cls, value: dict) -> "ModelRef":
        """mergekit's dict form: `{model: PATH[@REV] | {path: PATH, revision: REV}, lora: (the
        same), override_architecture: ...}` (its serialised `ModelReference`)."""
        extra = sorted(set(value) - {"model", "lora", "override_architecture"})
        if extra:
            raise ValueError(f"unknown key(s) {', '.join(extra)} in a model reference "
                             "(mergekit's dict form has model, lora and override_architecture)")
        if value.get("override_architecture") is not None:
            raise ValueError(
                "override_architecture is not supported: raymerge reads each model's architecture from its "
                "config.json (pass --allow-mixed-architectures / --allow-crimes to merge different ones)"
            )
        path, revision = _model_path(value["model"], "model")
        lora = lora_rev = None
        if value.get("lora") is not None:
            lora, lora_rev = _model_path(value["lora"], "lora")
        return cls(path=path, revision=revision, lora=lora, lora_revision=lora_rev)

    def without_lora(self) -> "ModelRef":
        return ModelRef(path=self.path, revision=self.revision, config_from=self.config_from)

    def __str__(self) -> str:
        text = self.path if self.revision is None else f"{self.path}@{self.revision}"
        if self.lora is not None:
            text += "+" + (self.lora if self.lora_revision is None else f"{self.lora}@{self.lora_revision}")
        return text


def _path_and_revision(text: str) -> tuple[str, Optional[str]]:
    """`org/name@rev` -> (org/name, rev); local and s3:// paths keep any @ in them."""
    if "@" in text and not text.startswith(("/", ".", "~", "s3://")):
        path, revision = text.rsplit("@", 1)
        return path, revision or None
    return text, None


def _model_path(value: Any, key: str) -> tuple[str, Optional[str]]:
    """A mergekit `ModelPath`: `PATH[@REV]` or `{path: PATH, revision: REV}`."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"path", "revision"})
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)} in {key}: (a model path has path and revision)")
        if not isinstance(value.get("path"), str) or not value["path"].strip():
            raise ValueError(f"{key}: a model path needs a non-empty 'path', got {value!r}")
        return value["path"].strip(), value.get("revision")
    if not isinstance(value, str) or not value.strip() or "+" in value:
        raise ValueError(f"{key}: expected a model path (PATH[@REV] or {{path, revision}}), got {value!r}")
    return _path_and_revision(value.strip())


def _model_ref(v: Any) -> ModelRef:
    return ModelRef.parse(v)


class InputModel(_Strict):
    model: ModelRef
    parameters: Optional[Parameters] = None

    _parse_model = field_validator("model", mode="before")(lambda cls, v: _model_ref(v))


class InputSlice(_Strict):
    model: ModelRef
    layer_range: tuple[int, int]
    parameters: Optional[Parameters] = None

    _parse_model = field_validator("model", mode="before")(lambda cls, v: _model_ref(v))

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] < v[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start <= end, got {list(v)}")
        return v


class OutputSlice(_Strict):
    sources: list[InputSlice] = Field(min_length=1)
    base_model: Optional[ModelRef] = None
    residual_weight: Optional[float] = None  # accepted for compatibility; mergekit ignores it too
    parameters: Optional[Parameters] = None

    @field_validator("base_model", mode="before")
    @classmethod
    def _parse_base(cls, v: Any) -> Any:
        return None if v is None else _model_ref(v)

    @model_validator(mode="after")
    def _same_length(self) -> "OutputSlice":
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(
                "all sources of a slice must cover the same number of layers, got "
                + ", ".join(f"{s.model}: {list(s.layer_range)}" for s in self.sources)
            )
        return self


class OutputModule(_Strict):
    slices: Optional[list[OutputSlice]] = None
    models: Optional[list[InputModel]] = None
    parameters: Optional[Parameters] = None


class ModelTokenEmbedding(_Strict):
    """`{kind: model_token, model: M, token: T | token_id: I}`: row I (or token T's row) of
    model M's own embedding."""

    kind: Literal["model_token"]
    model: ModelRef
    token_id: Optional[int] = None
    token: Optional[str] = None

    _parse_model = field_validator("model", mode="before")(lambda cls, v: _model_ref(v))

    @model_validator(mode="after")
    def _one_of(self) -> "ModelTokenEmbedding":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroEmbedding(_Strict):
    """`{kind: zero}`: an all-zero row."""

    kind: Literal["zero"]


def _token_source(v: Any) -> Any:
    if v is None or isinstance(v, (ModelRef, ModelTokenEmbedding, ZeroEmbedding)):
        return v
    if isinstance(v, dict) and "kind" in v:
        return ZeroEmbedding(**v) if v["kind"] == "zero" else ModelTokenEmbedding(**v)
    return _model_ref(v)


class TokenEmbedding(_Strict):
    """One entry of `tokenizer.tokens`: where the token's embedding row comes from (a model's row
    of the same token, a given model token, or zero) and whether it replaces rows models have."""

    source: Union[ModelTokenEmbedding, ZeroEmbedding, ModelRef, None] = None
    force: bool = False

    _parse_source = field_validator("source", mode="before")(lambda cls, v: _token_source(v))


class TokenizerSettings(_Strict):
    """The `tokenizer:` block: the vocabulary (`union` — mergekit's default —, `base` or a model),
    tokens to add with their embeddings, and padding of the vocabulary (`runtime.vocabulary`)."""

    source: Union[Literal["union", "base"], ModelRef] = "union"
    tokens: Optional[dict[str, TokenEmbedding]] = None
    pad_to_multiple_of: Optional[int] = Field(default=None, gt=0)

    @field_validator("source", mode="before")
    @classmethod
    def _parse_source(cls, v: Any) -> Any:
        return v if v in ("union", "base") else _model_ref(v)


class RaymergeSettings(_Strict):
    """raymerge-only options (mergekit ignores none of these: they live under `raymerge:`)."""

    random_seed: Optional[int] = None
    out_shard_size: Optional[Union[int, str]] = None
    guidance: Optional[dict[str, Any]] = None  # validated by config.guidance_config (AIM/ACM/Sens)
    export_task_vectors: bool = False  # onebit: also publish the compressed task vectors


DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


class MergeConfig(_Strict):
    merge_method: str
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    modules: Optional[dict[str, OutputModule]] = None
    base_model: Optional[ModelRef] = None
    parameters: Optional[Parameters] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Union[Literal["union", "base"], ModelRef, None] = None
    tokenizer: Optional[TokenizerSettings] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None
    raymerge: Optional[RaymergeSettings] = None

    @field_validator("base_model", mode="before")
    @classmethod
    def _parse_base(cls, v: Any) -> Any:
        return None if v is None else _model_ref(v)

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _parse_tok(cls, v: Any) -> Any:
        if v is None or v in ("union", "base"):
            return v
        return _model_ref(v)

    @field_validator("dtype", "out_dtype", mode="before")
    @classmethod
    def _torch_prefix(cls, v: Any) -> Any:
        """`torch.bfloat16` is `bfloat16` (mergekit strips the prefix too)."""
        return v[len("torch."):] if isinstance(v, str) and v.startswith("torch.") else v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {v!r}; use one of {', '.join(DTYPE_NAMES)}")
        return v

    @model_validator(mode="after")
    def _one_layout(self) -> "MergeConfig":
        present = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(present) != 1:
            raise ValueError(
                "exactly one of 'models', 'slices' or 'modules' must be given"
                + (f" (found {', '.join(present)})" if present else "")
            )
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or 'tokenizer', not both")
        seen: set[tuple[str, Optional[str]]] = set()
        for m in self.models or []:
            key = (m.model.path, m.model.revision)
            if key in seen:  # mergekit refuses it too; both entries would get the first one's parameters
                raise ValueError(f"models: {m.model.path} is listed twice; list each model once")
            seen.add(key)
        if self.modules:
            if len(self.modules) != 1:
                raise ValueError(
                    "multi-module configs (vision-language models) are not supported yet; "
                    "use 'models:' or 'slices:'"
                )
            (module,) = self.modules.values()
            if bool(module.slices) == bool(module.models):
                raise ValueError("a module needs exactly one of 'slices' or 'models'")
        return self

    def tokenizer_choice(self) -> Any:
        """`union`, `base`, a ModelRef, or None when the config keeps the vocabulary as it is."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    def referenced_models(self) -> list[ModelRef]:
        """Every model the config names, base first, without duplicates, in config order."""
        seen: list[ModelRef] = []

        def add(m: Optional[ModelRef]) -> None:
            if m is not None and m not in seen:
                seen.append(m)

        add(self.base_model)
        for m in self._model_list() or []:
            add(m.model)
        for s in self._slice_list() or []:
            add(s.base_model)
            for src in s.sources:
                add(src.model)
        return seen

    def _module(self) -> Optional[OutputModule]:
        return next(iter(self.modules.values())) if self.modules else None

    def _model_list(self) -> Optional[list[InputModel]]:
        mod = self._module()
        return self.models or (mod.models if mod else None)

    def _slice_list(self) -> Optional[list[OutputSlice]]:
        mod = self._module()
        return self.slices or (mod.slices if mod else None)

    def module_parameters(self) -> Optional[Parameters]:
        mod = self._module()
        return mod.parameters if mod else None

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(_refs_to_str(data), sort_keys=False)


def _refs_to_str(data: Any) -> Any:
    """Turn dumped ModelRef dicts back into the `path[@rev][+lora[@rev]]` strings of the YAML format."""
    if isinstance(data, dict):
        if set(data) <= {"path", "revision", "lora", "lora_revision"} and "path" in data:
            return str(ModelRef(**data))
        return {k: _refs_to_str(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_refs_to_str(v) for v in data]
    return data


def format_validation_error(
    err: ValidationError, source: str, what: str = "merge config",
    unknown_key: str = "unknown key (not part of the mergekit format; check the spelling)",
    prefix: str = "",
) -> str:
    """One line per error: the dotted key path (under `prefix`) and what is wrong with it."""
    lines = [f"invalid {what} {source}:"]
    for e in err.errors():
        parts = [str(p) for p in e["loc"] if not str(p).startswith(("function-", "list[", "union[", "literal["))]
        loc = ".".join([prefix, *parts] if prefix else parts)
        msg = e["msg"]
        if e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif e["type"] == "extra_forbidden":
            msg = unknown_key
        lines.append(f"  {loc or '<top level>'}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<dict>") -> MergeConfig:
    """Validate a config dict; raise ConfigError naming `source` and each bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid merge config {source}: expected a mapping at the top level")
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    if cfg.raymerge is not None and cfg.raymerge.guidance is not None:
        from raymerge.config.guidance_config import parse_guidance_config

        parse_guidance_config(cfg.raymerge.guidance, source)
    if cfg.raymerge is not None and cfg.raymerge.export_task_vectors and cfg.merge_method != "onebit":
        raise ConfigError(f"invalid merge config {source}:\n  raymerge.export_task_vectors: only merge_method onebit compresses task vectors")
    return cfg


def read_yaml(path: Union[str, Path], what: str) -> Any:
    """The parsed YAML file at `path`; ConfigError naming it when missing or not valid YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    from raymerge.config.yaml_loader import load_yaml_file

    return load_yaml_file(path)  # bounded: an alias bomb or a non-UTF-8 file is one line


def load_config(config: Union[str, Path, dict[str, Any], MergeConfig]) -> tuple[MergeConfig, str]:
    """Load a config from a YAML path, a dict or a MergeConfig; return it with its source label."""
    if isinstance(config, MergeConfig):
        return config, "<MergeConfig>"
    if isinstance(config, dict):
        return parse_config(config, "<dict>"), "<dict>"
    return parse_config(read_yaml(config, "merge config"), str(config)), str(config)
