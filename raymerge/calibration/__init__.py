"""Calibration data: reading text, cutting token windows, and activation-space curation.

Uses torch and transformers tokenizers only (no Ray): the pipeline that runs a model over the
windows lives elsewhere. Settings are `raymerge.config.calibration.CalibrationConfig`.
"""

from raymerge.calibration.curation import curate, kmeans, mean_pooled_features
from raymerge.calibration.text import SUPPORTED_SUFFIXES, CalibrationError, load_texts
from raymerge.calibration.windows import (
    CalibrationWarning,
    CalibrationWindows,
    FeatureFn,
    load_calibration,
    resolve_seqlen,
    token_stream,
    token_windows,
    windows_from_stream,
)

__all__ = [
    "CalibrationError",
    "CalibrationWarning",
    "CalibrationWindows",
    "FeatureFn",
    "SUPPORTED_SUFFIXES",
    "curate",
    "kmeans",
    "load_calibration",
    "load_texts",
    "mean_pooled_features",
    "resolve_seqlen",
    "token_stream",
    "token_windows",
    "windows_from_stream",
]
