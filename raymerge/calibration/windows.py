"""Cutting calibration text into fixed-length token windows, and the end-to-end `load_calibration`.

The documents are tokenized without special tokens, joined with the tokenizer's eos token (when
it has one) into a single stream, and cut into:

- `heldout`: the last `eval_samples * seqlen` tokens of the stream as consecutive,
  non-overlapping windows (for perplexity; never seen by calibration);
- `calibration`: `nsamples` windows at seeded random offsets in the rest of the stream
  (distinct offsets while there are enough; overlapping windows are allowed, with a warning).

Everything is deterministic for a given seed (`torch.Generator().manual_seed(seed)`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from raymerge.calibration.text import CalibrationError, load_texts

if TYPE_CHECKING:
    from raymerge.config.calibration import CalibrationConfig

DEFAULT_SEQLEN = 2048
_TOKENIZE_BATCH = 256

FeatureFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps candidate windows LongTensor[c, seqlen] to activation features Tensor[c, d]."""


class CalibrationWarning(UserWarning):
    """The calibration text is thin: windows overlap or repeat."""


@dataclass(frozen=True)
class CalibrationWindows:
    """Token windows for calibration and held-out evaluation.

    `calibration`: LongTensor[nsamples, seqlen]; `heldout`: LongTensor[eval_samples, seqlen];
    `offsets`: LongTensor[nsamples], the start of each calibration window in the token stream;
    `stream_tokens`: the length of that stream.
    """

    calibration: torch.Tensor
    heldout: torch.Tensor
    offsets: torch.Tensor
    stream_tokens: int

    @property
    def nsamples(self) -> int:
        return int(self.calibration.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.calibration.shape[1])

    def select(self, indices: torch.Tensor) -> "CalibrationWindows":
        """The same windows restricted to calibration rows `indices` (held-out unchanged)."""
        return CalibrationWindows(self.calibration[indices], self.heldout, self.offsets[indices], self.stream_tokens)


def resolve_seqlen(config_seqlen: Optional[int], max_positions: Optional[int]) -> int:
    """`config_seqlen`, or min(2048, max_positions) when None; check it fits the model."""
    if config_seqlen is None:
        return DEFAULT_SEQLEN if max_positions is None else min(DEFAULT_SEQLEN, int(max_positions))
    _check_seqlen(config_seqlen, max_positions)
    return int(config_seqlen)


def _check_seqlen(seqlen: int, max_positions: Optional[int]) -> None:
    if seqlen <= 0:
        raise CalibrationError(f"calibration.seqlen must be positive, got {seqlen}")
    if max_positions is not None and seqlen > max_positions:
        raise CalibrationError(
            f"calibration.seqlen={seqlen} is longer than the model's max_position_embeddings={max_positions}; "
            f"set calibration.seqlen to at most {max_positions}"
        )


