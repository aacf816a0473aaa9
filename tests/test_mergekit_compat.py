"""mergekit-yaml users' configs and command lines work with `raymerge merge` (issue 17).

Config leniency where mergekit 0.1.5 is lenient (numeric strings, `torch.` dtypes, mergekit's
dict form of a model reference, tied embeddings standing in for a missing head, named chat
templates), mergekit-yaml's flags on `raymerge merge`, and the model card. Every merge here runs
in process (no Ray). The two `mergekit`-marked tests compare with mergekit 0.1.5 itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import raymerge
from raymerge.cli import build_parser, main
from raymerge.config import ConfigError, parse_config
from raymerge.config.cluster import parse_size

from conftest import load_state


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _linear(models: dict, names=("ft1", "ft3"), weights=(0.3, 0.7), **extra) -> dict:
    return {"merge_method": "linear",
            "models": [{"model": str(models[n]), "parameters": {"weight": w}} for n, w in zip(names, weights)],
            **extra}


# -- config leniency -----------------------------------------------------------------------------


def test_numeric_strings_are_numbers():
    # YAML 1.1 reads 5e-1 and 1e3 (no dot) as strings; a quoted number is one too.
    data = yaml.safe_load("""
merge_method: ties
base_model: /m/base
parameters: {density: 5e-1, lambda: "1.0"}
models:
  - model: /m/a
    parameters:
      weight: [1e-1, "2E-1", .5]
  - model: /m/b
    parameters:
      weight: [{filter: mlp, value: 3e-1}, {value: "+1"}]
