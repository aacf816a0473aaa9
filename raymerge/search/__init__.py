"""Optuna searches over merge coefficients and sparsity ratios, evaluated in memory on Ray.

`space.py` turns ranges in a config into Optuna dimensions; `worker.py` is the resident stage
worker that re-merges or re-masks its own layers per trial; `study.py` drives the study.
"""
