"""Vocabulary merging (`tokenizer_source`, the `tokenizer:` block) against mergekit 0.1.5.

Tiny llama models with real (word-level, fast) tokenizers whose vocabularies differ:
- `base` and a fine-tune `ft1` share the demo tokenizer (`raymerge.demo.save_tiny_tokenizer`;
  its config's vocab_size has 4 padding rows past the tokenizer);
- `reordered`: `base` with a tokenizer listing the same tokens in another order and its
  embedding and head rows permuted to match (the same model, other token ids);
- `ext_a`, `ext_b`: fine-tunes extended with different added tokens (some shared), their
  embeddings resized (`tokenizer.add_tokens` + `model.resize_token_embeddings`);
- `avg_a`, `avg_b`: fine-tunes both adding the same two tokens (which the union averages).

Each case runs through mergekit-yaml and raymerge; the tensors must match (float32: bit for bit
in practice, within 1e-5) and so must every tokenizer file mergekit writes (byte for byte) and
config.json's vocab_size. Union cases list at most one model besides the base with new tokens, or
models adding the same tokens, because mergekit's union order otherwise follows Python's set
order (see `raymerge.runtime.vocabulary`).

Also: row-split computation equals the whole tensor and reads fewer bytes, and (regression) a
merge whose tokenizer comes from a reordered-vocabulary copy gives, through transformers, the
same logits per token for the same text as the model its rows came from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import raymerge
from mergekit_oracle import (
    assert_tensors_close,
    load_tensors,
    mergekit_python,
    mergekit_unavailable_reason,
    run_mergekit_many,
)

SKIP_FILES = {"README.md", "mergekit_config.yml", "config.json", "model.safetensors.index.json"}


def _extend(src: Path, dst: Path, tokens: list[str], seed: int) -> Path:
    """`src` with `tokens` added to its tokenizer and its embeddings resized to match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens(tokens)
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():  # make the new rows distinct per model
        g = torch.Generator().manual_seed(seed)
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb.weight[-len(tokens):] += 0.1 * torch.randn(emb.weight[-len(tokens):].shape, generator=g)
    model.save_pretrained(str(dst), safe_serialization=True)
    tok.save_pretrained(str(dst))
    return dst


