"""Merging models whose vocabularies differ: `tokenizer_source` and the `tokenizer:` block.

The semantics are mergekit 0.1.5's (checked against its `tokenizer/build.py` and
`tokenizer/embed.py`); the code is ours. Two halves:

Driver (`build_vocabulary`, from the tokenizer files alone, no weights):
- the output tokenizer: `base` is the base model's tokenizer (the first model's without a
  base_model) stripped of tokens whose id is >= its config's `vocab_size`; a model reference is
  that model's tokenizer as `AutoTokenizer` loads it; `union` (the `tokenizer:` block's default)
  is the base tokenizer plus, in turn, every other model's tokens it lacks (tokens registered as
  added tokens keep their settings: special, normalized, ...); then the `tokenizer.tokens` the
  output lacks are added, in config order. The driver saves it with `save_pretrained`, and sets
  `vocab_size` in config.json to its length, rounded up to `pad_to_multiple_of`;
- per model, an index map: output token id -> that model's row of the same token, or -1
  ("absent": the model's tokenizer lacks the token). A model without a readable tokenizer is
  taken to share the base's;
- per operator (`Vocabulary.operator_map`, one per embedding / output head), a `VocabularyMap`:
  each input's own rows (a token in `tokens` with `force: true` counts as absent), and for each
  token some input lacks, where its row comes from: the one model that has it; else the base
  model when it has it; else the mean of the models that have it; zero when none has it; or what
  `tokens` says (`source: MODEL`: that model's row of the token; `{kind: model_token, model,
  token | token_id}`: that row of that model's own tensor; `{kind: zero}`). An input lacking a
  token gets that row; every input keeps its own rows otherwise. Rows past the vocabulary
  (`pad_to_multiple_of`) are, per input, the mean of its gathered rows. The merge method then
  runs on these per-input tensors as on any other.

Workers (`gather_inputs`, called by `compute.compute_operator`): for output rows [a, b) each
input's rows are gathered from only the source rows that range needs (contiguous runs, read with
`rows=`, nearby runs coalesced), in the operator's working dtype, on the CPU (as mergekit does),
so a row-split embedding reads about its share of each input. The one exception is a part that
holds padding rows: their mean needs every gathered row, so that part reads the whole
vocabulary of each input, one input at a time.

Where raymerge differs: mergekit takes its models in Python set order (`referenced_models()`
returns `list(set(...))`), so with no base_model the tokenizer it calls "base", and in a union
the order in which tokens new to the base are appended, depend on string hashing
(PYTHONHASHSEED) when more than one non-base model brings new tokens; raymerge uses config order
(base first). Cases mergekit fails on with a KeyError or an assertion (a model's token id at or
past its `vocab_size`, a `tokens` entry without a source for a token some model lacks, a source
model that is not an input of the tensor) are errors here, naming the token and the model.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from raymerge.checkpoints import CheckpointSource
from raymerge.config import MergeConfig, ModelRef
from raymerge.config.merge_config import ConfigError, ModelTokenEmbedding, TokenEmbedding, ZeroEmbedding

log = logging.getLogger(__name__)

# Default-row kinds of a token some input lacks.
ZERO, COPY, MEAN = 0, 1, 2
ABSENT = -1  # the model does not have the token (or a `force` entry replaces its row)
PAST_VOCAB = -2  # the model's tokenizer has the token at an id >= its vocab_size (mergekit: KeyError)
_COALESCE_BYTES = 256 << 10  # rows less than this many bytes apart are read in one request (and the
# rows between them discarded): fewer requests for nearly contiguous maps, little waste for scattered ones


class VocabularyError(ConfigError):
    """The vocabulary cannot be built as the config asks (names the token and the model)."""


@dataclass(frozen=True)
class VocabularyMap:
    """How one operator's output rows are gathered from each input (picklable, small: a few
    int64 per token). `own[k][t]`: input k's row for output token t, or -1. `default_ids`
    (ascending): the tokens some input lacks, each with a kind (ZERO, COPY, MEAN) and, per
    input, the row it contributes (-1: none)."""

    rows: int  # output rows: the vocabulary, padded
    tokens: int  # output tokens (rows past it are padding)
    own: tuple[torch.Tensor, ...]
    in_rows: tuple[int, ...]  # rows of each input tensor
    default_ids: torch.Tensor
    default_kind: torch.Tensor
    default_src: torch.Tensor  # [len(default_ids), inputs]


@dataclass
class Vocabulary:
    """The merged tokenizer and each model's index map (driver only; see the module docstring)."""

    tokenizer: Any  # transformers tokenizer, saved with save_pretrained at publish time
    vocab: dict[str, int]
    rows: int
    index: dict[ModelRef, torch.Tensor]  # per model: output token id -> its row, ABSENT, PAST_VOCAB
    original: dict[ModelRef, dict[str, int]]  # each model's own vocabulary (model_token lookups)
    tokens: dict[str, TokenEmbedding] = field(default_factory=dict)

    def files(self, chat_template: Optional[str] = None) -> dict[str, bytes]:
        """The tokenizer's files as `save_pretrained` writes them, by name."""
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}

    def operator_map(self, name: str, models: Sequence[ModelRef], in_rows: Sequence[int],
                     base: Optional[ModelRef], label: str) -> VocabularyMap:
        """The VocabularyMap of output tensor `name` whose inputs come from `models` (in input order)."""
        n = len(self.vocab)
        index = torch.stack([self.index[m] for m in models])  # [inputs, tokens]
        for k, m in enumerate(models):
            bad = (index[k] == PAST_VOCAB).nonzero().flatten()
            if len(bad):
                tok = self._token(int(bad[0]))
                raise VocabularyError(f"{label}: tensor {name!r}: token {tok!r} of model {m} has an id at or past "
                                      f"its config's vocab_size (a padding token?); it has no row to use")
            if int(index[k].max()) >= in_rows[k]:
                t = int(index[k].argmax())
                raise VocabularyError(f"{label}: tensor {name!r}: token {self._token(t)!r} is row {int(index[k][t])} "
                                      f"of model {m}, which has only {in_rows[k]} rows")
        id_to_token = {i: t for t, i in self.vocab.items()}
        forced = torch.zeros(n, dtype=torch.bool)
        for tok, cfg in self.tokens.items():
            if cfg.force and tok in self.vocab:
                forced[self.vocab[tok]] = True
        present = index >= 0
        need = (~present.all(dim=0)) | forced
        ids = need.nonzero().flatten()
        kinds = torch.zeros(len(ids), dtype=torch.int8)
        src = torch.full((len(ids), len(models)), -1, dtype=torch.int64)
        nowhere: list[str] = []
        first = {}
        for k, m in enumerate(models):
            first.setdefault(m, k)
        base_k = first.get(base) if base is not None else None
        for d, t in enumerate(ids.tolist()):
            tok = id_to_token[t]
            cfg = self.tokens.get(tok)
            has = present[:, t]
            if cfg is None:
                count = int(has.sum())
                if count == 0:
                    nowhere.append(tok)
                    kinds[d] = ZERO
                elif count == 1 or (base_k is not None and bool(has[base_k])):
                    k = base_k if count > 1 else int(has.nonzero()[0])
                    kinds[d], src[d, k] = COPY, index[k, t]
                else:
                    kinds[d] = MEAN
                    src[d, has] = index[has, t]
                continue
            source = cfg.source
            if isinstance(source, ZeroEmbedding):
                kinds[d] = ZERO
                continue
            if source is None:
                why = "force: true replaces every model's row" if cfg.force else "some model lacks this token"
                raise VocabularyError(f"{label}: tokenizer.tokens[{tok!r}]: {why}, so it needs a source "
                                      f"(a model, {{kind: model_token, ...}} or {{kind: zero}})")
            model = source.model if isinstance(source, ModelTokenEmbedding) else source
            if model not in first:
                raise VocabularyError(f"{label}: tokenizer.tokens[{tok!r}] takes its row from model {model}, which is "
                                      f"not an input of tensor {name!r}")
            k = first[model]
            if isinstance(source, ModelTokenEmbedding):
                row = source.token_id
                if row is None:
                    vocab = self.original.get(model)
                    if vocab is None or source.token not in vocab:
                        raise VocabularyError(f"{label}: tokenizer.tokens[{tok!r}]: token {source.token!r} is not in "
                                              f"the tokenizer of model {model}")
                    row = vocab[source.token]
                if not 0 <= row < in_rows[k]:
                    raise VocabularyError(f"{label}: tokenizer.tokens[{tok!r}]: token id {row} is out of range for "
                                          f"model {model} ({in_rows[k]} rows)")
            else:
                row = int(index[k, t])
                if row < 0:
                    raise VocabularyError(f"{label}: tokenizer.tokens[{tok!r}]: model {model} does not have this token")
            kinds[d], src[d, k] = COPY, row
        if nowhere:
            log.warning("%s: tensor %r: %d token(s) are in no model (rows left zero): %s", label, name, len(nowhere),
                        ", ".join(map(repr, nowhere[:10])) + (", ..." if len(nowhere) > 10 else ""))
        own = index.clamp(min=-1)
        own[:, forced] = ABSENT
        return VocabularyMap(rows=self.rows, tokens=n, own=tuple(own[k].clone() for k in range(len(models))),
                             in_rows=tuple(in_rows), default_ids=ids, default_kind=kinds, default_src=src)

    def _token(self, t: int) -> str:
        return next(tok for tok, i in self.vocab.items() if i == t)


