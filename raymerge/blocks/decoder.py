"""A slice of a Hugging Face decoder model: some of its layers, run on their own.

Pruning and evaluation push hidden states through a model one block of decoder layers at a
time, on workers that each hold only their own block. This module builds such a block from a
`config.json` and a checkpoint source, with no architecture hard-coded:

- The model is instantiated on the meta device (no memory), and only the parts a block needs are
  materialised and loaded from the source: its decoder layers, plus the embeddings on the first
  block and the final norm and head on the last. Non-persistent buffers (rotary frequencies) are
  recomputed by the model's own initialisation code, as `from_pretrained` does.
- The decoder layers are found as the `nn.ModuleList` with `num_hidden_layers` entries; its path
  (`model.layers` for llama, mistral, qwen2, gemma, phi3, ...) prefixes the tensor names.
- What each layer is called with (attention masks, rotary embeddings, position ids: arguments
  that differ between architectures and even between layers, e.g. sliding-window layers) is
  captured rather than rebuilt: the model's own forward runs once with zero input embeddings and
  every layer replaced by a recorder that passes its input through. The recorded keyword
  arguments are then given to the real layers. Only hidden states travel between blocks.
- Embedding runs the model's forward up to the first layer (so any input scaling the
  architecture applies is kept); logits run the model's forward with the first layer replaced by
  a module that returns the block's hidden states (so the final norm, head and any logit
  soft-capping are the model's own).

Weights are held in a compute dtype (float32 by default: CPU matmuls and the statistics want it);
the checkpoint's own tensors are what the writer masks, so kept weights stay bit-identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from raymerge.checkpoints import CheckpointError, CheckpointSource


class _Stop(Exception):
    """Raised by the first-layer catcher to end a forward pass early."""


def _returns_tuple() -> bool:
    """Decoder layers returned `(hidden, ...)` tuples before transformers 5, tensors since."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


class _Catcher(nn.Module):
    """Stands in for layer 0: keeps its input hidden states and stops the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: Optional[torch.Tensor] = None

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.hidden = hidden
        raise _Stop


class _Recorder(nn.Module):
    """Stands in for a layer: records the keyword arguments it is called with, passes through."""

    def __init__(self, as_tuple: bool, stop: bool = False) -> None:
        super().__init__()
        self.kwargs: dict[str, Any] = {}
        self.as_tuple = as_tuple
        self.stop = stop

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise CheckpointError("decoder layers called with positional arguments besides the hidden states")
        self.kwargs = kwargs
        if self.stop:
            raise _Stop
        return (hidden,) if self.as_tuple else hidden


class _Feeder(_Recorder):
    """Stands in for layer 0: returns the given hidden states instead of its input."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__(as_tuple)
        self.hidden = hidden

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (self.hidden,) if self.as_tuple else self.hidden


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _autograd(enabled: bool) -> Any:
    """`torch.enable_grad()` or `torch.no_grad()`."""
    return torch.enable_grad() if enabled else torch.no_grad()


