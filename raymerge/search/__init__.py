"""Optuna searches over merge coefficients and sparsity ratios, evaluated in memory on Ray.

`space.py` turns ranges in a config into Optuna dimensions; the resident stage that re-merges or
re-masks its own layers per trial is `raymerge.runtime.pool_actor.PoolActor` (its `Trial`
capability; prune and guidance use the same actor, so it lives in runtime/: search -> runtime,
never back); `study.py` drives the study.
"""