def _reordered(src: Path, dst: Path, seed: int = 7) -> Path:
    """`src` with its tokenizer's ids shuffled and its embedding/head rows permuted to match."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    old = AutoTokenizer.from_pretrained(str(src)).get_vocab()
    n = len(old)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    new_vocab = {tok: perm[i] for tok, i in old.items()}
    tok = Tokenizer(models.WordLevel(vocab=new_vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            w = emb.weight.clone()
            for t, i in old.items():
                emb.weight[new_vocab[t]] = w[i]
    model.save_pretrained(str(dst), safe_serialization=True)
    fast.save_pretrained(str(dst))
    return dst


def _bpe_model(dst: Path, seed: int, base: Path | None = None) -> Path:
    """A tiny llama with a BPE tokenizer whose last two tokens (`x` and `y`, the parts of merge
    `x y`) and one added token lie past the config's vocab_size: mergekit strips them, and the
    merge, from the base tokenizer. (It fails when a stripped token is a merge's result.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from raymerge.demo import build_tiny_model

    chars = sorted(set("".join(["merge", "model", "layer", "token", "tensor"])))
    merges = [("m", "e"), ("e", "r"), ("t", "o"), ("l", "a"), ("me", "r"), ("to", "k"), ("x", "y")]
    tokens = ["<unk>", "<s>", "</s>"] + chars + ["".join(m) for m in merges] + ["x", "y"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_tokens(["<extra>"])
    size = len(vocab) - 2  # "x" and "y" (and the added "<extra>") are past vocab_size
    path = build_tiny_model(dst, seed=seed, base=base, config_overrides={"vocab_size": size})
    for f in path.glob("tokenizer*"):
        f.unlink()
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> dict[str, Path]:
    from raymerge.demo import build_tiny_model

    root = tmp_path_factory.mktemp("vocab-models")
    p = {"base": build_tiny_model(root / "base", seed=0)}
    for i, name in enumerate(("ft1", "ft2", "ft3")):
        p[name] = build_tiny_model(root / name, seed=100 + i, base=p["base"])
    p["reordered"] = _reordered(p["base"], root / "reordered")
    p["ext_a"] = _extend(p["ft1"], root / "ext_a", ["<a1>", "<a2>", "<a3>", "<s1>", "<s2>", "<a4>"], seed=1)
    p["ext_b"] = _extend(p["ft2"], root / "ext_b", ["<b1>", "<s1>", "<b2>", "<s2>", "<b3>"], seed=2)
    p["avg_a"] = _extend(p["ft1"], root / "avg_a", ["<s1>", "<s2>"], seed=3)
    p["avg_b"] = _extend(p["ft3"], root / "avg_b", ["<s1>", "<s2>"], seed=4)
    p["bpe_base"] = _bpe_model(root / "bpe_base", seed=5)
    p["bpe_ft"] = _bpe_model(root / "bpe_ft", seed=6, base=p["bpe_base"])
    return p


def _m(p, name: str, w: float) -> dict[str, Any]:
    return {"model": str(p[name]), "parameters": {"weight": w}}


CASES = {
    "tokenizer-source-base": lambda p: {
        "merge_method": "linear", "base_model": str(p["base"]),
        "models": [_m(p, "base", 0.5), _m(p, "ft1", 0.5)], "tokenizer_source": "base",
    },
    "tokenizer-source-reordered-model": lambda p: {
        "merge_method": "linear", "models": [_m(p, "base", 0.3), _m(p, "ft1", 0.7)],
        "tokenizer_source": str(p["reordered"]),
    },
    "tokenizer-source-reordered-task-arithmetic": lambda p: {
        "merge_method": "task_arithmetic", "base_model": str(p["base"]),
        "models": [_m(p, "ft1", 0.5), _m(p, "ft2", 0.8)], "tokenizer_source": str(p["reordered"]),
    },
    "union-extended": lambda p: {
        "merge_method": "linear", "base_model": str(p["ext_a"]),
        "models": [_m(p, "ext_a", 0.6), _m(p, "ext_b", 0.4)], "tokenizer_source": "union",
    },
    "union-averaged-new-tokens": lambda p: {
        "merge_method": "linear", "base_model": str(p["base"]),
        "models": [_m(p, "base", 0.2), _m(p, "avg_a", 0.5), _m(p, "avg_b", 0.3)], "tokenizer_source": "union",
    },
    "tokenizer-block": lambda p: {
        "merge_method": "linear", "base_model": str(p["ext_a"]),
        "models": [_m(p, "ext_a", 0.6), _m(p, "ext_b", 0.4)],
        "tokenizer": {
            "source": "union",
            "pad_to_multiple_of": 16,
            "tokens": {
                "<new1>": {"source": {"kind": "model_token", "model": str(p["ext_a"]), "token": "<a1>"}},
                "<new2>": {"source": {"kind": "zero"}},
                "<s1>": {"source": str(p["ext_b"]), "force": True},
                "<new3>": {"source": {"kind": "model_token", "model": str(p["ext_b"]), "token_id": 5}},
                "<b1>": {"source": str(p["ext_b"])},
            },
        },
    },
    # bfloat16 compute: the averaged new tokens and the padding mean are taken in bfloat16
    "tokenizer-block-bf16": lambda p: {**CASES["tokenizer-block"](p), "dtype": "bfloat16"},
    "union-averaged-new-tokens-bf16": lambda p: {**CASES["union-averaged-new-tokens"](p), "dtype": "bfloat16",
                                                 "tokenizer_source": None, "tokenizer": {"pad_to_multiple_of": 8}},
    # a BPE base tokenizer with tokens past its vocab_size: stripped (vocabulary and merges)
    "bpe-base-stripped": lambda p: {
        "merge_method": "linear", "base_model": str(p["bpe_base"]),
        "models": [_m(p, "bpe_base", 0.5), _m(p, "bpe_ft", 0.5)], "tokenizer_source": "base",
    },
    "bpe-union-stripped": lambda p: {
        "merge_method": "linear", "base_model": str(p["bpe_base"]),
        "models": [_m(p, "bpe_base", 0.5), _m(p, "bpe_ft", 0.5)], "tokenizer_source": "union",
    },
    "tokenizer-block-base-padded": lambda p: {
        "merge_method": "linear", "base_model": str(p["base"]),
        "models": [_m(p, "base", 0.5), _m(p, "ext_b", 0.5)],
        "tokenizer": {"source": "base", "pad_to_multiple_of": 32},
    },
}


@pytest.fixture(scope="module")
def mergekit_outputs(vocab_models, tmp_path_factory) -> dict[str, Any]:
    if mergekit_python() is None:
        pytest.skip(f"mergekit 0.1.5 unavailable: {mergekit_unavailable_reason()}")
    root = tmp_path_factory.mktemp("mergekit-vocab-out")
    jobs = [(build(vocab_models), root / case_id) for case_id, build in CASES.items()]
    errors = run_mergekit_many(jobs)
    return {case_id: errors[root / case_id] or (root / case_id) for case_id in CASES}


def _side_files(folder: Path) -> dict[str, bytes]:
    """Every file but the weights, config.json and the model card, by name. In tokenizer_config.json
    `local_files_only` is set to false: transformers records there whether the tokenizer was
    loaded offline, and the oracle runs mergekit with HF_HUB_OFFLINE=1."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(".safetensors"):
            data = f.read_bytes()
            if f.name == "tokenizer_config.json":
                data = data.replace(b'"local_files_only": true', b'"local_files_only": false')
            out[f.name] = data
    return out


@pytest.mark.mergekit
@pytest.mark.parametrize("case_id", list(CASES))
def test_vocabulary_matches_mergekit(case_id: str, vocab_models, mergekit_outputs, tmp_path):
    expected_dir = mergekit_outputs[case_id]
    if not isinstance(expected_dir, Path):
        pytest.fail(f"mergekit failed on {case_id}:\n{expected_dir}")
    result = raymerge.merge(CASES[case_id](vocab_models), tmp_path / "out", quiet=True, in_process=True)
    actual, expected = load_tensors(result.output), load_tensors(expected_dir)
    assert_tensors_close(actual, expected, rtol=1e-5, atol=1e-5)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # gathered rows: bit for bit
        assert torch.equal(actual[name], expected[name]), name
    ours, theirs = _side_files(result.output), _side_files(expected_dir)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name] == theirs[name], f"{name} differs from mergekit's:\n{ours[name][:2000]!r}\n{theirs[name][:2000]!r}"
    cfg_ours = json.loads((result.output / "config.json").read_text())
    cfg_theirs = json.loads((expected_dir / "config.json").read_text())
    assert cfg_ours["vocab_size"] == cfg_theirs["vocab_size"] == expected["model.embed_tokens.weight"].shape[0]


def test_row_parts_equal_whole_and_read_less(vocab_models):
    """A row-split vocabulary operator: the parts concatenate to the whole, and a part of a
    reordered vocabulary reads only the rows it needs (not the whole tensor)."""
    from raymerge.runtime.compile import compile_merge
    from raymerge.runtime.compute import compute_operator

    for case_id in ("tokenizer-block", "tokenizer-source-reordered-model", "union-averaged-new-tokens"):
        compiled = compile_merge(CASES[case_id](vocab_models))
        sources = [spec.open() for spec in compiled.specs]
        try:
            for op in compiled.operators:
                if op.vocab is None:
                    continue
                whole = compute_operator(op, sources)
                n = op.shape[0]
                cuts = [0, 3, 11, n - 5, n - 1, n]
                parts = [compute_operator(op, sources, rows=(a, b)) for a, b in zip(cuts, cuts[1:])]
                assert torch.equal(torch.cat(parts), whole), (case_id, op.name)
                if case_id == "tokenizer-source-reordered-model":
                    before = sum(s.bytes_read() for s in sources)
                    compute_operator(op, sources, rows=(0, 4))
                    read = sum(s.bytes_read() for s in sources) - before
                    assert read < sum(i.nbytes for i in op.inputs), (op.name, read)
        finally:
            for s in sources:
                s.close()


def test_reordered_tokenizer_source_keeps_the_model(vocab_models, tmp_path):
    """Regression: a merge taking its tokenizer from a reordered-vocabulary copy must move the
    embedding and head rows with the tokens, so the same text gives the same logits per token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = vocab_models
    cfg = {"merge_method": "linear", "models": [_m(p, "base", 1.0)], "tokenizer_source": str(p["reordered"])}
    result = raymerge.merge(cfg, tmp_path / "out", quiet=True, in_process=True)
    text = "the merge model layer weight token ray cluster head the base"
    outs = {}
    for name, folder in (("base", p["base"]), ("merged", result.output)):
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0]
        outs[name] = (tok.get_vocab(), ids[0].tolist(), logits)
    (v_base, ids_base, l_base), (v_out, ids_out, l_out) = outs["base"], outs["merged"]
    assert v_out != v_base and set(v_out) == set(v_base)
    inv_base = {i: t for t, i in v_base.items()}
    assert [v_out[inv_base[i]] for i in ids_base] == ids_out  # same tokens, other ids
    order_base = [v_base[t] for t in sorted(v_base)]
    order_out = [v_out[t] for t in sorted(v_base)]
    torch.testing.assert_close(l_out[:, order_out], l_base[:, order_base], rtol=1e-5, atol=1e-5)
    assert l_out.shape[1] == len(v_out)  # trimmed to the tokenizer, as mergekit


def test_tokenizer_only_folder_as_source(vocab_models, tmp_path):
    """`tokenizer_source` may name a folder holding only tokenizer files (mergekit loads it with
    AutoTokenizer too): the result equals naming the full reordered model."""
    tok_only = tmp_path / "tok"
    tok_only.mkdir()
    for f in vocab_models["reordered"].iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, tok_only / f.name)
    cfg = CASES["tokenizer-source-reordered-model"](vocab_models)
    a = raymerge.merge(cfg, tmp_path / "a", quiet=True, in_process=True)
    b = raymerge.merge({**cfg, "tokenizer_source": str(tok_only)}, tmp_path / "b", quiet=True, in_process=True)
    assert (a.output / "model.safetensors").read_bytes() == (b.output / "model.safetensors").read_bytes()
    assert _side_files(a.output) == _side_files(b.output)


