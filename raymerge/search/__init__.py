"""Optuna searches over merge coefficients and sparsity ratios, evaluated in memory on Ray.

`space.py` turns ranges in a config into Optuna dimensions; the resident stage worker that
re-merges or re-masks its own layers per trial is `raymerge.runtime.search_worker` (the guidance
worker builds on it, so it lives in runtime/: search -> runtime, never back); `study.py` drives
the study.
"""
