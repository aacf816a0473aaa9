"""Pruning end to end: the pipeline against direct implementations, distributed against single
process, perplexity on a trained tiny model, N:M, OWL, the report, the CLI and bad inputs.

The fixture model is trained for a few hundred steps on a second-order Markov "language"
(`raymerge.demo.demo_text`) and then given a few large-activation input features by a
function-preserving rescaling (`add_outlier_features`), as real LLMs have; random weights would
make perplexity meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raymerge.config import ConfigError
from raymerge.runtime.prune import PruneOptions, run_prune
from tests.conftest import load_state

LAYERS = "model.layers"
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _config(trained, method="wanda", **overrides):
    cfg = {
        "model": str(trained["model"]),
        "method": method,
        "sparsity": 0.5,
        "calibration": {"dataset": str(trained["calib"]), "nsamples": 16, "seqlen": 64, "eval_samples": 8},
        "batch_size": 4,
    }
    cfg.update(overrides)
    return cfg


def _prune(trained, tmp_path, name="out", options=None, **cfg):
    opts = options or PruneOptions(in_process=True, quiet=True)
    return run_prune(_config(trained, **cfg), tmp_path / name, opts)


def _weights(state, layer, module):
    return state[f"{LAYERS}.{layer}.{module}.weight"]


# -- direct single-process references -------------------------------------------------------------------
def _reference(trained, method, sparsity=0.5, nm=None, mode="sequential"):
    """Each formula applied directly to the transformers model: per layer, hooks on its linear
    modules collect the inputs of a full-model forward over the calibration windows (after the
    earlier layers were pruned, in sequential mode), then every module of the layer is pruned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raymerge.calibration import load_calibration
    from raymerge.config.calibration import CalibrationConfig
    from raymerge.pruning import sparsegpt_prune

    model = AutoModelForCausalLM.from_pretrained(str(trained["model"]), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(trained["model"]))
    calib = CalibrationConfig(dataset=str(trained["calib"]), nsamples=16, seqlen=64, eval_samples=8)
    windows = load_calibration(calib, tok, 128).calibration
    layers = model.model.layers

    def stats_of(layer_indices):
        sq = {}
        hess = {}
        handles = []
        for i in layer_indices:
            for name in MODULES:
                lin = layers[i].get_submodule(name)

                def hook(mod, args, key=(i, name)):
                    x = args[0].reshape(-1, args[0].shape[-1])
                    sq[key] = sq.get(key, 0) + x.double().square().sum(0)
                    hess[key] = hess.get(key, 0) + x.float().T @ x.float()

                handles.append(lin.register_forward_pre_hook(hook))
        with torch.no_grad():
            for ids in windows.split(4):
                model(input_ids=ids, use_cache=False)
        for h in handles:
            h.remove()
        return sq, hess

    def prune_layer(i, sq, hess):
        for name in MODULES:
            lin = layers[i].get_submodule(name)
            w = lin.weight.data
            if method == "magnitude":
                scores = w.abs()
            else:
                scores = w.abs() * sq[(i, name)].sqrt().float()
            if method == "sparsegpt":
                new, _ = sparsegpt_prune(w, hess[(i, name)], sparsity, pattern=nm)
                lin.weight.data = new
                continue
            mask = torch.zeros_like(w, dtype=torch.bool)
            if nm is not None:
                n, m = nm
                groups = scores.reshape(w.shape[0], -1, m)
                order = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
                mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(w.shape)
            elif method == "wanda":
                k = int(w.shape[1] * sparsity)
                order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
                mask.scatter_(1, order, True)
            else:
                k = int(w.numel() * sparsity)
                order = torch.sort(scores.flatten(), stable=True).indices[:k]
                mask.view(-1)[order] = True
            lin.weight.data = w.masked_fill(mask, 0)

    n = len(layers)
    if mode == "parallel":
        sq, hess = stats_of(range(n))
        for i in range(n):
            prune_layer(i, sq, hess)
    else:
        for i in range(n):
            sq, hess = stats_of([i]) if method != "magnitude" else ({}, {})
            prune_layer(i, sq, hess)
    return {f"{LAYERS}.{i}.{m}.weight": layers[i].get_submodule(m).weight.data for i in range(n) for m in MODULES}