def test_vocabulary_errors_name_the_token(vocab_models, tmp_path):
    from raymerge.config import ConfigError

    p = vocab_models
    cfg = CASES["union-extended"](p)
    no_source = {**cfg, "tokenizer_source": None, "tokenizer": {"tokens": {"<b1>": {"force": True}}}}
    with pytest.raises(ConfigError, match=r"tokenizer.tokens\['<b1>'\]: force: true replaces every model's row, so it needs a source"):
        raymerge.merge(no_source, tmp_path / "o1", quiet=True, in_process=True)
    other = {**cfg, "tokenizer_source": None,
             "tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": str(p["ft3"]), "token_id": 1}}}}}
    with pytest.raises(ConfigError, match=r"tokenizer.tokens\['<x>'\] takes its row from model .*ft3, which is not an input"):
        raymerge.merge(other, tmp_path / "o2", quiet=True, in_process=True)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_ray_workers_give_the_same_bytes(ray_session, vocab_models, tmp_path):
    """Workers on Ray (operators pickled with their vocabulary maps) write what one process writes."""
    cfg = CASES["tokenizer-block"](vocab_models)
    a = raymerge.merge(cfg, tmp_path / "a", quiet=True, in_process=True)
    b = raymerge.merge(cfg, tmp_path / "b", quiet=True, workers=2)
    assert load_tensors(a.output).keys() == load_tensors(b.output).keys()
    for name, t in load_tensors(a.output).items():
        assert torch.equal(t, load_tensors(b.output)[name]), name
    assert _side_files(a.output) == _side_files(b.output)


