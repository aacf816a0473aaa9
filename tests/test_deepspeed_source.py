"""DeepSpeed ZeRO checkpoints as merge inputs: listing, exact fp32 reconstruction, dispatch, errors,
and an end-to-end merge equal to the same merge of the consolidated model.

The checkpoints are written by real DeepSpeed training runs of a tiny llama on CPU: 3 ranks over
gloo, in a subprocess (this file run as a script, which imports once and forks the ranks), so that
no process group or DeepSpeed state leaks into the test process. Three data-parallel ranks make
the partitions uneven and padded.
The oracle is DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`, run by rank 0 once
the checkpoints are saved; it writes the consolidated state dict as safetensors, and the same
weights through `save_pretrained` (the "consolidated model").

Checkpoints made (all fp32, AdamW, two steps so that weights differ from init):
- z1: ZeRO-1, the model wrapped once more (names start with `module.`), one parameter group;
- z2: ZeRO-2, `model.norm.weight` frozen, two parameter groups (decay / no decay);
- z3: ZeRO-3, tied embeddings, a layer norm frozen, two parameter groups.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

RANKS = 3
CONFIGS = {
    "z1": dict(stage=1, wrap=True, tied=False, frozen=(), groups=1),
    "z2": dict(stage=2, wrap=False, tied=False, frozen=("model.norm.weight",), groups=2),
    "z3": dict(stage=3, wrap=False, tied=True, frozen=("model.layers.0.input_layernorm.weight",), groups=2),
}
REPO = Path(__file__).resolve().parent.parent


# -- the checkpoint writer (runs in a subprocess) -------------------------------------------------
def _write_checkpoints(out: Path, port: int) -> int:
    """Import once, then fork one process per rank (imports cost more than training here)."""
    import importlib

    import deepspeed  # noqa: F401
    from transformers import AutoModelForCausalLM

    from raymerge.demo import tiny_config

    # transformers imports model classes lazily, and deepspeed.initialize imports torch's
    # compiler: do both before forking, once
    AutoModelForCausalLM.from_config(tiny_config("llama"))
    importlib.import_module("torch._inductor.compile_fx")
    # DeepSpeed JIT-compiles a shared-memory allreduce kernel for CPU (about a minute, cold);
    # plain gloo is enough here.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    pids = []
    for rank in range(RANKS):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(RANKS),
                    LOCAL_RANK=str(rank),
                )
                _rank_main(out, rank)
                code = 0
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in pids)


def _rank_main(out: Path, rank: int) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM

    from raymerge.demo import tiny_config

    deepspeed.init_distributed(dist_backend="gloo")

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.module = inner

        def forward(self, **kwargs):
            return self.module(**kwargs)

    def build(c: dict) -> torch.nn.Module:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=c["tied"]))

    for name, c in CONFIGS.items():
        hf = build(c)
        for pname, p in hf.named_parameters():
            if pname in c["frozen"]:
                p.requires_grad_(False)
        model = Wrapper(hf) if c["wrap"] else hf
        params = [p for p in model.parameters() if p.requires_grad]
        if c["groups"] == 2:
            params = [
                {"params": [p for p in params if p.ndim > 1], "weight_decay": 0.1},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
            ]
        # a torch optimizer: DeepSpeed's own AdamW would JIT-compile fused_adam first
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": c["stage"]},
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-2), config=config)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(2):
            ids = torch.randint(0, 30, (2, 8), generator=gen)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        engine.save_checkpoint(str(out / name))
    deepspeed.comm.barrier()
    if rank != 0:
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    for name, c in CONFIGS.items():
        state = get_fp32_state_dict_from_zero_checkpoint(str(out / name))
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(out / f"{name}.oracle.safetensors"))
        prefix = "module." if c["wrap"] else ""
        hf = build(c)
        hf.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, strict=True)
        hf.save_pretrained(str(out / f"{name}.hf"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_early(config: pytest.Config) -> Optional[tuple[Path, Any]]:
    """Start the checkpoint writer when the session's tests are collected (`conftest`): its ~13 s,
    mostly one core's imports, overlap the tests before this module's; `ckpts` waits for it."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return None
    return _start_writer(config._tmp_path_factory.mktemp("deepspeed"))  # type: ignore[attr-defined]


