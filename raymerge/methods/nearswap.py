"""NearSwap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): take the other
model's value where it is close to the base, keep the base's where they are far apart.

Per element, with a the base and b the other model: w = clamp(t / max(|a - b|, 1e-6), 0, 1) and
the result is w b + (1 - w) a. Elements closer than `t` are swapped to b entirely; farther ones
move towards b by t / |a - b|. As in mergekit 0.1.5: exactly two models, one of them the
base, and `t` has no default.
"""

from __future__ import annotations

from raymerge.methods import checks
from raymerge.methods.registry import MethodSpec, ParamSpec, register


def nearswap(inputs, *, base_index, model_params, params, generator):
    base = inputs[base_index]
    other = inputs[1 - base_index]
    share = (float(params["t"]) / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return share * other + (1 - share) * base


register(
    MethodSpec(
        name="nearswap",
        fn=nearswap,
        params=(ParamSpec("t", required=True, check=checks.number, doc="distance below which the other model's value is taken"),),
        base="required",
        min_models=2,
        max_models=2,
        elementwise=True,
        doc="NearSwap: swap in the other model's values where they are within t of the base's",
        cost_ns=1.0,
        extra_copies=lambda n: 3.0,
    )
)
