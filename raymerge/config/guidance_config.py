"""Pydantic model of a guided merge's settings: `raymerge: guidance:` in a merge config.

A guided merge (AIM, ACM or Sens-Merging; formulas in `raymerge.methods.guided`) runs the
config's merge method with adjustments computed from calibration text::

    merge_method: ties
    base_model: base
    models: [...]
    raymerge:
      guidance:
        method: acm            # aim | acm | sens
        theta: 10.0            # ACM's sharpness;  AIM: omega (0.4);  Sens: temperature (2.0)
        calibration: {dataset: calib.txt, nsamples: 16, seqlen: 128}
        task_calibration:      # Sens only: each fine-tune's own text (default: `calibration`)
          org/math-model: {dataset: math.jsonl, field: text}
        stages: 2              # layer-stage workers the statistics pass is split over

A parameter that belongs to another method is an error (so a typo cannot be silently ignored).
The methods, their parameter and its default come from the guidance registry
(`raymerge.runtime.guidance_methods`, imported when a config is validated).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from raymerge.config.calibration import CalibrationConfig
from raymerge.config.merge_config import ConfigError, _Strict, format_validation_error

PARAMETERS = ("omega", "theta", "temperature")  # the strength fields a guidance method's spec may name


def _guidance_method(name: str):
    from raymerge.runtime.guidance_methods import get_guidance_method

    return get_guidance_method(name)


class GuidanceConfig(_Strict):
    """See the module docstring."""

    method: str  # a registered guidance method: aim | acm | sens | ...
    omega: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    theta: Optional[float] = Field(default=None, gt=0.0)
    temperature: Optional[float] = Field(default=None, gt=0.0)
    calibration: CalibrationConfig
    task_calibration: dict[str, CalibrationConfig] = Field(default_factory=dict)
    stages: int = Field(default=1, gt=0)
    batch_size: int = Field(default=4, gt=0)
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        try:
            _guidance_method(v)
        except ConfigError as err:
            raise ValueError(str(err)) from None
        return v

    @model_validator(mode="after")
    def _own_parameters(self) -> "GuidanceConfig":
        spec = _guidance_method(self.method)
        own = spec.parameter
        for name in PARAMETERS:
            if name != own and getattr(self, name) is not None:
                raise ValueError(f"{name!r} is not a parameter of {self.method} (it has {own!r})")
        if self.task_calibration and not spec.task_calibration:
            raise ValueError(f"task_calibration is not used by method: {self.method} (only by methods that take "
                             "each fine-tune's own text, such as sens)")
        return self

    @property
    def strength(self) -> float:
        """The method's own parameter: omega (AIM), theta (ACM) or temperature (Sens)."""
        spec = _guidance_method(self.method)
        value = getattr(self, spec.parameter)
        return spec.default if value is None else value


def parse_guidance_config(data: Any, source: str = "<dict>") -> GuidanceConfig:
    """Validate a `raymerge.guidance` mapping; ConfigError naming `source` and each bad field."""
    if isinstance(data, GuidanceConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"invalid merge config {source}: raymerge.guidance: expected a mapping, got {data!r}")
    try:
        return GuidanceConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            format_validation_error(err, source, "merge config", "unknown key (check the spelling)", "raymerge.guidance")
        ) from None
