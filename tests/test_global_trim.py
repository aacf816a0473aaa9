"""TIES with `trim_scope: model`: one magnitude threshold per model over its whole task vector
(the TIES paper), found by the two-pass histogram on the merge workers, checked against a direct
global k-th-largest computed here. The merges run in process (no Ray); that the histogram spread
over 1, 2 or 3 Ray workers gives the same bytes is `tests/test_determinism.py`'s "ties trim_scope
model" case."""

from __future__ import annotations

import pytest
import torch

import raymerge
from conftest import load_state


def _config(p, density1=0.3, density2=0.5, trim_scope="model"):
    return {
        "merge_method": "ties",
        "base_model": str(p["base"]),
        "models": [
            {"model": str(p["ft1"]), "parameters": {"weight": 0.7, "density": density1}},
            {"model": str(p["ft2"]), "parameters": {"weight": 0.4, "density": density2}},
        ],
        "parameters": {"trim_scope": trim_scope},
        "dtype": "float32",
    }


def _reference(p, densities):
    base = load_state(p["base"])
    fts = [load_state(p[k]) for k in ("ft1", "ft2")]
    weights = [0.7, 0.4]
    thresholds = []
    for ft, density in zip(fts, densities):
        mags = torch.cat([(ft[n] - base[n]).abs().reshape(-1) for n in base])
        k = int(density * mags.numel())
        thresholds.append(torch.topk(mags, k).values[-1])
    out = {}
    for n, b in base.items():
        deltas = []
        for ft, w, thr in zip(fts, weights, thresholds):
            d = ft[n] - b
            deltas.append(d * (d.abs() >= thr) * w)
        deltas = torch.stack(deltas)
        elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
        agree = deltas.sign() == elected
        w = torch.tensor(weights).reshape(-1, *[1] * b.dim())
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
        out[n] = b + (deltas * agree).sum(0) / divisor
    return out, thresholds


def test_model_scope_trim_matches_global_threshold(llama_models, tmp_path):
    p = llama_models
    result = raymerge.merge(_config(p), tmp_path / "out", quiet=True, in_process=True)
    got = load_state(result.output)
    want, _ = _reference(p, (0.3, 0.5))
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_model_scope_keeps_density_overall_but_not_per_tensor(llama_models, tmp_path):
    p = llama_models
    cfg = _config(p, density1=0.3, density2=0.3)
    cfg["models"] = cfg["models"][:1]
    out = load_state(raymerge.merge(cfg, tmp_path / "out", quiet=True, in_process=True).output)
    base, ft = load_state(p["base"]), load_state(p["ft1"])
    kept = {n: ((out[n] - base[n]).abs() > 0).float().mean().item() for n in base}
    numel = {n: base[n].numel() for n in base}
    overall = sum(kept[n] * numel[n] for n in base) / sum(numel.values())
    assert overall == pytest.approx(0.3, abs=0.002)
    assert max(kept.values()) - min(kept.values()) > 0.2  # tensors with bigger updates keep more


def test_model_scope_differs_from_tensor_scope(llama_models, tmp_path):
    p = llama_models
    a = load_state(raymerge.merge(_config(p), tmp_path / "model", quiet=True, in_process=True).output)
    b = load_state(raymerge.merge(_config(p, trim_scope="tensor"), tmp_path / "tensor", quiet=True, in_process=True).output)
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_model_scope_needs_one_density_per_model(llama_models, tmp_path):
    cfg = _config(llama_models, density1=[0.2, 0.6])
    with pytest.raises(raymerge.ConfigError, match="trim_scope: model.*several densities"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True, in_process=True)
    assert not (tmp_path / "out").exists()
