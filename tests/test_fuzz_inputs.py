"""Seeded fuzzing of a merge's inputs: every malformed input is one line and exit 2, or works.

A few hundred mutations (`random.Random(0)`, so every run tries the same ones) of one tiny llama
model's files — the bytes, length prefix and fields of a safetensors header, the sharded model's
index, `config.json` — and of the merge YAML. Each runs `raymerge merge --in-process` and must end
in one of two ways: exit 2 with exactly one line on stderr and no traceback, nothing published at
the output; or accepted (some mutations are harmless). Anything else — another exception escaping
the CLI, a second line — fails the test with the mutation's description.

To stay fast (under a minute on a 2-core machine), a mutation that passes every check is stopped
where the merge would start its worker (`_start_pool` raises `_Checked`), so each case runs the
whole driver side: config, output path, headers, planning, shard layout, disk space. The first
few accepted mutations then run the real merge to the end, where what a worker raises (a read of
bytes the header misdescribes) must still be one line and publish nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from raymerge.cli import main as cli_main

SEED = 0
CASES_PER_KIND = 45
FULL_MERGES = 6  # accepted mutations that also run the real merge to the end

ODD: list[Any] = [None, True, False, -1, 0, 1, 7, 1.5, -0.0, 2**64, -(2**70), float("inf"), "", "x", "F32", "BF16",
                  [], {}, [1], [0, 0], [-1, 5], [1.0, 2.0], [[1]], [1, 2, 3], {"a": 1}, ["F32"], [True, 1],
                  [128, 64], [64, 128], [0, 2**40], "model.layers.1.mlp.up_proj.weight"]
NAMES = ["model.layers.16000000.x", "model.layers.4.mlp.up_proj.weight", "", "model.layers.-1.x", "lm_head.weight",
         "model.layers.1.mlp.up_proj.weight", "__metadata__", "model.layers.00001.mlp.up_proj.weight", "\u0000"]


class _Checked(BaseException):
    """Raised where the merge would start its worker: every driver-side check passed."""


def _split(data: bytes) -> tuple[int, dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def _pack(header: Any, rest: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + rest


def _flip(rng: random.Random, data: bytes, lo: int, hi: int) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        out[rng.randrange(lo, hi)] = rng.choice([rng.randrange(256), ord("["), ord("{"), ord('"'), ord("-"), ord("9")])
    return bytes(out)


# -- mutations: each returns (file name inside the model, new bytes, description) -----------------------


def header_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    n, _, _ = _split(data)
    return _flip(rng, data, 8, 8 + n), "header JSON bytes flipped"


def header_length(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    n, _, _ = _split(data)
    value = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, len(data), len(data) - 8, 2**63, 2**64 - 1, rng.randrange(2**32)])
    return struct.pack("<Q", value) + data[8:], f"header length {value}"


def header_cut(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    at = rng.randrange(0, len(data))
    return data[:at], f"file cut at byte {at}"


def header_field(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    _, header, rest = _split(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    what = rng.choice(["dtype", "shape", "data_offsets", "entry", "drop-key", "rename", "metadata", "top", "add"])
    if what in ("dtype", "shape", "data_offsets"):
        value = rng.choice(ODD)
        header[name][what] = value
        desc = f"{name}.{what} = {value!r}"
    elif what == "entry":
        header[name] = rng.choice(ODD)
        desc = f"{name} = {header[name]!r}"
    elif what == "drop-key":
        key = rng.choice(["dtype", "shape", "data_offsets"])
        del header[name][key]
        desc = f"{name}: no {key}"
    elif what == "rename":
        new = rng.choice(NAMES)
        header[new] = header.pop(name)
        desc = f"{name} renamed {new!r}"
    elif what == "metadata":
        header["__metadata__"] = rng.choice(ODD + [{"format": "pt"}, {"format": 1}])
        desc = f"__metadata__ = {header['__metadata__']!r}"
    elif what == "add":
        new = rng.choice(NAMES)
        end = rng.choice([0, len(rest), len(rest) + 4])
        header[new] = {"dtype": "F32", "shape": rng.choice([[0], [1], [2, 2]]), "data_offsets": [end, end + rng.choice([0, 4, 16])]}
        desc = f"added {new!r} = {header[new]!r}"
    else:
        header = rng.choice(ODD)
        desc = f"header = {header!r}"
    return _pack(header, rest), desc


def index_field(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    index = json.loads(data)
    what = rng.choice(["value", "key", "map", "top", "bytes", "nest"])
    names = list(index["weight_map"])
    if what == "value":
        name = rng.choice(names)
        index["weight_map"][name] = rng.choice(ODD + ["model-00009-of-00004.safetensors", "../x.safetensors", "/etc/passwd"])
        desc = f"weight_map[{name}] = {index['weight_map'][name]!r}"
    elif what == "key":
        name = rng.choice(names)
        index["weight_map"][rng.choice(NAMES)] = index["weight_map"].pop(name)
        desc = f"weight_map key {name} renamed"
    elif what == "map":
        index["weight_map"] = rng.choice(ODD)
        desc = f"weight_map = {index['weight_map']!r}"
    elif what == "top":
        index = rng.choice(ODD)
        desc = f"index = {index!r}"
    elif what == "nest":
        depth = rng.choice([10, 70, 5000])
        return b'{"weight_map": ' + b"[" * depth + b"]" * depth + b"}", f"index nested {depth} deep"
    else:
        return _flip(rng, data, 0, len(data)), "index bytes flipped"
    return json.dumps(index).encode(), desc


def config_field(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    config = json.loads(data)
    what = rng.choice(["architectures", "num_hidden_layers", "model_type", "vocab_size", "top", "bytes", "latin1", "nest"])
    if what == "top":
        config = rng.choice(ODD)
        desc = f"config = {config!r}"
    elif what == "bytes":
        return _flip(rng, data, 0, len(data)), "config bytes flipped"
    elif what == "latin1":
        return data.replace(b"Llama", b"Ll\xe0ma", 1), "config not UTF-8"
    elif what == "nest":
        depth = rng.choice([10, 70, 5000])
        return b'{"a": ' * depth + b"1" + b"}" * depth, f"config nested {depth} deep"
    else:
        config[what] = rng.choice(ODD + ["LlamaForCausalLM", ["LlamaForCausalLM"], ["MistralForCausalLM"]])
        desc = f"config.{what} = {config[what]!r}"
    return json.dumps(config).encode(), desc


def yaml_text(rng: random.Random, text: str) -> tuple[str, str]:
    what = rng.choice(["bytes", "weight", "method", "models", "extra", "density", "alias"])
    data = yaml.safe_load(text)
    if what == "bytes":
        raw = bytearray(text.encode())
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = rng.choice([rng.randrange(256), ord(":"), ord("&"), ord("*"), ord("["), ord("-")])
        return raw.decode("utf-8", errors="surrogateescape"), "YAML bytes flipped"
    if what == "weight":
        data["models"][rng.randrange(2)]["parameters"]["weight"] = rng.choice(ODD)
    elif what == "density":
        data["merge_method"] = "ties"
        data["base_model"] = data["models"][0]["model"]
        data["models"][1]["parameters"]["density"] = rng.choice(ODD)
    elif what == "method":
        data["merge_method"] = rng.choice(ODD + ["ties", "slerp", "passthrough"])
    elif what == "models":
        data["models"] = rng.choice(ODD)
    elif what == "extra":
        data[rng.choice(["dtype", "tokenizer_source", "parameters", "raymerge", "slices"])] = rng.choice(ODD)
    else:
        laughs = "lol0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, rng.randint(3, 9)))
        return laughs + text, "alias bomb"
    return yaml.safe_dump(data), f"{what}: {yaml.safe_dump(data)[:120]!r}"


MODEL_MUTATIONS: list[tuple[str, str, str, Callable]] = [
    ("header-bytes", "ft1", "model.safetensors", header_bytes),
    ("header-length", "ft1", "model.safetensors", header_length),
    ("header-cut", "ft1", "model.safetensors", header_cut),
    ("header-field", "ft1", "model.safetensors", header_field),
    ("shard-field", "ft2", "model-00002-of-00004.safetensors", header_field),
    ("index", "ft2", "model.safetensors.index.json", index_field),
    ("config", "ft1", "config.json", config_field),
]


def _cases() -> list[tuple[str, int]]:
    kinds = [m[0] for m in MODEL_MUTATIONS] + ["yaml"]
    return [(kind, i) for kind in kinds for i in range(CASES_PER_KIND)]


def _run(argv: list[str]) -> tuple[Any, str]:
    """(exit status or the escaping exception, stderr) of the CLI."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return cli_main(argv), err.getvalue()
        except _Checked as checked:
            return checked, err.getvalue()
        except BaseException as other:  # noqa: BLE001 - the test's finding
            return other, err.getvalue()


