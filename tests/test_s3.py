"""S3 inputs and outputs against a real S3 API: moto's server on 127.0.0.1, started here and
wrapped in a WSGI recorder that counts the bytes of every response (never a mock of boto3).

Sources read headers and exact byte ranges; a merge from and to S3 gives the same bytes as the
local one; a worker fetches the bytes its operators need, not whole files; the output's
`config.json` is written last; bad buckets, keys, permissions and endpoints fail with one
message naming the URL, publish nothing, and never show a credential.

Ray workers take AWS credentials from the environment Ray was started with, so the dummy
credentials are set when this module is imported (at collection, before any fixture starts Ray).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path

import pytest
import torch
import yaml

ACCESS_KEY = "AKIARAYMERGETESTKEY01"
SECRET = "raymerge-test-SECRET-must-never-be-printed"
os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
for _var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)

import raymerge  # noqa: E402
from raymerge.checkpoints import CheckpointError, OutputError, open_source, plan_shards  # noqa: E402
from raymerge.checkpoints import s3 as s3mod  # noqa: E402
from raymerge.checkpoints.local import LocalSource  # noqa: E402
from raymerge.checkpoints.s3 import S3Source, S3StagedOutput, resolve_endpoint_url, upload_files, S3Target  # noqa: E402
from raymerge.checkpoints.writer import allocate_shards  # noqa: E402
from raymerge.cli import main as cli_main  # noqa: E402
from s3_server import S3, Recorder, serve  # noqa: E402,F401

IN_BUCKET, OUT_BUCKET = "rm-models", "rm-merged"
NAMED_FILES = ("README.md", "mergekit_config.yml")  # they name the input paths, so differ between local and S3 inputs


# -- the server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    with serve((IN_BUCKET, OUT_BUCKET)) as store:
        yield store


@pytest.fixture(scope="module")
def s3_models(s3, llama_models) -> dict[str, str]:
    """The tiny llama family (ft2 sharded) uploaded to s3://rm-models/llama/<name>."""
    urls = {}
    for name, path in llama_models.items():
        s3.upload_folder(path, IN_BUCKET, f"llama/{name}")
        urls[name] = f"s3://{IN_BUCKET}/llama/{name}"
    return urls


