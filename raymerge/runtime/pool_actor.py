"""The pool actor: the one actor class of every job, composed of the capabilities the jobs need.

Every pool (`runtime.actor_pool.ActorPool`) is made of `PoolActor`s (Ray actors, or the same
class in the driver process for the in-process modes). A merge uses their `merging` capability;
every job that runs a model layer by layer — a prune, a search's resident pipelines, a guided
merge's statistics pass — cuts the decoder layers into contiguous blocks and gives each block to
one of them. A `PoolActor` owns:

- `merging` (`runtime.worker.MergeWorkerImpl`): a merge's work — its input sources, opened on
  first use, and the staging shards parts are written into at their offsets; the planner's
  calibration and whole-model TIES trimming's histograms;
- `layers` (`StageLayers`): a block of decoder layers — a `PruneStage` (a `DecoderBlock` of layers
  first..last, plus the embeddings on the first stage and the final norm and head on the last),
  the checkpoint it was read from, the device, the busy time; `reload` swaps in the same layers
  of another checkpoint;
- `output` (`StageOutput`): the staging shards the block's tensors are written into at their
  planned offsets (pruned ones masked, the rest copied byte for byte), and uploads to an S3 output
  (on nodes that share no disk: each node's copy of the staging shards, and the shard pieces
  moved between them, `ensure_node_shards` / `read_staged` / `write_staged`);
- `pruning` (`Pruning`): the prune methods over the block (sequential or from collected
  statistics) and OWL's outlier ratios;
- `trial` (`Trial`): what a search trial varies — the input models' tensors for re-merging,
  the dense weights and statistics for re-masking, a trial's tensors and logits;
- `references` (`ReferenceLogits`): reference logits kept per evaluation batch on the last stage,
  and the reconstruction error / logit distance against them (search and Sens-Merging);
- `statistics` (`Statistics`): a guided merge's collectors (AIM, ACM) and Sens-Merging's
  backward passes.

Each capability is a small class with one job; none inherits from another. The actor's public
methods are the whole call surface. Drivers hold `ActorRef`s, whose methods are generated from
`PoolActor`'s (same names, signatures and docs): `ref.load(...)` is `actor.load.remote(...)` for
a Ray actor (an object reference) or the local object's method (the value) in process, and a
misspelt method is an `AttributeError` where it is called.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from raymerge.progress import bar as tqdm  # tqdm with raymerge.progress.bar_kwargs

from raymerge.calibration.curation import mean_pooled_features
from raymerge.checkpoints import OutputLayout, ShardFileWriter, SourceSpec
from raymerge.checkpoints.memory import MemorySource
from raymerge.checkpoints.safetensors_format import torch_dtype
from raymerge.blocks.activations import InputAbsMean, OutputRecorder, layer_keys
from raymerge.pruning.masks import row_mask
from raymerge.pruning.scores import wanda_scores
from raymerge.blocks.stage import PruneSettings, PruneStage
from raymerge.pruning.report import ModuleResult
from raymerge.runtime.compute import compute_operator
from raymerge.runtime.operators import MergeOperator
from raymerge.runtime.worker import BatchStats, MergeWorkerImpl, WorkerInfo, WorkItem, _peak_rss_bytes, pick_device, worker_info


# -- capabilities ----------------------------------------------------------------------------------------
class StageLayers:
    """The block of decoder layers this stage holds, the checkpoint it came from, and busy time."""

    def __init__(self, worker_id: int, device: torch.device) -> None:
        self.worker_id, self.device = worker_id, device
        self.stage: Optional[PruneStage] = None
        self.source: Any = None
        self.busy_seconds = 0.0
        self._load_args: Optional[tuple] = None

    def load(self, config: dict[str, Any], spec: SourceSpec, first: int, last: int, settings: PruneSettings,
             embed: bool, head: bool) -> int:
        """Build the block from `spec`'s checkpoint; return its resident parameter bytes."""
        t0 = time.perf_counter()
        self.close()
        self._load_args = (config, first, last, settings, embed, head)
        self.source = spec.open()
        self.stage = PruneStage(config, self.source, first, last, settings, embed=embed, head=head, device=str(self.device))
        self.busy_seconds += time.perf_counter() - t0
        return sum(p.numel() * p.element_size() for p in self.stage.block.model.parameters() if not p.is_meta)

    def reload(self, spec: SourceSpec) -> int:
        """The same layers (and settings), from another model's checkpoint."""
        if self._load_args is None:
            raise RuntimeError(f"stage {self.worker_id}: reload() before load()")
        config, first, last, settings, embed, head = self._load_args
        return self.load(config, spec, first, last, settings, embed, head)

    @property
    def held(self) -> PruneStage:
        if self.stage is None:
            raise RuntimeError(f"stage {self.worker_id} used before load()")
        return self.stage

    def timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.busy_seconds += time.perf_counter() - t0

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
        self.stage = None