def test_fuzzed_inputs_fail_in_one_line_or_work(llama_models, tmp_path, monkeypatch):
    import raymerge.runtime.merge as merge_mod

    def checked(*_a, **_k):
        raise _Checked()

    rng = random.Random(SEED)
    base = llama_models["base"]
    outcomes: dict[str, int] = {"refused": 0, "accepted": 0, "merged": 0}
    problems: list[str] = []
    full_left = FULL_MERGES
    for kind, i in _cases():
        case = tmp_path / f"{kind}-{i}"
        case.mkdir()
        if kind == "yaml":
            model = llama_models["ft1"]
            text, desc = yaml_text(rng, yaml.safe_dump({"merge_method": "linear", "models": [
                {"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(model), "parameters": {"weight": 0.5}}]}))
            (case / "cfg.yaml").write_bytes(text.encode("utf-8", errors="surrogateescape"))
        else:
            _, which, fname, mutate = next(m for m in MODEL_MUTATIONS if m[0] == kind)
            model = shutil.copytree(llama_models[which], case / "model")
            new, desc = mutate(rng, (model / fname).read_bytes())
            (model / fname).write_bytes(new)
            (case / "cfg.yaml").write_text(yaml.safe_dump({"merge_method": "linear", "models": [
                {"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(model), "parameters": {"weight": 0.5}}]}))
        out = case / "out"
        argv = ["merge", str(case / "cfg.yaml"), str(out), "--in-process", "--quiet", "--planner", "lpt"]
        full = False
        with monkeypatch.context() as mp:
            mp.setattr(merge_mod, "_start_pool", checked)
            result, err = _run(argv)
        if isinstance(result, _Checked) and full_left > 0:  # accepted: run this one to the end
            full_left -= 1
            full = True
            shutil.rmtree(case / ".out.raymerge-staging", ignore_errors=True)
            result, err = _run(argv)
        label = f"{kind} #{i} ({desc})"
        lines = [line for line in err.splitlines() if line.strip()]
        if isinstance(result, _Checked) or result == 0:
            outcomes["merged" if full else "accepted"] += 1
            if isinstance(result, _Checked) and out.exists():
                problems.append(f"{label}: output published before the merge ran")
        elif result == 2:
            outcomes["refused"] += 1
            if len(lines) != 1 or "Traceback" in err or not lines[0].startswith("raymerge: error: "):
                problems.append(f"{label}: not one line: {err!r:.400}")
            if out.exists() or (case / ".out.raymerge-staging").exists() and full:
                problems.append(f"{label}: refused but {out} or its staging folder exists")
        else:
            problems.append(f"{label}: {type(result).__name__}: {str(result)[:300]!r}")
        shutil.rmtree(case, ignore_errors=True)
    assert not problems, f"{len(problems)} bad outcome(s) of {len(_cases())}:\n" + "\n".join(problems[:20])
    assert outcomes["refused"] > len(_cases()) // 2, outcomes  # the mutations do reach the checks
    assert outcomes["merged"] >= 1, outcomes
