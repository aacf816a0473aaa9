"""Hub inputs at cluster scale (`checkpoints/hub.py`), against a local HTTP server standing in for the Hub.

`FakeHub` serves just the part of the Hub API that huggingface_hub calls: `model_info`
(`/api/models/{repo}[/revision/{rev}]` -> `{"id", "sha", "siblings"}`), a commit's file list
(`/api/models/{repo}/tree/{rev}`, which `snapshot_download` asks for) and file resolution
(`/{repo}/resolve/{rev}/{file}`: HEAD with `X-Repo-Commit`, `ETag`, `Content-Length`; GET with
`Range`). It counts every request, so the tests can say what was fetched, when and at which
commit:

- planning (`raymerge.plan`, the merge's header checks) reads shard headers with ranged GETs and
  downloads no shard file;
- a merge downloads only the shards holding tensors its operators read (a passthrough of some
  layers leaves the other shards on the server);
- everything is read at the commit the driver pinned, even when `main` moves on the server right
  after the pin;
- the merged bytes equal those of the same merge from a local folder;
- a Hub LoRA adapter (`model+org/adapter`) is pinned the same way.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlsplit

import pytest

import raymerge

REPO = "raymerge-test/tiny-llama"
SHARD_SIZE = "1MB"


@dataclass
class Request:
    method: str
    path: str
    revision: Optional[str]  # as asked for (a branch name or a sha)
    commit: Optional[str]  # the commit it was answered from
    filename: Optional[str]
    range: Optional[str]
    sent: int  # body bytes sent


class FakeHub:
    """A thread serving model repos: {repo: {commit sha: {filename: bytes}}} and branch refs."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, dict[str, bytes]]] = {}
        self.refs: dict[str, dict[str, str]] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.after_model_info = None  # called (repo, revision) after each model_info answer
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_commit(self, repo: str, folder: Path, *, tag: str) -> str:
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        sha = hashlib.sha1(f"{repo}:{tag}".encode()).hexdigest()
        self.commits.setdefault(repo, {})[sha] = files
        return sha

    def set_ref(self, repo: str, ref: str, sha: str) -> None:
        self.refs.setdefault(repo, {})[ref] = sha

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- accounting -------------------------------------------------------------------------------
    def file_requests(self, suffix: str = ".safetensors") -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.filename is not None and r.filename.endswith(suffix)]

    def downloaded(self, suffix: str = ".safetensors") -> set[tuple[str, str]]:
        """(commit, file) of every GET that sent a whole file."""
        out = set()
        for r in self.file_requests(suffix):
            size = len(self.commits[REPO][r.commit][r.filename]) if r.commit else -1
            if r.method == "GET" and r.sent == size:
                out.add((r.commit, r.filename))
        return out

    # -- serving ----------------------------------------------------------------------------------
    def _resolve(self, repo: str, revision: Optional[str]) -> Optional[str]:
        revision = revision or "main"
        if revision in self.commits.get(repo, {}):
            return revision
        return self.refs.get(repo, {}).get(revision)

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        parts = path.strip("/").split("/")
        rng = h.headers.get("Range")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
            # list_repo_tree (what snapshot_download asks first): the commit's files, one page
            repo, revision = "/".join(parts[2:4]), parts[5]
            sha = self._resolve(repo, revision)
            if sha is None:
                return self._send(h, head, 404, b'{"error": "not found"}', {"X-Error-Code": "RevisionNotFound"},
                                  Request(h.command, path, revision, None, None, rng, 0))
            body = json.dumps([{"type": "file", "path": f, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                               for f, data in sorted(self.commits[repo][sha].items())]).encode()
            return self._send(h, head, 200, body, {"Content-Type": "application/json"},
                              Request(h.command, path, revision, sha, None, rng, 0))
        if parts[:2] == ["api", "models"]:
            repo = "/".join(parts[2:4])
            revision = parts[5] if len(parts) >= 6 and parts[4] == "revision" else None
            sha = self._resolve(repo, revision)
            if sha is None:
                return self._send(h, head, 404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"},
                                  Request(h.command, path, revision, None, None, rng, 0))
            body = json.dumps({"id": repo, "modelId": repo, "sha": sha,
                               "siblings": [{"rfilename": f} for f in sorted(self.commits[repo][sha])]}).encode()
            self._send(h, head, 200, body, {"Content-Type": "application/json"},
                       Request(h.command, path, revision, sha, None, rng, 0))
            if self.after_model_info is not None:
                self.after_model_info(repo, revision)
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            sha = self._resolve(repo, revision)
            data = None if sha is None else self.commits[repo][sha].get(filename)
            if data is None:
                return self._send(h, head, 404, b"not found", {"X-Error-Code": "EntryNotFound"},
                                  Request(h.command, path, revision, sha, filename, rng, 0))
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            status = 200
            if rng and not head:
                first, _, last = rng.removeprefix("bytes=").partition("-")
                start = int(first)
                stop = min(int(last) + 1 if last else len(data), len(data))
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
                data, status = data[start:stop], 206
            return self._send(h, head, status, data, headers, Request(h.command, path, revision, sha, filename, rng, 0))
        # Anything else the library asks for (e.g. telemetry) is not a repo request: "-" as revision.
        self._send(h, head, 404, b"not found", {}, Request(h.command, path, "-", None, None, rng, 0))

    def _send(self, h, head: bool, status: int, body: bytes, headers: dict, record: Request) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        # Logged before the body goes out: the client may act on the last byte (and a test read
        # the log) before this thread would get to log it afterwards.
        if not head:
            record.sent = len(body)
        with self.lock:
            self.requests.append(record)
        if not head:
            h.wfile.write(body)


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama saved in ~1 MB shards (one or two layers a shard), and a second version."""
    import torch

    from raymerge.demo import build_tiny_model

    root = tmp_path_factory.mktemp("hub-models")
    big = {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4}
    v1 = build_tiny_model(root / "v1", seed=0, dtype=torch.float32, max_shard_size=SHARD_SIZE, config_overrides=big)
    v2 = build_tiny_model(root / "v2", seed=1, dtype=torch.float32, max_shard_size=SHARD_SIZE, config_overrides=big)
    assert len(list(Path(v1).glob("*.safetensors"))) >= 4
    return {"v1": Path(v1), "v2": Path(v2)}


@pytest.fixture
def hub(hub_models, tmp_path, monkeypatch):
    """A FakeHub serving REPO (main -> v1), this process's huggingface_hub pointed at it, and an
    empty HF cache for the test."""
    from huggingface_hub import constants

    server = FakeHub()
    server.v1 = server.add_commit(REPO, hub_models["v1"], tag="v1")
    server.v2 = server.add_commit(REPO, hub_models["v2"], tag="v2")
    server.set_ref(REPO, "main", server.v1)
    # HF_ENDPOINT is read once at import (constants.ENDPOINT, and the resolve-URL template built
    # from it): point both at the server, as setting HF_ENDPOINT before the import would.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True, raising=False)
    try:
        yield server
    finally:
        server.close()


def _shards_for(folder: Path, layers: range) -> set[str]:
    """The shard files holding the tensors a passthrough of `layers` reads."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    keep = set()
    for name, shard in weight_map.items():
        if ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) not in layers:
            continue
        keep.add(shard)
    return keep