@pytest.mark.parametrize(
    "method,mode,pattern",
    [
        ("magnitude", "sequential", "unstructured"),
        ("wanda", "sequential", "unstructured"),
        ("wanda", "parallel", "unstructured"),
        ("wanda", "sequential", "2:4"),
        ("sparsegpt", "sequential", "unstructured"),
        ("sparsegpt", "parallel", "4:8"),
    ],
)
def test_pipeline_matches_direct_implementation(trained, tmp_path, method, mode, pattern):
    nm = None if pattern == "unstructured" else tuple(int(x) for x in pattern.split(":"))
    extra = {"pattern": pattern} if nm else {}
    if nm:
        extra["sparsity"] = nm[0] / nm[1]
    result = _prune(trained, tmp_path, method=method, mode=mode, **extra)
    got = load_state(result.output)
    want = _reference(trained, method, nm=nm, mode=mode)
    for name, w in want.items():
        assert torch.equal(got[name] == 0, w == 0), f"{name}: masks differ"
        if method == "sparsegpt":
            torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(got[name], w), f"{name}: weights differ"


def test_exact_sparsity_per_row_and_group(trained, tmp_path):
    wanda = load_state(_prune(trained, tmp_path, "w", method="wanda").output)
    for i in range(4):
        for m in MODULES:
            w = _weights(wanda, i, m)
            zeros_per_row = (w == 0).sum(dim=1)
            assert torch.all(zeros_per_row == w.shape[1] // 2), f"layer {i} {m}"
    result = _prune(trained, tmp_path, "nm", method="sparsegpt", pattern="2:4", sparsity=None)
    nm = load_state(result.output)
    for i in range(4):
        for m in MODULES:
            groups = (_weights(nm, i, m) == 0).reshape(-1, 4).sum(dim=1)
            assert torch.all(groups == 2), f"layer {i} {m}: a 4-group without exactly 2 zeros"
    assert result.report.nm_valid is True
    assert result.report.achieved_sparsity == pytest.approx(0.5)


def test_untouched_tensors_keep_their_bytes_and_model_loads(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    result = _prune(trained, tmp_path, method="wanda")
    src, out = load_state(trained["model"]), load_state(result.output)
    pruned = {f"{LAYERS}.{i}.{m}.weight" for i in range(4) for m in MODULES}
    assert set(src) == set(out)
    for name in src:
        if name not in pruned:
            assert torch.equal(src[name], out[name]), name
        else:  # kept weights are the input's own values
            kept = out[name] != 0
            assert torch.equal(out[name][kept], src[name][kept]), name
    model = AutoModelForCausalLM.from_pretrained(str(result.output))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[4, 5, 6, 7]])).logits).all()
    report = json.loads((result.output / "prune_report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5)
    assert len(report["layers"]) == 4 and len(report["modules"]) == 4 * len(MODULES)
    assert (result.output / "raymerge_prune.yml").is_file()


def test_perplexity_activation_aware_beats_magnitude(trained, tmp_path):
    ppl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        report = _prune(trained, tmp_path, method, method=method).report
        ppl[method] = report.perplexity_after
        dense = report.perplexity_before
    assert dense < ppl["sparsegpt"] and dense < ppl["wanda"]
    assert ppl["wanda"] < ppl["magnitude"], ppl
    assert ppl["sparsegpt"] < ppl["magnitude"], ppl


def test_owl_layerwise_sparsity(trained, tmp_path):
    result = _prune(trained, tmp_path, method="wanda", sparsity=0.6, layerwise={"owl": {"lambda": 0.1, "m": 3}},
                    options=PruneOptions(in_process=True, quiet=True, plot=tmp_path / "layers.png"))
    targets = [row.target for row in result.report.layers]
    assert len(set(targets)) > 1, "OWL gave every layer the same sparsity"
    assert sum(targets) / len(targets) == pytest.approx(0.6, abs=1e-9)
    assert max(targets) - min(targets) == pytest.approx(0.2, abs=1e-9)
    for row in result.report.layers:
        assert row.achieved == pytest.approx(row.target, abs=1 / 64)
    assert (tmp_path / "layers.png").stat().st_size > 1000


def test_explicit_layer_list_and_module_selection(trained, tmp_path):
    result = _prune(trained, tmp_path, method="magnitude", sparsity=None, layerwise=[0.1, 0.2, 0.3, 0.4],
                    modules=[r"mlp\..*"], calibration=None)
    out, src = load_state(result.output), load_state(trained["model"])
    for i, s in enumerate([0.1, 0.2, 0.3, 0.4]):
        w = _weights(out, i, "mlp.up_proj")
        assert (w == 0).sum().item() == int(w.numel() * s)
        assert torch.equal(_weights(out, i, "self_attn.q_proj"), _weights(src, i, "self_attn.q_proj"))
    assert result.report.perplexity_before is None  # no calibration text, no perplexity


def test_cli_prune_prints_report(trained, tmp_path, capsys):
    import yaml

    from raymerge.cli import main

    cfg = tmp_path / "prune.yaml"
    cfg.write_text(yaml.safe_dump(_config(trained, method="wanda", pattern="4:8", sparsity=None)))
    rc = main(["prune", str(cfg), str(tmp_path / "out"), "--in-process", "--quiet", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "N:M ok" in text and "perplexity on" in text and "pruned" in text
    assert json.loads((tmp_path / "r.json").read_text())["nm_valid"] is True


def test_in_process_prune_shows_each_pass_while_it_runs(trained, tmp_path, capsys, monkeypatch):
    """In process a stage call runs when it is made, so each pass gets its own phase line, opened
    before its work and closed after it: the stage's work (marked here by a line its calls print)
    falls between a pass's start and end lines, never before the line that announces it."""
    import sys

    from raymerge.runtime.pool_actor import PoolActor

    def marked(name: str, mark: str):
        real = getattr(PoolActor, name)

        def call(self, *args, **kwargs):
            print(mark, file=sys.stderr, flush=True)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(PoolActor, name, call)

    marked("loss", "STAGE: loss")
    marked("prune_sequential", "STAGE: prune")
    _prune(trained, tmp_path, options=PruneOptions(in_process=True, quiet=False))
    lines = capsys.readouterr().err.splitlines()
    events = []
    for line in lines:
        if line.startswith("STAGE: "):
            if not events or events[-1] != line:  # one entry per run of the same call
                events.append(line)
        elif line.startswith("raymerge: ") and ("perplexity" in line or "pruning" in line):
            events.append(line.split(" ...")[0].split(": done in")[0] + (" END" if ": done in" in line else " START"))
    assert events == [
        "raymerge: perplexity before pruning (8 held-out windows) START", "STAGE: loss",
        "raymerge: perplexity before pruning (8 held-out windows) END",
        "raymerge: pruning (wanda, sequential) START", "STAGE: prune", "raymerge: pruning (wanda, sequential) END",
        "raymerge: perplexity after pruning (8 held-out windows) START", "STAGE: loss",
        "raymerge: perplexity after pruning (8 held-out windows) END",
    ], lines


def test_passes_on_ray_are_queued_then_waited_for_once(capsys):
    """On Ray the passes are queued without waiting (the stages overlap across passes) and waited
    for once, under one phase line naming them (a stand-in pool counts the waits)."""
    from raymerge.runtime.prune import _Passes

    class Pool:
        remote = True

        def __init__(self) -> None:
            self.waits: list = []

        def __len__(self) -> int:
            return 2

        def get(self, handles, desc=None, quiet=True):
            self.waits.append(list(handles))
            return [h * 10 for h in handles]

    pool = Pool()
    passes = _Passes(pool, quiet=False)
    passes.add("dense perplexity", lambda: [1, 2], "perplexity before pruning")
    passes.add("pruning", lambda: [3], "pruning (wanda, sequential)")
    assert pool.waits == [] and capsys.readouterr().err == ""  # queued: nothing waited for, no line yet
    assert passes.wait("wanda, sequential") == {"dense perplexity": [10, 20], "pruning": [30]}
    assert pool.waits == [[1, 2, 3]]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "raymerge: pruning (wanda, sequential; dense perplexity, pruning, pipelined over 2 stage(s)) ..."
    assert err[1].startswith("raymerge: pruning (wanda, sequential; dense perplexity, pruning, pipelined over 2 stage(s)): done in")


def test_starting_the_stage_workers_is_announced(trained, tmp_path, capsys, monkeypatch):
    """A prune on Ray says that it starts Ray and its stage workers (seconds) before it does, as a
    merge does ("starting the merge workers")."""
    from raymerge.runtime import prune as prune_module

    class Stop(Exception):
        pass

    def no_ray(address=None, num_cpus=None):
        print("STARTING RAY", file=__import__("sys").stderr, flush=True)
        raise Stop

    monkeypatch.setattr(prune_module, "ensure_ray", no_ray)
    with pytest.raises(Stop):
        run_prune(_config(trained), tmp_path / "out", PruneOptions(quiet=False))
    lines = capsys.readouterr().err.splitlines()
    assert lines.index("raymerge: starting the prune stage workers ...") < lines.index("STARTING RAY"), lines
    with pytest.raises(Stop):
        run_prune(_config(trained), tmp_path / "out", PruneOptions(quiet=True))
    assert "raymerge:" not in capsys.readouterr().err  # --quiet: nothing


# -- bad inputs: a clear error, nothing published -------------------------------------------------------
def _fails(trained, tmp_path, match, exc=ConfigError, **cfg):
    out = tmp_path / "never"
    with pytest.raises(exc, match=match):
        run_prune(_config(trained, **cfg), out, PruneOptions(in_process=True, quiet=True))
    assert not out.exists()
    assert not list(tmp_path.glob(".never*")), "a staging folder was left behind"


def test_no_calibration_text(trained, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    _fails(trained, tmp_path, "no calibration text", calibration={"dataset": str(empty), "seqlen": 32})
    _fails(trained, tmp_path, "calibration: required for method wanda", calibration=None)
    _fails(trained, tmp_path, "not found", calibration={"dataset": str(tmp_path / "missing.txt")})


def test_seqlen_longer_than_the_model_allows(trained, tmp_path):
    _fails(trained, tmp_path, r"calibration.seqlen=4096 is longer than the model's max_position_embeddings=128",
           calibration={"dataset": str(trained["calib"]), "seqlen": 4096})


def test_nm_pattern_that_does_not_divide_the_width(trained, tmp_path):
    _fails(trained, tmp_path, r"multiple of 5, but self_attn.q_proj has 64 inputs", pattern="2:5", sparsity=None)
    _fails(trained, tmp_path, r"pattern.*0 < N < M", pattern="4:2", sparsity=None)


def test_sparsity_outside_range(trained, tmp_path):
    _fails(trained, tmp_path, r"sparsity: must be in \[0, 1\), got 1.0", sparsity=1.0)
    _fails(trained, tmp_path, r"sparsity: must be in \[0, 1\), got -0.1", sparsity=-0.1)
    _fails(trained, tmp_path, r"layer 2: sparsity must be in \[0, 1\)", sparsity=None, layerwise=[0.1, 0.2, 1.5, 0.1])
    _fails(trained, tmp_path, r"4 sparsities given|3 sparsities given, the model has 4", sparsity=None, layerwise=[0.1, 0.2, 0.3])
    _fails(trained, tmp_path, r"modules: pattern 'attn.nothing' matches no linear module", modules=["attn.nothing"])


@pytest.mark.parametrize(
    "arch,overrides",
    [("llama", {}), ("mistral", {}), ("qwen2", {}), ("gemma2", {"head_dim": 16}), ("phi3", {"pad_token_id": 0}),
     ("llama", {"tie_word_embeddings": True})],
    ids=["llama", "mistral", "qwen2", "gemma2", "phi3", "llama-tied"],
)
def test_decoder_blocks_reproduce_the_model(model_root, arch, overrides):
    """Blocks built from config.json and the checkpoint, chained, give the transformers model's
    logits exactly: embeddings, per-layer arguments (sliding windows), norm, head, soft-capping."""
    from transformers import AutoModelForCausalLM

    from raymerge.checkpoints import open_source
    from raymerge.demo import build_tiny_model
    from raymerge.blocks.decoder import DecoderBlock

    name = arch + "".join(f"-{k}" for k in overrides)
    path = model_root / "blocks" / name
    if not (path / "config.json").exists():
        build_tiny_model(path, arch=arch, seed=3, config_overrides=overrides)
    src = open_source(str(path))
    cfg = src.config()
    ids = torch.randint(0, 30, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()(ids).logits
    first = DecoderBlock(cfg, src, 0, 1, embed=True)
    second = DecoderBlock(cfg, src, 2, 3, head=True)
    got = second.logits(second.forward(first.forward(first.embed(ids))))
    assert torch.equal(got, want)
    assert all(p.is_meta for p in first.model.lm_head.parameters()) or cfg.get("tie_word_embeddings")
    src.close()


def test_curated_calibration(trained, tmp_path):
    calib = {"dataset": str(trained["calib"]), "nsamples": 8, "seqlen": 32, "eval_samples": 4,
             "curate": {"candidates": 24, "clusters": 4}}
    a = _prune(trained, tmp_path, "a", method="wanda", calibration=calib)
    b = _prune(trained, tmp_path, "b", method="wanda", calibration=calib)
    plain = _prune(trained, tmp_path, "c", method="wanda", calibration={k: v for k, v in calib.items() if k != "curate"})
    assert a.report.calibration["nsamples"] == 8
    sa, sb, sc = load_state(a.output), load_state(b.output), load_state(plain.output)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "curation is not deterministic"
    assert any(not torch.equal(sa[k], sc[k]) for k in sa), "curation picked the same windows as no curation"


def test_report_gives_stage_utilisation(trained, tmp_path, ray_session):
    """Each stage's busy time (inside its calls), the driver's wall time and their ratio, in
    (0, 1], in the result, the JSON report and the printed table; in process and on two stages.
    No timing is asserted beyond the ratio's range (the machine may be shared)."""
    for name, options in (("one", PruneOptions(in_process=True, quiet=True)),
                          ("two", PruneOptions(workers=2, quiet=True, keep_workers=True))):  # kept for the next test
        result = _prune(trained, tmp_path, name, method="wanda", mode="parallel", options=options)
        written = json.loads((result.output / "prune_report.json").read_text())["stages"]
        assert len(written) == len(result.report.stages) == (1 if name == "one" else 2)
        for stage in [*result.report.stages, *written]:
            assert 0 < stage["busy_seconds"] <= stage["wall_seconds"] + 1e-3, stage
            assert 0 < stage["utilisation"] <= 1, stage
            # from the unrounded seconds: the rounded ones (3 decimals) may differ by a few 0.1% on a tiny model
            assert stage["utilisation"] == pytest.approx(min(1.0, stage["busy_seconds"] / stage["wall_seconds"]), abs=2e-2)
        table = result.report.table()
        for k, stage in enumerate(result.report.stages):
            assert f"stage {k} (layers {stage['layers'][0]}-{stage['layers'][1]}" in table
            assert f"utilisation {stage['utilisation']:.0%}" in table


# -- merge then prune in one job ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetune_of_trained(trained, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from raymerge.demo import save_tiny_tokenizer

    path = tmp_path_factory.mktemp("ft-of-trained") / "ft"
    model = AutoModelForCausalLM.from_pretrained(str(trained["model"]), dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.std())
    model.save_pretrained(str(path))
    save_tiny_tokenizer(path)
    return path


def test_merge_then_prune_equals_pruning_the_written_merge(trained, finetune_of_trained, tmp_path, ray_session):
    import raymerge

    # A random method with its own seed and a dtype other than the inputs': the seed and the
    # output dtype (tensors and config.json) must be the merge's.
    merge = {"merge_method": "dare_ties", "base_model": str(trained["model"]),
             "models": [{"model": str(finetune_of_trained), "parameters": {"weight": 0.6, "density": 0.7}}],
             "dtype": "bfloat16", "raymerge": {"random_seed": 7}}
    written = raymerge.merge(merge, tmp_path / "merged", quiet=True, in_process=True).output
    cfg = _config(trained)
    del cfg["model"]
    two_step = run_prune({**cfg, "model": str(written)}, tmp_path / "two-step", PruneOptions(in_process=True, quiet=True))
    one_job = run_prune({**cfg, "merge": merge}, tmp_path / "one-job", PruneOptions(in_process=True, quiet=True))
    staged = run_prune({**cfg, "merge": merge}, tmp_path / "staged", PruneOptions(workers=2, quiet=True, keep_workers=True))
    a, b, c = load_state(two_step.output), load_state(one_job.output), load_state(staged.output)
    assert sorted(a) == sorted(b) == sorted(c)
    for name in a:
        assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name]), name
    assert one_job.report.perplexity_after == pytest.approx(two_step.report.perplexity_after, rel=1e-6)
    assert a["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    config = json.loads((tmp_path / "one-job" / "config.json").read_text())
    assert config == json.loads((tmp_path / "two-step" / "config.json").read_text()) and config["dtype"] == "bfloat16"
    assert (tmp_path / "one-job" / "tokenizer.json").is_file()
    assert not (tmp_path / "one-job" / "merged").exists()


def test_merge_then_prune_config_errors(trained, finetune_of_trained, tmp_path):
    merge = {"merge_method": "task_arithmetic", "base_model": str(trained["model"]),
             "models": [{"model": str(finetune_of_trained), "parameters": {"weight": 0.6}}]}
    with pytest.raises(ConfigError, match="exactly one of `model:`"):
        run_prune({**_config(trained), "merge": merge}, tmp_path / "x", PruneOptions(in_process=True, quiet=True))
    cfg = _config(trained)
    del cfg["model"]
    with pytest.raises(ConfigError, match="merge"):
        run_prune({**cfg, "merge": {**merge, "merge_method": "nope"}}, tmp_path / "x", PruneOptions(in_process=True, quiet=True))
    with pytest.raises(ConfigError, match="tokenizer_source is not supported when pruning"):
        run_prune({**cfg, "merge": {**merge, "tokenizer_source": "base"}}, tmp_path / "x", PruneOptions(in_process=True, quiet=True))
    frank = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(trained["model"]), "layer_range": [0, 4]}]},
        {"sources": [{"model": str(trained["model"]), "layer_range": [2, 4]}]}]}
    with pytest.raises(ConfigError, match="change the layer stack"):
        run_prune({**cfg, "merge": frank}, tmp_path / "x", PruneOptions(in_process=True, quiet=True))
    assert not (tmp_path / "x").exists()


