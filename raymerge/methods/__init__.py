"""Merge methods: pure torch functions behind one registry (see `registry` for the contract).

Importing this package registers every built-in method.
"""

from raymerge.methods.registry import MethodError, MethodSpec, ParamSpec, available_methods, get_method, register

from raymerge.methods import linear as _linear  # noqa: E402,F401  (registers linear, passthrough)
from raymerge.methods import model_stock as _model_stock  # noqa: E402,F401
from raymerge.methods import slerp as _slerp  # noqa: E402,F401  (registers slerp, nuslerp)
from raymerge.methods import task_arithmetic as _task_arithmetic  # noqa: E402,F401
from raymerge.methods import lore as _lore  # noqa: E402,F401
from raymerge.methods import onebit as _onebit  # noqa: E402,F401
from raymerge.methods import tsv as _tsv  # noqa: E402,F401
from raymerge.methods import sce as _sce  # noqa: E402,F401
from raymerge.methods import karcher as _karcher  # noqa: E402,F401
from raymerge.methods import multislerp as _multislerp  # noqa: E402,F401
from raymerge.methods import nearswap as _nearswap  # noqa: E402,F401
from raymerge.methods import arcee_fusion as _arcee_fusion  # noqa: E402,F401
from raymerge.methods import ram as _ram  # noqa: E402,F401  (registers ram, ramplus_tl)

__all__ = ["MethodError", "MethodSpec", "ParamSpec", "available_methods", "get_method", "register"]