def _passthrough(model: str, first: int, last: int) -> dict:
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": model, "layer_range": [first, last]}]}]}


def _weights(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json"}


def test_plan_reads_headers_only(hub, hub_models):
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": REPO, "parameters": {"weight": 0.5}},
                      {"model": str(hub_models["v2"]), "parameters": {"weight": 0.5}}]}
    report = raymerge.plan(cfg, workers=2)
    assert report.plan is not None
    shards = hub.file_requests()
    assert shards, "shard headers are read over HTTP"
    assert not hub.downloaded(), f"planning downloaded shard files: {hub.downloaded()}"
    for r in shards:  # only ranged GETs (the header) and HEADs: never a whole shard
        assert r.method == "HEAD" or (r.method == "GET" and r.range is not None), r
        assert r.sent < len(hub.commits[REPO][hub.v1][r.filename]) / 4, r
    assert {r.filename for r in shards if r.method == "GET"} == {p.name for p in hub_models["v1"].glob("*.safetensors")}
    assert all(r.commit == hub.v1 for r in hub.requests if r.commit)
    fetched = {r.filename for r in hub.requests if r.method == "GET" and r.filename and r.range is None}
    assert fetched <= {"model.safetensors.index.json", "config.json"}, fetched


def test_cli_plan_of_a_hub_model_imports_no_torch(hub, hub_models, tmp_path):
    """`raymerge plan` of a Hub model, in a fresh interpreter pointed at the fake Hub: headers over
    HTTP, the plan printed, and torch never imported (dtypes are safetensors codes)."""
    import os
    import subprocess
    import sys

    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_passthrough(REPO, 0, 2)))
    script = ("import sys, raymerge.cli; code = raymerge.cli.main(sys.argv[1:]); "
              "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)")
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hf-cache"), HF_HUB_DISABLE_TELEMETRY="1")
    done = subprocess.run([sys.executable, "-c", script, "plan", str(config), "--planner", "lpt"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "predicted makespan" in done.stdout and done.stdout.split()[-2:] == ["NO-TORCH", "0"], done.stdout
    assert not hub.downloaded()  # headers only


def test_bad_shape_fails_before_any_download(hub, hub_models, tmp_path):
    from raymerge.demo import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=3)  # hidden 64: shapes differ from the Hub model
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": REPO, "parameters": {"weight": 0.5}}, {"model": str(other), "parameters": {"weight": 0.5}}]}
    from raymerge.errors import RaymergeError

    with pytest.raises(RaymergeError, match="shape"):
        raymerge.merge(cfg, tmp_path / "out", in_process=True, quiet=True)
    assert not hub.downloaded()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


def test_merge_downloads_only_the_shards_it_reads_at_the_pinned_commit(hub, hub_models, tmp_path):
    # `main` moves to v2 right after the driver pins it: every later read must stay on v1.
    def move_main(repo, revision):
        if revision in (None, "main"):
            hub.set_ref(REPO, "main", hub.v2)

    hub.after_model_info = move_main
    result = raymerge.merge(_passthrough(REPO, 0, 2), tmp_path / "hub-out", in_process=True, quiet=True)
    assert hub.refs[REPO]["main"] == hub.v2  # it did move
    needed = _shards_for(hub_models["v1"], range(0, 2))
    all_shards = {p.name for p in hub_models["v1"].glob("*.safetensors")}
    assert needed < all_shards, "the test needs a config that leaves some shards unread"
    assert hub.downloaded() == {(hub.v1, s) for s in needed}
    # After the one model_info that pinned it, nothing asks for `main` again; every file is v1's.
    asked_main = [r for r in hub.requests if r.revision in (None, "main")]
    assert len(asked_main) == 1 and asked_main[0].path.startswith("/api/models/"), asked_main
    assert all(r.commit == hub.v1 for r in hub.requests if r.commit), [r for r in hub.requests if r.commit != hub.v1]
    # The same bytes as the same merge from the local folder of that commit.
    local = raymerge.merge(_passthrough(str(hub_models["v1"]), 0, 2), tmp_path / "local-out", in_process=True, quiet=True)
    assert _weights(result.output) == _weights(local.output)
    assert _weights(result.output)


def test_hub_source_lists_from_headers_and_fetches_lazily(hub, hub_models):
    import torch
    from safetensors.torch import load_file

    from raymerge.checkpoints import SourceSpec

    spec = SourceSpec(REPO).pinned()
    assert spec.revision == hub.v1 and spec.hub_endpoint == hub.url
    src = spec.open()
    try:
        infos = src.tensors()
        assert not hub.downloaded()
        local = raymerge.checkpoints.open_source(str(hub_models["v1"]))
        assert {n: (i.shape, i.dtype, i.file) for n, i in infos.items()} == \
               {n: (i.shape, i.dtype, i.file) for n, i in local.tensors().items()}
        name = "model.layers.3.mlp.down_proj.weight"
        shard = infos[name].file
        t = src.read(name, rows=(2, 5))
        want = load_file(str(hub_models["v1"] / shard))[name][2:5]
        assert torch.equal(t, want)
        assert hub.downloaded() == {(hub.v1, shard)}
        assert src.read_json("config.json")["hidden_size"] == 128
        local.close()
    finally:
        src.close()


def test_index_naming_a_shard_outside_the_repo_is_refused_before_any_request(hub, hub_models):
    from raymerge.checkpoints import CheckpointError, SourceSpec

    files = hub.commits[REPO][hub.v1]
    index = json.loads(files["model.safetensors.index.json"])
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../../etc/passwd"
    bad = dict(files, **{"model.safetensors.index.json": json.dumps(index).encode()})
    sha = "0" * 39 + "1"
    hub.commits[REPO][sha] = bad
    with pytest.raises(CheckpointError, match="not a file name inside the model folder"):
        SourceSpec(REPO, sha).open()
    assert not [r for r in hub.requests if r.filename and "passwd" in r.filename]


def test_ray_workers_fetch_only_their_shards_at_the_pinned_commit(hub, hub_models, tmp_path, ray_session):
    import shutil

    import ray

    @ray.remote
    def worker_cache() -> str:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE

    # Workers use their own HF cache (this machine's default): the repo folder is removed after.
    repo_cache = Path(ray.get(worker_cache.remote())) / ("models--" + REPO.replace("/", "--"))
    shutil.rmtree(repo_cache, ignore_errors=True)

    def move_main(repo, revision):
        if revision in (None, "main"):
            hub.set_ref(REPO, "main", hub.v2)

    hub.after_model_info = move_main
    try:
        result = raymerge.merge(_passthrough(REPO, 0, 2), tmp_path / "ray-out", workers=2, quiet=True)
        needed = _shards_for(hub_models["v1"], range(0, 2))
        assert needed < {p.name for p in hub_models["v1"].glob("*.safetensors")}
        assert hub.downloaded() == {(hub.v1, s) for s in needed}
        # Both workers share this node's HF cache: each shard crosses the network once.
        whole = [r.filename for r in hub.file_requests() if r.method == "GET" and r.range is None]
        assert sorted(whole) == sorted(needed), whole
        asked_main = [r for r in hub.requests if r.revision in (None, "main")]
        assert len(asked_main) == 1 and asked_main[0].path.startswith("/api/models/"), asked_main
        assert all(r.commit == hub.v1 for r in hub.requests if r.commit)
        cached = {p.name for p in (repo_cache / "snapshots" / hub.v1).glob("*.safetensors")}
        assert cached == needed and not (repo_cache / "snapshots" / hub.v2).exists()
        local = raymerge.merge(_passthrough(str(hub_models["v1"]), 0, 2), tmp_path / "local-out", in_process=True, quiet=True)
        assert _weights(result.output) == _weights(local.output)
    finally:
        shutil.rmtree(repo_cache, ignore_errors=True)


def test_corrupt_shard_header_over_http_names_the_file_and_tensor(hub, hub_models, tmp_path):
    from raymerge.checkpoints import CheckpointError

    files = dict(hub.commits[REPO][hub.v1])
    shard = sorted(f for f in files if f.endswith(".safetensors"))[-1]
    data = bytearray(files[shard])
    n = int.from_bytes(data[:8], "little")
    header = bytes(data[8 : 8 + n])
    assert b'"F32"' in header
    files[shard] = bytes(data[:8]) + header.replace(b'"F32"', b'"F99"', 1) + bytes(data[8 + n :])
    sha = "0" * 39 + "2"
    hub.commits[REPO][sha] = files
    with pytest.raises(CheckpointError, match=rf"{REPO}@{sha}/{shard}: tensor '.+' has unsupported dtype 'F99'"):
        raymerge.merge(_passthrough(f"{REPO}@{sha}", 0, 2), tmp_path / "out", in_process=True, quiet=True)
    assert not hub.downloaded()


ADAPTER_REPO = "raymerge-test/tiny-lora"


def _adapter(folder: Path, model: Path, seed: int) -> Path:
    """A PEFT LoRA adapter (q_proj of every layer, r=2) for the tiny llama in `model`."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((model / "config.json").read_text())
    hidden, g = config["hidden_size"], torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(config["num_hidden_layers"]):
        module = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{module}.lora_A.weight"] = torch.randn(2, hidden, generator=g) * 0.1
        tensors[f"{module}.lora_B.weight"] = torch.randn(hidden, 2, generator=g) * 0.1
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "bias": "none", "task_type": "CAUSAL_LM"}))
    return folder


def test_a_hub_lora_adapter_is_read_at_the_commit_the_driver_pinned(hub, hub_models, tmp_path):
    # The adapter's `main` moves to v2 right after the driver pins it: the workers, which open
    # the adapter again, must still apply v1 (before the fix they downloaded `main`, then v2).
    v1 = _adapter(tmp_path / "adapter-v1", hub_models["v1"], seed=1)
    v2 = _adapter(tmp_path / "adapter-v2", hub_models["v1"], seed=2)
    a1, a2 = hub.add_commit(ADAPTER_REPO, v1, tag="v1"), hub.add_commit(ADAPTER_REPO, v2, tag="v2")
    hub.set_ref(ADAPTER_REPO, "main", a1)

    def move_main(repo, revision):
        if repo == ADAPTER_REPO and revision in (None, "main"):
            hub.set_ref(ADAPTER_REPO, "main", a2)

    hub.after_model_info = move_main
    model = str(hub_models["v1"])
    result = raymerge.merge(_passthrough(f"{model}+{ADAPTER_REPO}", 0, 4), tmp_path / "hub-out",
                            in_process=True, workers=2, quiet=True)
    assert hub.refs[ADAPTER_REPO]["main"] == a2  # it did move
    adapter_requests = [r for r in hub.requests if ADAPTER_REPO in r.path]
    asked_main = [r for r in adapter_requests if r.revision in (None, "main")]
    assert len(asked_main) == 1 and asked_main[0].path.startswith("/api/models/"), asked_main
    assert {r.commit for r in adapter_requests} == {a1}, adapter_requests
    local = raymerge.merge(_passthrough(f"{model}+{v1}", 0, 4), tmp_path / "local-out", in_process=True, quiet=True)
    assert _weights(result.output) == _weights(local.output)
    unadapted = raymerge.merge(_passthrough(model, 0, 4), tmp_path / "plain-out", in_process=True, quiet=True)
    assert _weights(result.output) != _weights(unadapted.output)  # the adapter was applied


def test_a_hub_lora_adapter_that_cannot_be_resolved_is_named(hub, hub_models, tmp_path):
    from raymerge.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match=r"LoRA adapter not found: raymerge-test/no-such-adapter is not a local "
                                              r"directory, and resolving it on the Hugging Face Hub .* failed"):
        raymerge.merge(_passthrough(f"{hub_models['v1']}+raymerge-test/no-such-adapter", 0, 2), tmp_path / "out",
                       in_process=True, quiet=True)
