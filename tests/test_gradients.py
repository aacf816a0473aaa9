"""Per-layer gradient sensitivities (Sens-Merging) computed stage by stage match transformers.

Tiny models are built with random weights and saved with `save_pretrained`; the reference is the
transformers model itself: `model(ids, labels=ids).loss.backward()` per window, and per decoder
layer the mean over windows of sum |p * p.grad|. The stage-wise computation cuts the model into
blocks and back-propagates through them one at a time (recomputing each block's forward), as
pipeline stages in different processes would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymerge.checkpoints import SourceSpec
from raymerge.blocks.decoder import DecoderBlock
from raymerge.blocks.gradients import GradientStage

VOCAB = 48
SEQLEN = 12
SPLITS = {
    "one-block": [(0, 3)],
    "two-blocks": [(0, 1), (2, 3)],
    "three-blocks": [(0, 0), (1, 2), (3, 3)],
}


def _build(root: Path, arch: str, **overrides) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = root / (arch + "".join(f"-{k}" for k in overrides))
    if (path / "config.json").exists():
        return path
    torch.manual_seed(7)
    config = AutoConfig.for_model(
        arch,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        **{"tie_word_embeddings": False, **overrides},
    )
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    # Random init leaves norms at one and some biases at zero; perturb every parameter so each
    # contributes a gradient of its own.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def _windows(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, SEQLEN), generator=g) for _ in range(n)]


def _reference(path: Path, windows: list[torch.Tensor]) -> tuple[dict[int, float], list[float]]:
    """Sensitivities and losses straight from the transformers model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    layers = model.model.layers
    sums = {i: 0.0 for i in range(len(layers))}
    losses = []
    for ids in windows:
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        for i, layer in enumerate(layers):
            sums[i] += sum((p.detach().double() * p.grad.double()).abs().sum().item() for p in layer.parameters())
    return {i: s / len(windows) for i, s in sums.items()}, losses


def _stages(path: Path, split: list[tuple[int, int]]) -> tuple[list[GradientStage], object]:
    source = SourceSpec(str(path)).open()
    config = source.config()
    last = len(split) - 1
    stages = [
        GradientStage(DecoderBlock(config, source, a, b, embed=k == 0, head=k == last))
        for k, (a, b) in enumerate(split)
    ]
    return stages, source


def _run_window(stages: list[GradientStage], ids: torch.Tensor) -> float:
    """One window through the pipeline: forward through all but the last stage, then the loss
    and backward on the last, then backward through the others in reverse."""
    hidden = stages[0].embed(ids)
    for stage in stages[:-1]:
        hidden = stage.forward(hidden)
    grad, loss = stages[-1].loss_backward(hidden, ids)
    for stage in reversed(stages[:-1]):
        grad = stage.backward(grad)
    return loss


def _sensitivities(stages: list[GradientStage]) -> dict[int, float]:
    out: dict[int, float] = {}
    for stage in stages:
        out.update(stage.sensitivities())
    return out


def _assert_close(got: dict[int, float], want: dict[int, float], rtol: float = 1e-4) -> None:
    assert sorted(got) == sorted(want)
    for i in want:
        assert want[i] > 0
        assert got[i] == pytest.approx(want[i], rel=rtol), f"layer {i}: {got[i]} vs {want[i]}"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grad-models")
    return {
        "llama": _build(root, "llama"),
        "qwen2": _build(root, "qwen2"),
        "mistral": _build(root, "mistral"),
        "llama-tied": _build(root, "llama", tie_word_embeddings=True),
    }


@pytest.fixture(scope="module")
def references(models) -> dict[str, tuple[dict[int, float], list[float]]]:
    windows = _windows()
    return {name: _reference(path, windows) for name, path in models.items()}


