"""More of the bad-inputs catalogue (README, "Bad inputs"): malformed files and bounded work.

Each case runs the CLI (`raymerge merge|prune|search ...`) on real files and checks what a user
sees: exit status 2, exactly one line on stderr naming the file (and the tensor or key), no
traceback, nothing published at the output, and Ray never started (`no_ray` makes starting it a
test failure). The inputs are copies of the tiny llama models of `conftest.llama_models`, edited
in place. Cases that used to loop (an alias bomb, a huge layer index) must also be fast.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import yaml

from raymerge.cli import main as cli_main

BAD = "model.layers.1.mlp.up_proj.weight"
BOMB = "bomb: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"b{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)
)


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray or a worker pool is a test failure: every check here comes first."""
    import raymerge.runtime.executor as executor_mod
    import raymerge.runtime.merge as merge_mod
    import raymerge.runtime.prune as prune_mod

    def forbidden(*_a, **_k):
        raise AssertionError("Ray or workers started before the bad input was reported")

    for mod in (merge_mod, prune_mod, executor_mod):
        for name in ("ensure_ray", "_start_pool", "acquire_pool"):  # whichever this version has
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, forbidden)


@pytest.fixture
def models(llama_models):
    return llama_models


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_header(file: Path, edit=None, raw: bytes | None = None) -> None:
    """Rewrite the JSON header of a safetensors file (`edit(header_dict)` or `raw` bytes)."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if edit is not None:
        edit(header)
    text = raw if raw is not None else json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def linear(*paths: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}


def refused(capsys, argv: list[str], out: Path | None) -> str:
    """Run the CLI; expect exit 2 and one line without a traceback; return the message."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("raymerge: error: "), err
    if out is not None:
        assert not out.exists() or out.is_symlink(), f"{out} was published"
        assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()), "staging folder left behind"
    return err.removeprefix("raymerge: error: ")


def merge_refused(capsys, tmp_path: Path, cfg: dict | Path, *extra: str) -> str:
    cfg_path = cfg if isinstance(cfg, Path) else write_yaml(tmp_path / "cfg.yaml", cfg)
    out = tmp_path / "out"
    return refused(capsys, ["merge", str(cfg_path), str(out), "--quiet", *extra], out)


# -- safetensors headers: JSON of the wrong shape or type -------------------------------------------


def _nested(h):
    return b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def _offsets(value):
    return lambda h: h[BAD].__setitem__("data_offsets", value(h[BAD]["data_offsets"]))


def _overlap(h):
    h[BAD]["data_offsets"] = list(h["model.layers.1.mlp.down_proj.weight"]["data_offsets"])