class StageOutput:
    """The staging shards this stage writes its tensors into (nothing when it has none)."""

    def __init__(self) -> None:
        self._writer: Optional[ShardFileWriter] = None
        self._layout: Optional[OutputLayout] = None

    def open(self, staging: Optional[str], layout: Optional[OutputLayout]) -> None:
        self.close()
        if staging is not None:
            self._writer, self._layout = ShardFileWriter(staging), layout

    def write(self, name: str, tensor: torch.Tensor) -> None:
        assert self._writer is not None and self._layout is not None, "stage has no output"
        filename, entry = self._layout.entry(name)
        self._writer.write(filename, entry, tensor)

    def sink(self, layers_path: str) -> Callable[[int, str, torch.Tensor, torch.Tensor], None]:
        """What a prune method calls with each pruned module (written when there is an output)."""

        def write_pruned(layer: int, module: str, weight: torch.Tensor, mask: torch.Tensor) -> None:
            if self._writer is not None:
                self.write(f"{layers_path}.{layer}.{module}.weight", weight)

        return write_pruned

    def copy(self, source: Any, names: Sequence[str]) -> int:
        total = 0
        for name in names:
            tensor = source.read(name)
            self.write(name, tensor)
            total += tensor.numel() * tensor.element_size()
        return total

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class Pruning:
    """The prune methods over the block, and OWL's outlier ratios."""

    def __init__(self, layers: StageLayers, output: StageOutput) -> None:
        self.layers, self.output = layers, output

    def _sink(self):
        return self.output.sink(self.layers.held.block.layers_path)

    def prune_sequential(self, sparsities: dict[int, float]) -> list[torch.Tensor]:
        return self.layers.timed(self.layers.held.prune_sequential, sparsities, self._sink())

    def prune_collected(self, sparsities: dict[int, float]) -> None:
        self.layers.timed(self.layers.held.prune_collected, sparsities, self._sink())

    def outlier_ratios(self, m: float, weight: Optional[Callable[[int, str], torch.Tensor]] = None) -> dict[int, float]:
        return self.layers.timed(self.layers.held.outlier_ratios, m, weight)