@pytest.mark.parametrize("split", list(SPLITS), ids=list(SPLITS))
@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "llama-tied"])
def test_stagewise_sensitivities_match_transformers(models, references, name, split):
    want, want_losses = references[name]
    stages, source = _stages(models[name], SPLITS[split])
    try:
        losses = [_run_window(stages, ids) for ids in _windows()]
        _assert_close(_sensitivities(stages), want)
        assert losses == pytest.approx(want_losses, rel=1e-5)
        assert all(s.windows == 3 and s.pending == 0 for s in stages)
        # Parameters are left as they were: no gradients, not requiring them.
        for stage in stages:
            for p in stage.block.held_parameters().values():
                assert not p.requires_grad and p.grad is None
    finally:
        source.close()


def test_no_gradient_leaks_between_windows(models):
    """Two identical windows give the sensitivities of one; a window's result does not depend on
    the windows back-propagated before it."""
    ids = _windows(1, seed=5)[0]
    other = _windows(1, seed=6)[0]
    split = SPLITS["two-blocks"]

    once, src1 = _stages(models["llama"], split)
    twice, src2 = _stages(models["llama"], split)
    after_other, src3 = _stages(models["llama"], split)
    try:
        _run_window(once, ids)
        _run_window(twice, ids)
        _run_window(twice, ids)
        _run_window(after_other, other)
        for stage in after_other:
            stage.reset()
        _run_window(after_other, ids)
        want = _sensitivities(once)
        _assert_close(_sensitivities(twice), want, rtol=1e-12)
        _assert_close(_sensitivities(after_other), want, rtol=1e-12)
    finally:
        for src in (src1, src2, src3):
            src.close()


def test_pipelined_windows_in_flight(models, references):
    """Several windows may go forward before their backward passes (first in, first out), or be
    matched by key in any order; the sums are those of one window at a time."""
    want, _ = references["llama"]
    windows = _windows()
    split = SPLITS["three-blocks"]

    fifo, src1 = _stages(models["llama"], split)
    keyed, src2 = _stages(models["llama"], split)
    try:
        inputs = []
        for ids in windows:
            hidden = fifo[0].embed(ids)
            for stage in fifo[:-1]:
                hidden = stage.forward(hidden)
            inputs.append(hidden)
        assert fifo[0].pending == 3
        for hidden, ids in zip(inputs, windows):
            grad, _ = fifo[-1].loss_backward(hidden, ids)
            for stage in reversed(fifo[:-1]):
                grad = stage.backward(grad)
        _assert_close(_sensitivities(fifo), want)

        lasts = {}
        for k, ids in enumerate(windows):
            hidden = keyed[0].embed(ids)
            for stage in keyed[:-1]:
                hidden = stage.forward(hidden, key=k)
            lasts[k] = hidden
        for k in reversed(range(len(windows))):
            grad, _ = keyed[-1].loss_backward(lasts[k], windows[k])
            for stage in reversed(keyed[:-1]):
                grad = stage.backward(grad, key=k)
        _assert_close(_sensitivities(keyed), want)
    finally:
        src1.close()
        src2.close()


def test_no_grad_paths_unchanged(models):
    """The default forward and logits still run without autograd, and match the grad-enabled
    ones exactly."""
    stages, source = _stages(models["llama"], SPLITS["one-block"])
    block = stages[0].block
    try:
        ids = _windows(1)[0]
        hidden = block.embed(ids)
        plain = block.logits(block.forward(hidden))
        assert not plain.requires_grad
        x = hidden.clone().requires_grad_(True)
        tracked = block.logits(block.forward(x, grad=True), grad=True)
        assert tracked.requires_grad
        assert torch.equal(plain, tracked.detach())
    finally:
        source.close()


def test_misuse_is_reported(models):
    stages, source = _stages(models["llama"], SPLITS["two-blocks"])
    try:
        with pytest.raises(RuntimeError, match="no remembered input"):
            stages[0].backward(torch.zeros(1, SEQLEN, 64))
        with pytest.raises(RuntimeError, match="head=True"):
            stages[0].loss_backward(torch.zeros(1, SEQLEN, 64), _windows(1)[0])
        stages[0].forward(stages[0].embed(_windows(1)[0]), key="a")
        with pytest.raises(KeyError, match="already waiting"):
            stages[0].forward(stages[0].embed(_windows(1)[0]), key="a")
    finally:
        source.close()
