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

This model checks the structure and each value's range. Which methods exist, which strength
parameter each takes and its default come from the guidance registry
(`raymerge.runtime.guidance_methods`); the runtime checks a config against it
(`raymerge.runtime.guidance.check_guidance`, before any work), since config/ imports nothing of
ours above it. A parameter that belongs to another method is an error there (so a typo cannot
be silently ignored).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, ValidationError

from raymerge.config.calibration import CalibrationConfig
from raymerge.config.merge_config import ConfigError, _Strict, format_validation_error

PARAMETERS = ("omega", "theta", "temperature")  # the strength fields a guidance method's spec may name


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

    def strength_or(self, parameter: str, default: float) -> float:
        """The value of the strength field `parameter` (omega, theta, temperature), else `default`."""
        value = getattr(self, parameter)
        return default if value is None else value


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
