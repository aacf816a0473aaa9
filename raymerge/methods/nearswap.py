"""NearSwap (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001): take the other
model's value where it is close to the base, keep the base's where they are far apart.

Per element, with a the base and b the other model: w = clamp(t / max(|a - b|, 1e-6), 0, 1) and
the result is w b + (1 - w) a. Elements closer than `t` are swapped to b entirely; farther ones
move towards b by t / |a - b|. As in mergekit 0.1.5: exactly two models, one of them the
base, and `t` has no default.
"""

from __future__ import annotations


def nearswap(inputs, *, base_index, model_params, params, generator):
    base = inputs[base_index]
    other = inputs[1 - base_index]
    share = (float(params["t"]) / (base - other).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return share * other + (1 - share) * base