HEADER_CASES = {
    "nested-json": (None, _nested, "corrupt safetensors header (JSON nested more than 64 levels deep; refused)"),
    "metadata-list": (lambda h: h.__setitem__("__metadata__", [1, 2]), None,
                      "corrupt safetensors header (__metadata__ must be a JSON object of strings, got list)"),
    "metadata-number-value": (lambda h: h.__setitem__("__metadata__", {"format": 1}), None,
                              "corrupt safetensors header (__metadata__ must be a JSON object of strings, got dict)"),
    "offsets-string": (_offsets(lambda o: "0-5"), None, f"tensor '{BAD}' has data_offsets '0-5', not two integers"),
    "float-offsets": (_offsets(lambda o: [float(x) for x in o]), None, f"tensor '{BAD}' has data_offsets ["),
    "dtype-list": (lambda h: h[BAD].__setitem__("dtype", ["F32"]), None, f"tensor '{BAD}' has dtype ['F32'], not a string"),
    "float-dims": (lambda h: h[BAD].__setitem__("shape", [128.0, 64.0]), None,
                   f"tensor '{BAD}' has shape [128.0, 64.0], not a list of non-negative integers"),
    "entry-not-object": (lambda h: h.__setitem__(BAD, [1, 2]), None,
                         f"corrupt safetensors header entry for tensor '{BAD}' (not a JSON object)"),
    "overlapping-offsets": (_overlap, None, f"tensor '{BAD}' (bytes "),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_malformed_header(models, tmp_path, no_ray, capsys, case):
    edit, raw, expected = HEADER_CASES[case]
    bad = copy_model(models["ft1"], tmp_path / "bad")
    f = bad / "model.safetensors"
    edit_header(f, edit, raw(None) if raw else None)
    text = merge_refused(capsys, tmp_path, linear(models["base"], bad))
    assert text.startswith(f"{f}: "), text
    assert expected in text, text


# -- the index of a sharded model ------------------------------------------------------------------


@pytest.mark.parametrize("case", ["nested", "shard-not-a-name"])
def test_malformed_index(models, tmp_path, no_ray, capsys, case):
    bad = copy_model(models["ft2"], tmp_path / "bad")
    index = bad / "model.safetensors.index.json"
    if case == "nested":
        index.write_text('{"weight_map": ' + "[" * 50_000 + "]" * 50_000 + "}")
        expected = f"{index}: JSON nested more than 64 levels deep; refused"
    else:
        data = json.loads(index.read_text())
        data["weight_map"][BAD] = ["model-00001-of-00004.safetensors"]
        index.write_text(json.dumps(data))
        expected = f"{index}: weight_map entry for tensor '{BAD}' is ['model-00001-of-00004.safetensors'], not a file name"
    assert merge_refused(capsys, tmp_path, linear(models["base"], bad)) == expected


# -- config.json -----------------------------------------------------------------------------------


def _config_edit(case: str, cfg_file: Path) -> str:
    """Break `cfg_file` as `case` says; return the message expected after the file's name."""
    if case == "missing":
        cfg_file.unlink()
        return "no config.json"
    if case == "list":
        cfg_file.write_text("[1, 2]")
        return "expected a JSON object at the top level, got list"
    if case == "not-utf8":
        cfg_file.write_bytes(b'{"architectures": ["Llama\xff"]}')
        return "not UTF-8 text (byte 25)"
    if case == "nested":
        cfg_file.write_text('{"a": ' * 10_000 + "1" + "}" * 10_000)
        return "JSON nested more than 64 levels deep; refused"
    data = json.loads(cfg_file.read_text())
    data["architectures"] = "LlamaForCausalLM" if case == "architectures-string" else [1, {"a": 2}]
    cfg_file.write_text(json.dumps(data))
    return f"'architectures' must be a non-empty list of names, got {data['architectures']!r}"


@pytest.mark.parametrize("case", ["missing", "list", "not-utf8", "nested", "architectures-string", "architectures-odd"])
def test_malformed_config_json(models, tmp_path, no_ray, capsys, case):
    bad = copy_model(models["ft1"], tmp_path / "bad")
    expected = _config_edit(case, bad / "config.json")
    text = merge_refused(capsys, tmp_path, linear(models["base"], bad))
    where = bad if case == "missing" else bad / "config.json"
    assert text == f"{where}: {expected}", text


# -- layers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_layer_model(tmp_path_factory) -> Path:
    from raymerge.demo import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("layers") / "two", seed=7, config_overrides={"num_hidden_layers": 2})


def test_different_layer_counts(models, two_layer_model, tmp_path, no_ray, capsys):
    text = merge_refused(capsys, tmp_path, linear(models["base"], two_layer_model))
    assert text == (
        f"{tmp_path / 'cfg.yaml'}: models have different numbers of layers (4 layers: {models['base']}; "
        f"2 layers: {two_layer_model}); use slices: with a layer_range per model to choose which layers are merged"
    )


def test_huge_layer_index_is_refused_fast(models, tmp_path, no_ray, capsys):
    """One (empty) tensor named `model.layers.16000000.x` used to make planning loop 16M times."""
    bad = copy_model(models["ft1"], tmp_path / "bad")
    f = bad / "model.safetensors"

    def add(h):
        end = max(e["data_offsets"][1] for k, e in h.items() if k != "__metadata__")
        h["model.layers.16000000.x"] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}

    edit_header(f, add)
    t0 = time.perf_counter()
    text = merge_refused(capsys, tmp_path, linear(models["base"], bad))
    assert time.perf_counter() - t0 < 10
    assert text == (f"{f}: tensor 'model.layers.16000000.x' has layer index 16000000, past the model's 5 layers "
                    "(config.json num_hidden_layers: 4); layer indices count up from 0")
    # config.json claiming that many layers does not lift the bound (it used to: minutes, then published)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 16000001}))
    t0 = time.perf_counter()
    text = merge_refused(capsys, tmp_path, linear(models["base"], bad))
    assert time.perf_counter() - t0 < 10
    assert text == (f"{f}: tensor 'model.layers.16000000.x' has layer index 16000000, past the model's 5 layers "
                    "(config.json num_hidden_layers: 16000001, believed only up to 2 x the indices present); "
                    "layer indices count up from 0")


# -- config files ------------------------------------------------------------------------------------


def _prune_cfg(models, **extra) -> dict:
    return {"model": str(models["base"]), "method": "magnitude", "sparsity": 0.5, **extra}