def _start_writer(out: Path) -> tuple[Path, Any]:
    from conftest import Background

    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
    )
    return out, Background([sys.executable, __file__, str(out), str(_free_port())], out, env=env)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """The folder holding z1, z2, z3 (DeepSpeed), zN.hf (consolidated) and zN.oracle.safetensors."""
    pytest.importorskip("deepspeed")
    from conftest import started_early

    out, writer = started_early(__name__) or _start_writer(tmp_path_factory.mktemp("deepspeed"))
    done = writer.result(timeout=600)
    if done.returncode != 0:
        pytest.fail(f"writing the DeepSpeed checkpoints failed (exit {done.returncode}); log:\n{(done.stdout + done.stderr)[-3000:]}")
    from raymerge.demo import save_tiny_tokenizer

    for name in CONFIGS:
        save_tiny_tokenizer(out / f"{name}.hf")
    return out


def _oracle(ckpts: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(ckpts / f"{name}.oracle.safetensors"))
    return {k.removeprefix("module."): v for k, v in state.items()}


def _open(ckpts: Path, name: str, **kwargs):
    from raymerge.checkpoints.deepspeed import DeepSpeedSource

    kwargs.setdefault("config_from", ckpts / f"{name}.hf")
    return DeepSpeedSource(ckpts / name, allow_pickle=True, **kwargs)


# -- listing and reading --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_lists_the_saved_model_tensors(ckpts, name):
    from conftest import load_state

    src = _open(ckpts, name)
    saved = load_state(ckpts / f"{name}.hf")
    infos = src.tensors()
    assert src.zero_stage == CONFIGS[name]["stage"] and src.world_size == RANKS
    assert {n: i.shape for n, i in infos.items()} == {n: tuple(t.shape) for n, t in saved.items()}
    assert all(i.dtype == torch.float32 and i.nbytes == i.numel * 4 for i in infos.values())
    assert src.bytes_read() == 0  # listing reads no tensor


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reads_equal_zero_to_fp32(ckpts, name):
    src = _open(ckpts, name)
    oracle = _oracle(ckpts, name)
    total = 0
    for n, info in src.tensors().items():
        t = src.read(n)
        assert t.dtype == torch.float32 and tuple(t.shape) == info.shape
        assert torch.equal(t, oracle[n]), n
        total += t.numel() * 4
        if len(info.shape) == 2:
            rows = src.read(n, rows=(1, info.shape[0] - 1))
            assert torch.equal(rows, oracle[n][1:-1]), n
            total += rows.numel() * 4
            assert src.read(n, rows=(3, 3)).shape == (0, info.shape[1])
    assert src.bytes_read() == total
    # writes to a returned tensor stay private
    first = next(iter(src.tensors()))
    src.read(first).zero_()
    assert torch.equal(src.read(first), oracle[first])
    src.close()
    assert torch.equal(src.read(first), oracle[first])  # reopens what it needs after close()


def test_frozen_and_tied_parameters(ckpts):
    z2, z3 = _open(ckpts, "z2"), _open(ckpts, "z3")
    oracle2, oracle3 = _oracle(ckpts, "z2"), _oracle(ckpts, "z3")
    assert torch.equal(z2.read("model.norm.weight"), oracle2["model.norm.weight"])
    frozen = "model.layers.0.input_layernorm.weight"
    assert torch.equal(z3.read(frozen), oracle3[frozen])
    # lm_head is tied to the embeddings: not listed (as save_pretrained), but readable
    assert "lm_head.weight" not in z3.tensors()
    assert torch.equal(z3.read("lm_head.weight"), oracle3["model.embed_tokens.weight"])
    assert torch.equal(z3.read("lm_head.weight", rows=(2, 5)), oracle3["model.embed_tokens.weight"][2:5])
    # norms start at 1: the frozen one stayed there, the trained ones moved
    assert torch.equal(z2.read("model.norm.weight"), torch.ones(64))
    assert not torch.equal(z3.read("model.norm.weight"), torch.ones(64))


