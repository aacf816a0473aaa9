"""One pipeline stage of a prune: a block of decoder layers, its statistics, its masks.

A `PruneStage` holds decoder layers `first`..`last` (a `DecoderBlock`) and does everything the
prune needs of them, with no Ray and no knowledge of the other stages:

- `embed` (first stage) turns token windows into the hidden states entering layer 0;
- `forward` pushes a micro-batch of hidden states through the block, optionally collecting
  statistics of every pruned linear module's inputs (parallel mode, OWL's dense pass);
- `store` keeps micro-batches, and `prune_sequential` then prunes layer by layer as the Wanda and
  SparseGPT papers do: statistics of layer i from the stored inputs, prune layer i, recompute
  its outputs with the pruned weights, which become layer i+1's inputs; it returns the outputs
  of the last layer for the next stage;
- `prune_collected` prunes every layer from the statistics `forward` collected (parallel mode);
- `loss` (last stage) gives the summed next-token negative log-likelihood, for perplexity.

Per linear module the statistic is the input features' sum of squares (Wanda, and OWL's
outlier counts) or the input Hessian (SparseGPT). Scores and comparison groups: magnitude
compares |W| over the whole matrix; Wanda compares |W| x ||X_j|| within each output row;
SparseGPT selects within 128-column blocks while updating the remaining weights; an N:M pattern
compares within each group of M inputs of a row for every method.

Pruned weights are handed to a `sink(layer, module, weight, mask)` callback as soon as a layer is
done (the runtime writes them), so a stage never keeps more than its layers. For magnitude and
Wanda the kept weights are the checkpoint's own values; SparseGPT's updated weights are rounded
to the checkpoint's dtype, and the block continues with those rounded values, so what later
layers see is exactly what is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from raymerge.checkpoints import CheckpointSource
from raymerge.blocks.decoder import DecoderBlock, input_hook
from raymerge.pruning.layerwise import outlier_ratio
from raymerge.pruning.masks import follows_nm
from raymerge.pruning.methods import get_prune_method
from raymerge.pruning.scores import wanda_scores
from raymerge.pruning.report import ModuleResult
from raymerge.pruning.statistics import STATISTICS

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PruneSettings:
    """How to prune; the same for every stage (picklable)."""

    method: str  # a registered prune method (`raymerge.pruning.methods`): magnitude | wanda | sparsegpt | ...
    modules: tuple[str, ...]  # linear modules of a layer to prune, relative names
    nm: Optional[tuple[int, int]] = None
    blocksize: int = 128
    dampening: float = 0.01
    dtype: str = "float32"
    weight_exponent: float = 1.0  # Wanda's metric |W|^a * ||X||^b
    norm_exponent: float = 1.0
    # build the layers from the code the checkpoint ships (its config's auto_map), as transformers'
    # trust_remote_code (`checkpoints.remote_code`); the job's option, handed to every stage here
    trust_remote_code: bool = False

    @property
    def statistic(self) -> Optional[str]:
        return get_prune_method(self.method).statistic


Sink = Callable[[int, str, torch.Tensor, torch.Tensor], None]


@dataclass
class _Collector:
    """Statistics of one layer's modules, filled by forward pre-hooks."""

    kind: str
    layer: int
    stats: dict[str, Any] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)

    def attach(self, block: DecoderBlock, layer: int, modules: tuple[str, ...]) -> None:
        for name in modules:
            linear = block.linear(layer, name)
            if name not in self.stats:
                width, device = linear.in_features, linear.weight.device
                self.stats[name] = STATISTICS[self.kind](width, device=device)
            self.handles.append(linear.register_forward_pre_hook(input_hook(self.stats[name].add)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class PruneStage:
    """Decoder layers `first`..`last` of the model at `source`, and how to prune them."""

    def __init__(
        self,
        config: dict[str, Any],
        source: CheckpointSource,
        first: int,
        last: int,
        settings: PruneSettings,
        *,
        embed: bool = False,
        head: bool = False,
        device: str = "cpu",
    ) -> None:
        self.settings = settings
        self.source = source
        self._dtypes = {name: info.dtype for name, info in source.tensors().items()}  # the checkpoint's, read once
        self.block = DecoderBlock(
            config, source, first, last, dtype=DTYPES[settings.dtype], device=device, embed=embed, head=head,
            trust_remote_code=settings.trust_remote_code,
        )
        self.first, self.last = first, last
        self._stored: list[torch.Tensor] = []
        self._collectors: dict[tuple[int, str], _Collector] = {}  # (layer, statistic kind) -> stats
        self.results: list[ModuleResult] = []

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)

    # -- data flow --------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.block.embed(input_ids)

    def forward(self, hidden: torch.Tensor, collect: Sequence[str] = ()) -> torch.Tensor:
        """Run the block; for each statistic kind in `collect` ("norms", "hessian") accumulate
        input statistics of every pruned module of every layer on the way."""
        collectors = [self._collector(i, kind) for kind in collect for i in self.layers]
        for c in collectors:
            c.attach(self.block, c.layer, self.settings.modules)
        try:
            return self.block.forward(hidden)
        finally:
            for c in collectors:
                c.detach()

    def store(self, hidden: torch.Tensor) -> None:
        self._stored.append(hidden)

    def loss(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
        """Summed next-token negative log-likelihood (float64) and the number of predicted tokens."""
        total = 0.0
        for h, ids in zip(hidden.split(1), input_ids.split(1)):  # one window's logits at a time
            logits = self.block.logits(h).float()
            targets = ids.to(logits.device)[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], targets[0], reduction="sum")
            total += float(nll.double())
        return total, int(input_ids[:, 1:].numel())

    def _collector(self, layer: int, kind: str) -> _Collector:
        key = (layer, kind)
        if key not in self._collectors:
            self._collectors[key] = _Collector(kind, layer)
        return self._collectors[key]

    def clear_statistics(self) -> None:
        self._collectors.clear()

    # -- OWL --------------------------------------------------------------------------------
    def outlier_ratios(self, m: float, weight: Optional[Callable[[int, str], torch.Tensor]] = None) -> dict[int, float]:
        """OWL's outlier ratio of each layer, from Wanda scores of the collected dense statistics
        and the block's weights (or `weight(layer, module)`'s, e.g. kept dense copies)."""
        weight = weight or (lambda i, n: self.block.linear(i, n).weight)
        ratios = {}
        for i in self.layers:
            stats = self._collector(i, "norms").stats
            if not stats:
                raise RuntimeError(f"layer {i}: no activation statistics collected before computing OWL ratios")
            scores = [wanda_scores(weight(i, n), stats[n].sq_sum) for n in self.settings.modules]
            ratios[i] = outlier_ratio(scores, m)
        return ratios

    # -- pruning ----------------------------------------------------------------------------
    def prune_sequential(self, sparsities: dict[int, float], sink: Sink) -> list[torch.Tensor]:
        """Prune layer by layer over the stored micro-batches; return the last layer's outputs."""
        inputs, self._stored = self._stored, []
        if not inputs and self.settings.statistic is not None:
            raise RuntimeError(f"layers {self.first}..{self.last}: no calibration inputs arrived")
        kind = self.settings.statistic
        for i in self.layers:
            if kind is not None:
                collector = _Collector(kind, i)
                collector.attach(self.block, i, self.settings.modules)
                try:
                    for h in inputs:
                        self.block.run_layer(i, h)
                finally:
                    collector.detach()
                self._prune_layer(i, sparsities[i], collector.stats, sink)
            else:
                self._prune_layer(i, sparsities[i], {}, sink)
            inputs = [self.block.run_layer(i, h) for h in inputs]
        return inputs

    def prune_collected(self, sparsities: dict[int, float], sink: Sink) -> None:
        """Prune every layer from the statistics collected by `forward` (parallel mode)."""
        kind = self.settings.statistic
        for i in self.layers:
            stats = self._collector(i, kind).stats if kind is not None else {}
            if kind is not None and not stats:
                raise RuntimeError(f"layer {i}: no calibration statistics collected")
            self._prune_layer(i, sparsities[i], stats, sink)
        self.clear_statistics()

    def _prune_layer(self, layer: int, sparsity: float, stats: dict[str, Any], sink: Sink) -> None:
        for name in self.settings.modules:
            linear = self.block.linear(layer, name)
            tensor_name = f"{self.block.layers_path}.{layer}.{name}.weight"
            if not get_prune_method(self.settings.method).reads_original:  # only the checkpoint tensor's dtype is needed
                original = torch.empty(0, dtype=self._dtypes[tensor_name])
            else:
                original = self.source.read(tensor_name).to(linear.weight.device)
            weight, mask = self._prune_matrix(linear.weight, original, sparsity, stats.get(name), tensor_name)
            linear.weight.data.copy_(weight.to(linear.weight.dtype))
            sink(layer, name, weight, mask)
            nm = self.settings.nm
            self.results.append(
                ModuleResult(
                    layer=layer, module=name, target=sparsity, zeros=int(weight.numel() - torch.count_nonzero(weight)),
                    numel=weight.numel(), nm_valid=None if nm is None else follows_nm(weight, *nm),
                )
            )

    def _prune_matrix(
        self, compute_weight: torch.Tensor, original: torch.Tensor, sparsity: float, stats: Any, name: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pruned weight in the checkpoint's dtype, and the mask (True = pruned): the method's
        spec (`raymerge.pruning.methods`) does the work."""
        return get_prune_method(self.settings.method).prune(compute_weight, original, sparsity, stats, self.settings, name)