def _search_cfg(models, folder: Path) -> dict:
    (folder / "heldout.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    return {
        "merge": {"merge_method": "linear", "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": {"low": 0.0, "high": 1.0}}},
            {"model": str(models["ft2"]), "parameters": {"weight": 1.0}}]},
        "objective": "perplexity",
        "evaluation": {"dataset": str(folder / "heldout.txt"), "seqlen": 16, "eval_samples": 2},
        "study": {"n_trials": 1, "sampler": "random", "seed": 0},
    }


@pytest.mark.parametrize("command", ["merge", "prune", "search"])
@pytest.mark.parametrize("where", ["top-level", "under-a-key"])
def test_yaml_alias_bomb_is_refused_fast(models, tmp_path, no_ray, capsys, command, where):
    """A "billion laughs" YAML (10^9 values once aliases are expanded) in any config: one line, fast."""
    base = {"merge": linear(models["base"], models["ft1"]), "prune": _prune_cfg(models), "search": _search_cfg(models, tmp_path)}[command]
    text = yaml.safe_dump(base)
    if where == "top-level":
        text = BOMB + text
    else:  # the bomb is the value of a real key, so key validation does not stop it first
        text = BOMB + text.replace("weight: 1.0", "weight: *a8", 1)
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(text)
    t0 = time.perf_counter()
    message = refused(capsys, [command, str(cfg), str(tmp_path / "out"), "--quiet"], tmp_path / "out")
    assert time.perf_counter() - t0 < 10
    assert message.startswith(f"{cfg}: YAML expands to more than 100000 values"), message


def test_recursive_yaml_alias(models, tmp_path, no_ray, capsys):
    cfg = tmp_path / "loop.yaml"
    cfg.write_text("merge_method: linear\nmodels: &m [*m]\n")
    assert merge_refused(capsys, tmp_path, cfg).startswith(f"{cfg}: ")