# -- pickles: an opt-in of the command line or the API, never of the config file ----------------------
def test_pickle_opt_in_comes_from_the_caller_not_the_config(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from raymerge.checkpoints import CheckpointError

    folder = tmp_path / "pickled"
    shutil.copytree(trained["model"], folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="allow_pickle: .*cannot opt in to loading pickles; pass --allow-pickle"):
        _prune(trained, tmp_path, "from-config", model=str(folder), allow_pickle=True)
    with pytest.raises(CheckpointError, match="only pytorch_model.*bin weights found.*--allow-pickle"):
        _prune(trained, tmp_path, "refused", model=str(folder))
    opted = _prune(trained, tmp_path, "opted", model=str(folder), options=PruneOptions(in_process=True, quiet=True, allow_pickle=True))
    safe = _prune(trained, tmp_path, "safe")
    a, b = load_state(opted.output), load_state(safe.output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_node_staging_gathers_shards_written_on_two_nodes(tmp_path):
    """An S3 prune whose stages run on two nodes that share no disk (`runtime.prune.NodeStaging`):
    each node stages in a folder of its own, the pieces of a shard written on another node than
    its owner's are moved to the owner's copy, and each owner's shards are the one-process bytes."""
    from raymerge.checkpoints import ShardFileWriter, plan_shards
    from raymerge.checkpoints.writer import ensure_node_shards, read_range, reset_staging, write_range
    from raymerge.runtime.prune import NodeStaging

    names = [f"t{i}" for i in range(10)]
    values = {n: torch.arange(i * 10, i * 10 + 10, dtype=torch.float32) for i, n in enumerate(names)}
    layout = plan_shards([(n, "F32", (10,)) for n in names], 120)
    writers = {n: 0 if i < 5 or i == 9 else 1 for i, n in enumerate(names)}  # stage 0 also writes the last
    plan = NodeStaging.plan(layout, writers, ["node-a", "node-b"])
    assert any(src != dst for src, dst, *_ in plan.moves)
    assert NodeStaging.plan(layout, writers, ["node-a", "node-a"]).moves == ()  # one disk: nothing moves

    reference = tmp_path / "one"
    reset_staging(reference, layout)
    w = ShardFileWriter(reference)
    for n in names:
        w.write(*layout.entry(n), values[n])
    w.close()

    folders = [tmp_path / "a" / "staging", tmp_path / "b" / "staging"]  # the same path on each node
    for k, folder in enumerate(folders):
        ensure_node_shards(folder, plan.job, plan.shards[k])
    writer = [ShardFileWriter(f) for f in folders]
    for n in names:
        writer[writers[n]].write(*layout.entry(n), values[n])
    for x in writer:
        x.close()
    for src, dst, filename, begin, end in plan.moves:
        write_range(folders[dst], filename, begin, read_range(folders[src], filename, begin, end))
    for shard in layout.shards:
        owned = folders[plan.owner[shard.filename]] / shard.filename
        assert owned.read_bytes() == (reference / shard.filename).read_bytes(), shard.filename