class Trial:
    """What a search trial varies on this block (see `raymerge.search.study`):

    - merge searches: every input model's tensors that the block's operators read, in memory
      (`MemorySource`s); `apply_merge(operators)` recomputes them with the merge's own code
      (`compute_operator`) into the block's parameters, cast through the merge's output dtype, so
      the model evaluated is exactly the model a merge would write;
    - prune searches: the pruned modules' dense weights; `apply_prune` re-masks them with
      per-layer sparsities and the metric |W|^a * ||X||^b (a = b = 1: Wanda, b = 0: magnitude)."""

    def __init__(self, layers: StageLayers) -> None:
        self.layers = layers
        self.inputs: list[MemorySource] = []
        self.dense: dict[str, torch.Tensor] = {}
        # (kind, start, end) wall-clock intervals of this actor's trial calls ("remerge", "forward"),
        # kept once `times()` was first called (a search's stages), drained by each `times()`.
        self.log: Optional[list[tuple[str, float, float]]] = None

    def times(self) -> list[tuple[str, float, float]]:
        """The trial calls' intervals since the last call (and keep recording from now on)."""
        log, self.log = self.log or [], []
        return log

    def hold_inputs(self, specs: Sequence[SourceSpec], needed: Sequence[Sequence[str]]) -> int:
        total = 0
        self.inputs = []
        for spec, names in zip(specs, needed):
            src = spec.open()
            try:
                infos = src.tensors()
                tensors = {n: src.read(n) for n in names}
            finally:
                src.close()
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            self.inputs.append(MemorySource(f"{spec.path} (held by search worker {self.layers.worker_id})", tensors, infos))
        return total

    def held_parameters(self) -> list[str]:
        return sorted(self.layers.held.block.held_parameters())

    def apply_merge(self, operators: Sequence[MergeOperator]) -> int:
        """Elementwise methods run on one torch thread: they are memory-bound, and linear's
        accumulation runs in cache-sized chunks (`methods.linear.CHUNK`), each of which several
        threads would split with a fork/join of their own — on a shared or loaded CPU that costs
        far more than the chunk (a 2816 x 1024 linear merge: 0.23-0.39 s on 2 threads at load 4
        on 2 cores, 0.005 s on one). The merged values do not depend on the thread count."""
        from raymerge.methods import get_method
        from raymerge.methods.reductions import fixed_threads

        params = self.layers.held.block.held_parameters()
        for op in operators:
            target = params.get(op.name)
            if target is None:
                raise RuntimeError(f"search worker {self.layers.worker_id}: {op.name} is not a parameter of its block")
            serial = self.layers.device.type == "cpu" and get_method(op.method).elementwise
            with fixed_threads(1) if serial else contextlib.nullcontext():
                merged = compute_operator(op, self.inputs, self.layers.device)
            with torch.no_grad():
                target.copy_(merged.to(torch_dtype(op.out_dtype)).to(target.dtype))
        return len(operators)

    def keep_dense(self) -> None:
        stage = self.layers.held
        for i in stage.layers:
            for name in stage.settings.modules:
                self.dense[f"{i}.{name}"] = stage.block.linear(i, name).weight.detach().clone()

    def dense_weight(self, layer: int, module: str) -> torch.Tensor:
        return self.dense[f"{layer}.{module}"]

    def apply_prune(self, sparsities: dict[int, float], weight_exponent: float, norm_exponent: float) -> float:
        stage = self.layers.held
        zeros = total = 0
        for i in stage.layers:
            stats = stage._collector(i, "norms").stats
            for name in stage.settings.modules:
                dense = self.dense[f"{i}.{name}"]
                scores = wanda_scores(dense, stats[name].sq_sum, weight_exponent=weight_exponent,
                                      norm_exponent=norm_exponent, name=name)
                mask = row_mask(scores, sparsities[i], name=name)
                with torch.no_grad():
                    stage.block.linear(i, name).weight.copy_(dense.masked_fill(mask, 0))
                zeros += int(mask.sum())
                total += mask.numel()
        return zeros / total if total else 0.0

    def state_dict(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        held = self.layers.held.block.held_parameters()
        return {n: held[n].detach().cpu().clone() for n in names if n in held}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers.held.block.logits(hidden.to(self.layers.device)).float().cpu()


class ReferenceLogits:
    """Reference logits per evaluation batch (kept on the last stage, in host memory: bf16 would
    lose digits), and distances of the block's logits from them. They survive `reload`."""

    def __init__(self, layers: StageLayers) -> None:
        self.layers = layers
        self.kept: dict[int, torch.Tensor] = {}

    def keep(self, hidden: torch.Tensor, key: int) -> None:
        block, device = self.layers.held.block, self.layers.device
        self.kept[key] = torch.cat([block.logits(h.to(device)).float().cpu() for h in hidden.split(1)])

    def _errors(self, hidden: torch.Tensor, key: int) -> Iterator[torch.Tensor]:
        """Per window (one window's logits at a time): float64 logits minus the kept reference's."""
        ref = self.kept[key]
        block, device = self.layers.held.block, self.layers.device
        for j, h in enumerate(hidden.split(1)):
            logits = block.logits(h.to(device)).float()
            yield (logits - ref[j : j + 1].to(logits.device)).double()

    def reconstruction(self, hidden: torch.Tensor, key: int) -> tuple[float, int]:
        total = sum((float(e.square().sum()) for e in self._errors(hidden, key)), 0.0)
        return total, self.kept[key].numel()

    def distance(self, hidden: torch.Tensor, key: int) -> tuple[float, int]:
        total = sum((float(e.norm(dim=-1).sum()) for e in self._errors(hidden, key)), 0.0)
        ref = self.kept[key]
        return total, ref.shape[0] * ref.shape[1]

    def drop(self) -> None:
        self.kept.clear()


class Statistics:
    """A guided merge's statistics on the block: AIM's input statistics and ACM's activation
    mutual information (`raymerge.blocks.activations`), Sens-Merging's gradients
    (`raymerge.blocks.gradients`). ACM's recording of the base survives `reload`."""

    def __init__(self, layers: StageLayers) -> None:
        self.layers = layers
        self._aim: Optional[InputAbsMean] = None
        self._acm: Optional[OutputRecorder] = None
        self._recorded: dict[int, list[torch.Tensor]] = {}
        self._grads: Any = None

    def detach(self) -> None:
        for c in (self._aim, self._acm):
            if c is not None:
                c.remove()
        if self._acm is not None:
            self._recorded = self._acm.recorded
        self._aim = self._acm = None
        self._grads = None

    def head(self, hidden: torch.Tensor) -> None:
        for h in hidden.split(1):
            self.layers.held.block.logits(h.to(self.layers.device))

    def aim_begin(self) -> None:
        self.detach()
        self._aim = InputAbsMean(self.layers.held.block)

    def aim_end(self) -> dict[str, torch.Tensor]:
        assert self._aim is not None, "aim_begin() first"
        sums = self._aim.sums
        self.detach()
        return sums

    def acm_begin(self, mode: str) -> None:
        self.detach()
        self._acm = OutputRecorder(self.layers.held.block)
        if mode == "record":
            self._recorded = {}
        self._acm.recorded = self._recorded
        self._acm.start(mode)

    def acm_end(self) -> dict[int, float]:
        assert self._acm is not None, "acm_begin() first"
        out = self._acm.mean_nmi()
        self.detach()
        return out

    def layer_keys(self) -> dict[str, Optional[int]]:
        return layer_keys(self.layers.held.block)

    def gradients(self):
        from raymerge.blocks.gradients import GradientStage

        if self._grads is None:
            self._grads = GradientStage(self.layers.held.block)
        return self._grads

    def grad_begin(self) -> None:
        self.detach()
        self.gradients()

    def grad_end(self) -> dict[int, float]:
        out = self.gradients().sensitivities()
        self._grads = None
        return out


def _trial_clock(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Record the wall-clock interval of a `PoolActor` call in `Trial.log` as `kind` (a search's
    per-trial time breakdown, `search.study.TrialTimes`); nothing when the log is off."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(self: "PoolActor", *args: Any, **kwargs: Any) -> Any:
            log = self.trial.log
            if log is None:
                return method(self, *args, **kwargs)
            t0 = time.time()
            try:
                return method(self, *args, **kwargs)
            finally:
                log.append((kind, t0, time.time()))

        return run

    return wrap


# -- the actor -------------------------------------------------------------------------------------------
class PoolActor:
    """Every job's actor: merge work, a block of decoder layers, and what jobs do with it (see the
    module docstring). The public methods are the calls drivers make (through `ActorRef`)."""

    def __init__(self, worker_id: int, threads: Optional[int] = None) -> None:
        self.worker_id = worker_id
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device()
        self.layers = StageLayers(worker_id, self.device)
        self.output = StageOutput()
        self.pruning = Pruning(self.layers, self.output)
        self.trial = Trial(self.layers)
        self.references = ReferenceLogits(self.layers)
        self.statistics = Statistics(self.layers)
        self.merging = MergeWorkerImpl(worker_id, device=self.device)

    def describe(self) -> WorkerInfo:
        return worker_info(self.worker_id, self.device)

    # -- merge work (`runtime.executor`) ------------------------------------------------------
    def calibrate(self, ops: Sequence[MergeOperator]) -> list[float]:
        """Seconds per output element of each operator's method on this actor (for the planner)."""
        return self.merging.calibrate(ops)

    def measure_io(self, large: MergeOperator, small: MergeOperator) -> Any:
        """Read, write and per-part figures of this actor on the job's storage, after
        `merge_begin` (`runtime.worker.MergeWorkerImpl.measure_io`)."""
        return self.merging.measure_io(large, small)

    def merge_begin(self, sources: Sequence[SourceSpec], staging: str, node_shards: Optional[tuple] = None) -> None:
        """Point this actor at a merge: its sources (opened on first use) and staging folder;
        `node_shards` ((job, [(name, header, size)])): an S3 output's shards, allocated in this
        node's own staging folder when the driver's is not on this node's disk."""
        if node_shards is not None:
            from raymerge.checkpoints.writer import ensure_node_shards

            ensure_node_shards(staging, *node_shards)
        self.merging.begin(sources, staging)

    def drop_node_shards(self, staging: str, job: str) -> bool:
        """After the merge published: remove this node's copy of the staging folder, if this
        node had one for `job` (`checkpoints.writer.drop_node_shards`)."""
        from raymerge.checkpoints.writer import drop_node_shards

        return drop_node_shards(staging, job)

    def seal_shard(self, target: Any, staging: str, name: str, job: str) -> str:
        """Hash and upload one finished shard from this node's staging folder (S3 outputs:
        `checkpoints.s3.seal_shard`); its sha256."""
        from raymerge.checkpoints.s3 import seal_shard

        return seal_shard(target, staging, name, job)

    def merge_run(self, batch: Sequence[WorkItem]) -> BatchStats:
        """Compute a batch of parts and write each at its offset in the staging shards."""
        return self.merging.run(batch)

    def histogram(self, ops: Sequence[MergeOperator], high_bins: Optional[dict[int, int]] = None) -> dict[int, torch.Tensor]:
        """Whole-model TIES trimming's histograms of the merge's task vectors."""
        return self.merging.histogram(ops, high_bins)

    def merge_finish(self):
        """Close the merge's files; this process's peak RSS and input bytes read (`worker.JobEnd`)."""
        return self.merging.finish()

    # -- the block ----------------------------------------------------------------------------
    def load(
        self, config: dict[str, Any], spec: SourceSpec, first: int, last: int, settings: PruneSettings,
        embed: bool, head: bool, staging: Optional[str] = None, layout: Optional[OutputLayout] = None,
    ) -> int:
        """Build the block (layers first..last; the embeddings if `embed`, norm and head if
        `head`) and open the output `staging` folder if any; return the resident parameter bytes.
        Starts the busy time afresh: a job's stage busy time is its own (a kept actor's too)."""
        self.statistics.detach()
        self.layers.busy_seconds = 0.0
        n = self.layers.load(config, spec, first, last, settings, embed, head)
        self.output.open(staging, layout)
        return n

    def reload(self, spec: SourceSpec) -> int:
        """The same layers from another model's checkpoint (statistics collectors are detached;
        kept references, recordings and a trial's held tensors stay)."""
        self.statistics.detach()
        self.output.close()
        return self.layers.reload(spec)

    # -- data flow (see PruneStage) -----------------------------------------------------------
    @_trial_clock("forward")
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.layers.timed(self.layers.held.embed, input_ids).cpu()

    @_trial_clock("forward")
    def forward(self, hidden: torch.Tensor, collect: Sequence[str] = (), emit: bool = True) -> Optional[torch.Tensor]:
        """Run the block's layers; `emit=False` keeps the output here (a statistics-only pass)."""
        out = self.layers.timed(self.layers.held.forward, hidden.to(self.device), tuple(collect))
        return out.cpu() if emit else None

    def store(self, hidden: torch.Tensor) -> None:
        self.layers.timed(self.layers.held.store, hidden.to(self.device))

    def store_all(self, hiddens: Sequence[torch.Tensor]) -> None:
        for h in hiddens:
            self.store(h)

    @_trial_clock("forward")
    def loss(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
        return self.layers.timed(self.layers.held.loss, hidden.to(self.device), input_ids)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mean over positions of the hidden states (calibration curation's activation space)."""
        return self.layers.timed(mean_pooled_features, hidden).cpu()

    def clear_statistics(self) -> None:
        self.layers.held.clear_statistics()

    # -- pruning and writing ------------------------------------------------------------------
    @_trial_clock("remerge")
    def outlier_ratios(self, m: float) -> dict[int, float]:
        """OWL's outlier ratios; from the kept dense weights once `keep_dense` ran (a search's
        block then holds a trial's pruned ones), else from the block's weights."""
        return self.pruning.outlier_ratios(m, self.trial.dense_weight if self.trial.dense else None)

    def prune_sequential(self, sparsities: dict[int, float], emit: bool = True) -> Optional[list[torch.Tensor]]:
        outs = self.pruning.prune_sequential(sparsities)
        return [h.cpu() for h in outs] if emit else None

    def prune_collected(self, sparsities: dict[int, float]) -> None:
        self.pruning.prune_collected(sparsities)

    def copy(self, names: Sequence[str]) -> int:
        """Copy tensors unchanged from the checkpoint to the output; return the bytes copied."""
        return self.layers.timed(self.output.copy, self.layers.source, names)

    def finish(self) -> tuple[list[ModuleResult], int, float]:
        """Close the output files; return module results, peak RSS bytes and busy seconds (the
        time spent inside this stage's calls since `load`, closing the files included)."""
        results = self.layers.held.results
        self.layers.timed(self.output.close)
        self.close()
        return results, _peak_rss_bytes(), self.layers.busy_seconds

    def close(self) -> None:
        """Release the output files and the checkpoint sources (idempotent)."""
        self.statistics.detach()
        self.output.close()
        self.layers.close()
        self.merging.finish()

    def upload_files(self, target: Any, staging: str, filenames: Sequence[str]) -> int:
        """Upload finished shards of `staging` to an S3 output (`checkpoints.s3.S3Target`) with
        this process's own credentials (`runtime.output.upload_on`); returns the bytes uploaded."""
        from raymerge.checkpoints.s3 import upload_files

        return upload_files(target, staging, filenames)

    # -- a prune's staging shards on private disks (S3 output, stages on several nodes) ----------
    def ensure_node_shards(self, staging: str, job: str, shards: Sequence[tuple[str, bytes, int]]) -> bool:
        """This node's copy of the staging shards `shards` ((name, header, size)) for `job`, when
        the driver's staging folder is not on this node's disk (`checkpoints.writer.ensure_node_shards`)."""
        from raymerge.checkpoints.writer import ensure_node_shards

        return ensure_node_shards(staging, job, shards)

    def read_staged(self, staging: str, filename: str, begin: int, end: int) -> bytes:
        """Bytes [begin, end) of a shard in this node's staging folder (a piece for another node)."""
        from raymerge.checkpoints.writer import read_range

        return read_range(staging, filename, begin, end)

    def write_staged(self, staging: str, filename: str, begin: int, data: bytes) -> int:
        """Write a piece another node staged at offset `begin` of a shard in this node's staging folder."""
        from raymerge.checkpoints.writer import write_range

        return write_range(staging, filename, begin, data)

    # -- search trials ------------------------------------------------------------------------
    def hold_inputs(self, specs: Sequence[SourceSpec], needed: Sequence[Sequence[str]]) -> int:
        """Read, once, the tensors of each input model this block's operators need; return bytes."""
        return self.trial.hold_inputs(specs, needed)

    def held_parameters(self) -> list[str]:
        """Names of the parameters this block holds (tied names included)."""
        return self.trial.held_parameters()

    def resize_vocabulary(self, rows: int) -> None:
        """The held embedding and head with `rows` rows: the merged vocabulary of a merge that
        chooses a tokenizer (`DecoderBlock.resize_vocabulary`)."""
        self.trial.layers.held.block.resize_vocabulary(rows)

    @_trial_clock("remerge")
    def apply_merge(self, operators: Sequence[MergeOperator]) -> int:
        """Recompute `operators` into this block's parameters; return how many were applied."""
        return self.trial.apply_merge(operators)

    def trial_times(self) -> list[tuple[str, float, float]]:
        """(kind, start, end) wall-clock intervals of this actor's re-merge ("remerge": apply_merge,
        apply_prune, outlier_ratios) and evaluation ("forward": embed, forward, loss, logits, ...)
        calls since the last `trial_times()`; the first call switches the recording on."""
        return self.trial.times()

    def keep_dense(self) -> None:
        """Remember the pruned modules' dense weights (trials re-mask from them)."""
        self.trial.keep_dense()

    @_trial_clock("remerge")
    def apply_prune(self, sparsities: dict[int, float], weight_exponent: float = 1.0, norm_exponent: float = 1.0) -> float:
        """Re-mask every pruned module; return the fraction of zeros over them."""
        return self.trial.apply_prune(sparsities, weight_exponent, norm_exponent)

    def state_dict(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The held parameters among `names` as they are now (a trial's weights), on CPU."""
        return self.trial.state_dict(names)

    @_trial_clock("forward")
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.trial.logits(hidden)

    # -- reference logits ---------------------------------------------------------------------
    def keep_reference(self, hidden: torch.Tensor, key: int) -> None:
        """Keep the logits of an evaluation batch under `key` (last stage)."""
        self.references.keep(hidden, key)

    @_trial_clock("forward")
    def reconstruction(self, hidden: torch.Tensor, key: int) -> tuple[float, int]:
        """Summed squared error of the logits against the reference's, and the element count."""
        return self.references.reconstruction(hidden, key)

    @_trial_clock("forward")
    def logit_distance(self, hidden: torch.Tensor, key: int) -> tuple[float, int]:
        """Sum over tokens of the L2 distance between these logits and the kept reference's."""
        return self.references.distance(hidden, key)

    def drop_references(self) -> None:
        self.references.drop()

    # -- guidance statistics ------------------------------------------------------------------
    def head(self, hidden: torch.Tensor) -> None:
        """Run the final norm and head on the last stage (so their collectors see inputs)."""
        self.statistics.head(hidden)

    def aim_begin(self) -> None:
        self.statistics.aim_begin()

    def aim_end(self) -> dict[str, torch.Tensor]:
        """Per weighted module: the sum over windows of the per-channel mean |input|."""
        return self.statistics.aim_end()

    def acm_begin(self, mode: str) -> None:
        """Attach the recorder: `record` (the base) or `compare` (a fine-tune, against the base)."""
        self.statistics.acm_begin(mode)

    def acm_end(self) -> dict[int, float]:
        """Mean normalised mutual information per layer key (compare mode)."""
        return self.statistics.acm_end()

    def layer_keys(self) -> dict[str, Optional[int]]:
        return self.statistics.layer_keys()

    def grad_begin(self) -> None:
        self.statistics.grad_begin()

    def grad_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers.timed(self.statistics.gradients().forward, hidden.to(self.device)).cpu()

    def grad_loss_backward(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        grad, _ = self.layers.timed(self.statistics.gradients().loss_backward, hidden.to(self.device),
                                    input_ids.to(self.device))
        return grad.cpu()

    def grad_backward(self, grad: torch.Tensor) -> torch.Tensor:
        return self.layers.timed(self.statistics.gradients().backward, grad.to(self.device)).cpu()

    def grad_end(self) -> dict[int, float]:
        """Per decoder layer: mean over windows of Σ|θ ⊙ ∇θ L|."""
        return self.statistics.grad_end()


# -- the driver side -------------------------------------------------------------------------------------
class ActorRef:
    """A driver's handle on one pool actor: each `PoolActor` method, called as `ref.method(...)`,
    runs `actor.method.remote(...)` on a Ray actor (returning an object reference) or the method
    of an in-process `PoolActor` (returning its value). Only `PoolActor`'s public methods
    exist here, so a misspelt call is an `AttributeError` at the call site."""

    __slots__ = ("actor", "remote")

    def __init__(self, actor: Any, remote: bool) -> None:
        self.actor, self.remote = actor, remote

    def __repr__(self) -> str:
        return f"ActorRef({'remote' if self.remote else 'in-process'} {self.actor!r})"


def actor_methods() -> list[str]:
    """The public methods of `PoolActor`: the calls a driver can make on an actor."""
    return sorted(n for n, v in vars(PoolActor).items() if callable(v) and not n.startswith("_"))


def _route(name: str) -> Callable[..., Any]:
    method = getattr(PoolActor, name)

    @functools.wraps(method)
    def call(self: ActorRef, *args: Any, **kwargs: Any) -> Any:
        bound = getattr(self.actor, name)
        return bound.remote(*args, **kwargs) if self.remote else bound(*args, **kwargs)

    return call


for _name in actor_methods():
    setattr(ActorRef, _name, _route(_name))
del _name
