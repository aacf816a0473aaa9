"""The guidance-method registry: one `GuidanceSpec` per `raymerge: guidance: method:` (aim, acm, sens).

Same shape as the merge-method registry (`raymerge.methods.registry`): a frozen spec,
`register`, `get_guidance_method(name)` raising the package's user error (`ConfigError`) that
lists the known names, and `available_guidance_methods()`. The config (`GuidanceConfig`), the
checks, the memory guard and the statistics pass (`raymerge.runtime.guidance`) read the spec, so
a new guidance method is one module that calls `register` (plus its tests).

- `parameter` / `default`: the config key of the method's strength and its default. It must be
  one of the `GuidanceConfig` fields (omega, theta, temperature), which carry the value checks.
- `run(sp, g, program, base, names, report)`: the statistics pass. `sp` is the open
  `_StagePass` (layer-stage workers over one model at a time, see `raymerge.runtime.guidance`),
  `g` the settings, `program` the compiled merge whose operators it gives `OperatorGuide`s,
  `base` the base model's index, `names` the models' names; it fills `report`.
- `scales_task_vectors`: True when the method scales each model's task vector per layer (then a
  model-wide trim, which needs unscaled task vectors, is refused).
- `task_calibration`: True when the method accepts each fine-tune's own calibration text.
- `kept_bytes(shape, vocab, tokens)`: (bytes, what) the pass keeps on the stage workers for
  `tokens` calibration tokens, refused when over half the host memory; None: nothing large.
- `label`: how the report names the method (AIM, ACM, Sens).

The built-ins are registered by `raymerge.runtime.guidance` (imported by the getters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from raymerge.errors import ConfigError
from raymerge.registries import Registry


@dataclass(frozen=True)
class GuidanceSpec:
    name: str
    parameter: str
    default: float
    run: Callable[..., None]
    scales_task_vectors: bool = True
    task_calibration: bool = False
    kept_bytes: Optional[Callable[[Any, int, int], tuple[int, str]]] = None
    label: str = ""
    doc: str = ""


def _load_builtins() -> None:
    import raymerge.runtime.guidance  # noqa: F401  (registers aim, acm, sens)


REGISTRY: Registry[GuidanceSpec] = Registry("guidance method", ConfigError, _load_builtins)


def register(spec: GuidanceSpec) -> GuidanceSpec:
    return REGISTRY.register(spec)


def get_guidance_method(name: str) -> GuidanceSpec:
    return REGISTRY.get(name)


def available_guidance_methods() -> list[str]:
    return REGISTRY.names()