def ties(p: dict) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(p["base"]),
        "models": [
            {"model": str(p["ft1"]), "parameters": {"weight": 1.0, "density": [0.8, 0.4]}},
            {"model": str(p["ft2"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(p["ft3"]), "parameters": {"weight": 0.9, "density": 0.6}},
        ],
        "parameters": {"normalize": True},
    }


MERGE = dict(quiet=True, out_shard_size="300KB", workers=2, keep_workers=True)  # reuse the actors between merges


@pytest.fixture(scope="module")
def reference(ray_session, llama_models, tmp_path_factory) -> dict[str, bytes]:
    """The local -> local merge, file by file."""
    out = raymerge.merge(ties(llama_models), tmp_path_factory.mktemp("ref") / "out", **MERGE).output
    files = {f.name: f.read_bytes() for f in sorted(out.iterdir())}
    assert len([n for n in files if n.endswith(".safetensors")]) > 1  # sharded: an index is written too
    yield files
    raymerge.shutdown_workers()


def without_named(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k not in NAMED_FILES}


def assert_no_credentials(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and ACCESS_KEY not in text


# -- the source -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["base", "ft2"], ids=["single", "sharded"])
def test_source_matches_local(s3, s3_models, llama_models, name):
    src = S3Source(s3_models[name], endpoint_url=s3.url)
    local = LocalSource(llama_models[name])
    assert src.tensors() == local.tensors()
    assert src.bytes_read() == 0  # opening reads headers only
    for tname in local.tensors():
        assert torch.equal(src.read(tname), local.read(tname))
    tname = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(src.read(tname, rows=(3, 11)), local.read(tname, rows=(3, 11)))
    assert src.config() == local.config()
    assert src.read_bytes("tokenizer.json") == local.read_bytes("tokenizer.json")
    assert src.read_json("nothing.json") is None and src.read_bytes("tokenizer.model") is None
    with pytest.raises(CheckpointError, match="no tensor 'zzz'"):
        src.read("zzz")
    with pytest.raises(CheckpointError, match="bad row range"):
        src.read(tname, rows=(5, 10**6))
    src.read(tname).add_(1)  # tensors are writable, like local ones


def test_reads_fetch_exactly_the_tensor_bytes(s3, s3_models, monkeypatch):
    rec = s3.recorder
    rec.clear()
    src = open_source(s3_models["ft2"], s3_endpoint_url=s3.url)  # sharded: index + 2 ranged GETs per shard
    opened = rec.bytes_sent()
    stats = src.fetch_stats()
    assert opened == stats["meta_bytes"] and stats["tensor_bytes"] == 0
    info = src.tensors()["model.layers.2.self_attn.o_proj.weight"]
    rec.clear()
    src.read(info.name)
    gets = rec.records("GET")
    assert len(gets) == 1 and gets[0]["range"] and rec.bytes_sent() == info.nbytes == src.bytes_read()
    rec.clear()
    src.read(info.name, rows=(2, 5))
    assert rec.bytes_sent() == 3 * info.nbytes // info.shape[0]
    # Large reads are split into concurrent sub-ranges (here: parts of 4 KiB) into one buffer.
    monkeypatch.setattr(s3mod, "RANGE_PART_BYTES", 4096)
    big = max(src.tensors().values(), key=lambda t: t.nbytes)
    rec.clear()
    whole = src.read(big.name)
    assert len(rec.records("GET")) == -(-big.nbytes // 4096) > 2 and rec.bytes_sent() == big.nbytes
    monkeypatch.undo()
    assert torch.equal(whole, src.read(big.name))


def test_throttling_and_server_errors_are_retried(s3, s3_models, llama_models):
    src = open_source(s3_models["base"], s3_endpoint_url=s3.url)
    name = "model.layers.0.mlp.down_proj.weight"
    s3.recorder.clear()
    s3.recorder.faults = [(503, "SlowDown"), (500, "InternalError")]
    try:
        got = src.read(name)
    finally:
        s3.recorder.faults = []
        s3mod.reset_clients()  # adaptive mode now rate-limits that client: start the next tests afresh
    assert [r["status"] for r in s3.recorder.records("GET")] == [503, 500, 206]
    assert torch.equal(got, LocalSource(llama_models["base"]).read(name))


def test_plan_from_s3_headers(s3, s3_models):
    report = raymerge.plan(ties(s3_models), workers=2, planner="lpt", s3_endpoint_url=s3.url)
    assert report.tensors == len(open_source(s3_models["base"], s3_endpoint_url=s3.url).tensors())


def test_endpoint_from_environment(s3, s3_models, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    assert resolve_endpoint_url(None) == s3.url
    assert resolve_endpoint_url("http://other:9000") == "http://other:9000"
    src = open_source(s3_models["base"])  # botocore reads AWS_ENDPOINT_URL itself too
    assert src.tensors()


def test_worker_reads_only_its_operators(s3, s3_models, llama_models, tmp_path):
    """One worker (the actor's logic, without Ray) computing the operators of one layer, one of
    them as a row part, fetches exactly their input bytes plus the headers: not whole files."""
    from raymerge.config import load_config
    from raymerge.methods import get_method
    from raymerge.runtime.merge import MergeOptions, _prepare
    from raymerge.runtime.worker import MergeWorkerImpl, WorkItem, WriteTarget

    cfg, label = load_config({
        "merge_method": "linear",
        "models": [{"model": s3_models[k], "parameters": {"weight": w}} for k, w in (("ft1", 0.3), ("ft2", 0.7))],
    })
    program, specs, _ = _prepare(cfg, label, MergeOptions(s3_endpoint_url=s3.url))
    layout = plan_shards([(op.name, op.out_dtype, op.shape) for op in program.operators], 300_000)
    allocate_shards(tmp_path, layout)
    ops = [op for op in program.operators if ".layers.1." in op.name]
    split = next(op for op in ops if len(op.shape) == 2)
    assert get_method(split.method).elementwise
    items = [WorkItem(op, WriteTarget(*layout.entry(op.name))) for op in ops if op is not split]
    items.append(WorkItem(split, WriteTarget(*layout.entry(split.name)), rows=(0, split.shape[0] // 2)))
    worker = MergeWorkerImpl(0, threads=1)
    s3.recorder.clear()
    worker.begin(specs, str(tmp_path))
    stats = worker.run(items)
    needed = sum(item.bytes_in for item in items)
    headers = sum(src.fetch_stats()["meta_bytes"] for src in worker._sources.values())
    assert stats.bytes_read == needed
    assert s3.recorder.bytes_sent() == needed + headers
    model_bytes = sum(f.stat().st_size for k in ("ft1", "ft2") for f in llama_models[k].glob("*.safetensors"))
    assert needed + headers < 0.3 * model_bytes
    worker.finish()


# -- merges -----------------------------------------------------------------------------------------


def test_merge_from_s3_is_byte_identical(s3, s3_models, reference, tmp_path, monkeypatch):
    # The endpoint only in the driver's environment: workers get it through the source specs.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    s3.recorder.clear()
    result = raymerge.merge(ties(s3_models), tmp_path / "out", **MERGE)
    files = {f.name: f.read_bytes() for f in sorted(result.output.iterdir())}
    assert without_named(files) == without_named(reference)
    assert s3_models["ft1"] in files["README.md"].decode()
    inputs = sum(t.nbytes for k in ("base", "ft1", "ft2", "ft3") for t in open_source(s3_models[k]).tensors().values())
    assert result.bytes_read == inputs  # every input tensor once: ties needs them all
    # Everything fetched beyond the tensors: headers, config and tokenizer files.
    assert result.bytes_read < s3.recorder.bytes_sent() < result.bytes_read + 4 * 1024 * 1024


@pytest.fixture
def from_driver(tmp_path, monkeypatch) -> list[str]:
    """The names of the files the driver uploads (the rest come from the workers); staging in tmp_path."""
    monkeypatch.setenv(s3mod.STAGING_ENV, str(tmp_path / "staging"))
    (tmp_path / "staging").mkdir()
    names: list[str] = []
    upload = s3mod.upload_files

    def recording_upload(target, staging, files, **kw):
        names.extend(files)
        return upload(target, staging, files, **kw)

    monkeypatch.setattr(s3mod, "upload_files", recording_upload)
    return names


def test_merge_to_s3_is_byte_identical_and_config_comes_last(s3, llama_models, reference, tmp_path, from_driver):
    s3.recorder.clear()
    result = raymerge.merge(ties(llama_models), f"s3://{OUT_BUCKET}/local-in/", s3_endpoint_url=s3.url, **MERGE)
    assert from_driver and not [n for n in from_driver if n.endswith(".safetensors")]  # the workers uploaded the shards
    assert result.output == f"s3://{OUT_BUCKET}/local-in"
    assert s3.objects(OUT_BUCKET, "local-in") == reference
    assert result.files == sorted(reference)
    puts = [r["path"].rsplit("/", 1)[-1] for r in s3.recorder.records("PUT", f"/{OUT_BUCKET}/local-in/") if r["status"] == 200]
    names = [n for n in puts if not n.startswith(".raymerge-write-probe")]
    assert names[-1] == "config.json" and names[-2] == "model.safetensors.index.json"
    shards = [n for n in reference if n.endswith(".safetensors")]
    assert max(names.index(n) for n in shards) < names.index("model.safetensors.index.json")
    assert not any((tmp_path / "staging").iterdir())  # staging removed


def test_in_process_merge_to_s3_uploads_from_the_driver(s3, llama_models, reference, tmp_path, from_driver):
    """No actors to upload: the driver uploads every shard, and the bytes are the Ray merge's."""
    result = raymerge.merge(ties(llama_models), f"s3://{OUT_BUCKET}/in-process/", s3_endpoint_url=s3.url,
                            quiet=True, out_shard_size="300KB", in_process=True)
    assert result.output == f"s3://{OUT_BUCKET}/in-process"
    assert s3.objects(OUT_BUCKET, "in-process") == reference
    assert {n for n in reference if n.endswith(".safetensors")} <= set(from_driver)
    assert not any((tmp_path / "staging").iterdir())


def test_cli_merge_s3_to_s3(s3, s3_models, reference, tmp_path, capsys):
    cfg_path = tmp_path / "ties.yaml"
    cfg_path.write_text(yaml.safe_dump(ties(s3_models)))
    out = f"s3://{OUT_BUCKET}/from-s3"
    args = ["merge", str(cfg_path), out, "--quiet", "--workers", "2", "--out-shard-size", "300KB", "--s3-endpoint-url", s3.url]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert f"into {out}" in text
    assert without_named(s3.objects(OUT_BUCKET, "from-s3")) == without_named(reference)
    assert cli_main(args) == 2  # the prefix now holds a model
    err = capsys.readouterr().err
    assert "already holds a model" in err and out in err
    assert_no_credentials(text, err)


def test_overwrite_replaces_model_and_removes_stale_objects(ray_session, s3, llama_models, reference):
    prefix = "existing"
    s3.upload_folder(llama_models["ft3"], OUT_BUCKET, prefix)
    s3.client.put_object(Bucket=OUT_BUCKET, Key=f"{prefix}/old-notes.txt", Body=b"old")
    before = s3.objects(OUT_BUCKET, prefix)
    url = f"s3://{OUT_BUCKET}/{prefix}"
    with pytest.raises(OutputError, match=f"output path {url} already holds a model; pass --overwrite"):
        raymerge.merge(ties(llama_models), url, s3_endpoint_url=s3.url, **MERGE)
    assert s3.objects(OUT_BUCKET, prefix) == before
    raymerge.merge(ties(llama_models), url, s3_endpoint_url=s3.url, overwrite=True, **MERGE)
    assert s3.objects(OUT_BUCKET, prefix) == reference  # old model.safetensors and notes are gone


# -- failures: one clear message, nothing published, no credentials --------------------------------


def assert_prefix_empty(s3, prefix: str) -> None:
    listing = s3.client.list_objects_v2(Bucket=OUT_BUCKET, Prefix=prefix)
    assert not listing.get("Contents"), [o["Key"] for o in listing.get("Contents", [])]
    assert not s3.client.list_multipart_uploads(Bucket=OUT_BUCKET, Prefix=prefix).get("Uploads")


def test_failure_during_merge_publishes_nothing(ray_session, s3, llama_models, tmp_path, monkeypatch):
    monkeypatch.setenv(s3mod.STAGING_ENV, str(tmp_path))
    cfg = {  # density +/- epsilon outside (0, 1): found only when DELLA runs on a worker
        "merge_method": "della",
        "base_model": str(llama_models["base"]),
        "models": [{"model": str(llama_models[k]), "parameters": {"weight": 1.0, "density": 0.1, "epsilon": 0.2}} for k in ("ft1", "ft2")],
    }
    with pytest.raises(Exception, match="epsilon"):
        raymerge.merge(cfg, f"s3://{OUT_BUCKET}/failed", s3_endpoint_url=s3.url, **MERGE)
    assert_prefix_empty(s3, "failed")
    assert not any(tmp_path.iterdir())


def test_abort_after_upload_deletes_what_was_uploaded(s3, tmp_path):
    staged = S3StagedOutput(f"s3://{OUT_BUCKET}/aborted", endpoint_url=s3.url)
    layout = plan_shards([("a", "F32", (1000, 10)), ("b", "F32", (1000, 10))], 50_000)
    staged.prepare(layout)
    staged.write_file("config.json", "{}")
    staged.upload_shards()  # from this process: no actors
    assert len(s3.objects(OUT_BUCKET, "aborted")) == 2
    staged.abort()
    assert_prefix_empty(s3, "aborted")
    assert not staged.staging.exists()


def test_multipart_upload_of_a_large_shard(s3, tmp_path):
    data = os.urandom(11 * 1024 * 1024)
    (tmp_path / "big.safetensors").write_bytes(data)
    s3.recorder.clear()
    target = S3Target(OUT_BUCKET, "multipart", s3.url)
    assert upload_files(target, tmp_path, ["big.safetensors"], multipart_threshold=5 * 2**20, multipart_chunk=5 * 2**20) == len(data)
    parts = [r for r in s3.recorder.records("PUT", f"/{OUT_BUCKET}/multipart/") if "partNumber" in r["query"]]
    assert len(parts) == 3
    assert s3.objects(OUT_BUCKET, "multipart") == {"big.safetensors": data}


def _errors_of(fn) -> str:
    with pytest.raises((CheckpointError, OutputError)) as err:
        fn()
    text = str(err.value)
    assert_no_credentials(text)
    assert "\n" not in text
    return text


def test_missing_bucket_key_and_bad_endpoint(s3, s3_models, llama_models, tmp_path, monkeypatch):
    def merge_from(model: str, **kw):
        cfg = ties(s3_models)
        cfg["models"][1]["model"] = model
        return lambda: raymerge.merge(cfg, tmp_path / "out", **MERGE, **kw)

    text = _errors_of(merge_from("s3://rm-no-such-bucket/m", s3_endpoint_url=s3.url))
    assert text == "s3://rm-no-such-bucket/m: S3 bucket 'rm-no-such-bucket' does not exist"
    text = _errors_of(merge_from(f"s3://{IN_BUCKET}/llama/nowhere", s3_endpoint_url=s3.url))
    assert text == f"model path not found: s3://{IN_BUCKET}/llama/nowhere (no objects under this prefix)"
    s3.client.put_object(Bucket=IN_BUCKET, Key="llama/configonly/config.json", Body=b"{}")
    text = _errors_of(merge_from(f"s3://{IN_BUCKET}/llama/configonly", s3_endpoint_url=s3.url))
    assert "no weights found" in text
    assert not (tmp_path / "out").exists()
    text = _errors_of(lambda: raymerge.merge(ties(llama_models), "s3://rm-no-such-bucket/out", s3_endpoint_url=s3.url, **MERGE))
    assert text == "s3://rm-no-such-bucket/out: S3 bucket 'rm-no-such-bucket' does not exist"
    # An endpoint where nothing listens, with few retries so the test stays quick.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    s3mod.reset_clients()
    try:
        text = _errors_of(merge_from(s3_models["ft2"], s3_endpoint_url=dead))
    finally:
        s3mod.reset_clients()
    assert f"cannot reach the S3 endpoint {dead}" in text


def test_access_denied(s3, s3_models, llama_models, tmp_path, monkeypatch, capsys):
    """IAM enforcement on: a user allowed only on another bucket reads and writes nothing here."""
    import boto3
    import requests

    iam = boto3.client("iam", endpoint_url=s3.url)
    iam.create_user(UserName="outsider")
    allow = {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::elsewhere", "arn:aws:s3:::elsewhere/*"]}
    policy = {"Version": "2012-10-17", "Statement": [allow]}
    iam.put_user_policy(UserName="outsider", PolicyName="elsewhere-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="outsider")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    s3mod.reset_clients()
    requests.post(f"{s3.url}/moto-api/reset-auth", data=b"0")
    try:
        text = _errors_of(lambda: raymerge.merge(ties(s3_models), tmp_path / "out", s3_endpoint_url=s3.url, **MERGE))
        assert text.startswith(f"s3://{IN_BUCKET}/llama/base/") and "access denied (AccessDenied" in text
        text = _errors_of(lambda: raymerge.merge(ties(llama_models), f"s3://{OUT_BUCKET}/denied", s3_endpoint_url=s3.url, **MERGE))
        assert text.startswith(f"s3://{OUT_BUCKET}/denied: access denied")
        cfg_path = tmp_path / "ties.yaml"
        cfg_path.write_text(yaml.safe_dump(ties(s3_models)))
        assert cli_main(["merge", str(cfg_path), str(tmp_path / "out"), "--quiet", "--s3-endpoint-url", s3.url]) == 2
        captured = capsys.readouterr()
        assert "access denied" in captured.err and "Traceback" not in captured.err
        for text in (captured.out, captured.err):
            assert key["SecretAccessKey"] not in text and key["AccessKeyId"] not in text
            assert_no_credentials(text)
    finally:
        requests.post(f"{s3.url}/moto-api/reset-auth", data=b"inf")
        monkeypatch.undo()
        s3mod.reset_clients()
    assert not (tmp_path / "out").exists()
    assert_prefix_empty(s3, "denied")


def test_prune_from_s3_matches_local(s3, s3_models, llama_models, tmp_path):
    """A prune reads its model from S3 (ft2 is sharded) and writes what the local prune writes."""
    from raymerge.demo import demo_text

    calib = tmp_path / "calib.txt"
    calib.write_text(demo_text(8, 200, seed=2))
    cfg = {"method": "wanda", "sparsity": 0.5, "calibration": {"dataset": str(calib), "nsamples": 4, "seqlen": 32, "eval_samples": 2}}
    local = raymerge.prune({**cfg, "model": str(llama_models["ft2"])}, tmp_path / "local", in_process=True, quiet=True)
    remote = raymerge.prune({**cfg, "model": s3_models["ft2"]}, tmp_path / "remote", in_process=True, quiet=True,
                            s3_endpoint_url=s3.url)
    for f in sorted(local.output.glob("*.safetensors")):
        assert f.read_bytes() == (remote.output / f.name).read_bytes(), f.name
    assert remote.report.perplexity_after == local.report.perplexity_after


# -- prune and search publish through the same output path ------------------------------------------


def _prune_cfg(llama_models, tmp_path: Path) -> dict:
    from raymerge.demo import demo_text

    calib = tmp_path / "calib.txt"
    calib.write_text(demo_text(8, 200, seed=2))
    return {"model": str(llama_models["ft2"]), "method": "wanda", "sparsity": 0.5, "out_shard_size": "300KB",
            "calibration": {"dataset": str(calib), "nsamples": 4, "seqlen": 32, "eval_samples": 2}}


def assert_nothing_named_s3(*roots: Path) -> None:
    for root in roots:
        found = [str(p) for p in Path(root).rglob("s3:*")]
        assert not found, found


def test_prune_to_s3_publishes_into_the_bucket(ray_session, s3, llama_models, tmp_path, monkeypatch, capsys):
    """`raymerge prune cfg.yaml s3://...` (the CLI, in process) and `raymerge.prune(..., workers=2)`
    publish what a local prune writes, byte for byte, `config.json` last, and create no local
    folder named `s3:` (nothing local but the staging folder, removed once published)."""
    monkeypatch.chdir(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setenv(s3mod.STAGING_ENV, str(staging))
    cfg = _prune_cfg(llama_models, tmp_path)
    local = raymerge.prune(cfg, tmp_path / "local", in_process=True, quiet=True)
    expected = {f.name: f.read_bytes() for f in sorted(local.output.iterdir())}
    assert "model.safetensors.index.json" in expected and len([n for n in expected if n.endswith(".safetensors")]) > 1

    def check(prefix: str) -> None:
        got = s3.objects(OUT_BUCKET, prefix)
        assert sorted(got) == sorted(expected)
        # The report holds timings and stage workers; everything else is byte-identical.
        assert {k: v for k, v in got.items() if k != "prune_report.json"} == {k: v for k, v in expected.items() if k != "prune_report.json"}
        puts = [r["path"].rsplit("/", 1)[-1] for r in s3.recorder.records("PUT", f"/{OUT_BUCKET}/{prefix}/") if r["status"] == 200]
        names = [n for n in puts if not n.startswith(".raymerge-write-probe")]
        assert names[-1] == "config.json" and names[-2] == "model.safetensors.index.json"
        assert not any(staging.iterdir())  # the staging folder is gone
        assert_nothing_named_s3(tmp_path)

    cfg_path = tmp_path / "prune.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = f"s3://{OUT_BUCKET}/pruned"
    args = ["prune", str(cfg_path), out, "--in-process", "--quiet", "--s3-endpoint-url", s3.url]
    s3.recorder.clear()
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert f"into {out}" in text
    check("pruned")
    assert cli_main(args) == 2  # the prefix now holds a model
    err = capsys.readouterr().err
    assert "already holds a model" in err and out in err
    assert_no_credentials(text, err)

    raymerge.shutdown_workers()  # merges above keep their workers: give the stage workers the CPUs
    s3.recorder.clear()
    upload = s3mod.upload_files
    from_driver: list[str] = []

    def recording_upload(target, staging_dir, names, **kw):
        from_driver.extend(names)
        return upload(target, staging_dir, names, **kw)

    monkeypatch.setattr(s3mod, "upload_files", recording_upload)
    result = raymerge.prune(cfg, f"s3://{OUT_BUCKET}/pruned-ray", workers=2, quiet=True, s3_endpoint_url=s3.url)
    assert result.output == f"s3://{OUT_BUCKET}/pruned-ray" and len(result.stages) == 2
    assert from_driver and not [n for n in from_driver if n.endswith(".safetensors")]  # the stage workers uploaded the shards
    check("pruned-ray")


def test_prune_to_s3_failure_publishes_nothing(s3, llama_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(s3mod.STAGING_ENV, str(tmp_path / "staging"))
    cfg = _prune_cfg(llama_models, tmp_path)
    from raymerge.runtime import prune as prune_mod

    def broken(*a, **kw):
        raise RuntimeError("report failed")

    monkeypatch.setattr(prune_mod.PruneReport, "build", broken)
    with pytest.raises(RuntimeError, match="report failed"):
        raymerge.prune(cfg, f"s3://{OUT_BUCKET}/prune-failed", in_process=True, quiet=True, s3_endpoint_url=s3.url)
    assert_prefix_empty(s3, "prune-failed")
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").iterdir())
    assert_nothing_named_s3(tmp_path)


def test_search_materializes_the_best_model_into_s3(ray_session, s3, llama_models, tmp_path, monkeypatch):
    from raymerge.demo import demo_text

    monkeypatch.chdir(tmp_path)
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setenv(s3mod.STAGING_ENV, str(staging))
    calib = tmp_path / "calib.txt"
    calib.write_text(demo_text(8, 200, seed=3))
    cfg = {
        "merge": {
            "merge_method": "linear",
            "models": [{"model": str(llama_models["ft1"]), "parameters": {"weight": {"low": 0.2, "high": 1.0}}},
                       {"model": str(llama_models["ft3"]), "parameters": {"weight": 1.0}}],
            "dtype": "float32",
        },
        "objective": "perplexity",
        "evaluation": {"dataset": str(calib), "seqlen": 32, "eval_samples": 2},
        "study": {"n_trials": 2, "sampler": "random", "seed": 0},
    }
    url = f"s3://{OUT_BUCKET}/best"
    raymerge.shutdown_workers()
    result = raymerge.optimize(cfg, tmp_path / "study", in_process=True, quiet=True, materialize=url, s3_endpoint_url=s3.url)
    assert result.materialized == url
    local = raymerge.merge(result.best_configs[0], tmp_path / "local", quiet=True)
    expected = {f.name: f.read_bytes() for f in sorted(local.output.iterdir())}
    assert "config.json" in expected and s3.objects(OUT_BUCKET, "best") == expected
    assert not any(staging.iterdir())
    assert not (tmp_path / "study" / "best-model").exists()
    assert_nothing_named_s3(tmp_path)
    # The target is checked before the study starts: a prefix holding a model is refused.
    with pytest.raises(OutputError, match=f"output path {url} already holds a model"):
        raymerge.optimize(cfg, tmp_path / "again", in_process=True, quiet=True, materialize=url, s3_endpoint_url=s3.url)
    assert not (tmp_path / "again").exists()
    # The study folder itself must be local (it holds the journal): refused, nothing created.
    with pytest.raises(OutputError, match="must be local"):
        raymerge.optimize(cfg, f"s3://{OUT_BUCKET}/study", in_process=True, quiet=True, s3_endpoint_url=s3.url)
    assert_nothing_named_s3(tmp_path)


def merge_interrupted_at_config(cfg: dict, url: str, opts: dict, monkeypatch) -> list[str]:
    """Merge `cfg` into `url`, interrupted (Ctrl-C) when config.json is to be uploaded: every
    shard is in the bucket, the model is not. The files uploaded before that."""
    upload = s3mod.upload_files
    uploaded: list[str] = []

    def interrupted_at_config(target, staging, files, **kw):
        if "config.json" in files:
            raise KeyboardInterrupt
        uploaded.extend(files)
        return upload(target, staging, files, **kw)

    with monkeypatch.context() as m:
        m.setattr(s3mod, "upload_files", interrupted_at_config)
        with pytest.raises(KeyboardInterrupt):
            raymerge.merge(cfg, url, **opts)
    return uploaded


def test_a_rerun_from_another_driver_resumes_from_the_shards_in_the_bucket(s3, llama_models, reference, tmp_path, monkeypatch):
    """The driver of an interrupted S3 merge is gone with its staging folder (another node, a new
    pod): a rerun on a driver with an empty staging folder finds the shards the first run
    uploaded (their metadata names the job and sha256), reuses them and publishes the reference
    bytes. Shards of another merge under the prefix are refused before any work, unless
    --overwrite."""
    monkeypatch.setenv(s3mod.STAGING_ENV, str(tmp_path / "driver-a"))
    (tmp_path / "driver-a").mkdir()
    url = f"s3://{OUT_BUCKET}/other-driver/"
    opts = dict(s3_endpoint_url=s3.url, quiet=True, out_shard_size="300KB", in_process=True)
    merge_interrupted_at_config(ties(llama_models), url, opts, monkeypatch)
    shards = [n for n in reference if n.endswith(".safetensors")]
    left = s3.objects(OUT_BUCKET, "other-driver")
    assert set(shards) <= set(left) and "config.json" not in left  # every shard up, not a model
    # Another merge to the same prefix, from a third driver: refused, nothing touched.
    monkeypatch.setenv(s3mod.STAGING_ENV, str(tmp_path / "driver-c"))
    (tmp_path / "driver-c").mkdir()
    other = ties(llama_models)
    other["models"][1]["parameters"]["weight"] = 0.5
    with pytest.raises(raymerge.RaymergeError, match="holds shards of another, interrupted merge.*--overwrite"):
        raymerge.merge(other, url, **opts)
    assert s3.objects(OUT_BUCKET, "other-driver") == left
    # The same merge from driver b: every shard reused, the reference published.
    monkeypatch.setenv(s3mod.STAGING_ENV, str(tmp_path / "driver-b"))
    (tmp_path / "driver-b").mkdir()
    result = raymerge.merge(ties(llama_models), url, **opts)
    assert result.reused_shards == len(shards) > 1, result.summary()
    assert s3.objects(OUT_BUCKET, "other-driver") == reference


def test_publish_interrupted_before_config_resumes_every_shard(s3, llama_models, reference, tmp_path, monkeypatch):
    """Ctrl-C while the index and config.json are being uploaded (every shard already in the
    bucket): the resume manifest is still in the local staging folder (it is never uploaded), so
    the rerun reuses every shard instead of merging again, and publishes the reference bytes."""
    monkeypatch.setenv(s3mod.STAGING_ENV, str(tmp_path / "staging"))
    (tmp_path / "staging").mkdir()
    url = f"s3://{OUT_BUCKET}/publish-cut/"
    opts = dict(s3_endpoint_url=s3.url, quiet=True, out_shard_size="300KB", in_process=True)
    uploaded = merge_interrupted_at_config(ties(llama_models), url, opts, monkeypatch)
    assert not [n for n in uploaded if n.startswith(".raymerge")]  # bookkeeping never reaches the bucket
    assert "config.json" not in s3.objects(OUT_BUCKET, "publish-cut")  # not a model yet
    result = raymerge.merge(ties(llama_models), url, **opts)
    shards = [n for n in reference if n.endswith(".safetensors")]
    assert result.reused_shards == len(shards) > 1, result.summary()
    assert s3.objects(OUT_BUCKET, "publish-cut") == reference