def token_stream(texts: Sequence[str], tokenizer: Any) -> torch.Tensor:
    """Tokenize `texts` (no special tokens) and join them with the eos token id, if any."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = list(texts[start : start + _TOKENIZE_BATCH])
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for doc in encoded:
            if not doc:
                continue
            if ids and eos is not None:
                ids.append(int(eos))
            ids.extend(doc)
    return torch.tensor(ids, dtype=torch.long)


def token_windows(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    eval_samples: int = 0,
    max_positions: Optional[int] = None,
) -> CalibrationWindows:
    """Cut `texts` into `nsamples` calibration windows and `eval_samples` held-out windows."""
    _check_seqlen(seqlen, max_positions)
    return windows_from_stream(token_stream(texts, tokenizer), nsamples=nsamples, seqlen=seqlen, seed=seed, eval_samples=eval_samples)


def windows_from_stream(
    stream: torch.Tensor, *, nsamples: int, seqlen: int, seed: int, eval_samples: int = 0
) -> CalibrationWindows:
    """The windowing of `token_windows`, on an already tokenized 1-D stream."""
    if nsamples <= 0:
        raise CalibrationError(f"calibration.nsamples must be positive, got {nsamples}")
    if eval_samples < 0:
        raise CalibrationError(f"calibration.eval_samples must be >= 0, got {eval_samples}")
    _check_seqlen(seqlen, None)
    total = int(stream.numel())
    held = eval_samples * seqlen
    needed = held + seqlen
    if total < needed:
        raise CalibrationError(
            f"calibration text has {total} tokens, needs at least {needed} "
            f"(eval_samples={eval_samples} held-out windows of seqlen={seqlen}, plus one calibration "
            "window); add more text or lower calibration.seqlen / calibration.eval_samples"
        )
    rest = total - held
    heldout = stream[rest:].reshape(eval_samples, seqlen).clone()
    offsets = _window_offsets(rest - seqlen + 1, nsamples, seed)
    _warn_if_thin(rest, nsamples, seqlen)
    calibration = stream[offsets.unsqueeze(1) + torch.arange(seqlen)]
    return CalibrationWindows(calibration, heldout, offsets, total)


def _window_offsets(starts: int, nsamples: int, seed: int) -> torch.Tensor:
    """`nsamples` seeded offsets in [0, starts): distinct while starts >= nsamples, else cycling."""
    gen = torch.Generator().manual_seed(seed)
    if starts < nsamples:
        perm = torch.randperm(starts, generator=gen)
        return perm.repeat((nsamples + starts - 1) // starts)[:nsamples]
    chosen: dict[int, None] = {}
    while len(chosen) < nsamples:
        for value in torch.randint(0, starts, (2 * nsamples,), generator=gen).tolist():
            chosen.setdefault(value, None)
            if len(chosen) == nsamples:
                break
    return torch.tensor(list(chosen), dtype=torch.long)


def _warn_if_thin(rest: int, nsamples: int, seqlen: int) -> None:
    covered = nsamples * seqlen
    if rest >= covered:
        return
    starts = rest - seqlen + 1
    detail = (
        f"only {starts} distinct windows exist, so some windows repeat"
        if starts < nsamples
        else "so the windows overlap"
    )
    warnings.warn(
        f"calibration text has {rest} tokens outside the held-out part, less than "
        f"nsamples={nsamples} x seqlen={seqlen} = {covered}; {detail}. Add more text or lower "
        "calibration.nsamples / calibration.seqlen",
        CalibrationWarning,
        stacklevel=3,
    )


def load_calibration(
    config: "CalibrationConfig",
    tokenizer: Any,
    max_positions: Optional[int],
    *,
    features: Optional[FeatureFn] = None,
) -> CalibrationWindows:
    """Read `config.dataset`, tokenize it and cut the windows; curate them when `config.curate` is set.

    With `curate`, `curate.candidates` windows are drawn and `features(candidates)` (the
    caller runs the model: LongTensor[c, seqlen] -> Tensor[c, d]) decides which `nsamples`
    are kept; `features` is then required.
    """
    from raymerge.calibration.curation import curate

    if config.curate is not None and features is None:
        raise CalibrationError(
            "calibration.curate is set but no activation feature function was given; "
            "curation needs the model's activations of the candidate windows"
        )
    seqlen = resolve_seqlen(config.seqlen, max_positions)
    texts = load_texts(config)
    if config.curate is None:
        return token_windows(
            texts, tokenizer, nsamples=config.nsamples, seqlen=seqlen, seed=config.seed,
            eval_samples=config.eval_samples, max_positions=max_positions,
        )
    pool = token_windows(
        texts, tokenizer, nsamples=config.curate.candidates, seqlen=seqlen, seed=config.seed,
        eval_samples=config.eval_samples, max_positions=max_positions,
    )
    assert features is not None
    feats = features(pool.calibration)
    chosen = curate(
        pool.calibration, feats, nsamples=config.nsamples,
        clusters=config.curate.resolved_clusters(config.nsamples), seed=config.seed,
    )
    return pool.select(chosen)