# -- driver: tokenizers ------------------------------------------------------------------------


def load_tokenizer(files: dict[str, bytes], where: str, *, trust_remote_code: bool = False) -> Any:
    """A fast tokenizer from a model's tokenizer files (and config.json, and with
    `trust_remote_code` the code files its auto_map names), or None without them; one whose
    code is needed without the flag is a `CheckpointError` naming `where` and the flag."""
    from raymerge.checkpoints.model_files import tokenizer_from_files
    from raymerge.checkpoints.remote_code import tokenizer_auto_map

    if not any(name.startswith("tokenizer") for name in files):
        return None
    return tokenizer_from_files(files, where, trust_remote_code=trust_remote_code,
                                names_code=bool(tokenizer_auto_map(files)), use_fast=True)


def _vocab_size(source: CheckpointSource) -> Optional[int]:
    cfg = source.read_json("config.json") or {}
    size = cfg.get("vocab_size")
    if size is None and isinstance(cfg.get("text_config"), dict):
        size = cfg["text_config"].get("vocab_size")
    return size if isinstance(size, int) else None


def _strip(tokenizer: Any, vocab_size: Optional[int], where: str) -> Any:
    """The tokenizer without the tokens whose id is >= vocab_size (BPE only, as mergekit)."""
    import tokenizers

    size = vocab_size or len(tokenizer.get_vocab())
    unused = {tok for tok, i in tokenizer.get_vocab().items() if i >= size}
    if not unused:
        return tokenizer
    if not tokenizer.is_fast:
        raise VocabularyError(f"{where}: its tokenizer has tokens past vocab_size {size} and is not a fast tokenizer")
    data = json.loads(tokenizer._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise VocabularyError(f"{where}: its tokenizer has tokens past vocab_size {size}; only a BPE tokenizer "
                              f"can be trimmed to it, this one is {data['model']['type']}")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if t not in unused}

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    try:
        tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    except Exception as err:  # noqa: BLE001 - mergekit fails here too (a stripped token is a merge's result)
        raise VocabularyError(f"{where}: its tokenizer cannot be trimmed to vocab_size {size}: {err}") from None
    return tokenizer


