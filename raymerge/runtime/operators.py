"""From a merge config and the input headers to operators: one per output tensor.

This is where mergekit's planning semantics live (checked against mergekit 0.1.5):
- `models:` becomes one slice covering every layer of every listed model; a `base_model` not
  listed is appended as the last input;
- output layers are numbered consecutively across slices; within a slice, layer parameters use
  t = i / (n - 1) (t = 1 for a one-layer slice);
- tensors before the layers (embeddings) come from the first slice's sources, tensors after
  them (final norm, lm_head) from the last slice's; both use t = 0;
- per-model parameters are resolved with the input's own tensor name, global ones with the
  output name; the base model gets per-model parameters only for input-scoped ones;
- an output head (`lm_head.weight`, ...) that one input lacks because its embeddings are tied is
  read from that input's embedding (`TIED_HEADS`), unless its config.json says
  `tie_word_embeddings: false`; the output keeps the head only when some input stores one.

Everything is resolved here, in the driver, from headers alone: a bad parameter, a missing
tensor or a shape mismatch fails before any worker starts or anything is written.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from raymerge.checkpoints import CheckpointError, CheckpointSource, TensorInfo
from raymerge.checkpoints.safetensors_format import CODE_NAMES, NAME_CODES, dtype_code, promote_codes, torch_dtype
from raymerge.config import MergeConfig, ModelRef
from raymerge.config.merge_config import ConfigError, InputSlice, OutputSlice, Parameters
from raymerge.config.parameters import is_missing, resolve_parameter
from raymerge.errors import RaymergeError
from raymerge.methods import MethodError, MethodSpec
from raymerge.runtime.method_config import check_method_config
from raymerge.runtime.layers import ModelLayout, layer_index_problem, parse_layer_name, split_layout

if TYPE_CHECKING:
    import torch

# Tensors whose rows are the vocabulary: token embeddings and output heads (llama, gpt2, gpt-neox, bloom, ...).
_VOCAB_TENSOR = re.compile(r"(embed_tokens|lm_head|embed_in|embed_out|\bwte|word_embeddings|tok_embeddings|^output)\.weight$")

# Output heads that a model with tied embeddings does not store, and where it keeps them instead
# (mergekit's architecture files list these as the head's `tied_names`).
TIED_HEADS: dict[str, tuple[str, ...]] = {
    "lm_head.weight": (
        "model.embed_tokens.weight", "transformer.wte.weight", "model.language_model.embed_tokens.weight",
        "language_model.model.embed_tokens.weight", "model.decoder.embed_tokens.weight", "shared.weight",
    ),
    "language_model.lm_head.weight": ("language_model.model.embed_tokens.weight",),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),
}

class MergePlanError(RaymergeError, ValueError):
    """The config cannot be applied to these models (missing tensor, shape mismatch, ...)."""


@dataclass(frozen=True)
class TensorInput:
    model: int  # index into the list of model sources
    name: str
    nbytes: int


@dataclass(frozen=True)
class OperatorGuide:
    """Adjustments from a guided merge (AIM, ACM, Sens; see `raymerge.methods.guided`).

    `input_scales[i]` scales input i's difference from the base before the merge method runs
    (ACM, Sens); `importance` (one value per input channel, the last dimension) relaxes the merged
    result towards the base afterwards with `omega` (AIM).
    """

    input_scales: Optional[tuple[float, ...]] = None
    importance: Optional[torch.Tensor] = None
    omega: float = 1.0


@dataclass(frozen=True)
class MergeOperator:
    """Everything a worker needs to produce one output tensor (picklable, small)."""

    index: int
    name: str
    method: str
    inputs: tuple[TensorInput, ...]
    base_index: Optional[int]
    model_params: tuple[dict[str, Any], ...]
    params: dict[str, Any]
    # The dtype the inputs are cast to and the method computes in, by name: `resolve_work_code`
    # (the config's `dtype`, else the promotion of the inputs'), resolved once at compile time so
    # the workers, the whole-model trim and the planner's cost model all use the same one. None
    # (operators built by hand, integer tensors): promote the dtypes of the tensors read.
    work_dtype: Optional[str]
    out_dtype: str  # safetensors dtype code of the output
    shape: tuple[int, ...]
    seed: Optional[int]  # per-tensor seed for random methods
    guide: Optional[OperatorGuide] = None  # a guided merge's adjustments (None: a plain merge)
    # An embedding or output head under a tokenizer choice: how each input's rows are gathered,
    # permuted and padded into the output vocabulary (`runtime.vocabulary`); None: read as stored.
    vocab: Optional[Any] = None

    @property
    def bytes_in(self) -> int:
        return sum(i.nbytes for i in self.inputs)

    @property
    def bytes_out(self) -> int:
        from raymerge.checkpoints.safetensors_format import element_size

        n = element_size(self.out_dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass
class MergeProgram:
    """The operators of a merge plus what the driver needs to publish the result."""

    operators: list[MergeOperator]
    models: list[ModelRef]
    donor: int  # model whose config.json and tokenizer are used
    layer_count: int
    layer_sources: list[tuple[int, int]] = field(default_factory=list)  # (model, input layer) per output layer
    changes_layers: bool = False
    # Output heads merged from a tied model's embedding in place of its missing head (output name,
    # model index, embedding read): the output stores the head, so its config must not tie it.
    tied_heads: list[tuple[str, int, str]] = field(default_factory=list)
    # The merged tokenizer and its index maps when the config chooses a tokenizer (driver only:
    # published with the output; operators carry their own small `vocab` maps).
    vocabulary: Optional[Any] = None


def tensor_seed(random_seed: int, tensor_name: str) -> int:
    """A 63-bit seed from (global seed, tensor name): independent of placement and order."""
    digest = hashlib.sha256(f"{random_seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _Planner:
    def __init__(self, config: MergeConfig, sources: dict[ModelRef, CheckpointSource], source_label: str, random_seed: int,
                 vocabulary: Optional[Any] = None):
        self.config = config
        self.vocabulary = vocabulary
        self.label = source_label
        self.spec: MethodSpec = check_method_config(config, source_label)  # the checks that need no headers, first
        self.models = list(sources)
        self.model_index = {m: i for i, m in enumerate(self.models)}
        self.sources = sources
        self.headers: dict[ModelRef, dict[str, TensorInfo]] = {m: s.tensors() for m, s in sources.items()}
        self.layouts: dict[ModelRef, ModelLayout] = {m: split_layout(h) for m, h in self.headers.items()}
        self._check_layer_indices()
        self.random_seed = random_seed
        self.operators: list[MergeOperator] = []
        self.layer_sources: list[tuple[int, int]] = []
        self.tied_heads: list[tuple[str, int, str]] = []

    # -- validation ------------------------------------------------------------------------
    def _check_layer_indices(self) -> None:
        """Planning walks layer indices: bound them before it does (`layers.layer_index_problem`)."""
        for m, layout in self.layouts.items():
            problem = layer_index_problem(layout, self.sources[m].read_json("config.json"))
            if problem is not None:
                name, what = problem
                raise MergePlanError(f"{self._file(m, self.headers[m][name])}: tensor {name!r} {what}")

    def _check_layer_counts(self, models: list[ModelRef]) -> None:
        """Without `slices:`, every model contributes all its layers: their counts must agree."""
        counts: dict[int, list[str]] = {}
        for m in dict.fromkeys(models):
            counts.setdefault(self.layouts[m].num_layers, []).append(self.sources[m].location)
        if len(counts) > 1:
            detail = "; ".join(f"{n} layers: {', '.join(locs)}" for n, locs in counts.items())
            raise MergePlanError(f"{self.label}: models have different numbers of layers ({detail}); "
                                 "use slices: with a layer_range per model to choose which layers are merged")

    # -- slices ----------------------------------------------------------------------------
    def normalized_slices(self) -> list[OutputSlice]:
        cfg = self.config
        slices = cfg._slice_list()
        if slices:
            return slices
        self._check_layer_counts([m.model for m in cfg._model_list() or []]
                                 + ([cfg.base_model] if cfg.base_model is not None else []))
        sources: list[InputSlice] = []
        listed = False
        for m in cfg._model_list() or []:
            listed = listed or m.model == cfg.base_model
            sources.append(InputSlice(model=m.model, layer_range=(0, self.layouts[m.model].num_layers), parameters=m.parameters))
        if cfg.base_model is not None and not listed:
            sources.append(InputSlice(model=cfg.base_model, layer_range=(0, self.layouts[cfg.base_model].num_layers)))
        return [OutputSlice(sources=sources)]

    def plan(self) -> list[MergeOperator]:
        slices = self.normalized_slices()
        for s_i, s in enumerate(slices):
            for src in s.sources:
                n = self.layouts[src.model].num_layers
                if src.layer_range[1] > n:
                    raise ConfigError(
                        f"{self.label}: slices[{s_i}]: layer_range {list(src.layer_range)} of {src.model} "
                        f"is past its {n} layers"
                    )
        first, last = slices[0], slices[-1]
        for name in _ordered_union(self.layouts[src.model].pre for src in first.sources):
            self._plan_tensor(name, [(src, name) for src in first.sources], first, t=0.0)
        out_layer = 0
        for s in slices:
            n = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            for offset in range(n):
                t = offset / (n - 1) if n > 1 else 1.0
                lead = s.sources[0]
                in_layer = lead.layer_range[0] + offset
                self.layer_sources.append((self.model_index[lead.model], in_layer))
                # Every tensor any source has in this layer: one missing elsewhere is an error.
                names = _ordered_union(
                    [parse_layer_name(n).with_index(0) for n in self.layouts[src.model].layers.get(src.layer_range[0] + offset, ())]  # type: ignore[union-attr]
                    for src in s.sources
                )
                for name in names:
                    parsed = parse_layer_name(name)
                    assert parsed is not None
                    inputs = [(src, parsed.with_index(src.layer_range[0] + offset)) for src in s.sources]
                    self._plan_tensor(parsed.with_index(out_layer), inputs, s, t=t)
                out_layer += 1
        for name in _ordered_union(self.layouts[src.model].post for src in last.sources):
            self._plan_tensor(name, [(src, name) for src in last.sources], last, t=0.0)
        return self.operators

    def _check_input_count(self, n_inputs: int, base_index: Optional[int]) -> None:
        spec = self.spec

        def bounds(lo: int, hi: Optional[int]) -> str:
            return f"exactly {lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")

        if n_inputs < spec.min_models or (spec.max_models is not None and n_inputs > spec.max_models):
            raise ConfigError(
                f"{self.label}: merge_method {spec.name!r} takes {bounds(spec.min_models, spec.max_models)} "
                f"input models, got {n_inputs}"
            )
        if spec.non_base_models is not None:
            lo, hi = spec.non_base_models
            n = n_inputs - (base_index is not None)
            if n < lo or (hi is not None and n > hi):
                raise ConfigError(
                    f"{self.label}: merge_method {spec.name!r} takes {bounds(lo, hi)} models besides "
                    f"the base_model, got {n}"
                )

    # -- mismatches ----------------------------------------------------------------------------
    def _file(self, model: ModelRef, info: TensorInfo) -> str:
        loc = self.sources[model].location
        return f"{loc.rstrip('/')}/{info.file}" if info.file else loc

    def _vocab_size(self, model: ModelRef) -> Optional[int]:
        cfg = self.sources[model].read_json("config.json") or {}
        size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
        return size if isinstance(size, int) else None

    def _is_vocab_mismatch(self, inputs: list[tuple[InputSlice, str]], infos: list[TensorInfo]) -> bool:
        """Shapes that differ only in rows, on an embedding or output head (by name, or rows
        equal to each model's config vocab_size)."""
        if len({(len(i.shape), i.shape[1:]) for i in infos}) > 1 or not infos[0].shape:
            return False
        name = inputs[0][1]
        if _VOCAB_TENSOR.search(name):
            return True
        return all(i.shape[0] == self._vocab_size(s.model) for (s, _), i in zip(inputs, infos))

    def _vocab_message(self, out_name: str, inputs: list[tuple[InputSlice, str]], infos: list[TensorInfo]) -> str:
        sizes = [(self._file(s.model, i), i.shape[0]) for (s, _), i in zip(inputs, infos)]
        detail = ", ".join(f"{loc} has {rows} rows" for loc, rows in sizes)
        largest = max(rows for _, rows in sizes)
        return (
            f"vocabulary size mismatch for tensor {out_name!r}: {detail}; models with different "
            f"vocabularies cannot be merged row by row. If their tokenizers agree except for added or "
            f"padding tokens, resize the smaller models' embeddings first (transformers: "
            f"model.resize_token_embeddings({largest}) then save_pretrained) and merge the resized copies, "
            f"or choose the output vocabulary (tokenizer_source: base, union or a model; or a tokenizer: block): "
            f"the rows are then matched by token"
        )

    # -- tied embeddings -------------------------------------------------------------------------
    def _ties_embeddings(self, model: ModelRef) -> bool:
        """False when the model's config.json says its head is not tied (`tie_word_embeddings:
        false`, at the top or in `text_config`); True otherwise, transformers' default."""
        cfg = self.sources[model].read_json("config.json") or {}
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        for where in (cfg, text):
            if where.get("tie_word_embeddings") is False:
                return False
        return True

    def _tied_substitute(self, model: ModelRef, name: str) -> Optional[str]:
        """The embedding that stands in for output head `name`, which `model` does not store
        because its embeddings are tied; None when that does not apply."""
        if name not in TIED_HEADS or not self._ties_embeddings(model):
            return None
        header = self.headers[model]
        return next((t for t in TIED_HEADS[name] if t in header), None)

    # -- one tensor --------------------------------------------------------------------------
    def _plan_tensor(self, out_name: str, inputs: list[tuple[InputSlice, str]], out_slice: OutputSlice, t: float) -> None:
        cfg = self.config
        base = out_slice.base_model or cfg.base_model
        infos: list[TensorInfo] = []
        read_names: list[str] = []  # the tensor read per input (parameters resolve with `inputs`' names)
        for src, name in inputs:
            info = self.headers[src.model].get(name)
            if info is None:
                tied = self._tied_substitute(src.model, name)
                if tied is not None:  # mergekit too: a tied model's head is its embedding
                    self.tied_heads.append((out_name, self.model_index[src.model], tied))
                    infos.append(self.headers[src.model][tied])
                    read_names.append(tied)
                    continue
                loc = self.sources[src.model].location
                hint = ""
                if name in TIED_HEADS and self._ties_embeddings(src.model) is False:
                    hint = " (its config.json has tie_word_embeddings: false, so its embedding is not used in its place)"
                raise MergePlanError(f"tensor {name!r} is missing in model {loc} (needed for output tensor {out_name!r}){hint}")
            infos.append(info)
            read_names.append(name)
        shapes = {i.shape for i in infos}
        vocab_map = None
        out_shape = infos[0].shape
        if self.vocabulary is not None and _VOCAB_TENSOR.search(out_name) and len(infos[0].shape) >= 1:
            if len({i.shape[1:] for i in infos}) > 1:
                detail = ", ".join(f"{self._file(s.model, i)}: {list(i.shape)}" for (s, _), i in zip(inputs, infos))
                raise MergePlanError(f"shape mismatch for tensor {out_name!r} beyond its vocabulary rows: {detail}")
            vocab_map = self.vocabulary.operator_map(
                out_name, [s.model for s, _ in inputs], [i.shape[0] for i in infos], base, self.label)
            out_shape = (vocab_map.rows, *infos[0].shape[1:])
            shapes = {out_shape}
        if len(shapes) > 1:
            if self._is_vocab_mismatch(inputs, infos):
                raise MergePlanError(self._vocab_message(out_name, inputs, infos))
            detail = ", ".join(f"{self._file(s.model, i)}: {list(i.shape)}" for (s, _), i in zip(inputs, infos))
            raise MergePlanError(f"shape mismatch for tensor {out_name!r}: {detail}")
        floating = {i.floating for i in infos}
        if len(floating) > 1 or (floating == {False} and len({i.code for i in infos}) > 1):
            # Floating-point inputs of different precisions are merged in a common dtype; an
            # integer buffer is copied from one model, so it must be the same in all of them.
            detail = ", ".join(f"{self._file(s.model, i)}: {i.code}" for (s, _), i in zip(inputs, infos))
            raise MergePlanError(
                f"dtype mismatch for tensor {out_name!r}: {detail} (a floating-point tensor cannot be merged "
                "with an integer one, nor integer tensors of different types)"
            )
        base_index = next((k for k, (src, _) in enumerate(inputs) if src.model == base), None)
        if self.spec.base == "none":
            base_index = None  # e.g. linear: the base model is an ordinary weighted input
        if self.spec.base == "required" and base_index is None:
            raise ConfigError(f"{self.label}: merge_method {self.spec.name!r} needs a base_model")
        self._check_input_count(len(inputs), base_index)

        def scopes_for(src: Optional[InputSlice]) -> list[Optional[Parameters]]:
            out: list[Optional[Parameters]] = []
            if src is not None:
                out += [s.parameters for s in out_slice.sources if s.model == src.model]
            return out + [out_slice.parameters, cfg.module_parameters(), cfg.parameters]

        params: dict[str, Any] = {}
        for p in self.spec.params:
            if p.per_model:
                continue
            v = resolve_parameter(p.name, scopes_for(None), out_name, t)
            if not is_missing(v):
                params[p.name] = v
        model_params: list[dict[str, Any]] = []
        for k, (src, name) in enumerate(inputs):
            mp: dict[str, Any] = {}
            for p in self.spec.params:
                if not p.per_model or (k == base_index and not p.input_scope):
                    continue
                v = resolve_parameter(p.name, scopes_for(src), name, t)
                if not is_missing(v):
                    mp[p.name] = v
            model_params.append(mp)
        try:
            model_params, params = self.spec.resolve(model_params, params, base_index)
        except MethodError as err:
            raise ConfigError(f"{self.label}: tensor {out_name!r}: {err}") from None

        codes = [i.code for i in infos]
        work = resolve_work_code(cfg.dtype, codes)
        floating = all(i.floating for i in infos)
        if not floating:
            out = codes[0]  # integer buffers are copied, never merged
        else:
            out = NAME_CODES[cfg.out_dtype] if cfg.out_dtype else work
        self.operators.append(
            MergeOperator(
                index=len(self.operators),
                name=out_name,
                method=self.spec.name,
                inputs=tuple(TensorInput(self.model_index[s.model], n, i.nbytes) for (s, _), n, i in zip(inputs, read_names, infos)),
                base_index=base_index,
                model_params=tuple(model_params),
                params=params,
                work_dtype=CODE_NAMES[work] if floating else cfg.dtype,
                out_dtype=out,
                shape=out_shape,
                seed=tensor_seed(self.random_seed, out_name) if self.spec.random else None,
                vocab=vocab_map,
            )
        )


def _ordered_union(lists) -> list[str]:
    """Names from several lists, each once, in first-seen order."""
    seen: dict[str, None] = {}
    for names in lists:
        for n in names:
            seen.setdefault(n, None)
    return list(seen)


def resolve_work_code(config_dtype: Optional[str], input_codes: Sequence[str]) -> str:
    """The one working-dtype rule, on safetensors codes: the config's `dtype` ("bfloat16"), else
    the promotion of the inputs' dtypes (every input of the operator, not a pair of them), as
    `torch.promote_types` would give it."""
    return NAME_CODES[config_dtype] if config_dtype else promote_codes(input_codes)


def resolve_work_dtype(config_dtype: Optional[str], input_dtypes: Sequence["torch.dtype"]) -> "torch.dtype":
    """The same rule on the torch dtypes of the tensors read (the workers' side)."""
    return torch_dtype(resolve_work_code(config_dtype, [dtype_code(d) for d in input_dtypes]))


def build_program(
    config: MergeConfig, sources: dict[ModelRef, CheckpointSource], *, source_label: str = "<config>", random_seed: int = 0,
    vocabulary: Optional[Any] = None,
) -> MergeProgram:
    """Resolve every output tensor of `config` over the opened `sources` (keyed by reference).
    `vocabulary` (`runtime.vocabulary.build_vocabulary`): the merged vocabulary of a config that
    chooses a tokenizer; its embeddings and heads are then gathered into it."""
    planner = _Planner(config, sources, source_label, random_seed, vocabulary)
    ops = planner.plan()
    if not ops:
        raise MergePlanError("the merge produces no tensors (are the layer ranges empty?)")
    names = [o.name for o in ops]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MergePlanError(f"output tensor {dup!r} would be written twice")
    models = planner.models
    donor = models.index(config.base_model) if config.base_model is not None else 0
    n_out = len(planner.layer_sources)
    donor_layers = planner.layouts[models[donor]].num_layers
    return MergeProgram(
        operators=ops,
        models=models,
        donor=donor,
        layer_count=n_out,
        layer_sources=planner.layer_sources,
        changes_layers=bool(config._slice_list()) or n_out != donor_layers,
        tied_heads=planner.tied_heads,
        vocabulary=vocabulary,
    )


def check_sources_compatible(sources: dict[ModelRef, CheckpointSource], allow_mixed: bool = False) -> None:
    """Refuse to merge models of different architectures (mergekit's --allow-crimes to override)."""
    if allow_mixed:
        return
    archs: dict[str, list[str]] = {}
    for ref, src in sources.items():
        archs.setdefault(src.architecture(), []).append(src.location)  # config.json missing or odd: one line
    if len(archs) > 1:
        detail = "; ".join(f"{a}: {', '.join(locs)}" for a, locs in archs.items())
        raise MergePlanError(f"models have different architectures ({detail}); pass --allow-mixed-architectures to merge anyway")
