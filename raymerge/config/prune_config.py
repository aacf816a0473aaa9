"""Pydantic model of the prune YAML, and loading it with errors that name the key and the file.

```yaml
model: ./my-model              # local directory, Hub id (org/name[@rev]), s3:// prefix, or
                               # {path: ./zero_ckpt, config_from: ./hf_dir} for a DeepSpeed folder
# merge: {...}                 # or, instead of `model:`, a merge config (mergekit format): the
                               # merged tensors are pruned without writing the merged model
method: wanda                  # magnitude | wanda | sparsegpt (or a registered prune method)
sparsity: 0.5                  # fraction of each pruned matrix set to zero, in [0, 1)
pattern: unstructured          # or an N:M pattern such as "2:4" or "4:8" (then sparsity = N/M)
layerwise: uniform             # or {owl: {lambda: 0.08, m: 5}}, or one sparsity per decoder layer
modules: null                  # regexes over linear-module names inside a decoder layer
                               # (e.g. ["self_attn\\..*", "mlp\\.down_proj"]); default: all of them
mode: sequential               # sequential: each layer's inputs come from the already pruned
                               # layers before it (Wanda/SparseGPT papers); parallel: all
                               # statistics from the dense model in one pass
calibration:                   # see raymerge/config/calibration.py
  dataset: calib.txt
  nsamples: 128
  seqlen: 2048
sparsegpt: {blocksize: 128, dampening: 0.01}
wanda: {weight_exponent: 1.0, norm_exponent: 1.0}   # the Wanda metric's exponents (search output)
batch_size: 8                  # calibration windows per micro-batch between stages
dtype: float32                 # compute dtype of the layers (the output keeps the input's dtype)
evaluate: true                 # perplexity before/after on the held-out calibration windows
```

Wanda and SparseGPT need calibration text; magnitude does not (without it there is no
perplexity report). N:M patterns fix the sparsity at N/M: a `sparsity` that disagrees is an
error rather than being silently overridden.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from raymerge.config.calibration import CalibrationConfig
from raymerge.config.merge_config import ConfigError, ModelRef, _Strict, format_validation_error, read_yaml

METHODS = ("magnitude", "wanda", "sparsegpt")  # the built-ins; `method:` accepts any registered name
# (checked against the registry when a job starts: `raymerge.pruning.methods.check_config_method`)


class OwlSettings(_Strict):
    """OWL (outlier-weighted layerwise sparsity): `lambda` is the largest deviation of a layer's
    sparsity from the target, `m` the outlier threshold as a multiple of the mean score."""

    lam: float = Field(default=0.08, ge=0.0, lt=1.0, alias="lambda")
    m: float = Field(default=5.0, gt=0.0)


class Owl(_Strict):
    owl: OwlSettings


class WandaSettings(_Strict):
    """The metric |W|^weight_exponent * ||X||^norm_exponent (1, 1: Wanda; OptiShear searches them)."""

    weight_exponent: float = Field(default=1.0, ge=0.0)
    norm_exponent: float = Field(default=1.0, ge=0.0)


class SparseGPTSettings(_Strict):
    blocksize: int = Field(default=128, gt=0)
    dampening: float = Field(default=0.01, gt=0.0)


class PruneConfig(_Strict):
    """A prune job (see the module docstring)."""

    model: Optional[ModelRef] = None
    merge: Optional[dict[str, Any]] = None  # a merge config; its result is pruned (instead of `model`)
    method: str  # a registered prune method: magnitude | wanda | sparsegpt | ...
    sparsity: Optional[float] = None
    pattern: str = "unstructured"
    layerwise: Union[Literal["uniform"], Owl, list[float]] = "uniform"
    modules: Optional[list[str]] = None
    mode: Literal["sequential", "parallel"] = "sequential"
    calibration: Optional[CalibrationConfig] = None
    sparsegpt: SparseGPTSettings = SparseGPTSettings()
    wanda: WandaSettings = WandaSettings()
    batch_size: int = Field(default=8, gt=0)
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    evaluate: bool = True
    out_shard_size: Union[int, str, None] = None
    # Not a config key: loading pickles (pytorch_model*.bin, DeepSpeed ZeRO folders) can run code,
    # and a config is a shared file that must not opt in for the user. It is `--allow-pickle`
    # (API: allow_pickle=True), as for `raymerge merge`.
    allow_pickle: Optional[Any] = None

    @field_validator("allow_pickle")
    @classmethod
    def _pickle_is_not_a_config_key(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError("a config file cannot opt in to loading pickles; pass --allow-pickle on the command line "
                             "(API: allow_pickle=True)")
        return v

    @field_validator("model", mode="before")
    @classmethod
    def _parse_model(cls, v: Any) -> Optional[ModelRef]:
        return None if v is None else ModelRef.parse(v, allow_lora=False)

    @field_validator("merge")
    @classmethod
    def _merge_config(cls, v: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if v is not None:
            from raymerge.config.merge_config import parse_config

            try:
                parse_config(v, "(the prune config's `merge:`)")
            except ConfigError as err:
                raise ValueError(str(err).replace("\n", ";")) from None
        return v

    @field_validator("sparsity")
    @classmethod
    def _in_range(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        nm = parse_nm(v)
        return "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"

    @field_validator("modules")
    @classmethod
    def _regexes(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        for i, pattern in enumerate(v or []):
            try:
                re.compile(pattern)
            except (re.error, RecursionError, OverflowError) as err:
                raise ValueError(f"[{i}] {pattern!r} is not a valid regular expression ({err})") from None
        return v

    @field_validator("layerwise")
    @classmethod
    def _layer_values(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("a per-layer list needs one sparsity per decoder layer, got an empty list")
            for i, s in enumerate(v):
                if not 0.0 <= s < 1.0:
                    raise ValueError(f"layer {i}: sparsity must be in [0, 1), got {s}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "PruneConfig":
        if (self.model is None) == (self.merge is None):
            raise ValueError("give exactly one of `model:` (a checkpoint) or `merge:` (a merge config whose result is pruned)")
        nm = self.nm
        if nm is not None:
            implied = nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern} prunes {nm[0]} of every {nm[1]} weights (sparsity {implied:g}); "
                    f"sparsity: {self.sparsity} disagrees: drop `sparsity` or make it {implied:g}"
                )
            if self.layerwise != "uniform":
                raise ValueError(f"layerwise: per-layer sparsities need an unstructured pattern, not {self.pattern}")
        elif isinstance(self.layerwise, list) and self.sparsity is not None:
            raise ValueError("sparsity: leave it out when layerwise gives one sparsity per layer (their mean is the target)")
        elif self.sparsity is None and not isinstance(self.layerwise, list):
            raise ValueError("sparsity: required (the fraction of weights to prune, e.g. 0.5)")
        if isinstance(self.layerwise, Owl) and self.calibration is None:
            raise ValueError("calibration: required for OWL layerwise sparsity (it counts activation outliers)")
        return self

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        return parse_nm(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The overall target: N/M, `sparsity`, or the mean of a per-layer list."""
        nm = self.nm
        if nm is not None:
            return nm[0] / nm[1]
        if self.sparsity is not None:
            return self.sparsity
        assert isinstance(self.layerwise, list)
        return sum(self.layerwise) / len(self.layerwise)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)


def parse_nm(text: str) -> Optional[tuple[int, int]]:
    """"unstructured" -> None; "N:M" with 0 < N < M -> (N, M); anything else is an error."""
    value = str(text).strip().lower()
    if value == "unstructured":
        return None
    parts = value.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
    raise ValueError(f"must be 'unstructured' or an N:M pattern with 0 < N < M such as '2:4' or '4:8', got {text!r}")


def parse_prune_config(data: Any, source: str = "<dict>") -> PruneConfig:
    if isinstance(data, PruneConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"invalid prune config {source}: expected a mapping at the top level")
    try:
        return PruneConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, "prune config", "unknown key (check the spelling)")) from None


def load_prune_config(config: Union[str, Path, dict[str, Any], PruneConfig]) -> tuple[PruneConfig, str]:
    """Load a prune config from a YAML path, a dict or a PruneConfig; return it with its label."""
    if isinstance(config, PruneConfig):
        return config, "<PruneConfig>"
    if isinstance(config, dict):
        return parse_prune_config(config), "<dict>"
    return parse_prune_config(read_yaml(config, "prune config"), str(config)), str(config)
