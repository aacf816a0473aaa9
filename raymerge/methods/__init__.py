"""Merge methods: pure torch functions behind one registry (see `registry` for the contract).

The built-in methods' specs are `catalog`'s (torch-free: a spec names its function, imported
when first called); their functions are this package's modules (`linear`, `task_arithmetic`,
`slerp`, ...). Importing this package imports no torch.
"""

from raymerge.methods.registry import MethodError, MethodSpec, ParamSpec, available_methods, get_method, register

__all__ = ["MethodError", "MethodSpec", "ParamSpec", "available_methods", "get_method", "register"]
