"""Pydantic model of the search YAML (`raymerge search`), loaded with errors naming key and file.

```yaml
merge:                 # a mergekit config whose numbers may be ranges (raymerge/search/space.py)
  merge_method: ties
  base_model: ./base
  models:
    - model: ./ft1
      parameters: {weight: {low: 0.0, high: 1.0}, density: {low: 0.2, high: 1.0, knots: 3}}
# or
prune:                 # a prune config (wanda family), searched over `space:`
  model: ./model
  method: wanda
  sparsity: 0.6
  calibration: {dataset: calib.txt, nsamples: 64, seqlen: 256}
space:                 # prune searches only
  blocks: 4            # per-block sparsity offsets within +/- max_deviation, mean kept at the target
  max_deviation: 0.1
  exponents: true      # OptiShear-style metric |W|^a * ||X||^b, a and b in [0, 2]
  owl: false           # or search OWL's lambda in [0, 2*max_deviation] and m in [2, 10]
objective: perplexity  # perplexity | reconstruction | module:function, or a list (multi-objective);
                       # or {kind: lm_eval, lm_eval: {tasks: [arc_easy], metric: "acc,none", limit: 200}}
                       # (lm-evaluation-harness; writes each trial's model once: slower)
evaluation:            # held-out text (calibration format; its eval_samples windows are used)
  dataset: heldout.txt
  seqlen: 128
  eval_samples: 16
study:
  n_trials: 50
  concurrency: 2       # trials at once, each on its own set of stage actors
  sampler: tpe         # tpe | cmaes | random | grid | nsga2 | nsga3
  seed: 0
  storage: null        # default: a journal file in OUT (resumable); or an RDB URL
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from raymerge.config.calibration import CalibrationConfig
from raymerge.config.merge_config import ConfigError, ModelRef, _Strict, format_validation_error, read_yaml

BUILTIN_OBJECTIVES = ("perplexity", "reconstruction", "lm_eval")  # `kind:` accepts any registered objective
# Which kinds exist, and each one's default direction, come from the objective registry
# (`raymerge.search.objectives`); the search checks a config against it when it starts
# (`raymerge.search.objectives.check_objectives`, before any work): config/ imports nothing above it.
SAMPLERS = ("tpe", "cmaes", "random", "grid", "nsga2", "nsga3")


class LmEvalSettings(_Strict):
    """lm-evaluation-harness tasks for `kind: lm_eval` (the objective is the mean of `metric`)."""

    tasks: list[str] = Field(min_length=1)
    metric: str = "acc,none"
    limit: Optional[int] = Field(default=None, gt=0)  # examples per task
    num_fewshot: Optional[int] = Field(default=None, ge=0)
    batch_size: int = Field(default=8, gt=0)
    device: str = "cpu"  # where lm-eval runs the model, in the driver process (GPUs are the stages')


class Objective(_Strict):
    """One objective. `kind`: perplexity, reconstruction (mean squared error of the logits against
    `reference`'s), lm_eval (lm-evaluation-harness `tasks`; the trial's model is written to disk
    once, so it is slower) or `package.module:function` (called with a callable from token ids
    to logits)."""

    kind: str = "perplexity"
    dataset: Optional[str] = None  # held-out text for this objective (default: evaluation.dataset)
    reference: Optional[ModelRef] = None  # reconstruction only; default: the base/first model
    direction: Optional[Literal["minimize", "maximize"]] = None  # default: the objective's (lm_eval: maximize)
    lm_eval: Optional[LmEvalSettings] = None

    @model_validator(mode="after")
    def _lm_eval_settings(self) -> "Objective":
        if (self.kind == "lm_eval") != (self.lm_eval is not None):
            raise ValueError("kind: lm_eval needs `lm_eval: {tasks: [...]}`, and only it takes lm_eval settings")
        if self.kind == "lm_eval":
            import importlib.util

            if importlib.util.find_spec("lm_eval") is None:
                raise ValueError("kind: lm_eval needs lm-evaluation-harness: pip install lm-eval")
        return self

    @field_validator("reference", mode="before")
    @classmethod
    def _ref(cls, v: Any) -> Any:
        return None if v is None else ModelRef.parse(v)


class PruneSpace(_Strict):
    blocks: Optional[int] = Field(default=None, gt=0)
    max_deviation: float = Field(default=0.1, gt=0.0, lt=0.5)
    exponents: bool = False
    owl: bool = False

    @model_validator(mode="after")
    def _something(self) -> "PruneSpace":
        if self.blocks is None and not self.exponents and not self.owl:
            raise ValueError("nothing to search: set blocks, exponents: true or owl: true")
        if self.blocks is not None and self.owl:
            raise ValueError("blocks and owl both set per-layer sparsities; choose one")
        return self


class StudySettings(_Strict):
    n_trials: int = Field(default=20, gt=0)
    concurrency: int = Field(default=1, gt=0)
    sampler: Literal["tpe", "cmaes", "random", "grid", "nsga2", "nsga3"] = "tpe"
    seed: int = 0
    storage: Optional[str] = None
    study_name: str = "raymerge-search"


class SearchConfig(_Strict):
    merge: Optional[dict[str, Any]] = None
    prune: Optional[dict[str, Any]] = None
    space: Optional[PruneSpace] = None
    objective: Union[str, Objective, list[Union[str, Objective]]] = "perplexity"
    evaluation: Optional[CalibrationConfig] = None
    study: StudySettings = StudySettings()
    batch_size: int = Field(default=8, gt=0)
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchConfig":
        if (self.merge is None) == (self.prune is None):
            raise ValueError("give exactly one of `merge:` (a merge config with ranges) or `prune:` (a prune config)")
        if self.prune is not None and self.space is None:
            raise ValueError("space: required for a prune search (blocks, exponents and/or owl)")
        if self.merge is not None and self.space is not None:
            raise ValueError("space: is for prune searches; a merge search puts ranges in the merge config itself")
        if self.merge is not None and self.evaluation is None:
            raise ValueError("evaluation: required (held-out text to score each trial on)")
        raw = self.objective if isinstance(self.objective, list) else [self.objective]
        if "lm_eval" in raw:
            raise ValueError("objective: lm_eval needs its tasks: {kind: lm_eval, lm_eval: {tasks: [hellaswag], metric: 'acc,none'}}")
        if len(self.objectives) > 1 and self.study.sampler == "cmaes":
            raise ValueError("study.sampler: cmaes is single-objective; use nsga2, nsga3, tpe or random")
        return self

    @property
    def objectives(self) -> list[Objective]:
        raw = self.objective if isinstance(self.objective, list) else [self.objective]
        return [Objective.model_validate({"kind": o}) if isinstance(o, str) else o for o in raw]


def load_search_config(config: Union[str, Path, dict[str, Any], SearchConfig]) -> tuple[SearchConfig, str]:
    if isinstance(config, SearchConfig):
        return config, "<SearchConfig>"
    label = "<dict>"
    if not isinstance(config, dict):
        label = str(config)
        config = read_yaml(config, "search config")
    if not isinstance(config, dict):
        raise ConfigError(f"invalid search config {label}: expected a mapping at the top level")
    try:
        return SearchConfig.model_validate(config), label
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, label, "search config", "unknown key (check the spelling)")) from None