def test_model_trim_sees_the_gathered_rows(vocab_models, tmp_path):
    """TIES `trim_scope: model` (raymerge only) thresholds over the rows the merge sees: a
    reordered copy of the base tokenizer has the same tokens as `base`, so the two outputs are the
    same model, their embedding and head rows permuted."""
    from transformers import AutoTokenizer

    p = vocab_models
    cfg = {"merge_method": "ties", "base_model": str(p["base"]),
           "models": [_m(p, "ft1", 0.7), _m(p, "ft2", 0.4)],
           "parameters": {"trim_scope": "model", "density": 0.3}}
    a = raymerge.merge({**cfg, "tokenizer_source": "base"}, tmp_path / "a", quiet=True, in_process=True)
    b = raymerge.merge({**cfg, "tokenizer_source": str(p["reordered"])}, tmp_path / "b", quiet=True, in_process=True)
    ta, tb = load_tensors(a.output), load_tensors(b.output)
    va = AutoTokenizer.from_pretrained(str(p["base"])).get_vocab()
    vb = AutoTokenizer.from_pretrained(str(p["reordered"])).get_vocab()
    order_a, order_b = [va[t] for t in sorted(va)], [vb[t] for t in sorted(va)]
    for name in ta:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(ta[name][order_a], tb[name][order_b]), name
        else:
            assert torch.equal(ta[name], tb[name]), name
    # and the magnitudes counted are the gathered rows' (34 tokens), not the stored 38 rows
    from raymerge.runtime.compile import compile_merge
    from raymerge.runtime.global_trim import magnitude_bits

    compiled = compile_merge({**cfg, "tokenizer_source": str(p["reordered"])})
    sources = [spec.open() for spec in compiled.specs]
    try:
        op = next(o for o in compiled.operators if o.name == "model.embed_tokens.weight")
        k = next(i for i in range(len(op.inputs)) if i != op.base_index)
        assert magnitude_bits(op, k, dict(enumerate(sources))).numel() == op.shape[0] * op.shape[1] == len(vb) * 64
    finally:
        for s in sources:
            s.close()