def test_bad_reads_name_the_tensor(ckpts):
    from raymerge.checkpoints import CheckpointError

    src = _open(ckpts, "z2")
    with pytest.raises(CheckpointError, match="no tensor 'model.nope'"):
        src.read("model.nope")
    with pytest.raises(CheckpointError, match="bad row range"):
        src.read("model.embed_tokens.weight", rows=(5, 1000))


# -- layouts, side files and dispatch -----------------------------------------------------------
def test_open_source_layouts(ckpts, tmp_path):
    from raymerge.checkpoints import SourceSpec, open_source
    from raymerge.checkpoints.deepspeed import DeepSpeedSource
    from raymerge.checkpoints.local import LocalSource

    hf = ckpts / "z2.hf"
    oracle = _oracle(ckpts, "z2")
    name = "model.layers.2.self_attn.o_proj.weight"
    # the checkpoint folder, and its tag folder directly
    for path in (ckpts / "z2", ckpts / "z2" / "global_step2"):
        src = open_source(str(path), allow_pickle=True, config_from=str(hf))
        assert isinstance(src, DeepSpeedSource) and torch.equal(src.read(name), oracle[name])
        assert src.config()["model_type"] == "llama" and src.read_bytes("tokenizer.json") == (hf / "tokenizer.json").read_bytes()
    # the spec workers get is picklable and reopens the same source
    spec = pickle.loads(pickle.dumps(SourceSpec(str(ckpts / "z2"), allow_pickle=True, config_from=str(hf))))
    assert torch.equal(spec.open().read(name), oracle[name])

    # Hugging Face Trainer layout: checkpoint-N/ holds config.json and tokenizer files itself
    trainer = tmp_path / "checkpoint-2"
    shutil.copytree(ckpts / "z2", trainer)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf / f, trainer / f)
    for path in (trainer, trainer / "global_step2"):  # a tag folder finds them next to `latest`
        src = open_source(str(path), allow_pickle=True)
        assert isinstance(src, DeepSpeedSource) and src.read_json("tokenizer_config.json") is not None
        assert src.read_bytes("special_tokens_map.json") is None
    # with Hugging Face weights next to it (Trainer with a gathered 16-bit model), those are used
    shutil.copy(hf / "model.safetensors", trainer / "model.safetensors")
    assert isinstance(open_source(str(trainer)), LocalSource)
    assert isinstance(open_source(str(trainer / "global_step2"), allow_pickle=True), DeepSpeedSource)


def test_config_from_in_yaml(tmp_path):
    from raymerge.config import ModelRef, load_config

    cfg, _ = load_config({
        "merge_method": "linear",
        "models": [
            {"model": {"path": "./ds_ckpt", "config_from": "./hf_base"}, "parameters": {"weight": 0.5}},
            {"model": "./other", "parameters": {"weight": 0.5}},
        ],
    })
    assert cfg.models[0].model == ModelRef(path="./ds_ckpt", config_from="./hf_base")
    assert cfg.models[1].model.config_from is None
    saved = tmp_path / "merge.yml"
    saved.write_text(cfg.to_yaml())
    assert load_config(str(saved))[0].models[0].model == cfg.models[0].model