def _union(base_tok: Any, toks: dict[ModelRef, Any], sizes: dict[ModelRef, Optional[int]],
           trust_remote_code: bool = False) -> Any:
    """The base tokenizer (a fresh copy) plus every other model's tokens it lacks, in turn."""
    import transformers

    merged_vocab: dict[str, None] = {}
    added: dict[str, Any] = {}
    for model, tok in toks.items():
        size = sizes.get(model) or tok.vocab_size
        for t, i in tok.get_vocab().items():
            if i < size:
                merged_vocab.setdefault(t, None)
        for i, info in tok.added_tokens_decoder.items():
            if i >= size:
                continue
            if info.content in added:
                if added[info.content] != info:
                    log.warning("token %r is added with different settings by several models; using the first", info.content)
                continue
            added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:
        base_tok.save_pretrained(tmp, legacy_format=False)
        out = transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=trust_remote_code)
    base_vocab = base_tok.get_vocab()
    for t in merged_vocab:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_vocabulary(
    config: MergeConfig, sources: dict[ModelRef, CheckpointSource], label: str,
    tokenizer_files: Callable[[ModelRef], dict[str, bytes]], *, trust_remote_code: bool = False,
) -> Optional[Vocabulary]:
    """The merged vocabulary of `config` (None when it chooses no tokenizer). `sources` holds the
    referenced models; `tokenizer_files(ref)` gives a model's tokenizer files (and config.json,
    and with `trust_remote_code` the code of a tokenizer whose auto_map names one)."""
    choice = config.tokenizer_choice()
    if choice is None:
        return None
    models = config.referenced_models()
    base = config.base_model if config.base_model is not None else models[0]
    settings = config.tokenizer
    tokens = dict(settings.tokens or {}) if settings is not None else {}
    pad = settings.pad_to_multiple_of if settings is not None else None

    sizes = {m: _vocab_size(sources[m]) for m in models}
    base_tok = load_tokenizer(tokenizer_files(base), str(base), trust_remote_code=trust_remote_code)
    if base_tok is None:
        raise VocabularyError(f"{label}: the base model {base} has no tokenizer files (needed for the tokenizer choice)")
    base_tok = _strip(base_tok, sizes[base], str(base))
    toks: dict[ModelRef, Any] = {base: base_tok}
    for m in models:
        if m == base:
            continue
        try:
            tok = load_tokenizer(tokenizer_files(m), str(m), trust_remote_code=trust_remote_code)
        except Exception as err:  # noqa: BLE001 - mergekit too: assume the base's tokenizer
            log.warning("%s: cannot load the tokenizer of %s (%s); assuming it is the base's", label, m, err)
            tok = None
        if tok is None:
            log.warning("%s: model %s has no tokenizer; assuming it is the base's", label, m)
            continue
        toks[m] = tok

    if isinstance(choice, ModelRef):
        out = load_tokenizer(tokenizer_files(choice), str(choice), trust_remote_code=trust_remote_code)
        if out is None:
            raise VocabularyError(f"{label}: tokenizer_source {choice} has no tokenizer files")
    elif choice == "base":
        out = base_tok  # the same object: tokens added below are then the base's too (as in mergekit)
    else:
        out = _union(base_tok, toks, sizes, trust_remote_code)
    existing = set(out.get_vocab())
    for tok in tokens:
        if tok not in existing:
            out.add_tokens(tok)
            existing.add(tok)
    vocab = out.get_vocab()
    n = len(vocab)
    if n == 0 or max(vocab.values()) != n - 1:
        raise VocabularyError(f"{label}: the output tokenizer's token ids are not 0..{n - 1} (max {max(vocab.values(), default=-1)})")
    rows = n
    if pad and rows % pad:
        rows += pad - rows % pad

    index: dict[ModelRef, torch.Tensor] = {}
    for m in models:
        model_vocab = toks.get(m, base_tok).get_vocab()
        size = sizes[m] if sizes[m] is not None else len(model_vocab)
        ids = [ABSENT] * n
        for tok, new in vocab.items():
            orig = model_vocab.get(tok)
            if orig is not None:
                ids[new] = orig if orig < size else PAST_VOCAB
        index[m] = torch.tensor(ids, dtype=torch.int64)
    original = {m: tok.get_vocab() for m, tok in toks.items()}
    return Vocabulary(tokenizer=out, vocab=vocab, rows=rows, index=index, original=original, tokens=tokens)


