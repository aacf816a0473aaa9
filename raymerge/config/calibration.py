"""Pydantic models of the `calibration:` settings: where calibration text comes from and how much.

A pass that needs activations (pruning with Wanda/SparseGPT-style scores, perplexity checks)
reads `nsamples` token windows of `seqlen` tokens from `dataset`: a local .txt / .jsonl / .json /
.parquet file, a directory of such files, or a Hugging Face datasets name. `eval_samples` more
windows are held out (the tail of the text) for perplexity. With `curate:`, `candidates` windows
are drawn first and `nsamples` of them picked across activation-space clusters (COLA,
arXiv 2510.10618). Loading and windowing live in `raymerge.calibration`; this module only
validates the settings.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, ValidationError, ValidationInfo, field_validator

from raymerge.config.merge_config import ConfigError, _Strict, format_validation_error

DEFAULT_CLUSTERS = 16


class CurationConfig(_Strict):
    """Activation-space curation: draw `candidates` windows, keep `nsamples` spread over `clusters`."""

    candidates: int = Field(gt=0)
    clusters: Optional[int] = Field(default=None, gt=0)

    def resolved_clusters(self, nsamples: int) -> int:
        """`clusters`, or min(nsamples, 16) when unset."""
        return self.clusters if self.clusters is not None else min(nsamples, DEFAULT_CLUSTERS)


class CalibrationConfig(_Strict):
    """Calibration text source and windowing (see the module docstring)."""

    dataset: str
    field: str = "text"
    split: str = "train"
    subset: Optional[str] = None
    nsamples: int = Field(default=128, gt=0)
    seqlen: Optional[int] = Field(default=None, gt=0)
    seed: int = Field(default=0, ge=0)
    eval_samples: int = Field(default=16, ge=0)
    curate: Optional[CurationConfig] = None

    @field_validator("dataset", "field", "split")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty string")
        return v.strip()

    @field_validator("curate")
    @classmethod
    def _curation_fits(cls, v: Optional[CurationConfig], info: ValidationInfo) -> Optional[CurationConfig]:
        nsamples = info.data.get("nsamples")
        if v is None or nsamples is None:  # nsamples itself invalid: reported on its own
            return v
        if v.candidates <= nsamples:
            raise ValueError(
                f"curate.candidates ({v.candidates}) must be larger than nsamples ({nsamples}): "
                "curation picks nsamples windows out of the candidates"
            )
        clusters = v.resolved_clusters(nsamples)
        if clusters > nsamples:
            raise ValueError(
                f"curate.clusters ({clusters}) must be at most nsamples ({nsamples}), "
                "so that every cluster can be represented"
            )
        return v


def parse_calibration_config(data: Any, source: str = "<dict>", prefix: str = "calibration") -> CalibrationConfig:
    """Validate a `calibration:` mapping; raise ConfigError naming `source` and each bad field.

    Fields are reported as `<prefix>.<field>` (e.g. `calibration.nsamples`).
    """
    if isinstance(data, CalibrationConfig):
        return data
    if not isinstance(data, dict):
        where = prefix or "<top level>"
        raise ConfigError(f"invalid calibration config {source}: {where}: expected a mapping, got {data!r}")
    try:
        return CalibrationConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            format_validation_error(err, source, "calibration config", "unknown key (check the spelling)", prefix)
        ) from None