# -- refusals -------------------------------------------------------------------------------------
def test_refusals(ckpts, tmp_path):
    from raymerge.checkpoints import CheckpointError, open_source

    ds = str(ckpts / "z2")
    with pytest.raises(CheckpointError, match="allow-pickle"):
        open_source(ds, config_from=str(ckpts / "z2.hf"))
    with pytest.raises(CheckpointError, match="config_from:"):
        open_source(ds, allow_pickle=True)
    with pytest.raises(CheckpointError, match="holds no config.json"):
        open_source(ds, allow_pickle=True, config_from=str(tmp_path))
    with pytest.raises(CheckpointError, match="applies only to DeepSpeed"):
        open_source(str(ckpts / "z1.hf"), config_from=str(ckpts / "z2.hf"))

    # `latest` naming a tag that is not there
    broken = tmp_path / "broken"
    shutil.copytree(ckpts / "z2", broken)
    (broken / "latest").write_text("global_step9")
    with pytest.raises(CheckpointError, match="names tag 'global_step9'.*does not exist"):
        open_source(str(broken), allow_pickle=True, config_from=str(ckpts / "z2.hf"))

    # a rank's optimizer states missing
    partial = tmp_path / "partial"
    shutil.copytree(ckpts / "z3", partial)
    (partial / "global_step2" / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    (partial / "global_step2" / "zero_pp_rank_2_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="partitioned over 3 ranks but 2"):
        open_source(str(partial), allow_pickle=True, config_from=str(ckpts / "z3.hf"))


class _Payload:
    """Unpickling this would run a command (it must not)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def test_pickled_code_never_runs(ckpts, tmp_path):
    from raymerge.checkpoints import CheckpointError, open_source

    evil = tmp_path / "evil"
    shutil.copytree(ckpts / "z2", evil)
    marker = tmp_path / "ran"
    torch.save({"param_shapes": _Payload(marker)}, evil / "global_step2" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="no param_shapes"):
        open_source(str(evil), allow_pickle=True, config_from=str(ckpts / "z2.hf"))
    assert not marker.exists()


def test_two_threads_loading_pickles_at_once_both_see_every_global(ckpts, monkeypatch):
    """In-process merge workers are threads of one process, and torch's safe-globals list is
    process-wide: while one thread loads inside its safe_globals context, another thread's
    `get_unsafe_globals_in_checkpoint` leaves out the globals the first one allowed, and its own
    load then fails once that context is gone. Listing and loading happen under one lock."""
    import threading
    import time

    from raymerge.checkpoints import deepspeed as ds

    path = next((ckpts / "z3" / "global_step2").glob("*optim_states.pt"))
    inside, release = threading.Event(), threading.Event()
    real_load = torch.load
    calls = []

    def first_load_waits(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            inside.set()
            release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", first_load_waits)
    errors: list = []

    def load() -> None:
        try:
            ds.load_pickle(path)
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            errors.append(err)

    first = threading.Thread(target=load)
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=load)
    second.start()
    time.sleep(0.3)  # the second thread lists the globals now, unless it waits for the first
    release.set()
    first.join(60)
    second.join(60)
    assert errors == [] and len(calls) == 2


# -- end to end -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["z2", "z3"])
def test_merge_equals_merge_of_consolidated_model(ray_session, ckpts, tmp_path, name):
    import raymerge
    from conftest import load_state
    from raymerge.demo import build_tiny_model

    hf = ckpts / f"{name}.hf"
    other = build_tiny_model(tmp_path / "other", seed=7, base=hf)  # same architecture (and tying)

    def config(model) -> dict:
        return {
            "merge_method": "linear",
            "models": [
                {"model": model, "parameters": {"weight": 0.7}},
                {"model": str(other), "parameters": {"weight": 0.3}},
            ],
            "dtype": "float32",
        }

    # The plan is not what is tested here. z2 merges on Ray worker actors (the source spec travels
    # to them), z3 in process (no Ray): the numbers are the same either way.
    fast = dict(quiet=True, planner="lpt", in_process=name == "z3")
    from_ds = raymerge.merge(
        config({"path": str(ckpts / name), "config_from": str(hf)}), tmp_path / "from_ds", allow_pickle=True,
        keep_workers=True, **fast,
    )
    from_hf = raymerge.merge(config(str(hf)), tmp_path / "from_hf", keep_workers=False, **fast)
    got, want = load_state(from_ds.output), load_state(from_hf.output)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert from_ds.bytes_read > 0
    for f in ("config.json", "tokenizer.json"):
        assert (from_ds.output / f).read_bytes() == (from_hf.output / f).read_bytes()


if __name__ == "__main__":
    sys.exit(_write_checkpoints(Path(sys.argv[1]), int(sys.argv[2])))
