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

The built-ins are registered here, torch-free (`raymerge methods` lists them without importing
torch): each `run` is a `LazyFunction` naming its pass in `raymerge.runtime.guidance`, imported on
the first call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from raymerge.errors import ConfigError
from raymerge.methods.registry import LazyFunction
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


REGISTRY: Registry[GuidanceSpec] = Registry("guidance method", ConfigError)


def register(spec: GuidanceSpec) -> GuidanceSpec:
    return REGISTRY.register(spec)


def get_guidance_method(name: str) -> GuidanceSpec:
    return REGISTRY.get(name)


def available_guidance_methods() -> list[str]:
    return REGISTRY.names()


def _run(name: str) -> LazyFunction:
    return LazyFunction("raymerge.runtime.guidance", name)


register(GuidanceSpec(
    "aim", "omega", 0.4, _run("run_aim"), scales_task_vectors=False, label="AIM",
    doc="relax the merged delta per input channel by the base's activations",
))
register(GuidanceSpec(
    "acm", "theta", 10.0, _run("run_acm"), label="ACM",
    # bf16 outputs of every layer, the embeddings, the final norm and the head
    kept_bytes=lambda shape, vocab, tokens: (
        tokens * (shape.num_layers * shape.hidden_size + 2 * shape.hidden_size + vocab) * 2, "activations"),
    doc="per-layer task-vector scales from activation mutual information",
))
register(GuidanceSpec(
    "sens", "temperature", 2.0, _run("run_sens"), task_calibration=True, label="SENS",
    kept_bytes=lambda shape, vocab, tokens: (tokens * vocab * 4, "reference logits"),  # float32, one task's windows
    doc="per-layer scales from gradient sensitivity and logit distances",
))