""")
    assert data["parameters"]["density"] == "5e-1"  # what PyYAML gives
    cfg = parse_config(data)
    assert cfg.parameters == {"density": 0.5, "lambda": 1.0}
    assert cfg.models[0].parameters["weight"] == [0.1, 0.2, 0.5]
    cond = cfg.models[1].parameters["weight"]
    assert (cond[0].filter, cond[0].value, cond[1].value) == ("mlp", 0.3, 1)
    assert "5e-1" not in cfg.to_yaml()  # the config as run says 0.5


def test_non_numbers_stay_strings_and_are_still_refused(llama_models):
    cfg = parse_config({"merge_method": "linear", "models": [
        {"model": str(llama_models["ft1"]), "parameters": {"weight": "inf"}},
        {"model": str(llama_models["ft2"]), "parameters": {"weight": "heavy"}}]})
    assert cfg.models[0].parameters["weight"] == "inf"
    from raymerge.runtime.compile import compile_merge

    with pytest.raises(ConfigError, match="finite number"):
        compile_merge(cfg)


def test_torch_prefixed_dtypes():
    cfg = parse_config({"merge_method": "linear", "dtype": "torch.bfloat16", "out_dtype": "torch.float16",
                        "models": [{"model": "/m/a", "parameters": {"weight": 1}}]})
    assert (cfg.dtype, cfg.out_dtype) == ("bfloat16", "float16")
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_config({"merge_method": "linear", "dtype": "torch.int8", "models": [{"model": "/m/a"}]})


def test_mergekit_dict_model_references():
    cfg = parse_config({"merge_method": "linear", "base_model": {"model": {"path": "org/base", "revision": "v1"}},
                        "models": [{"model": {"model": "org/a@main"}, "parameters": {"weight": 1}},
                                   {"model": {"model": {"path": "/m/b"}, "lora": None}, "parameters": {"weight": 1}},
                                   {"model": {"path": "/m/c", "revision": None}, "parameters": {"weight": 1}}]})
    assert [(m.path, m.revision) for m in cfg.referenced_models()] == [
        ("org/base", "v1"), ("org/a", "main"), ("/m/b", None), ("/m/c", None)]
    assert yaml.safe_load(cfg.to_yaml())["models"][0]["model"] == "org/a@main"
    lora = parse_config({"merge_method": "linear", "models": [
        {"model": {"model": "org/a@v1", "lora": {"path": "org/adapter", "revision": "r2"}}},
        {"model": "/m/b+/m/adapter-b"}]})
    refs = lora.referenced_models()
    assert [(r.path, r.revision, r.lora, r.lora_revision) for r in refs] == [
        ("org/a", "v1", "org/adapter", "r2"), ("/m/b", None, "/m/adapter-b", None)]
    assert [m["model"] for m in yaml.safe_load(lora.to_yaml())["models"]] == ["org/a@v1+org/adapter@r2", "/m/b+/m/adapter-b"]


@pytest.mark.parametrize("ref, message", [
    ({"model": "/m/a", "lora": "/m/x+/m/y"}, "expected a model path"),
    ({"model": "/m/a", "override_architecture": "MistralForCausalLM"}, "override_architecture is not supported"),
    ({"model": "/m/a", "revison": "x"}, "unknown key"),
    ({"model": {"path": "/m/a", "rev": "x"}}, "unknown key"),
])
def test_mergekit_dict_model_references_refused(ref, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1}}]})


def test_strictness_kept():
    base = {"merge_method": "linear"}
    with pytest.raises(ConfigError, match="listed twice"):  # the same model in both spellings
        parse_config({**base, "models": [{"model": "/m/a"}, {"model": {"model": {"path": "/m/a"}}}]})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({**base, "models": [{"model": "/m/a"}], "densty": 0.5})


# -- shard sizes -------------------------------------------------------------------------------------


def test_shard_size_units():
    assert parse_size("5B") == parse_size("5GB") == parse_size("5b") == 5 * 10**9  # mergekit's 5 billion
    assert parse_size("500M") == parse_size("500MB") == 500 * 10**6
    assert parse_size("1K") == parse_size("1kb") == 1000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5B") == 1_500_000_000
    assert parse_size("4096") == 4096


def _shards(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.safetensors"))


def test_cli_out_shard_size_mergekit_and_byte_units(llama_models, tmp_path):
    cfg = _write(_linear(llama_models), tmp_path / "cfg.yaml")
    outs = {}
    for size in ("5B", "5GB", "200K", "200KB"):
        outs[size] = tmp_path / f"out-{size}"
        assert main(["merge", str(cfg), str(outs[size]), "--in-process", "--quiet", "--out-shard-size", size]) == 0
    assert _shards(outs["5B"]) == _shards(outs["5GB"]) == ["model.safetensors"]
    assert len(_shards(outs["200K"])) > 1 and _shards(outs["200K"]) == _shards(outs["200KB"])
    for name in _shards(outs["200K"]):
        assert (outs["200K"] / name).read_bytes() == (outs["200KB"] / name).read_bytes()


def _weight_map(out: Path) -> dict[str, str]:
    """Tensor name -> shard file, from the index (a single unindexed shard holds every tensor)."""
    index = out / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


@pytest.mark.mergekit
def test_out_shard_size_gives_mergekits_shards(llama_models, tmp_path):
    """`--out-shard-size` in mergekit's count units gives mergekit-yaml's shard files (count and
    names) and an index of the same tensors, on the same model and config (issue 17: "5B gives
    mergekit's shard count"). Which file a tensor lands in is not compared: both fill shards in
    write order, and mergekit writes in its task order (the output head right after the
    embedding, ...), raymerge in its own, so at 100K/300K a boundary tensor sits one file apart."""
    from mergekit_oracle import mergekit_python, mergekit_unavailable_reason, run_mergekit_many

    if mergekit_python() is None:
        pytest.skip(f"mergekit 0.1.5 unavailable: {mergekit_unavailable_reason()}")
    config = _linear(llama_models, dtype="float32")
    cfg = _write(config, tmp_path / "cfg.yaml")
    sizes = ("5B", "100K", "300K")
    theirs = {size: tmp_path / f"mergekit-{size}" for size in sizes}
    errors = run_mergekit_many([(config, theirs[size], ("--out-shard-size", size)) for size in sizes])
    assert all(e is None for e in errors.values()), errors
    for size in sizes:
        ours = tmp_path / f"raymerge-{size}"
        assert main(["merge", str(cfg), str(ours), "--in-process", "--quiet", "--out-shard-size", size]) == 0
        assert _shards(ours) == _shards(theirs[size]), size
        ours_map, theirs_map = _weight_map(ours), _weight_map(theirs[size])
        assert set(ours_map) == set(theirs_map), size
        assert set(ours_map.values()) == set(theirs_map.values()) == set(_shards(ours)), size
    assert len(_shards(theirs["5B"])) == 1 and len(_shards(theirs["100K"])) > len(_shards(theirs["300K"])) > 1


# -- flags ---------------------------------------------------------------------------------------------


def test_cli_noop_flags_note_what_raymerge_does(llama_models, tmp_path, capsys):
    cfg = _write(_linear(llama_models), tmp_path / "cfg.yaml")
    argv = ["merge", str(cfg), str(tmp_path / "out"), "--in-process", "--quiet",
            "--cuda", "--lazy-unpickle", "--low-cpu-memory", "--trust-remote-code"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    for flag in ("--cuda", "--lazy-unpickle", "--low-cpu-memory"):
        lines = [line for line in err.splitlines() if line.startswith(f"raymerge: note: {flag} has no effect")]
        assert len(lines) == 1, err
    assert "--trust-remote-code has no effect" not in err  # it does something (tests/test_remote_code.py)
    assert main(["merge", str(cfg), str(tmp_path / "out2"), "--in-process", "--quiet", "--no-cuda"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_cli_help_explains_mergekit_flags(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--allow-crimes", "--out-shard-size", "--cuda", "--lazy-unpickle", "--low-cpu-memory",
                 "--copy-tokenizer", "--no-copy-tokenizer", "--write-model-card", "--no-write-model-card",
                 "--trust-remote-code"):
        assert flag in text
    assert "5 billion" in text and "accepted, no effect" in text


def test_cli_allow_crimes(llama_models, tmp_path, capsys):
    other = tmp_path / "renamed"
    shutil.copytree(llama_models["ft3"], other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    cfg = _write(_linear({"ft1": llama_models["ft1"], "ft3": other}), tmp_path / "cfg.yaml")
    assert main(["merge", str(cfg), str(tmp_path / "refused"), "--in-process", "--quiet"]) == 2
    assert "different architectures" in capsys.readouterr().err
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--in-process", "--quiet", "--allow-crimes"]) == 0
    assert build_parser().parse_args(["plan", str(cfg), "--allow-crimes"]).allow_mixed_architectures


def test_cli_copy_tokenizer_and_model_card_switches(llama_models, tmp_path):
    cfg = _write(_linear(llama_models), tmp_path / "cfg.yaml")
    assert main(["merge", str(cfg), str(tmp_path / "on"), "--in-process", "--quiet",
                 "--copy-tokenizer", "--write-model-card"]) == 0
    on = {p.name for p in (tmp_path / "on").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "README.md", "mergekit_config.yml"} <= on
    assert main(["merge", str(cfg), str(tmp_path / "off"), "--in-process", "--quiet",
                 "--no-copy-tokenizer", "--no-write-model-card"]) == 0
    off = {p.name for p in (tmp_path / "off").iterdir()}
    assert not off & {"tokenizer.json", "tokenizer_config.json", "README.md", "mergekit_config.yml"}
    assert {"config.json", "model.safetensors"} <= off
    assert load_state(tmp_path / "on").keys() == load_state(tmp_path / "off").keys()


# -- model card and processor files ---------------------------------------------------------------


def test_model_card_metadata_parses_back(llama_models, tmp_path):
    from huggingface_hub import ModelCard

    cfg = _linear(llama_models, name="tiny-merge")
    result = raymerge.merge(cfg, tmp_path / "out", quiet=True, in_process=True)
    card = ModelCard.load(result.output / "README.md")
    assert card.data.tags == ["merge", "raymerge"]
    assert card.data.library_name == "transformers"
    assert card.data.base_model is None  # local folders are not Hub ids: named in the text only
    assert "**linear**" in card.text and "# tiny-merge" in card.text
    for name in ("ft1", "ft3"):
        assert str(llama_models[name]) in card.text
    assert yaml.safe_load(card.text.split("```yaml")[1].split("```")[0])["merge_method"] == "linear"


def test_model_card_lists_every_hub_input(tmp_path):
    from huggingface_hub import ModelCard

    from raymerge.checkpoints.model_files import model_card

    text = model_card(method="ties", models=["org/base@v2", "org/ft-a", "/local/ft-b", "s3://bucket/ft-c", "org/ft-d"],
                      base="org/base@v2", config_yaml="merge_method: ties\n", version="dev")
    (tmp_path / "README.md").write_text(text)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == ["org/base", "org/ft-a", "org/ft-d"]
    assert card.data.tags == ["merge", "raymerge"]
    assert "/local/ft-b" in card.text and "s3://bucket/ft-c" in card.text and "**ties**" in card.text


def test_processor_files_are_kept(llama_models, tmp_path):
    donor = tmp_path / "vision-ish"
    shutil.copytree(llama_models["ft1"], donor)
    (donor / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor", "size": 224}))
    (donor / "processor_config.json").write_text(json.dumps({"processor_class": "LlavaProcessor"}))
    cfg = _linear({"ft1": donor, "ft3": llama_models["ft3"]})
    result = raymerge.merge(cfg, tmp_path / "out", quiet=True, in_process=True, copy_tokenizer=False)
    for name in ("preprocessor_config.json", "processor_config.json"):
        assert (result.output / name).read_bytes() == (donor / name).read_bytes()
    # and an --overwrite of such an output is allowed (it is a model folder raymerge wrote)
    raymerge.merge(cfg, result.output, quiet=True, in_process=True, overwrite=True)


# -- chat templates ----------------------------------------------------------------------------


def _render(folder: Path) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
                                   tokenize=False, add_generation_prompt=True)


def test_named_chat_templates(llama_models, tmp_path):
    from raymerge.checkpoints.chat_templates import NAMED_TEMPLATES

    expected = {
        "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
        "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "mistral": "<s> [INST] Be brief.\n\nHi [/INST] Hello</s> [INST] Bye [/INST]",
        "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n### Instruction:\nBye\n\n### Response:\n",
        "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n[|user|]Bye\n[|assistant|]",
    }
    assert set(expected) == set(NAMED_TEMPLATES)
    for name, text in expected.items():
        out = tmp_path / name
        raymerge.merge(_linear(llama_models, chat_template=name), out, quiet=True, in_process=True)
        assert (out / "chat_template.jinja").read_text() == NAMED_TEMPLATES[name]
        assert _render(out) == text, name


def test_chat_template_auto_and_unknown(llama_models, tmp_path):
    from raymerge.checkpoints.chat_templates import CHATML

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(llama_models["ft1"], a)
    shutil.copytree(llama_models["ft3"], b)
    tmpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (a / "chat_template.jinja").write_text(tmpl)
    tok_cfg = json.loads((b / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = tmpl  # the same template, the older way
    (b / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    out = tmp_path / "auto"
    # the donor (base b) has no chat_template.jinja: the one written is auto's choice (2 of 3 inputs)
    raymerge.merge(_linear({"ft1": llama_models["ft2"], "ft3": a}, chat_template="auto")
                   | {"base_model": str(b), "merge_method": "task_arithmetic"}, out, quiet=True, in_process=True)
    assert (out / "chat_template.jinja").read_text() == tmpl
    with pytest.raises(ConfigError, match="neither a Jinja template nor a known name.*chatml"):
        raymerge.merge(_linear(llama_models, chat_template="chatlm"), tmp_path / "bad", quiet=True, in_process=True)
    assert not (tmp_path / "bad").exists()
    assert "<|im_start|>" in CHATML


# -- tied embeddings -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory) -> dict[str, Path]:
    """Two tiny llamas of the same shape: one with tied embeddings (no lm_head.weight stored), one without."""
    from raymerge.demo import build_tiny_model

    root = tmp_path_factory.mktemp("tied")
    tied = build_tiny_model(root / "tied", seed=1, config_overrides={"tie_word_embeddings": True})
    untied = build_tiny_model(root / "untied", seed=2)
    assert "lm_head.weight" not in load_state(tied) and "lm_head.weight" in load_state(untied)
    return {"tied": tied, "untied": untied}


def _tied_config(tied_pair) -> dict:
    return {"merge_method": "linear", "dtype": "torch.float32", "models": [
        {"model": str(tied_pair["tied"]), "parameters": {"weight": "3e-1"}},
        {"model": str(tied_pair["untied"]), "parameters": {"weight": 0.7}}]}


def test_tied_embedding_stands_in_for_the_missing_head(tied_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    result = raymerge.merge(_tied_config(tied_pair), tmp_path / "out", quiet=True, in_process=True)
    out, tied, untied = load_state(result.output), load_state(tied_pair["tied"]), load_state(tied_pair["untied"])
    embed = "model.embed_tokens.weight"
    torch.testing.assert_close(out["lm_head.weight"], 0.3 * tied[embed] + 0.7 * untied["lm_head.weight"])
    torch.testing.assert_close(out[embed], 0.3 * tied[embed] + 0.7 * untied[embed])
    # the donor (the first model) ties its head; the output stores its own, so it must not be tied
    config = json.loads((result.output / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(str(result.output), dtype=torch.float32)
    torch.testing.assert_close(model.lm_head.weight.detach(), out["lm_head.weight"])


def test_all_tied_models_keep_no_head(tied_pair, tmp_path):
    from raymerge.runtime.compile import compile_merge

    cfg = {"merge_method": "linear", "models": [{"model": str(tied_pair["tied"]), "parameters": {"weight": 1}}]}
    program = compile_merge(cfg).program
    assert "lm_head.weight" not in {op.name for op in program.operators} and not program.tied_heads


def test_untied_model_without_head_is_still_an_error(tied_pair, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tied_pair["tied"], broken)
    config = json.loads((broken / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (broken / "config.json").write_text(json.dumps(config))
    cfg = _tied_config({"tied": broken, "untied": tied_pair["untied"]})
    from raymerge.runtime.operators import MergePlanError

    with pytest.raises(MergePlanError, match="lm_head.weight.*missing.*tie_word_embeddings: false"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True, in_process=True)


# -- against mergekit 0.1.5 -----------------------------------------------------------------------


@pytest.mark.mergekit
def test_tied_embedding_and_numeric_strings_match_mergekit(tied_pair, llama_models, tmp_path):
    from mergekit_oracle import assert_tensors_close, load_tensors, mergekit_python, mergekit_unavailable_reason, run_mergekit_many

    if mergekit_python() is None:
        pytest.skip(f"mergekit 0.1.5 unavailable: {mergekit_unavailable_reason()}")
    numeric = {"merge_method": "ties", "base_model": str(llama_models["base"]), "dtype": "float32",
               "parameters": {"density": "5e-1", "normalize": True},
               "models": [{"model": str(llama_models["ft1"]), "parameters": {"weight": "7e-1"}},
                          {"model": str(llama_models["ft3"]), "parameters": {"weight": ["1e-1", "9e-1"]}}]}
    cases = {"tied": _tied_config(tied_pair), "numeric": numeric}
    errors = run_mergekit_many([(cfg, tmp_path / f"mk-{name}") for name, cfg in cases.items()])
    for name, cfg in cases.items():
        assert errors[tmp_path / f"mk-{name}"] is None, errors[tmp_path / f"mk-{name}"]
        ours = raymerge.merge(cfg, tmp_path / f"rm-{name}", quiet=True, in_process=True).output
        assert_tensors_close(load_tensors(ours), load_tensors(tmp_path / f"mk-{name}"), rtol=1e-5, atol=1e-6)


# -- LoRA references (model+adapter) -------------------------------------------------------------

LORA_R, LORA_ALPHA, V_RANK = 4, 8, 2


@pytest.fixture(scope="module")
def adapter(llama_models, tmp_path_factory) -> Path:
    """A PEFT LoRA adapter for the tiny llama base, laid out as PEFT 0.21 saves one: q_proj (r=4)
    and v_proj (rank_pattern r=2) of every layer, the token embedding (lora_embedding_A/B, plus the
    base_layer copy PEFT saves), and lm_head in modules_to_save. B is nonzero (a trained adapter)."""
    from safetensors.torch import save_file

    base = load_state(llama_models["base"])
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for name, w in base.items():
        module = name.removesuffix(".weight")
        r = LORA_R if "q_proj" in name else V_RANK if "v_proj" in name else None
        if r is not None:
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, w.shape[1], generator=g) * 0.1
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(w.shape[0], r, generator=g) * 0.1
    emb = base["model.embed_tokens.weight"]
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] = emb + 0.01 * torch.randn(emb.shape, generator=g)
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(LORA_R, emb.shape[0], generator=g) * 0.1
    tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(emb.shape[1], LORA_R, generator=g) * 0.1
    tensors["base_model.model.lm_head.weight"] = base["lm_head.weight"] + 0.01 * torch.randn(base["lm_head.weight"].shape, generator=g)
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": LORA_R, "lora_alpha": LORA_ALPHA, "target_modules": ["q_proj", "v_proj", "embed_tokens"],
        "modules_to_save": ["lm_head"], "rank_pattern": {"v_proj": V_RANK}, "alpha_pattern": {}, "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None, "inference_mode": True,
    }))
    return folder


def _adapted(base: dict, adapter_dir: Path) -> dict:
    """The base model's tensors with the adapter merged, computed here by hand (PEFT's formula)."""
    from safetensors.torch import load_file

    ad = {k.removeprefix("base_model.model."): v for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}
    out = dict(base)
    out["lm_head.weight"] = ad["lm_head.weight"]
    out["model.embed_tokens.weight"] = ad["model.embed_tokens.base_layer.weight"] + (
        ad["model.embed_tokens.lora_embedding_B"] @ ad["model.embed_tokens.lora_embedding_A"]).T * (LORA_ALPHA / LORA_R)
    for name in base:
        module = name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in ad:
            scale = LORA_ALPHA / (LORA_R if "q_proj" in name else V_RANK)
            out[name] = base[name] + (ad[f"{module}.lora_B.weight"] @ ad[f"{module}.lora_A.weight"]) * scale
    return out


def test_lora_reference_is_applied_per_tensor(llama_models, adapter, tmp_path):
    base = load_state(llama_models["base"])
    expected = _adapted(base, adapter)
    ft1 = load_state(llama_models["ft1"])
    cfg = {"merge_method": "linear", "models": [
        {"model": f"{llama_models['base']}+{adapter}", "parameters": {"weight": 0.5}},
        {"model": str(llama_models["ft1"]), "parameters": {"weight": 0.5}}]}
    # small shards: the adapted tensors are read in row parts by the planner too
    result = raymerge.merge(cfg, tmp_path / "out", quiet=True, in_process=True, out_shard_size="100KB")
    out = load_state(result.output)
    assert out.keys() == base.keys()
    for name in base:
        torch.testing.assert_close(out[name], 0.5 * expected[name] + 0.5 * ft1[name], msg=name)
    assert f"{llama_models['base']}+{adapter}" in (result.output / "README.md").read_text()
    assert yaml.safe_load((result.output / "mergekit_config.yml").read_text())["models"][0]["model"] == f"{llama_models['base']}+{adapter}"


def test_lora_dict_form_and_merge_dtype(llama_models, adapter, tmp_path, capsys):
    expected = _adapted(load_state(llama_models["base"]), adapter)
    cfg = _write({"merge_method": "linear", "models": [
        {"model": {"model": {"path": str(llama_models["base"])}, "lora": {"path": str(adapter)}}, "parameters": {"weight": 1.0}}]},
        tmp_path / "cfg.yaml")
    argv = ["merge", str(cfg), str(tmp_path / "out"), "--in-process", "--quiet", "--lora-merge-dtype", "bfloat16",
            "--lora-merge-cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    assert "--lora-merge-cache has no effect" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    out = load_state(tmp_path / "out")
    base = load_state(llama_models["base"])
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    q = "model.layers.0.self_attn.q_proj.weight"
    delta = expected[q] - base[q]
    torch.testing.assert_close(out[q], base[q].bfloat16() + delta.bfloat16())
    assert main(["merge", str(cfg), str(tmp_path / "bad"), "--in-process", "--quiet", "--lora-merge-dtype", "int8"]) == 2


def test_lora_errors_name_the_adapter(llama_models, adapter, tmp_path):
    from raymerge.checkpoints.source import CheckpointError

    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    acfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**acfg, "use_dora": True}))
    cfg = {"merge_method": "linear", "models": [{"model": f"{llama_models['base']}+{dora}", "parameters": {"weight": 1}}]}
    with pytest.raises(CheckpointError, match="DoRA"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True, in_process=True)
    missing = {"merge_method": "linear", "models": [{"model": f"{llama_models['base']}+{tmp_path / 'nope'}", "parameters": {"weight": 1}}]}
    with pytest.raises(CheckpointError, match="LoRA adapter not found"):
        raymerge.merge(missing, tmp_path / "out", quiet=True, in_process=True)
    with pytest.raises(ConfigError, match="LoRA reference"):
        from raymerge.config.prune_config import parse_prune_config

        parse_prune_config({"model": f"{llama_models['base']}+{adapter}", "method": "magnitude", "sparsity": 0.5})


@pytest.mark.mergekit
def test_lora_matches_mergekit(llama_models, adapter, tmp_path):
    from mergekit_oracle import assert_tensors_close, load_tensors, mergekit_python, mergekit_unavailable_reason, run_mergekit_many

    if mergekit_python() is None:
        pytest.skip(f"mergekit 0.1.5 unavailable: {mergekit_unavailable_reason()}")
    cfg = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{llama_models['base']}+{adapter}", "parameters": {"weight": 0.5}},
        {"model": str(llama_models["ft1"]), "parameters": {"weight": 0.5}}]}
    errors = run_mergekit_many([(cfg, tmp_path / "mk")], "--lora-merge-cache", str(tmp_path / "mk-cache"))
    assert errors[tmp_path / "mk"] is None, errors[tmp_path / "mk"]
    ours = raymerge.merge(cfg, tmp_path / "rm", quiet=True, in_process=True).output
    assert_tensors_close(load_tensors(ours), load_tensors(tmp_path / "mk"), rtol=1e-5, atol=1e-6)
