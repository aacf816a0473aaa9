"""Calibration data: text loading, token windows, curation and the calibration config."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch

from raymerge.calibration import (
    CalibrationError,
    CalibrationWarning,
    curate,
    kmeans,
    load_calibration,
    load_texts,
    mean_pooled_features,
    resolve_seqlen,
    token_stream,
    token_windows,
)
from raymerge.config.calibration import CalibrationConfig, ConfigError, parse_calibration_config
from raymerge.demo import DEMO_WORDS, save_tiny_tokenizer


def words(n: int, start: int = 0) -> str:
    return " ".join(DEMO_WORDS[(start + i) % len(DEMO_WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


# --- text loading -------------------------------------------------------------------------------


def test_txt_documents_split_on_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("the merge model\nlayer weight\n\n  \nsparse dense\n\n\ntensor ray\n")
    assert load_texts(f) == ["the merge model\nlayer weight", "sparse dense", "tensor ray"]
    g = tmp_path / "one.txt"
    g.write_text("the merge\nmodel layer\n")
    assert load_texts(g) == ["the merge\nmodel layer"]


def test_jsonl_and_json_lines_read_field(tmp_path):
    rows = [{"content": "the merge", "id": 1}, {"content": None}, {"content": "model layer"}]
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_texts(f, field="content") == ["the merge", "model layer"]
    g = tmp_path / "b.json"
    g.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_texts(g, field="content") == ["the merge", "model layer"]
    h = tmp_path / "c.json"
    h.write_text(json.dumps([{"text": "tensor ray"}, {"text": "node"}]))
    assert load_texts(h) == ["tensor ray", "node"]


def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["the merge", None, "model layer"], "n": [1, 2, 3]}), f)
    assert load_texts(f) == ["the merge", "model layer"]
    with pytest.raises(CalibrationError, match=r"no column 'body'.*text, n"):
        load_texts(f, field="body")
    with pytest.raises(CalibrationError, match="column 'n' must hold strings"):
        load_texts(f, field="n")


def test_directory_reads_supported_files_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second doc")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n")
    (tmp_path / "c.md").write_text("ignored")
    (tmp_path / "sub").mkdir()
    assert load_texts(tmp_path) == ["first doc", "second doc"]
    cfg = CalibrationConfig(dataset=str(tmp_path))
    assert load_texts(cfg) == ["first doc", "second doc"]


def test_missing_field_names_file_line_and_field(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CalibrationError) as err:
        load_texts(f)
    msg = str(err.value)
    assert str(f) in msg and "line 2" in msg and "'text'" in msg and "'body'" in msg


def test_invalid_json_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n{nope\n")
    with pytest.raises(CalibrationError, match="line 2: invalid JSON"):
        load_texts(f)


def test_empty_inputs(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("  \n\n \n")
    with pytest.raises(CalibrationError, match=f"no calibration text in {f}"):
        load_texts(f)
    (tmp_path / "d").mkdir()
    with pytest.raises(CalibrationError, match="no calibration files in directory"):
        load_texts(tmp_path / "d")
    with pytest.raises(CalibrationError, match="not found: ./missing.jsonl"):
        load_texts("./missing.jsonl")


def test_hf_dataset_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CalibrationError, match=r"'allenai/c4'.*pip install datasets.*local"):
        load_texts("allenai/c4")


def test_hf_dataset_via_load_dataset(monkeypatch):
    calls = []

    class FakeDataset:
        column_names = ["text"]

        def __getitem__(self, key):
            return ["the merge", "", "model layer"]

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    cfg = CalibrationConfig(dataset="org/corpus", subset="en", split="train[:10]")
    assert load_texts(cfg) == ["the merge", "model layer"]
    assert calls == [("org/corpus", "en", "train[:10]")]
    with pytest.raises(CalibrationError, match="no column 'body'"):
        load_texts("org/corpus", field="body")


# --- token windows ------------------------------------------------------------------------------


def corpus(n_docs: int = 20, words_per_doc: int = 30) -> list[str]:
    return [words(words_per_doc, start=3 * i) for i in range(n_docs)]


def test_stream_joins_documents_with_eos(tokenizer):
    stream = token_stream(["the merge", "model"], tokenizer)
    eos = tokenizer.eos_token_id
    assert stream.tolist() == tokenizer("the merge", add_special_tokens=False)["input_ids"] + [eos] + tokenizer(
        "model", add_special_tokens=False
    )["input_ids"]


def test_windows_shape_and_determinism(tokenizer):
    texts = corpus()
    kw = dict(nsamples=8, seqlen=16, eval_samples=3, max_positions=128)
    a = token_windows(texts, tokenizer, seed=0, **kw)
    b = token_windows(texts, tokenizer, seed=0, **kw)
    c = token_windows(texts, tokenizer, seed=1, **kw)
    assert a.calibration.shape == (8, 16) and a.calibration.dtype == torch.long
    assert a.heldout.shape == (3, 16) and a.heldout.dtype == torch.long
    assert torch.equal(a.calibration, b.calibration) and torch.equal(a.heldout, b.heldout)
    assert not torch.equal(a.calibration, c.calibration)
    assert torch.equal(a.heldout, c.heldout)
    assert len(set(a.offsets.tolist())) == 8


def test_heldout_is_stream_tail_and_disjoint(tokenizer):
    texts = corpus()
    stream = token_stream(texts, tokenizer)
    w = token_windows(texts, tokenizer, nsamples=10, seqlen=16, seed=3, eval_samples=4)
    assert w.stream_tokens == stream.numel()
    assert torch.equal(w.heldout.reshape(-1), stream[-4 * 16 :])
    rest = stream.numel() - 4 * 16
    for off, row in zip(w.offsets.tolist(), w.calibration):
        assert 0 <= off and off + 16 <= rest
        assert torch.equal(row, stream[off : off + 16])


def test_seqlen_longer_than_model(tokenizer):
    with pytest.raises(CalibrationError, match=r"calibration.seqlen=256.*max_position_embeddings=128"):
        token_windows(corpus(), tokenizer, nsamples=2, seqlen=256, seed=0, max_positions=128)
    with pytest.raises(CalibrationError, match="calibration.seqlen=4096"):
        resolve_seqlen(4096, 2048)
    assert resolve_seqlen(None, 128) == 128
    assert resolve_seqlen(None, 32768) == 2048
    assert resolve_seqlen(None, None) == 2048
    assert resolve_seqlen(64, 128) == 64


def test_too_little_text(tokenizer):
    text = [words(10)]
    with pytest.raises(CalibrationError, match=r"has 10 tokens, needs at least 48"):
        token_windows(text, tokenizer, nsamples=2, seqlen=16, seed=0, eval_samples=2)


def test_thin_text_overlaps_with_warning(tokenizer):
    text = [words(40)]
    with pytest.warns(CalibrationWarning, match="overlap"):
        w = token_windows(text, tokenizer, nsamples=4, seqlen=16, seed=0)
    assert w.calibration.shape == (4, 16)
    with pytest.warns(CalibrationWarning, match="only 5 distinct windows exist"):
        w = token_windows([words(20)], tokenizer, nsamples=8, seqlen=16, seed=0)
    assert w.calibration.shape == (8, 16) and len(set(w.offsets.tolist())) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token_windows(corpus(), tokenizer, nsamples=4, seqlen=16, seed=0)


# --- curation -----------------------------------------------------------------------------------


def blobs(per_blob: int = 20, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.eye(dim)[:3] * 10.0
    sizes = [per_blob + 10, per_blob, per_blob - 5]
    feats = torch.cat([centers[i] + 0.3 * torch.randn(n, dim, generator=gen) for i, n in enumerate(sizes)])
    truth = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    perm = torch.randperm(feats.shape[0], generator=gen)
    return feats[perm], truth[perm]


def test_curation_covers_every_cluster():
    feats, truth = blobs()
    cands = torch.arange(feats.shape[0] * 4).reshape(-1, 4)
    idx = curate(cands, feats, nsamples=6, clusters=3, seed=0)
    assert idx.dtype == torch.long and idx.shape == (6,)
    assert len(set(idx.tolist())) == 6
    assert sorted(truth[idx].tolist()) == [0, 0, 1, 1, 2, 2]
    assert truth[idx[0]] == 0  # the largest cluster comes first
    assert torch.equal(idx, curate(cands, feats, nsamples=6, clusters=3, seed=0))


def test_curation_nearest_to_centroid_first_and_distinct():
    feats, truth = blobs()
    cands = torch.zeros(feats.shape[0], 4, dtype=torch.long)
    idx = curate(cands, feats, nsamples=feats.shape[0], clusters=3, seed=5)
    assert sorted(idx.tolist()) == list(range(feats.shape[0]))
    labels, _ = kmeans(torch.nn.functional.normalize(feats.double(), dim=1), 3, seed=5)
    assert len(set(zip(labels.tolist(), truth.tolist()))) == 3  # k-means recovers the blobs


def test_curation_input_errors():
    feats, _ = blobs()
    cands = torch.zeros(feats.shape[0], 4, dtype=torch.long)
    with pytest.raises(CalibrationError, match="features for"):
        curate(cands[:5], feats, nsamples=2, clusters=2, seed=0)
    with pytest.raises(CalibrationError, match="nsamples=999"):
        curate(cands, feats, nsamples=999, clusters=2, seed=0)


def test_mean_pooled_features():
    hs = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    assert torch.allclose(mean_pooled_features(hs), hs.mean(dim=1))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.allclose(mean_pooled_features(hs, mask)[0], hs[0, :2].mean(dim=0))


# --- load_calibration and config ----------------------------------------------------------------


def test_load_calibration_end_to_end(tmp_path, tokenizer):
    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(corpus()))
    cfg = CalibrationConfig(dataset=str(f), nsamples=4, seqlen=16, eval_samples=2)
    w = load_calibration(cfg, tokenizer, max_positions=128)
    assert w.calibration.shape == (4, 16) and w.heldout.shape == (2, 16)

    curated_cfg = CalibrationConfig(
        dataset=str(f), nsamples=4, seqlen=16, eval_samples=2, curate={"candidates": 12, "clusters": 2}
    )
    seen = []

    def features(windows: torch.Tensor) -> torch.Tensor:
        seen.append(windows.shape)
        return torch.nn.functional.one_hot(windows, len(DEMO_WORDS) + 8).float().mean(dim=1)

    cw = load_calibration(curated_cfg, tokenizer, max_positions=128, features=features)
    assert seen == [(12, 16)]
    assert cw.calibration.shape == (4, 16) and torch.equal(cw.heldout, w.heldout)
    with pytest.raises(CalibrationError, match="feature function"):
        load_calibration(curated_cfg, tokenizer, max_positions=128)


def test_config_defaults_and_errors_name_fields():
    cfg = parse_calibration_config({"dataset": "x.jsonl", "curate": {"candidates": 256}})
    assert (cfg.field, cfg.split, cfg.nsamples, cfg.seqlen, cfg.eval_samples) == ("text", "train", 128, None, 16)
    assert cfg.curate.resolved_clusters(cfg.nsamples) == 16
    with pytest.raises(ConfigError, match=r"calibration\.nsamples: .*greater than 0"):
        parse_calibration_config({"dataset": "x", "nsamples": 0})
    with pytest.raises(ConfigError, match=r"calibration\.nsampels: unknown key"):
        parse_calibration_config({"dataset": "x", "nsampels": 4})
    with pytest.raises(ConfigError, match=r"calibration\.curate: curate\.candidates \(8\) must be larger"):
        parse_calibration_config({"dataset": "x", "nsamples": 8, "curate": {"candidates": 8}})
    with pytest.raises(ConfigError, match=r"calibration\.eval_samples"):
        parse_calibration_config({"dataset": "x", "eval_samples": -1})
    with pytest.raises(ConfigError, match=r"calibration\.dataset: Field required"):
        parse_calibration_config({})
