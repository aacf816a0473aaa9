"""Tiny demo checkpoints: the models `raymerge demo`, the tests and the benchmarks build for themselves.

Nothing can be downloaded from a model hub in CI, so every model used here is made with a
`transformers` config and `save_pretrained`, exactly the layout a real hub checkpoint has
(`config.json`, safetensors shards, tokenizer files). Fine-tunes are the base plus seeded,
structured perturbations, so task vectors are non-trivial (some coordinates agree in sign across
fine-tunes, some conflict), which is what TIES/DARE-style methods act on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

DEMO_WORDS = (
    "the a merge model layer weight sparse dense tensor ray cluster node worker shard token "
    "attention mlp norm embed head rank vector task base tune prune slice plan graph bit"
).split()


def tiny_config(arch: str = "llama", **overrides: Any):
    """A transformers config for a tiny decoder (hidden 64, 4 layers) of architecture `arch`."""
    from transformers import AutoConfig

    base: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(DEMO_WORDS) + 8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return AutoConfig.for_model(arch, **base)


def save_tiny_tokenizer(path: str | Path) -> None:
    """Save a small word-level fast tokenizer whose vocabulary is `DEMO_WORDS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + DEMO_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(path))


def build_tiny_model(
    path: str | Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    base: str | Path | None = None,
    delta_scale: float = 0.02,
    max_shard_size: str | int | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Build and save a tiny causal LM at `path`.

    With `base`, the model is a "fine-tune": the base's weights plus a seeded perturbation of
    relative size `delta_scale` (half of it shared across all fine-tunes built from the same
    base, so their task vectors partly agree). `max_shard_size` forces sharded safetensors.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = Path(path)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        shared = torch.Generator().manual_seed(12345)
        own = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                scale = delta_scale * (p.abs().mean().item() + 1e-3)
                common = torch.randn(p.shape, generator=shared) * scale
                private = torch.randn(p.shape, generator=own) * scale
                p.add_(0.5 * common + private)
    else:
        torch.manual_seed(seed)
        config = tiny_config(arch, **(config_overrides or {}))
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(dtype)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(path), **kwargs)
    save_tiny_tokenizer(path)
    return path


def build_demo_models(root: str | Path, *, arch: str = "llama", n_finetunes: int = 3) -> dict[str, Path]:
    """Build a base model and `n_finetunes` fine-tunes under `root`; return their paths by name."""
    root = Path(root)
    paths = {"base": build_tiny_model(root / "base", arch=arch, seed=0)}
    for i in range(n_finetunes):
        name = f"ft{i + 1}"
        paths[name] = build_tiny_model(root / name, arch=arch, seed=100 + i, base=paths["base"])
    return paths


def demo_config(paths: dict[str, Path], method: str = "ties") -> dict[str, Any]:
    """A mergekit-format TIES config over the demo models (a per-layer gradient included)."""
    fts = [k for k in paths if k != "base"]
    return {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [
            {
                "model": str(paths[name]),
                "parameters": {"weight": 1.0, "density": [0.7, 0.5] if i == 0 else 0.5},
            }
            for i, name in enumerate(fts)
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }


def demo_prune_config(paths: dict[str, Path], calibration: str | Path) -> dict[str, Any]:
    """A small Wanda prune of the demo base model (seconds on a CPU)."""
    return {
        "model": str(paths["base"]),
        "method": "wanda",
        "sparsity": 0.5,
        "calibration": {"dataset": str(calibration), "nsamples": 8, "seqlen": 32, "eval_samples": 4},
    }


def demo_search_config(paths: dict[str, Path], heldout: str | Path, n_trials: int = 4) -> dict[str, Any]:
    """A small Optuna study over the weights of a linear merge of two demo fine-tunes."""
    fts = [k for k in paths if k != "base"][:2]
    return {
        "merge": {
            "merge_method": "linear",
            "models": [{"model": str(paths[name]), "parameters": {"weight": {"low": 0.2, "high": 1.0}}} for name in fts],
            "dtype": "float32",
        },
        "objective": "perplexity",
        "evaluation": {"dataset": str(heldout), "seqlen": 32, "eval_samples": 4},
        "study": {"n_trials": n_trials, "concurrency": 1, "sampler": "random", "seed": 0},
    }


def write_demo_workdir(workdir: str | Path, *, arch: str = "llama", method: str = "ties") -> dict[str, Path]:
    """Everything `raymerge demo --workdir DIR` leaves for the README's next commands: the models
    under DIR/models, DIR/calib.txt, and DIR/<method>.yaml, DIR/prune.yaml, DIR/search.yaml."""
    workdir = Path(workdir)
    paths = build_demo_models(workdir / "models", arch=arch)
    calib = workdir / "calib.txt"
    calib.write_text(demo_text(n_docs=12, words_per_doc=120))
    return {
        "merge": write_yaml(demo_config(paths, method), workdir / f"{method}.yaml"),
        "prune": write_yaml(demo_prune_config(paths, calib), workdir / "prune.yaml"),
        "search": write_yaml(demo_search_config(paths, calib), workdir / "search.yaml"),
    }


def write_yaml(config: dict[str, Any], path: str | Path) -> Path:
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def describe(paths: dict[str, Path]) -> str:
    return json.dumps({k: str(v) for k, v in paths.items()}, indent=2)


def demo_text(n_docs: int = 40, words_per_doc: int = 200, seed: int = 0, language: int = 1234) -> str:
    """Text with learnable structure for calibration and for training a tiny model: the next
    word is, 90% of the time, one of two successors of the previous *two* words (a second-order
    Markov chain, the same for every seed; the seed picks the documents). Learning ~1,300
    contexts takes most of a tiny model's capacity, so pruning damage shows in its perplexity.
    `language` picks another chain over the same words (a different "task" for merging
    benchmarks). Documents are separated by blank lines."""
    import random

    table = random.Random(language)
    successors = {(a, b): table.sample(DEMO_WORDS, 2) for a in DEMO_WORDS for b in DEMO_WORDS}
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        out = [rng.choice(DEMO_WORDS), rng.choice(DEMO_WORDS)]
        while len(out) < words_per_doc:
            context = (out[-2], out[-1])
            out.append(rng.choice(successors[context]) if rng.random() < 0.9 else rng.choice(DEMO_WORDS))
        docs.append(" ".join(out))
    return "\n\n".join(docs) + "\n"


def build_trained_model(
    path: str | Path, text: str, *, steps: int = 300, seqlen: int = 32, batch: int = 16, seed: int = 0,
    arch: str = "llama", config_overrides: dict[str, Any] | None = None, outlier_features: bool = False,
    start_from: str | Path | None = None, lr: float = 3e-3,
) -> Path:
    """Train a tiny model on `text` (next-token loss, AdamW) and save it with its tokenizer:
    a model whose perplexity means something, for pruning tests and benchmarks. With
    `outlier_features`, see `add_outlier_features`. With `start_from` (a saved model folder),
    training continues from it: a fine-tune, for merging benchmarks."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    save_tiny_tokenizer(path)
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    ids = torch.tensor(tok(text.replace("\n\n", " </s> "))["input_ids"])
    torch.manual_seed(seed)
    if start_from is not None:
        model = AutoModelForCausalLM.from_pretrained(str(start_from), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(arch, **(config_overrides or {})))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seqlen - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if outlier_features:
        add_outlier_features(model, seed=seed)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def add_outlier_features(model, *, count: int = 6, scale: float = 30.0, seed: int = 0) -> None:
    """Give a llama-style model a few large-activation input features, as LLMs have, without
    changing what it computes: per decoder layer, some features of each norm's output are scaled
    up by `scale` (the norm weight) and the matching input columns of the projections that read
    them are scaled down by the same factor; likewise some intermediate MLP features (up_proj rows
    and down_proj columns). The outputs are unchanged up to rounding, but those inputs now have
    large activations and small weights: what tells activation-aware pruning (Wanda, SparseGPT)
    from magnitude pruning."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            pairs = [
                (layer.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj]),
                (layer.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj]),
            ]
            for norm_weight, readers in pairs:
                idx = torch.randperm(norm_weight.shape[0], generator=gen)[:count]
                norm_weight[idx] *= scale
                for lin in readers:
                    lin.weight[:, idx] /= scale
            idx = torch.randperm(mlp.up_proj.weight.shape[0], generator=gen)[:count]
            mlp.up_proj.weight[idx, :] *= scale
            mlp.down_proj.weight[:, idx] /= scale
