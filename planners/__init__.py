"""Placement planning for raymerge (a PuLP MILP over operators and workers).

Standalone: imports pulp and nothing of torch or Ray. Filled in by the planner work; for now
the runtime schedules operators dynamically (largest first) over its worker pool.
"""