def test_config_not_utf8(models, tmp_path, no_ray, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes(yaml.safe_dump(linear(models["base"], models["ft1"])).encode() + b"# caf\xe9\n")
    text = merge_refused(capsys, tmp_path, cfg)
    assert text.startswith(f"{cfg}: not UTF-8 text (byte "), text


def test_invalid_yaml_is_one_line(models, tmp_path, no_ray, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("merge_method: linear\nmodels: [\n")
    text = merge_refused(capsys, tmp_path, cfg)
    assert text.startswith(f"invalid YAML in {cfg}: ") and " at line " in text, text


def test_empty_density_list(models, tmp_path, no_ray, capsys):
    cfg = {"merge_method": "ties", "base_model": str(models["base"]),
           "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1.0, "density": []}}]}
    text = merge_refused(capsys, tmp_path, cfg)
    assert text == (f"invalid merge config {tmp_path / 'cfg.yaml'}: models.0.parameters: density: an empty list is not a "
                    "value (give a number, a list of numbers (a gradient over layers) or a filter list)")


def test_pydantic_errors_are_condensed(models, tmp_path, no_ray, capsys):
    cfg = {**linear(models["base"], models["ft1"]), "typo_one": 1, "typo_two": 2, "typo_three": 3}
    text = merge_refused(capsys, tmp_path, cfg)
    assert text.endswith("(and 2 more problems)"), text
    assert text.startswith(f"invalid merge config {tmp_path / 'cfg.yaml'}: typo_one: unknown key"), text


def test_out_shard_size_overflow(models, tmp_path, no_ray, capsys):
    text = merge_refused(capsys, tmp_path, linear(models["base"], models["ft1"]), "--out-shard-size", "1e400")
    assert text == "out_shard_size: must be a positive, finite amount, got '1e400'"


def test_bad_prune_modules_regex(models, tmp_path, no_ray, capsys):
    cfg = write_yaml(tmp_path / "prune.yaml", _prune_cfg(models, modules=["mlp\\..*", "(unclosed"]))
    text = refused(capsys, ["prune", str(cfg), str(tmp_path / "out"), "--quiet"], tmp_path / "out")
    assert text.startswith(f"invalid prune config {cfg}: modules: [1] '(unclosed' is not a valid regular expression ("), text


# -- output paths --------------------------------------------------------------------------------------


def test_output_is_a_dangling_symlink(models, tmp_path, no_ray, capsys):
    out = tmp_path / "out"
    os.symlink(tmp_path / "nowhere", out)
    cfg = write_yaml(tmp_path / "cfg.yaml", linear(models["base"], models["ft1"]))
    text = refused(capsys, ["merge", str(cfg), str(out), "--quiet"], out)
    assert text == (f"output path {out} is a symlink to {tmp_path / 'nowhere'}, which does not exist; "
                    "remove the link or choose another output path")
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()


def test_output_name_too_long(models, tmp_path, no_ray, capsys):
    out = tmp_path / ("m" * 240)  # fits the filesystem's 255 bytes, not with the staging folder's affixes
    cfg = write_yaml(tmp_path / "cfg.yaml", linear(models["base"], models["ft1"]))
    text = refused(capsys, ["merge", str(cfg), str(out), "--quiet"], out)
    assert text == (f"output name {'m' * 40!r}... is 240 bytes: the filesystem allows 255-byte names and raymerge's "
                    "staging folder beside the output adds 23, so at most 232 bytes")


def test_search_output_is_a_file(models, tmp_path, no_ray, capsys):
    out = tmp_path / "study"
    out.write_text("not a folder")
    cfg = write_yaml(tmp_path / "search.yaml", _search_cfg(models, tmp_path))
    assert cli_main(["search", str(cfg), str(out), "--quiet", "--in-process"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"raymerge: error: search output {out} is a file; the study folder (journal, best.yaml, plots) must be a folder"
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("content, line", [(b"garbage\n{\"op_code\": 0}\n", 1), (b"[1, 2]\n", 1),
                                           (b"{\"op_code\": 0}\n\x00\xff\x00\n{\"op_code\": 1}\n", 2)])
def test_corrupt_study_journal(models, tmp_path, no_ray, capsys, content, line):
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.journal").write_bytes(content)
    cfg = write_yaml(tmp_path / "search.yaml", _search_cfg(models, tmp_path))
    assert cli_main(["search", str(cfg), str(out), "--quiet", "--in-process"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"raymerge: error: {out / 'study.journal'}: line {line} is not "), err
    assert "\n" not in err and (out / "study.journal").read_bytes() == content


# -- errors raised inside Ray workers ---------------------------------------------------------------------


def test_worker_error_is_one_line_without_the_remote_traceback():
    """What Ray re-raises in the driver (a `RayTaskError` that is also the worker's exception class)
    prints as the worker's own message: no `ray::` header, remote traceback or colour codes."""
    from ray.exceptions import RayTaskError

    from raymerge.checkpoints import CheckpointError
    from raymerge.errors import one_line

    cause = CheckpointError(f"/models/ft1/model.safetensors: truncated while reading tensor '{BAD}'")
    remote = RayTaskError("MergeWorker.run", "Traceback (most recent call last):\n  File \"w.py\"\nCheckpointError: x",
                          cause).as_instanceof_cause()
    assert isinstance(remote, CheckpointError) and "\x1b[" in str(remote)
    assert one_line(remote) == str(cause)
    assert one_line("\x1b[31mred\x1b[0m problem") == "red problem"


def test_error_inside_a_ray_worker_is_one_line_naming_the_tensor(ray_session, models, tmp_path, monkeypatch, capsys):
    """An input shard cut after the driver's checks passed (e.g. rewritten by another process
    during the merge): the worker that reads it fails, and the user gets the worker's own message
    as one line naming the file and the tensor — no remote traceback, no colour codes — exit 2."""
    import raymerge.runtime.executor as executor_mod

    victim = copy_model(models["ft1"], tmp_path / "ft1")
    shard = victim / "model.safetensors"
    real_begin = executor_mod.begin

    def begin_then_cut(pool, *args):
        with open(shard, "r+b") as f:  # keep the header, drop most tensor bytes
            header = struct.unpack("<Q", f.read(8))[0]
            f.truncate(8 + header + 64)
        return real_begin(pool, *args)

    monkeypatch.setattr(executor_mod, "begin", begin_then_cut)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(models["base"]), "parameters": {"weight": 0.5}},
        {"model": str(victim), "parameters": {"weight": 0.5}}]}))
    out = tmp_path / "out"
    code = cli_main(["merge", str(cfg), str(out), "--workers", "1", "--quiet", "--no-resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymerge: error: "), err
    assert "Traceback" not in err and "\x1b[" not in err and "ray::" not in err, err
    assert str(shard) in err and "tensor '" in err, err
    assert not out.exists()


def test_readme_bad_input_caption_counts_the_rows():
    """The README's bad-input table says how many cases it lists: that number is its row count."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    caption = re.search(r"The (\d+) cases below are refused", text)
    assert caption is not None
    lines = text[caption.end():].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| input problem |")) + 2  # header, rule
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    assert int(caption.group(1)) == len(rows), f"caption says {caption.group(1)}, the table has {len(rows)} rows"