# -- workers: gathering rows -------------------------------------------------------------------


def _read_rows(source: CheckpointSource, name: str, wanted: torch.Tensor, row_bytes: int) -> torch.Tensor:
    """Rows `wanted` (sorted, unique) of tensor `name`: contiguous runs read with `rows=`, runs
    closer than _COALESCE_BYTES read as one."""
    gap = max(1, _COALESCE_BYTES // max(1, row_bytes))
    breaks = ((wanted[1:] - wanted[:-1]) > gap).nonzero().flatten() + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), len(wanted)]
    parts = []
    for s, e in zip(starts, ends):
        lo, hi = int(wanted[s]), int(wanted[e - 1]) + 1
        block = source.read(name, rows=(lo, hi))
        parts.append(block if hi - lo == e - s else block.index_select(0, wanted[s:e] - lo))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Rows:
    """Reads and caches the rows of each input a range needs, cast to the working dtype."""

    def __init__(self, op: Any, sources: Sequence[CheckpointSource], work: torch.dtype):
        self.op, self.sources, self.work = op, sources, work
        self.vm: VocabularyMap = op.vocab

    def read(self, k: int, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted unique rows, their values) of input k."""
        uniq = torch.unique(wanted)
        if len(uniq) == 0:
            return uniq, torch.empty(0)
        inp = self.op.inputs[k]
        row_bytes = inp.nbytes // max(1, self.vm.in_rows[k])
        values = _read_rows(self.sources[inp.model], inp.name, uniq, row_bytes)
        if not values.is_floating_point():
            raise VocabularyError(f"tensor {self.op.name!r}: a vocabulary tensor must be floating point")
        return uniq, values.to(self.work)


def _defaults(reader: _Rows, lo: int, hi: int, row_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, rows) of the default rows of tokens in [lo, hi) that some input lacks."""
    vm = reader.vm
    sel = (vm.default_ids >= lo) & (vm.default_ids < hi)
    ids, kinds, src = vm.default_ids[sel], vm.default_kind[sel], vm.default_src[sel]
    out = torch.zeros((len(ids), *row_shape), dtype=reader.work)
    if len(ids) == 0:
        return ids, out
    copy, mean = kinds == COPY, kinds == MEAN
    for k in range(src.shape[1]):
        col = src[:, k]
        use = col >= 0
        if not bool(use.any()):
            continue
        uniq, values = reader.read(k, col[use])
        rows = values[torch.searchsorted(uniq, col[use])]
        c = use & copy
        out[c] = rows[c[use]]
        mm = use & mean
        out[mm] = out[mm] + rows[mm[use]]  # in input order, as a running sum from zero
    counts = (src >= 0).sum(dim=1)
    for c in torch.unique(counts[mean]).tolist():
        sel_c = mean & (counts == c)
        out[sel_c] = out[sel_c] / c
    return ids, out