def meta_model(
    config: dict[str, Any], *, source: Optional[CheckpointSource] = None, trust_remote_code: bool = False,
) -> nn.Module:
    """The causal LM of `config` (a config.json dict), on the meta device: no memory used.

    A config with an `auto_map` is built from the code it names (read through `source`) when
    `trust_remote_code` is set (`checkpoints.remote_code`); without it, transformers' own class
    of its `model_type` is used, and a model type transformers does not know is a
    `CheckpointError` naming the flag.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from raymerge.checkpoints.remote_code import auto_map, code_folder, model_code_files, needs_code_error

    where = source.file_label("config.json") if source is not None else "config.json"
    if trust_remote_code and auto_map(config):
        if source is None:
            raise CheckpointError(f"{where}: its model code must be read from the checkpoint, and none was given")
        files = model_code_files(config, source.read_bytes, where)
        with code_folder(files) as folder:
            try:
                hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
                with torch.device("meta"):
                    return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=True)
            except Exception as err:  # noqa: BLE001 - the model's own code failed (a missing package, no causal LM class)
                first = str(err).splitlines()[0][:300] if str(err) else ""
                raise CheckpointError(f"{where}: building the model from the code it ships failed: {type(err).__name__}: {first}") from None
    cfg_dict = dict(config)
    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise CheckpointError(f"{where} has no model_type")
    if model_type not in CONFIG_MAPPING and auto_map(config):
        raise needs_code_error(where, f"model type {model_type!r}", KeyError(f"transformers has no model type {model_type!r}"))
    hf_config = AutoConfig.for_model(model_type, **cfg_dict)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: the first ModuleList with `num_hidden_layers` entries, and its path."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return name, module
    raise CheckpointError(
        f"cannot find the decoder layers of {type(model).__name__}: no module list of num_hidden_layers={n} entries"
    )


def prunable_modules(layer: nn.Module, patterns: Optional[list[str]] = None) -> list[str]:
    """Names (relative to a layer) of the linear modules to prune: all of them by default, else
    those whose name matches one of the regular expressions (`re.fullmatch`)."""
    names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    if patterns is None:
        return names
    compiled = [(p, re.compile(p)) for p in patterns]
    for text, rx in compiled:
        if not any(rx.fullmatch(n) for n in names):
            raise CheckpointError(
                f"modules: pattern '{text}' matches no linear module of a decoder layer; they are: {', '.join(names)}"
            )
    return [n for n in names if any(rx.fullmatch(n) for _, rx in compiled)]


@dataclass(frozen=True)
class ModelShape:
    """What the driver needs to know of a model to cut it into blocks (from config alone)."""

    layers_path: str  # e.g. "model.layers"
    num_layers: int
    hidden_size: int
    max_positions: Optional[int]
    modules: tuple[str, ...]  # prunable linear modules of one layer (relative names)
    layer_params: int  # parameters of one decoder layer
    module_shapes: dict[str, tuple[int, int]]  # relative module name -> (out_features, in_features)


def describe_model(
    config: dict[str, Any], patterns: Optional[list[str]] = None, *,
    source: Optional[CheckpointSource] = None, trust_remote_code: bool = False,
) -> ModelShape:
    """The `ModelShape` of `config` (`source` and `trust_remote_code`: as `meta_model`'s)."""
    model = meta_model(config, source=source, trust_remote_code=trust_remote_code)
    path, layers = find_layers(model)
    modules = prunable_modules(layers[0], patterns)
    shapes = {n: tuple(layers[0].get_submodule(n).weight.shape) for n in modules}
    return ModelShape(
        layers_path=path,
        num_layers=len(layers),
        hidden_size=int(model.config.hidden_size),
        max_positions=getattr(model.config, "max_position_embeddings", None),
        modules=tuple(modules),
        layer_params=sum(p.numel() for p in layers[0].parameters()),
        module_shapes=shapes,  # type: ignore[arg-type]
    )


class DecoderBlock:
    """Decoder layers `first`..`last` (inclusive) of a model, materialised from a checkpoint."""

    def __init__(
        self,
        config: dict[str, Any],
        source: CheckpointSource,
        first: int,
        last: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        embed: bool = False,
        head: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        self.model = meta_model(config, source=source, trust_remote_code=trust_remote_code)
        self.layers_path, layers = find_layers(self.model)
        if not 0 <= first <= last < len(layers):
            raise ValueError(f"layers {first}..{last} out of range for a model of {len(layers)} layers")
        self.first, self.last = first, last
        self.device = torch.device(device)
        self.dtype = dtype
        self.has_embed, self.has_head = embed, head
        self._layers = layers
        self._as_tuple = _returns_tuple()
        self._kwargs_cache: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self._materialise(source)

    # -- building ---------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        return [f"{self.layers_path}.{i}" for i in range(self.first, self.last + 1)]

    def layer(self, index: int) -> nn.Module:
        return self._layers[index]

    def _wanted_names(self) -> list[str]:
        """Parameters and persistent buffers this block loads: its layers; the input embeddings on
        the first block; the output head on the last; anything else outside the layers (norms) on
        both, since it may act before the layers (embedding norms) or after them (final norm)."""
        layer_root = self.layers_path + "."
        own = tuple(name + "." for name in self.layer_names())
        embed_ids = {id(p) for p in self.model.get_input_embeddings().parameters()}
        head = self.model.get_output_embeddings()
        head_names = {n for n, m in self.model.named_modules() if m is head}
        wanted = []
        persistent = [
            f"{mod}.{b}" if mod else b
            for mod, m in self.model.named_modules()
            for b in m._buffers
            if b not in m._non_persistent_buffers_set
        ]
        params = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        for name in params + persistent:
            if name.startswith(layer_root):
                if name.startswith(own):
                    wanted.append(name)
            elif name.rsplit(".", 1)[0] in head_names:
                if self.has_head:
                    wanted.append(name)
            elif name in params and id(self.model.get_parameter(name)) in embed_ids:
                if self.has_embed:
                    wanted.append(name)
            elif self.has_embed or self.has_head:
                wanted.append(name)
        return wanted

    def _materialise(self, source: CheckpointSource) -> None:
        available = source.tensors()
        tied = self._tied_names()
        loaded: dict[str, nn.Parameter] = {}
        for name in self._wanted_names():
            src_name = name if name in available else tied.get(name)
            if src_name is None or src_name not in available:
                raise CheckpointError(
                    f"{source.location}: tensor {name} not found (needed for layers {self.first}..{self.last})"
                )
            mod_name, attr = name.rsplit(".", 1) if "." in name else ("", name)
            module = self.model.get_submodule(mod_name)
            current = getattr(module, attr)
            value = source.read(src_name)
            value = value.to(device=self.device, dtype=self.dtype if value.is_floating_point() else value.dtype)
            if tuple(current.shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{source.location}: tensor {src_name} has shape {list(value.shape)}, the config implies {list(current.shape)}"
                )
            if isinstance(current, nn.Parameter):
                other = tied.get(name)
                shared = loaded.get(other) if other is not None else None
                setattr(module, attr, shared if shared is not None else nn.Parameter(value, requires_grad=False))
                loaded[name] = getattr(module, attr)
            else:
                module._buffers[attr] = value if value.is_floating_point() else value.to(current.dtype)
        # A tied partner this block did not load itself (the head of a middle-less last block)
        # shares the loaded parameter, so updating one updates both, as in the real model.
        for name, other in tied.items():
            if name in loaded and other not in loaded:
                mod_name, attr = other.rsplit(".", 1)
                setattr(self.model.get_submodule(mod_name), attr, loaded[name])
                loaded[other] = loaded[name]
        # Computed buffers (rotary frequencies, embedding scales) come from the model's own init
        # code; loaded weights are flagged so that code leaves them alone (as from_pretrained does).
        for module in self.model.modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                continue  # not part of this block
            meta = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
            if not meta:
                continue
            for p in module.parameters(recurse=False):
                p._is_hf_initialized = True
            for key in meta:
                module._buffers[key] = torch.empty_like(module._buffers[key], device=self.device)
            self.model._init_weights(module)
        self.model.eval()

    def _tied_names(self) -> dict[str, str]:
        """Parameters shared with another name (tied embeddings): name -> the other name."""
        seen: dict[int, str] = {}
        tied: dict[str, str] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                tied[name] = seen[id(p)]
                tied[seen[id(p)]] = name
            else:
                seen[id(p)] = name
        return tied

    # -- running ----------------------------------------------------------------------------
    def layer_kwargs(self, batch: int, seqlen: int) -> list[dict[str, Any]]:
        """Keyword arguments each of this block's layers is called with, for a batch shape."""
        key = (batch, seqlen)
        if key not in self._kwargs_cache:
            # Recorders pass the hidden states through; the one at this block's last layer stops
            # the forward, so the final norm and head (not materialised here) never run.
            recorders = {i: _Recorder(self._as_tuple, stop=i == self.last) for i in range(self.last + 1)}
            zeros = torch.zeros(batch, seqlen, self.model.config.hidden_size, dtype=self.dtype, device=self.device)
            with self._swapped_layers(recorders), torch.no_grad():
                try:
                    self._base_forward(inputs_embeds=zeros)
                except _Stop:
                    pass
            if len(self._kwargs_cache) >= 4:  # micro-batches share a shape or two (the last may be short)
                self._kwargs_cache.clear()
            self._kwargs_cache[key] = [recorders[i].kwargs for i in range(self.first, self.last + 1)]
        return self._kwargs_cache[key]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer 0 (needs the block built with `embed=True`)."""
        if not self.has_embed:
            raise RuntimeError("this block was built without the embeddings")
        catcher = _Catcher()
        with self._swapped_layers({0: catcher}), torch.no_grad():
            try:
                self._base_forward(input_ids=input_ids.to(self.device))
            except _Stop:
                pass
        assert catcher.hidden is not None
        return catcher.hidden.to(self.dtype)

    # `grad=True` runs with autograd on (for backward passes, see `raymerge.blocks.gradients`):
    # gradients then flow back to `hidden`, and to whichever parameters the caller has set to
    # require them (all are loaded with `requires_grad=False`). The default runs without autograd.
    def run_layer(self, index: int, hidden: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        kwargs = self.layer_kwargs(hidden.shape[0], hidden.shape[1])[index - self.first]
        with _autograd(grad):
            return _hidden(self._layers[index](hidden.to(self.device), **kwargs))

    def forward(self, hidden: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        for i in range(self.first, self.last + 1):
            hidden = self.run_layer(i, hidden, grad=grad)
        return hidden

    def logits(self, hidden: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """Logits from the hidden states leaving the last layer (needs `head=True`)."""
        if not self.has_head:
            raise RuntimeError("this block was built without the final norm and head")
        feeder = _Feeder(hidden.to(self.device), self._as_tuple)
        passthrough = {i: _Recorder(self._as_tuple) for i in range(1, len(self._layers))}
        zeros = torch.zeros_like(hidden, device=self.device, dtype=self.dtype)
        with self._swapped_layers({0: feeder, **passthrough}), _autograd(grad):
            out = self.model(inputs_embeds=zeros, use_cache=False)
        return out.logits

    def _base_forward(self, **inputs: Any) -> Any:
        return self.model(**inputs, use_cache=False)

    def _swapped_layers(self, replacements: dict[int, nn.Module]):
        return _Swap(self._layers, replacements)

    def resize_vocabulary(self, rows: int) -> None:
        """Give the held input embedding and output head `rows` rows: a search of a merge that
        chooses a tokenizer loads its stages from one input model, and every trial's merge then
        writes all of these rows. Rows past the loaded ones start at zero; tied ones stay tied."""
        resized: dict[int, nn.Parameter] = {}
        for module in (self.model.get_input_embeddings(), self.model.get_output_embeddings()):
            weight = getattr(module, "weight", None)
            if weight is None or weight.is_meta or weight.shape[0] == rows:
                continue
            if id(weight) not in resized:
                new = torch.zeros((rows, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
                keep = min(rows, weight.shape[0])
                new[:keep] = weight.detach()[:keep]
                resized[id(weight)] = nn.Parameter(new, requires_grad=False)
            module.weight = resized[id(weight)]
            if isinstance(module, nn.Embedding):
                module.num_embeddings = rows
            elif isinstance(module, nn.Linear):
                module.out_features = rows
        if resized:
            self.model.config.vocab_size = rows

    def held_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter this block materialised, under all its names (tied ones too)."""
        return {n: p for n, p in self.model.named_parameters(remove_duplicate=False) if not p.is_meta}

    def linear(self, index: int, module: str) -> nn.Linear:
        return self._layers[index].get_submodule(module)  # type: ignore[return-value]



class _Swap:
    """Temporarily put other modules in place of some layers."""

    def __init__(self, layers: nn.ModuleList, replacements: dict[int, nn.Module]) -> None:
        self.layers, self.replacements = layers, replacements
        self.saved: dict[int, nn.Module] = {}

    def __enter__(self) -> None:
        for i, module in self.replacements.items():
            self.saved[i] = self.layers[i]
            self.layers[i] = module

    def __exit__(self, *exc: Any) -> None:
        for i, module in self.saved.items():
            self.layers[i] = module


def input_hook(callback: Callable[[torch.Tensor], None]) -> Callable[..., None]:
    """A forward pre-hook that hands a linear module's input to `callback`."""

    def hook(module: nn.Module, args: tuple) -> None:
        callback(args[0])

    return hook
