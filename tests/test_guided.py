"""Guided merges: AIM, ACM and Sens-Merging (`raymerge: guidance:` in a merge config).

- the formulas of `raymerge.methods.guided` against direct computations (mutual information
  from a contingency table written here, AIM relaxation, ACM and Sens coefficients);
- end to end on the tiny llama fixtures: the statistics computed here with plain transformers
  models and hooks (whole model, one process), the merged tensors from the formulas, against
  `raymerge.merge` with the statistics pass split over one and over two stage workers;
- determinism for a fixed calibration seed, and the documented limits: a fine-tune identical to
  the base gets ACM's floor 0.5 in every layer; AIM with omega = 1 is the plain merge; Sens with
  two identical fine-tunes scales every task vector by exactly 1;
- configuration errors: a parameter of another method, no base model, a model-wide trim.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import pytest
import torch

import raymerge
from raymerge.calibration import load_calibration
from raymerge.config import ConfigError
from raymerge.config.calibration import CalibrationConfig
from raymerge.methods.guided import (
    acm_coefficients,
    aim_importance,
    discrete_mutual_information,
    normalized_mutual_information,
    relax_columns,
    scale_deltas,
    sens_layer_scores,
    sens_scales,
    sens_transferability,
)
from conftest import load_state

OMEGA, THETA = 0.3, 10.0


# -- formulas ----------------------------------------------------------------------------------------
def mi_by_counting(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    xs, ys = x.flatten().tolist(), y.flatten().tolist()
    n = len(xs)
    px, py, pxy = Counter(xs), Counter(ys), Counter(zip(xs, ys))
    mi = sum(c / n * math.log((c / n) / (px[a] / n * py[b] / n)) for (a, b), c in pxy.items())
    hx = -sum(c / n * math.log(c / n) for c in px.values())
    hy = -sum(c / n * math.log(c / n) for c in py.values())
    return mi, hx, hy


def test_mutual_information_equals_contingency_count():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 7, (500,), generator=g).float()
    y = (x + torch.randint(0, 3, (500,), generator=g)).float()
    got = discrete_mutual_information(x, y)
    assert got == pytest.approx(mi_by_counting(x, y), rel=1e-9)
    assert normalized_mutual_information(x, x) == pytest.approx(1.0)
    independent = torch.randint(0, 4, (20000,), generator=g).float()
    assert normalized_mutual_information(independent, torch.randint(0, 4, (20000,), generator=g).float()) < 0.01


def test_aim_relaxation_and_acm_sens_coefficients():
    base, merged = torch.zeros(2, 3), torch.ones(2, 3)
    a = aim_importance(torch.tensor([2.0, 1.0, 0.0]))
    assert a.tolist() == [1.0, 0.5, 0.0]
    out = relax_columns(base, merged, a, 0.4)
    assert torch.allclose(out, torch.tensor([[0.4, 0.7, 1.0]] * 2))  # 1 - a (1 - omega)
    assert torch.equal(relax_columns(base, merged, a, 1.0), merged)
    scaled = scale_deltas([torch.full((2,), 3.0), torch.ones(2)], 1, [0.5, 1.0])
    assert scaled[0].tolist() == [2.0, 2.0]
    c = acm_coefficients({0: 0.9, 1: 0.5, 2: 0.7}, 10.0)
    assert c[0] == 0.5 and c[1] > c[2] > c[0]  # higher MI, smaller coefficient; the top layer gets 0.5
    assert all(v == 0.5 for v in acm_coefficients({0: 1.0, 1: 1.0}, 3.0).values())
    assert sens_layer_scores([3.0, 4.0]) == pytest.approx([0.6, 0.8])
    assert sens_transferability([[0, 1.0], [3.0, 0]]) == pytest.approx([0.25, 0.75])
    scales = sens_scales([[0.6, 0.8], [0.8, 0.6]], [0.5, 0.5], 2.0)
    w = math.exp(0.6 * 0.5 / 2) / (math.exp(0.6 * 0.5 / 2) + math.exp(0.8 * 0.5 / 2))
    assert scales[0] == pytest.approx([2 * w, 2 * (1 - w)])
    assert [s[0] + s[1] for s in zip(*scales)] == pytest.approx([2.0, 2.0])  # K softmax sums to K
    assert sens_scales([[0.6, 0.8], [0.6, 0.8]], [0.5, 0.5], 2.0) == [[1.0, 1.0], [1.0, 1.0]]


# -- end to end --------------------------------------------------------------------------------------
CALIB = {"nsamples": 4, "seqlen": 24, "eval_samples": 0, "seed": 3}


@pytest.fixture(scope="module")
def family(llama_models, tmp_path_factory):
    """The tiny llama base and two fine-tunes, a copy of the base posing as a fine-tune, and text."""
    from raymerge.demo import demo_text

    root = tmp_path_factory.mktemp("guided")
    same = root / "same"
    shutil.copytree(llama_models["base"], same)
    twin = root / "twin"
    shutil.copytree(llama_models["ft1"], twin)
    (root / "calib.txt").write_text(demo_text(8, 120, seed=5))
    return {**llama_models, "same": same, "twin": twin, "calib": root / "calib.txt", "root": root}


def guided_config(fam, method, models, merge_method="task_arithmetic", stages=1, **kw):
    return {
        "merge_method": merge_method,
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam[m]), "parameters": {"weight": w}} for m, w in models],
        "dtype": "float32",
        "raymerge": {"guidance": {"method": method, "calibration": {"dataset": str(fam["calib"]), **CALIB},
                                  "stages": stages, **kw}},
    }


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def windows(fam):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(fam["base"]))
    cal = CalibrationConfig(dataset=str(fam["calib"]), **CALIB)
    return load_calibration(cal, tok, 10**6).calibration


def layer_key(name: str):
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return {"model.embed_tokens.weight": -1, "model.norm.weight": -2, "lm_head.weight": -3}.get(name)


def reference_nmi(base, ft, ids):
    """Per layer key: mean over windows of the NMI of bf16 activations (whole models, hooks)."""
    def record(model):
        acts: dict[int, list] = {}
        mods = {i: layer.mlp for i, layer in enumerate(model.model.layers)}
        mods.update({-1: model.model.embed_tokens, -2: model.model.norm, -3: model.lm_head})
        hooks = [m.register_forward_hook(lambda _m, _a, out, k=k: acts.setdefault(k, []).append(out.detach().to(torch.bfloat16)))
                 for k, m in mods.items()]
        with torch.no_grad():
            for w in ids.split(1):
                model(w)
        for h in hooks:
            h.remove()
        return acts

    a, b = record(base), record(ft)
    out = {}
    for k in a:
        vals = []
        for x, y in zip(a[k], b[k]):
            mi, hx, hy = mi_by_counting(x, y)
            vals.append(mi / ((hx + hy) / 2))
        out[k] = sum(vals) / len(vals)
    return out


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


@pytest.fixture(scope="module", autouse=True)
def _kept_pool_ends_with_the_module():
    """The guided runs below keep their two actors for the next Ray merge of 2 workers in this
    module (ACM's serve Sens's and the kept-pool test's: 2 stage actors started instead of 6);
    whatever is still kept ends with the module, so no other module finds it."""
    yield
    raymerge.shutdown_workers()


@pytest.fixture(scope="module")
def acm_runs(ray_session, family):
    models = [("ft1", 0.6), ("ft2", 0.5), ("same", 0.4)]
    out = {}
    try:
        for stages in (1, 2):
            # Two stages with one window per micro-batch: the base's and each fine-tune's windows
            # are paired across many calls; one stage with all windows in one batch. Both on the
            # same two kept actors (the statistics use the first `stages` of them), which stay
            # kept for this module's next Ray merges of 2 workers (`_kept_pool_ends_with_the_module`).
            res = raymerge.merge(guided_config(family, "acm", models, stages=stages, theta=THETA, batch_size=5 - 2 * stages),
                                 family["root"] / f"acm{stages}", quiet=True, workers=2, keep_workers=True)
            out[stages] = res.output
    except BaseException:
        raymerge.shutdown_workers()
        raise
    return models, out


def test_acm_equals_direct_computation_and_is_stage_independent(acm_runs, family):
    models, outs = acm_runs
    reports = {s: json.loads((p / "guidance.json").read_text()) for s, p in outs.items()}
    assert reports[1]["coefficients"] == reports[2]["coefficients"]  # split over stages: same numbers
    ids = windows(family)
    base = hf_model(family["base"])
    states = {m: load_state(family[m]) for m in ("base", "ft1", "ft2", "same")}
    expected_c = {}
    for m, _ in models:
        nmi = reference_nmi(base, hf_model(family[m]), ids)
        top = max(nmi.values())
        expected_c[m] = {k: 1 - sigmoid(THETA * (v - top)) for k, v in nmi.items()}
        got = reports[2]["coefficients"][str(family[m])]
        names = {-1: "embed", -2: "norm", -3: "head"}
        for k, v in expected_c[m].items():
            assert got[names.get(k, str(k))] == pytest.approx(v, abs=1e-6), (m, k)
    merged = load_state(outs[2])
    for name, out in merged.items():
        k = layer_key(name)
        expected = states["base"][name].clone()
        for m, w in models:
            c = expected_c[m][k] if k is not None else 1.0
            expected += w * c * (states[m][name] - states["base"][name])
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5, msg=name)


def test_acm_identical_finetune_gets_the_floor_everywhere(acm_runs, family):
    _, outs = acm_runs
    report = json.loads((outs[1] / "guidance.json").read_text())
    same = report["coefficients"][str(family["same"])]
    assert set(same.values()) == {0.5}
    others = report["coefficients"][str(family["ft1"])]
    assert min(others.values()) == 0.5 and max(others.values()) > 0.5


def test_aim_equals_direct_computation_and_omega_one_is_the_plain_merge(family):
    # In process: the stage independence of the statistics is the ACM and Sens tests' (on Ray).
    models = [("ft1", 0.7), ("ft2", 0.5)]
    root = family["root"]
    plain_cfg = guided_config(family, "aim", models, merge_method="ties")
    del plain_cfg["raymerge"]
    plain_cfg["parameters"] = {"density": 0.6}
    plain = load_state(raymerge.merge(plain_cfg, root / "aim-plain", quiet=True, in_process=True).output)
    cfg = guided_config(family, "aim", models, merge_method="ties", stages=2, omega=OMEGA)
    cfg["parameters"] = {"density": 0.6}
    guided = load_state(raymerge.merge(cfg, root / "aim", quiet=True, in_process=True).output)
    cfg["raymerge"]["guidance"].update(omega=1.0, stages=1)
    same = load_state(raymerge.merge(cfg, root / "aim-one", quiet=True, in_process=True).output)
    assert all(torch.equal(same[n], plain[n]) for n in plain)

    # Direct AIM statistic: whole base model, hooks on every module with a weight but the embeddings.
    base_model = hf_model(family["base"])
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for mname, mod in base_model.named_modules():
        if "weight" in mod._parameters and mod is not base_model.model.embed_tokens:
            def hook(_m, args, key=f"{mname}.weight"):
                v = args[0].abs().double().mean(dim=1).sum(dim=0)
                sums[key] = sums[key] + v if key in sums else v
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for w in windows(family).split(1):
            base_model(w)
    for h in hooks:
        h.remove()
    base = load_state(family["base"])
    relaxed = 0
    for name, out in guided.items():
        if name in sums:
            a = (sums[name] / sums[name].max()).float()
            expected = base[name] + (plain[name] - base[name]) * (1 - a * (1 - OMEGA))
            relaxed += 1
        else:
            expected = plain[name]
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5, msg=name)
    assert relaxed == len(guided) - 1  # everything but the embeddings


# -- configuration errors --------------------------------------------------------------------------------
def test_guidance_config_errors(family, tmp_path):
    import yaml

    cfg = guided_config(family, "aim", [("ft1", 1.0)], theta=3.0)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"bad.yaml: raymerge.guidance.theta: not a parameter of aim"):
        raymerge.merge(str(path), tmp_path / "out", quiet=True)
    cfg = guided_config(family, "acm", [("ft1", 1.0)])
    cfg["raymerge"]["guidance"]["calibration"]["nsamples"] = 0
    with pytest.raises(ConfigError, match=r"raymerge.guidance.calibration.nsamples"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)


def test_guidance_needs_a_base_model(ray_session, family, tmp_path, monkeypatch):
    """Every guidance mistake is a ConfigError before any actor starts (on a Ray session too)."""
    import raymerge.runtime.merge as merge_module

    def no_actors(*args, **kwargs):
        raise AssertionError("a guidance config mistake started actors")

    monkeypatch.setattr(merge_module, "_start_pool", no_actors)
    cfg = guided_config(family, "acm", [("ft1", 1.0), ("ft2", 1.0)])
    del cfg["base_model"]
    with pytest.raises(ConfigError, match="needs a base_model"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
    cfg = guided_config(family, "aim", [("ft1", 1.0), ("base", 1.0)], merge_method="linear")
    with pytest.raises(ConfigError, match="merge_method linear has no base model"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
    cfg = guided_config(family, "sens", [("ft1", 1.0), ("ft2", 1.0)], task_calibration={"nope": {"dataset": "x.txt"}})
    with pytest.raises(ConfigError, match="task_calibration: nope is not one of the fine-tuned models"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
    cfg = guided_config(family, "sens", [("ft1", 1.0), ("ft2", 1.0)])
    cfg["raymerge"]["guidance"]["calibration"].update(nsamples=10**6, seqlen=128)
    with pytest.raises(ConfigError, match="lower calibration.nsamples or calibration.seqlen"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
    cfg = guided_config(family, "acm", [("ft1", 1.0), ("ft2", 1.0)], merge_method="ties")
    cfg["parameters"] = {"density": 0.5, "trim_scope": "model"}
    with pytest.raises(ConfigError, match="model-wide trim"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


# -- Sens-Merging ------------------------------------------------------------------------------------
TEMPERATURE = 0.5


def reference_sensitivity(model, ids) -> dict[int, float]:
    """Per decoder layer: mean over windows of Σ|θ ⊙ ∇θ L| (whole model, plain autograd)."""
    sums: dict[int, float] = {}
    for w in ids.split(1):
        model.zero_grad(set_to_none=True)
        model(w, labels=w).loss.backward()
        for i, layer in enumerate(model.model.layers):
            sums[i] = sums.get(i, 0.0) + sum(float((p.detach().double() * p.grad.double()).abs().sum()) for p in layer.parameters())
    model.zero_grad(set_to_none=True)
    return {i: v / ids.shape[0] for i, v in sums.items()}


def reference_distance(model_i, model_j, ids) -> float:
    with torch.no_grad():
        a, b = model_i(ids).logits.double(), model_j(ids).logits.double()
    return float((a - b).norm(dim=-1).mean())


@pytest.fixture(scope="module")
def sens_runs(ray_session, family):
    from raymerge.demo import demo_text

    (family["root"] / "calib-ft1.txt").write_text(demo_text(8, 120, seed=9))
    models = [("ft1", 0.6), ("ft2", 0.5)]
    task = {str(family["ft1"]): {"dataset": str(family["root"] / "calib-ft1.txt"), **CALIB}}
    out = {}
    try:
        for stages in (1, 2):  # on the same two kept actors, as acm_runs (its own, when it ran)
            cfg = guided_config(family, "sens", models, stages=stages, temperature=TEMPERATURE, task_calibration=task)
            out[stages] = raymerge.merge(cfg, family["root"] / f"sens{stages}", quiet=True, workers=2, keep_workers=True).output
    except BaseException:
        raymerge.shutdown_workers()
        raise
    return models, out


def test_sens_equals_direct_computation_and_is_stage_independent(sens_runs, family):
    models, outs = sens_runs
    reports = {s: json.loads((p / "guidance.json").read_text()) for s, p in outs.items()}
    for key in ("coefficients", "transferability"):
        a, b = reports[1][key] if key == "coefficients" else reports[1]["extra"][key], \
            reports[2][key] if key == "coefficients" else reports[2]["extra"][key]
        assert a.keys() == b.keys()
        for m in a:
            assert a[m] == b[m], (key, m)  # the same numbers, not merely close
    ids = {"ft1": windows({**family, "calib": family["root"] / "calib-ft1.txt"}), "ft2": windows(family)}
    hf = {m: hf_model(family[m]) for m, _ in models}
    sens = {m: reference_sensitivity(hf[m], ids[m]) for m, _ in models}
    for m, _ in models:
        got = reports[2]["extra"]["sensitivity"][str(family[m])]
        assert {int(k): v for k, v in got.items()} == pytest.approx(sens[m], rel=1e-4)
    g = {(i, j): reference_distance(hf[i], hf[j], ids[j]) for i, _ in models for j, _ in models if i != j}
    raw = {i: sum(v for (a, _), v in g.items() if a == i) for i, _ in models}
    tau = {i: raw[i] / sum(raw.values()) for i in raw}
    layers = sorted(sens["ft1"])
    alpha = {m: {l: sens[m][l] / math.sqrt(sum(v * v for v in sens[m].values())) for l in layers} for m in sens}
    scale = {}
    for l in layers:
        e = {m: math.exp(alpha[m][l] * tau[m] / TEMPERATURE) for m in sens}
        for m in sens:
            scale[(m, l)] = len(sens) * e[m] / sum(e.values())
    for m, _ in models:
        got = reports[2]["coefficients"][str(family[m])]
        assert {int(k): v for k, v in got.items()} == pytest.approx({l: scale[(m, l)] for l in layers}, rel=1e-4)
    states = {m: load_state(family[m]) for m in ("base", "ft1", "ft2")}
    for name, out in load_state(outs[2]).items():
        k = layer_key(name)
        expected = states["base"][name].clone()
        for m, w in models:
            s = scale[(m, k)] if k is not None and k >= 0 else 1.0
            expected += w * s * (states[m][name] - states["base"][name])
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-4, msg=name)


def test_sens_identical_finetunes_scale_by_one(family):
    models = [("ft1", 0.6), ("twin", 0.4)]
    cfg = guided_config(family, "sens", models)
    out = raymerge.merge(cfg, family["root"] / "sens-twins", quiet=True, in_process=True).output
    report = json.loads((out / "guidance.json").read_text())
    for coefficients in report["coefficients"].values():
        assert coefficients and all(v == pytest.approx(1.0, abs=1e-12) for v in coefficients.values())


def test_in_process_statistics_passes_show_progress(family, tmp_path, capsys):
    """In process (no Ray: a stage call runs when it is made) the statistics passes show the same
    progress bars as on Ray; stderr is a pipe here, so each bar's states are plain lines."""
    models = [("ft1", 0.6), ("ft2", 0.4)]
    raymerge.merge(guided_config(family, "aim", models, omega=OMEGA), tmp_path / "aim", in_process=True)
    raymerge.merge(guided_config(family, "sens", models), tmp_path / "sens", in_process=True)
    lines = capsys.readouterr().err.splitlines()
    for bar in ("AIM statistics (base): 100%", "Sens gradients (", "Sens reference logits (", "Sens logit distances ("):
        assert any(x.startswith(bar) for x in lines), (bar, lines)
    raymerge.merge(guided_config(family, "aim", models, omega=OMEGA), tmp_path / "aim-quiet", in_process=True, quiet=True)
    assert not [x for x in capsys.readouterr().err.splitlines() if "%|" in x]  # quiet: no bar


def test_job_hash_covers_the_guidance():
    """A resumed merge only reuses shards made with the same statistics (the guides are hashed)."""
    from dataclasses import replace

    from raymerge.checkpoints.writer import plan_shards
    from raymerge.runtime.operators import MergeOperator, OperatorGuide, TensorInput
    from raymerge.runtime.recovery import job_identity

    op = MergeOperator(index=0, name="w", method="task_arithmetic", inputs=(TensorInput(0, "w", 16), TensorInput(1, "w", 16)),
                       base_index=0, model_params=({}, {"weight": 1.0}), params={}, work_dtype=None, out_dtype="F32",
                       shape=(2, 2), seed=None)
    layout = plan_shards([("w", "F32", (2, 2))], 1 << 20)

    def h(guide):
        return job_identity("cfg", [replace(op, guide=guide)], layout, [], "v")

    a = h(OperatorGuide(importance=torch.tensor([1.0, 0.5])))
    assert a == h(OperatorGuide(importance=torch.tensor([1.0, 0.5])))
    assert a != h(OperatorGuide(importance=torch.tensor([1.0, 0.25])))
    assert h(OperatorGuide(input_scales=(1.0, 0.7))) != h(OperatorGuide(input_scales=(1.0, 0.8))) != h(None)


def test_guidance_runs_on_a_kept_merge_pool(ray_session, family):
    """A guided merge's statistics run on the merge's own pool: with a pool kept by
    `keep_workers=True` holding every CPU (2 workers of 1 CPU on 2 CPUs), the guided merge neither
    hangs waiting for slots nor shuts the kept pool down, and gives the in-process bytes."""
    from conftest import finishes_within

    from raymerge.runtime import actor_pool

    models = [("ft1", 0.7), ("ft2", 0.5)]
    root = family["root"]
    cfg = guided_config(family, "aim", models, merge_method="ties", stages=2, omega=OMEGA)
    cfg["parameters"] = {"density": 0.6}
    local = raymerge.merge(cfg, root / "kept-local", quiet=True, in_process=True).output
    plain = {k: v for k, v in cfg.items() if k != "raymerge"}
    try:
        raymerge.merge(plain, root / "kept-first", quiet=True, workers=2, keep_workers=True)
        pool = actor_pool.kept()
        assert pool is not None and len(pool) == 2 and pool.rule.cpus == 1
        actors = list(pool.actors)
        out = finishes_within(120, raymerge.merge, cfg, root / "kept-guided", quiet=True, workers=2, keep_workers=True).output
        assert actor_pool.kept() is pool and pool.actors == actors  # the same actors, still kept
    finally:
        raymerge.shutdown_workers()
    reports = [json.loads((p / "guidance.json").read_text()) for p in (out, local)]
    for r in reports:
        r.pop("seconds", None)
    assert reports[0] == reports[1]
    mine, theirs = load_state(out), load_state(local)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_aim_relaxes_the_matrix_a_tied_head_shares_with_the_embeddings(family, tmp_path):
    """Tied embeddings: the head is the stored embedding matrix, so AIM relaxes that matrix's
    columns by the head's input statistic (before, the statistic was collected under
    `lm_head.weight`, a tensor the checkpoint does not have, and dropped)."""
    from raymerge.demo import build_tiny_model

    tied = {"tie_word_embeddings": True}
    base = build_tiny_model(tmp_path / "base", seed=0, config_overrides=tied)
    fam = {"base": base, "calib": family["calib"],
           **{f"ft{i}": build_tiny_model(tmp_path / f"ft{i}", seed=10 + i, base=base, config_overrides=tied) for i in (1, 2)}}
    assert "lm_head.weight" not in load_state(base)
    models = [("ft1", 0.7), ("ft2", 0.5)]
    cfg = guided_config(fam, "aim", models, merge_method="ties", omega=OMEGA)
    cfg["parameters"] = {"density": 0.6}
    plain_cfg = {k: v for k, v in cfg.items() if k != "raymerge"}
    plain = load_state(raymerge.merge(plain_cfg, tmp_path / "plain", quiet=True, in_process=True).output)
    guided = load_state(raymerge.merge(cfg, tmp_path / "aim", quiet=True, in_process=True).output)

    model = hf_model(base)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    total = None

    def hook(_m, args):
        nonlocal total
        v = args[0].abs().double().mean(dim=1).sum(dim=0)
        total = v if total is None else total + v

    handle = model.lm_head.register_forward_pre_hook(hook)
    with torch.no_grad():
        for w in windows(fam).split(1):
            model(w)
    handle.remove()
    name = "model.embed_tokens.weight"
    a = (total / total.max()).float()
    b = load_state(base)[name]
    expected = b + (plain[name] - b) * (1 - a * (1 - OMEGA))
    assert not torch.equal(guided[name], plain[name])
    torch.testing.assert_close(guided[name], expected, atol=1e-6, rtol=1e-5)