def _permuted(reader: _Rows, k: int, lo: int, hi: int, row_shape: tuple[int, ...],
              defaults: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Input k's rows for output tokens [lo, hi): its own row, else the token's default row."""
    vm = reader.vm
    out = torch.zeros((hi - lo, *row_shape), dtype=reader.work)
    own = vm.own[k][lo:hi]
    has = own >= 0
    if bool(has.any()):
        uniq, values = reader.read(k, own[has])
        out[has] = values[torch.searchsorted(uniq, own[has])]
    ids, rows = defaults
    if len(ids):
        sel = (ids >= lo) & (ids < hi)
        local = ids[sel] - lo
        lacks = ~has[local]
        out[local[lacks]] = rows[sel][lacks]
    return out


def gather_inputs(op: Any, sources: Sequence[CheckpointSource], work: torch.dtype,
                  rows: Optional[tuple[int, int]] = None) -> list[torch.Tensor]:
    """Each input's rows [a, b) of operator `op` (whose `vocab` is set), in the output's token
    order, in dtype `work`, on the CPU."""
    vm: VocabularyMap = op.vocab
    a, b = rows if rows is not None else (0, vm.rows)
    row_shape = tuple(op.shape[1:])
    reader = _Rows(op, sources, work)
    t_hi = min(b, vm.tokens)
    n_in = len(op.inputs)
    if b <= vm.tokens:
        defaults = _defaults(reader, a, t_hi, row_shape)
        return [_permuted(reader, k, a, t_hi, row_shape, defaults) for k in range(n_in)]
    # padding rows: per input, the mean of all its gathered rows (one input's rows at a time)
    defaults = _defaults(reader, 0, vm.tokens, row_shape)
    out = []
    n_pad = b - max(a, vm.tokens)
    for k in range(n_in):
        full = _permuted(reader, k, 0, vm.tokens, row_shape, defaults)
        mean = torch.mean(full, dim=0)
        part = full[a:t_hi].clone() if a < t_hi else full[:0]
        del full
        out.append(torch.cat([part, mean.expand(n_pad, *row_shape)]))
    return out
