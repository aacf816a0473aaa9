"""The prune report: target and achieved sparsity per layer and overall, N:M validity, perplexity.

Built from the stages' per-module results. "Achieved" counts exact zeros after pruning, so
weights that were already zero count too (the achieved figure can exceed the target by those).
Sparsity overall is given two ways: over the pruned modules (what the target refers to) and
over every parameter of the model (embeddings, norms and head included, which are not pruned).
Perplexity is exp(mean next-token NLL) over the held-out calibration windows, before and after.
Each stage's entry says where it ran, its layers, and its utilisation: `busy_seconds` (time
inside the stage's calls, measured by the actor) over `wall_seconds` (the driver's wall time from
loading the stage to finishing it); utilisation near 1 on every stage means the micro-batches
overlapped between stages, near 1/k on k stages that they ran one stage at a time.
Written next to the model as `prune_report.json`; `table()` is what the CLI prints; `figure()`
draws target vs achieved sparsity per layer (matplotlib, optional) and `plot()` saves it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from raymerge.errors import ConfigError


@dataclass
class ModuleResult:
    """What pruning did to one linear module (for the report)."""

    layer: int
    module: str
    target: float
    zeros: int
    numel: int
    nm_valid: Optional[bool] = None

    @property
    def achieved(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


REPORT_FILE = "prune_report.json"


@dataclass
class LayerRow:
    layer: int
    target: float
    achieved: float
    zeros: int
    numel: int
    nm_valid: Optional[bool]


@dataclass
class PruneReport:
    method: str
    pattern: str
    mode: str
    target_sparsity: float
    layers: list[LayerRow]
    modules: list[ModuleResult]
    model_parameters: int
    perplexity_before: Optional[float] = None
    perplexity_after: Optional[float] = None
    eval_tokens: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def build(
        cls, results: Sequence[ModuleResult], *, method: str, pattern: str, mode: str, target: float,
        model_parameters: int, **extra: Any,
    ) -> "PruneReport":
        by_layer: dict[int, list[ModuleResult]] = {}
        for r in sorted(results, key=lambda r: (r.layer, r.module)):
            by_layer.setdefault(r.layer, []).append(r)
        rows = []
        for layer, rs in sorted(by_layer.items()):
            zeros, numel = sum(r.zeros for r in rs), sum(r.numel for r in rs)
            checks = [r.nm_valid for r in rs if r.nm_valid is not None]
            rows.append(LayerRow(layer, rs[0].target, zeros / numel if numel else 0.0, zeros, numel,
                                 all(checks) if checks else None))
        return cls(method=method, pattern=pattern, mode=mode, target_sparsity=target, layers=rows,
                   modules=list(results), model_parameters=model_parameters, **extra)

    @property
    def pruned_zeros(self) -> int:
        return sum(r.zeros for r in self.layers)

    @property
    def pruned_numel(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def achieved_sparsity(self) -> float:
        return self.pruned_zeros / self.pruned_numel if self.pruned_numel else 0.0

    @property
    def model_sparsity(self) -> float:
        return self.pruned_zeros / self.model_parameters if self.model_parameters else 0.0

    @property
    def nm_valid(self) -> Optional[bool]:
        checks = [r.nm_valid for r in self.layers if r.nm_valid is not None]
        return all(checks) if checks else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "pattern": self.pattern,
            "mode": self.mode,
            "target_sparsity": self.target_sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "model_sparsity": self.model_sparsity,
            "pruned_parameters": self.pruned_numel,
            "model_parameters": self.model_parameters,
            "nm_valid": self.nm_valid,
            "perplexity_before": self.perplexity_before,
            "perplexity_after": self.perplexity_after,
            "eval_tokens": self.eval_tokens,
            "calibration": self.calibration,
            "stages": self.stages,
            "layers": [asdict(r) for r in self.layers],
            "modules": [asdict(m) | {"achieved": m.achieved} for m in self.modules],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def table(self) -> str:
        nm = self.pattern != "unstructured"
        head = f"{'layer':>5}  {'target':>7}  {'achieved':>8}" + ("  N:M ok" if nm else "")
        lines = [head]
        for r in self.layers:
            line = f"{r.layer:>5}  {r.target:>7.4f}  {r.achieved:>8.4f}"
            if nm:
                line += f"  {'yes' if r.nm_valid else 'NO':>6}"
            lines.append(line)
        lines.append(
            f"{'all':>5}  {self.target_sparsity:>7.4f}  {self.achieved_sparsity:>8.4f}"
            + (f"  {'yes' if self.nm_valid else 'NO':>6}" if nm else "")
        )
        lines.append(
            f"{self.pruned_zeros:,} of {self.pruned_numel:,} pruned weights are zero; "
            f"{self.model_sparsity:.2%} of all {self.model_parameters:,} parameters"
        )
        if self.perplexity_before is not None:
            lines.append(
                f"perplexity on {self.eval_tokens:,} held-out tokens: {_fmt(self.perplexity_before)} dense -> "
                f"{_fmt(self.perplexity_after)} pruned"
            )
        for k, stage in enumerate(self.stages):
            if "utilisation" in stage:
                first, last = stage["layers"]
                lines.append(
                    f"stage {k} (layers {first}-{last}, {stage['worker']}): busy {stage['busy_seconds']:.1f} s of "
                    f"{stage['wall_seconds']:.1f} s, utilisation {stage['utilisation']:.0%}"
                )
        return "\n".join(lines)

    def figure(self):
        """The per-layer chart as a matplotlib figure (needs matplotlib): target and achieved
        sparsity side by side for each decoder layer, one integer tick per layer, the axes
        labelled and a legend naming the two bars. `plot` saves it; tests read it."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install matplotlib") from None
        xs = [r.layer for r in self.layers]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(xs) + 2), 3.5))
        ax.bar([x - 0.2 for x in xs], [r.target for r in self.layers], width=0.4, label="target")
        ax.bar([x + 0.2 for x in xs], [r.achieved for r in self.layers], width=0.4, label="achieved")
        ax.set_xticks(xs)  # one tick per layer (matplotlib's own would fall on half layers)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("sparsity (share of weights that are zero)")
        ax.set_ylim(0, 1)
        ax.set_title(f"{self.method} {self.pattern}: {self.achieved_sparsity:.1%} of pruned weights are zero")
        ax.legend()
        fig.tight_layout()
        return fig

    def plot(self, path: str | Path) -> Path:
        """The per-layer chart (`figure`) as PNG at `path`."""
        path = Path(path)
        fig = self.figure()  # first: without matplotlib, its one-line error
        import matplotlib.pyplot as plt

        try:
            fig.savefig(path, dpi=100)
        finally:
            plt.close(fig)
        return path


def perplexity(nll_sum: float, tokens: int) -> Optional[float]:
    if tokens <= 0:
        return None
    mean = nll_sum / tokens
    return math.exp(mean) if mean < 700 else math.inf


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"
