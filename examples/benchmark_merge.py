"""Benchmark: raymerge vs mergekit 0.1.5, whole commands, on a synthetic ~250M-parameter bf16 llama and three fine-tunes.

    python examples/benchmark_merge.py [--workdir DIR] [--params 250M] [--methods ties,linear]
                                       [--workers N] [--repeat N] [--skip-mergekit]

What it does:

1. Builds (once; cached under --workdir, default ~/.cache/raymerge/bench) a llama-shaped base
   model and three fine-tunes in bfloat16: config.json, sharded safetensors written directly
   (no transformers model is instantiated) and a tiny tokenizer. Tensors are generated shard by
   shard from per-tensor seeds, so at most one shard of each model is in memory at a time.
   Fine-tune = base + 0.5 * shared perturbation + own perturbation (about 10% of the weight's
   scale), so TIES' sign election has real work to do.
2. For each method (TIES: density 0.5, normalize; linear: weights 0.5/0.3/0.2; both with
   ``dtype: bfloat16``) runs each tool's whole command as a user types it, in its own
   subprocess, on a warm page cache (every input file is read once just before each run):
   ``raymerge merge CONFIG OUT --overwrite --quiet`` (local Ray of its own, started and stopped
   by the command) and ``mergekit-yaml CONFIG OUT ...`` (its low-memory CPU settings, below).
3. Measures, in the same run, how fast this machine reads the same input files from the page
   cache (one reader, best of 2, the faster of 64 MiB reads into a reused buffer and a memory
   map whose every byte is summed, as raymerge reads through maps): the reference the merge
   phase's input rate is compared with.
   After each timed raymerge run, also how fast it writes the merge's output size into a new
   file (64 MiB writes, no fsync, best of 2): the merge writes its output into new page-cache
   pages, and on a VM those can cost far more than reused ones. Reading at the page-cache rate
   plus writing at that rate is printed as the phase's floor on one reader and writer.
4. Prints a table and the figures against the targets (on a 2-core machine: TIES >= 5x, linear
   >= 1.5x faster than mergekit, whole command; an elementwise merge phase reading its inputs at
   >= 50% of the page-cache rate; predicted makespan within 15% of the measured one).

What is measured:

* ``whole s``: the whole command, from spawn to exit (interpreter start, imports, raymerge's Ray
  start and shutdown, writing with fsync). Best of ``--repeat`` (default 2) unwatched runs.
* raymerge's phases, from ``raymerge merge --result-json``: plan (config, headers, operators),
  Ray start, workers (start, calibration, I/O probe, planning), merge, publish; "outside" is
  the rest of the whole command (interpreter, imports, Ray shutdown, exit).
* ``merge GB/s``: input bytes read by the workers / the merge phase; next to it the page-cache
  rate of step 3 and their ratio.
* ``predicted / measured makespan``: the planner's makespan for the plan it chose (calibrated on
  the workers: compute, read, write and per-part costs) and the merge phase's execution as run.
* Memory comes from one more run per tool and method with the poller below on (polling many
  processes every 50 ms takes CPU), never from a timed run.
* ``peak RSS``: the largest *simultaneous* sum of RSS over the tool's merge processes, polled
  every 50 ms with psutil: mergekit's single process; raymerge's driver plus its Ray worker
  processes (``ray::*`` workers, idle ones included). Ray's own daemons (gcs_server, raylet,
  dashboard/runtime-env agents, log monitor) are not merge processes; their RSS is printed
  separately (``Ray daemons``). RSS counts shared pages (the torch libraries each Python process
  maps) once per process, so ``peak PSS`` (proportional set size, polled every 0.5 s) is printed
  as well.
* mergekit runs as ``mergekit-yaml CONFIG OUT --random-seed 0 --device cpu --no-cuda --quiet
  --lazy-unpickle`` (its low-memory CPU settings), torch using all cores. Add flags with
  --mergekit-args (e.g. ``--async-write`` for speed at higher memory).
* raymerge runs with one worker per CPU (``--workers`` to change).

mergekit comes from tests/mergekit_oracle.py's venv (built on first use, ~40 s, needs a package
index), or from --mergekit-python, or is skipped (--skip-mergekit, RAYMERGE_NO_MERGEKIT=1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

GEN_VERSION = 1
SHARD_BYTES = 200 * 1024 * 1024
TARGETS = {"ties": 5.0, "linear": 1.5}  # minimum speedup over mergekit, on 2 cores
MERGEKIT_FLAGS = ["--lazy-unpickle"]
RAY_DAEMONS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
REPO = Path(__file__).resolve().parent.parent


# -- sizes -------------------------------------------------------------------------------------
def parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMBG" else text) * scale)


def human(n: float, unit: str = "B") -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}"


def model_shape(target: int) -> dict[str, int]:
    """A llama shape (head dim 64, GQA 2:1, MLP 2.75x) with about `target` parameters."""
    vocab = 32000 if target >= 100_000_000 else 8192
    hidden = int(min(8192, max(256, 256 * round(4 * math.sqrt(target / 250e6)))))
    heads = hidden // 64
    kv_heads = max(1, heads // 2)
    inter = 256 * max(1, round(2.75 * hidden / 256))
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * 64 + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((target - 2 * vocab * hidden - hidden) / per_layer))
    return dict(hidden=hidden, inter=inter, heads=heads, kv_heads=kv_heads, layers=layers, vocab=vocab)


def tensor_shapes(s: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model, in the order Hugging Face saves a llama."""
    h, kv = s["hidden"], s["kv_heads"] * 64
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s["vocab"], h))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (s["inter"], h)),
            (p + "mlp.up_proj.weight", (s["inter"], h)),
            (p + "mlp.down_proj.weight", (h, s["inter"])),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    return out


def llama_config(s: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": 64,
        "vocab_size": s["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


# -- synthetic models ------------------------------------------------------------------------
MODELS = ("base", "ft1", "ft2", "ft3")


def _generator(name: str, role: str):
    import torch

    seed = int.from_bytes(hashlib.sha256(f"{GEN_VERSION}:{role}:{name}".encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(seed)


def _tensors_for(name: str, shape: tuple[int, ...]) -> dict[str, Any]:
    """This tensor in all four models (bf16): base, and base + shared/2 + own perturbation."""
    import torch

    if len(shape) == 1:  # norms: around 1
        base = 1.0 + 0.05 * torch.randn(shape, generator=_generator(name, "base"))
        scale = 0.01
    else:
        base = torch.randn(shape, generator=_generator(name, "base")).mul_(0.02)
        scale = 0.002
    out = {"base": base.to(torch.bfloat16)}
    shared = torch.randn(shape, generator=_generator(name, "shared")).mul_(0.5 * scale)
    for ft in MODELS[1:]:
        delta = torch.randn(shape, generator=_generator(name, ft)).mul_(scale).add_(shared)
        out[ft] = delta.add_(base).to(torch.bfloat16)
        del delta
    return out


def build_models(workdir: Path, params: int) -> tuple[dict[str, Path], dict[str, int]]:
    """Build (or reuse) the four models; returns their folders and the shape."""
    from safetensors.torch import save_file

    from raymerge.demo import save_tiny_tokenizer

    shape = model_shape(params)
    tag = f"llama-{params / 1e6:.0f}M-bf16-v{GEN_VERSION}"
    root = workdir / "models" / tag
    paths = {m: root / m for m in MODELS}
    if (root / ".complete").exists():
        return paths, shape
    if root.exists():
        shutil.rmtree(root)
    tensors = tensor_shapes(shape)
    n_params = sum(math.prod(s) for _, s in tensors)
    print(f"building 4 synthetic bf16 models of {n_params / 1e6:.1f}M parameters under {root} ...", flush=True)
    t0 = time.perf_counter()
    # group tensors into shards of about SHARD_BYTES (bf16)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in tensors:
        nbytes = 2 * math.prod(s)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, s))
        size += nbytes
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        buffers: dict[str, dict[str, Any]] = {m: {} for m in MODELS}
        for name, s in shard:
            for m, t in _tensors_for(name, s).items():
                buffers[m][name] = t
            weight_map[name] = fname
        for m in MODELS:
            save_file(buffers[m], str(paths[m] / fname), metadata={"format": "pt"})
        del buffers
    index = {"metadata": {"total_size": 2 * n_params}, "weight_map": weight_map}
    for m, p in paths.items():
        (p / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (p / "config.json").write_text(json.dumps(llama_config(shape), indent=2))
        save_tiny_tokenizer(p)
    (root / ".complete").write_text(json.dumps({"params": n_params, **shape}))
    print(f"  built in {time.perf_counter() - t0:.1f} s ({len(shards)} shards per model)", flush=True)
    return paths, shape


def merge_configs(paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    base = str(paths["base"])
    fts = [str(paths[m]) for m in MODELS[1:]]
    return {
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": w, "density": 0.5}} for m, w in zip(fts, (1.0, 0.8, 0.6))],
            "parameters": {"normalize": True},
            "dtype": "bfloat16",
        },
        "linear": {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(fts, (0.5, 0.3, 0.2))],
            "dtype": "bfloat16",
        },
    }


def input_files(config: dict[str, Any]) -> list[Path]:
    models = {config["base_model"]} if config.get("base_model") else set()
    models |= {m["model"] for m in config["models"]}
    return sorted(f for m in models for f in Path(m).glob("*.safetensors"))


def warm_page_cache(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


# -- process-tree memory monitor -------------------------------------------------------------
def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMonitor(threading.Thread):
    """Polls the RSS (every `interval` s) and PSS (every `pss_interval` s) of a process tree.

    Processes are split into the merge processes (the root, and Ray worker processes: names
    starting with ``ray::`` other than Ray's agents) and everything else (Ray's daemons).
    """

    def __init__(self, pid: int, interval: float = 0.05, pss_interval: float = 0.5):
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.interval, self.pss_interval = interval, pss_interval
        self.peak_rss = self.peak_pss = self.peak_daemons = 0
        self._halt = threading.Event()

    def _procs(self):
        import psutil

        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return [], []
        merge, daemons = [], []
        for p in procs:
            try:
                name = p.name()
            except psutil.Error:
                continue
            is_worker = name.startswith("ray::") and name not in RAY_DAEMONS
            (merge if p.pid == self.root.pid or is_worker else daemons).append(p)
        return merge, daemons

    @staticmethod
    def _rss(procs) -> int:
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except Exception:  # noqa: BLE001 - exited meanwhile
                pass
        return total

    def run(self) -> None:
        last_pss = 0.0
        while not self._halt.is_set():
            merge, daemons = self._procs()
            rss, rss_d = self._rss(merge), self._rss(daemons)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_daemons = max(self.peak_daemons, rss_d)
            now = time.monotonic()
            if now - last_pss >= self.pss_interval:
                last_pss = now
                pss = sum(_pss(p.pid) for p in merge)
                self.peak_pss = max(self.peak_pss, pss)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- running one tool in a subprocess --------------------------------------------------------
# mergekit-yaml's own command in a python that also writes how long its merge took after its
# imports (`merge_s`, printed next to the whole command).
MERGEKIT_DRIVER = r"""
import json, sys, time
from mergekit.scripts.run_yaml import main
t0 = time.perf_counter()
main.main(args=json.loads(sys.argv[1]), standalone_mode=False)
with open(sys.argv[2], "w") as f:
    json.dump({"merge_s": time.perf_counter() - t0}, f)
"""


def raymerge_command(config_path: Path, out: Path, workers: Optional[int], on_ray: bool = False) -> list[str]:
    """`raymerge merge ...` as a user runs it (the console script next to this interpreter);
    `on_ray`: with `--address local` (a local Ray of its own, one worker actor per CPU)."""
    script = Path(sys.executable).with_name("raymerge")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "raymerge.cli"]
    cmd = base + ["merge", str(config_path), str(out), "--overwrite", "--quiet", "--result-json", "{RESULT}"]
    return cmd + (["--workers", str(workers)] if workers else []) + (["--address", "local"] if on_ray else [])


def run_tool(tool: str, cmd: list[str], env: dict[str, str], monitor_memory: bool) -> dict[str, Any]:
    """One whole command of a tool, timed from spawn to exit. Memory is polled only when
    `monitor_memory`: the poller costs CPU (more for raymerge's many processes), so timed runs
    go unwatched."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [c.replace("{RESULT}", str(result_path)) for c in cmd]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp)
        monitor = TreeMonitor(proc.pid)
        if monitor_memory:
            monitor.start()
        output = proc.communicate()[0]
        total = time.perf_counter() - start
        if monitor_memory:
            monitor.stop()
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(f"{tool} failed ({proc.returncode}):\n{output[-4000:]}")
        data = json.loads(result_path.read_text())
    data.update(
        whole_s=total,
        peak_rss=monitor.peak_rss,
        peak_pss=monitor.peak_pss,
        peak_daemons=monitor.peak_daemons,
        monitored=monitor_memory,
    )
    return data


def page_cache_rate(files: list[Path], tries: int = 2) -> float:
    """Bytes/s reading `files` (already in the page cache) with one reader, the faster of two
    ways (best of `tries` each): `read_rate` (64 MiB `read`s into a reused buffer) and
    `mapped_rate` (every byte of a memory map, as raymerge reads, summed). The faster way is the
    honest reference: on this VM a copy into a buffer can run at a fifth of a mapped read."""
    return max(read_rate(files, tries), mapped_rate(files, tries))


def read_rate(files: list[Path], tries: int = 2) -> float:
    """Bytes/s of a plain sequential read: 64 MiB at a time into a reused buffer (best of `tries`)."""
    buf = bytearray(64 << 20)
    best = 0.0
    for _ in range(tries):
        start, size = time.perf_counter(), 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    size += n
        best = max(best, size / (time.perf_counter() - start))
    return best


def mapped_rate(files: list[Path], tries: int = 2) -> float:
    """Bytes/s reading every byte of `files` through a read-only memory map: summed as 64-bit
    integers by torch on one thread, 64 MiB at a time (best of `tries`)."""
    import mmap

    import torch

    from raymerge.methods.reductions import fixed_threads

    best = 0.0
    with fixed_threads(1):
        for _ in range(tries):
            start, size = time.perf_counter(), 0
            for f in files:
                with open(f, "rb") as fh:
                    length = os.fstat(fh.fileno()).st_size // 8 * 8
                    if not length:
                        continue
                    with mmap.mmap(fh.fileno(), length, access=mmap.ACCESS_READ) as mapped:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: never written
                            words = torch.frombuffer(mapped, dtype=torch.int64)
                        for chunk in words.split(8 << 20):
                            chunk.sum()
                        del words, chunk
                    size += length
            best = max(best, size / (time.perf_counter() - start))
    return best


def method_compute_rate(config: dict, elements: int = 32 << 20, tries: int = 3) -> float:
    """Bytes/s of bf16 input that `config`'s method (with its models' parameters) turns into
    output on one thread, on in-memory tensors of `elements` each: its arithmetic alone, no
    page faults, no writes (best of `tries`)."""
    import torch

    from raymerge.methods import get_method
    from raymerge.methods.reductions import fixed_threads

    spec = get_method(config["merge_method"])
    models = config["models"]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(elements, generator=g).to(torch.bfloat16) for _ in models]
    model_params, params = spec.resolve([dict(m.get("parameters") or {}) for m in models],
                                        dict(config.get("parameters") or {}), None)
    best = math.inf
    with fixed_threads(1):
        for _ in range(tries):
            start = time.perf_counter()
            spec.fn(inputs, base_index=None, model_params=model_params, params=params, generator=None)
            best = min(best, time.perf_counter() - start)
    return sum(t.numel() * t.element_size() for t in inputs) / best


def new_file_write_rate(folder: Path, size: int, tries: int = 2) -> float:
    """Bytes/s writing `size` bytes into a new file in `folder` (64 MiB writes from a reused
    buffer, no fsync, the file deleted afterwards; best of `tries`): what the machine gives the
    merge's own output, which lands in new page-cache pages. On a VM, pages the guest has not
    used lately can cost several times more than pages it reuses."""
    buf = memoryview(bytearray(64 << 20))
    best = 0.0
    for k in range(tries):
        path = folder / f".write-probe-{k}"
        start, done = time.perf_counter(), 0
        with open(path, "wb", buffering=0) as fh:
            while done < size:
                done += fh.write(buf[: min(len(buf), size - done)])
        best = max(best, size / (time.perf_counter() - start))
        path.unlink()
    return best


def find_mergekit(explicit: Optional[str]) -> tuple[Optional[str], str]:
    """The python of an environment with mergekit 0.1.5, or None and why not."""
    if explicit:
        return explicit, f"--mergekit-python {explicit}"
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import mergekit_oracle
    except ImportError:
        mergekit_oracle = None
    if mergekit_oracle is not None:
        print("locating mergekit 0.1.5 (tests/mergekit_oracle.py builds its venv on first use) ...", flush=True)
        python = mergekit_oracle.mergekit_python()
        if python is not None:
            return str(python), f"venv {mergekit_oracle.venv_path()}"
        return None, mergekit_oracle.mergekit_unavailable_reason() or "unavailable"
    try:
        import importlib.metadata

        if importlib.metadata.version("mergekit") == "0.1.5":
            return sys.executable, "this interpreter"
    except importlib.metadata.PackageNotFoundError:
        pass
    return None, "mergekit 0.1.5 not installed"


def mergekit_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return env


# -- comparing outputs -----------------------------------------------------------------------
def compare_outputs(a: Path, b: Path) -> str:
    """Max abs difference and share of differing elements between two merged checkpoints."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                out.update({k: f for k in st.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return f"tensor names differ ({len(set(ia) ^ set(ib))} not in both)"
    worst, differing, total = 0.0, 0, 0
    for name in sorted(ia):
        with safe_open(str(ia[name]), "pt") as sa, safe_open(str(ib[name]), "pt") as sb:
            x, y = sa.get_tensor(name), sb.get_tensor(name)
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        d = (x.to(torch.float32) - y.to(torch.float32)).abs()
        worst = max(worst, float(d.max()))
        differing += int((d > 0).sum())
        total += d.numel()
    return f"max abs diff {worst:.3g}, {100 * differing / total:.3f}% of elements differ"


# -- main ------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "raymerge" / "bench")
    ap.add_argument("--params", default="250M", help="model size, e.g. 250M (default), 50M, 1B")
    ap.add_argument("--methods", default="ties,linear", help="comma-separated: ties, linear")
    ap.add_argument("--workers", type=int, default=None, help="raymerge workers (default: one per CPU)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs per tool and method (best is reported; default 2); "
                    "one more run per tool and method measures memory")
    ap.add_argument("--skip-mergekit", action="store_true", help="only run raymerge")
    ap.add_argument("--mergekit-python", default=None, help="python of an environment with mergekit 0.1.5")
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml flags, e.g. '--async-write'")
    ap.add_argument("--no-check", action="store_true", help="do not compare the two tools' outputs")
    ap.add_argument("--no-memory", action="store_true", help="skip the polled memory runs")
    ap.add_argument("--no-ray", action="store_true",
                    help="do not also time `raymerge merge --address local` (the merge on a local Ray of its own)")
    args = ap.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(TARGETS)
    if unknown:
        ap.error(f"unknown method(s) {sorted(unknown)}; choose from {sorted(TARGETS)}")
    workdir = args.workdir.expanduser()
    paths, shape = build_models(workdir, parse_count(args.params))
    configs = merge_configs(paths)
    n_params = sum(math.prod(s) for _, s in tensor_shapes(shape))

    mk_python, mk_where = (None, "--skip-mergekit") if args.skip_mergekit else find_mergekit(args.mergekit_python)
    if mk_python is None and not args.skip_mergekit:
        print(f"mergekit skipped: {mk_where}")
    mk_flags = MERGEKIT_FLAGS + args.mergekit_args.split()
    mk_base = ["--random-seed", "0", "--device", "cpu", "--no-cuda", "--quiet"]

    out_root = workdir / "out"
    cfg_root = workdir / "configs"
    cfg_root.mkdir(parents=True, exist_ok=True)
    import yaml

    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    checks: dict[str, str] = {}
    cache_rates: dict[str, float] = {}
    write_rates: dict[str, float] = {}
    env_rm = dict(os.environ)
    print(f"{os.cpu_count()} CPUs; model {n_params / 1e6:.1f}M parameters, {shape['layers']} layers, bf16; "
          f"raymerge workers: {args.workers or 'one per CPU'}; mergekit: {mk_where}")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before starting: other processes will distort the timings")
    # `--repeat` timed runs, then one more run per tool and method that polls memory.
    for rep in range(args.repeat + (0 if args.no_memory else 1)):
        memory_run = rep == args.repeat
        for method in methods:
            config_path = cfg_root / f"{method}.yaml"
            config_path.write_text(yaml.safe_dump(configs[method], sort_keys=False))
            files = input_files(configs[method])
            tools = (["mergekit"] if mk_python else []) + ["raymerge"] + ([] if args.no_ray else ["raymerge-ray"])
            for tool in tools:
                out = out_root / f"{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # no writeback of an earlier run's output during this one
                warm_page_cache(files)
                if tool == "raymerge" and not memory_run:
                    cache_rates[method] = max(cache_rates.get(method, 0.0), page_cache_rate(files))
                if tool == "mergekit":
                    cmd = [mk_python, "-c", MERGEKIT_DRIVER,
                           json.dumps([str(config_path), str(out), *mk_base, *mk_flags]), "{RESULT}"]
                    data = run_tool(tool, cmd, mergekit_env(), memory_run)
                else:
                    cmd = raymerge_command(config_path, out, args.workers, on_ray=tool == "raymerge-ray")
                    data = run_tool(tool, cmd, env_rm, memory_run)
                data["input_bytes"] = sum(f.stat().st_size for f in files)
                if tool == "raymerge" and not memory_run and data.get("bytes_written"):
                    # after the run, not before it (the probe frees its pages again, which can make
                    # the next runs' writes cheaper, as deleting each earlier output does)
                    write_rates[method] = max(write_rates.get(method, 0.0),
                                              new_file_write_rate(out_root, data["bytes_written"]))
                rows.setdefault((tool, method), []).append(data)
                what = "memory run" if memory_run else f"{rep + 1}/{args.repeat}"
                memory = f", peak RSS {human(data['peak_rss'])}" if memory_run else ""
                print(f"  [{what}] {tool:8s} {method:6s} whole command {data['whole_s']:.2f} s{memory}", flush=True)
            if rep == 0 and mk_python and not args.no_check:
                checks[method] = compare_outputs(out_root / f"raymerge-{method}", out_root / f"mergekit-{method}")
    report(rows, methods, checks, cache_rates, write_rates, mk_flags, mk_base)
    for method in methods:
        if method in ELEMENTWISE:
            rate = method_compute_rate(configs[method])
            print(f"{method}: the method alone, one thread, in-memory bf16 inputs: {rate / 1e9:.2f} GB/s of input "
                  f"(x {os.cpu_count()} cores: the most a merge phase can read at without faster arithmetic)")
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    shutil.rmtree(out_root, ignore_errors=True)
    return 0


ELEMENTWISE = ("linear",)  # methods whose merge phase is held to the page-cache read rate


def report(rows, methods, checks: dict[str, str], cache_rates: dict[str, float], write_rates: dict[str, float], mk_flags: list[str], mk_base: list[str]) -> None:
    def best(tool: str, method: str) -> Optional[dict[str, Any]]:
        runs = rows.get((tool, method))
        if not runs:
            return None
        timed = [r for r in runs if not r["monitored"]] or runs
        out = dict(min(timed, key=lambda r: r["whole_s"]))
        watched = [r for r in runs if r["monitored"]]
        for key in ("peak_rss", "peak_pss", "peak_daemons"):
            out[key] = max((r[key] for r in watched), default=0)
        return out

    print()
    header = f"{'tool':12s} {'method':7s} {'whole s':>8s} {'peak RSS':>10s} {'peak PSS':>10s} {'Ray daemons':>11s}"
    print(header)
    print("-" * len(header))
    lines = []
    for method in methods:
        res = {tool: best(tool, method) for tool in ("mergekit", "raymerge", "raymerge-ray")}
        for tool, r in res.items():
            if r is None:
                continue
            daemons = human(r["peak_daemons"]) if tool == "raymerge-ray" and r["peak_daemons"] else "-"
            print(f"{tool:12s} {method:7s} {r['whole_s']:8.2f} {human(r['peak_rss']) if r['peak_rss'] else '-':>10s} "
                  f"{human(r['peak_pss']) if r['peak_pss'] else '-':>10s} {daemons:>11s}")
        mk = res["mergekit"]
        for tool in ("raymerge", "raymerge-ray"):
            rm = res[tool]
            if rm is None:
                continue
            name = "raymerge" if tool == "raymerge" else "raymerge --address local"
            t = rm["timings"]
            outside = rm["whole_s"] - rm["seconds"]
            lines.append(
                f"{name} {method}: whole {rm['whole_s']:.2f} s = outside merge() {outside:.2f} s (interpreter, imports, Ray "
                f"shutdown, exit) + plan {t['plan']:.2f} + Ray start {t['ray']:.2f} + workers {t['workers']:.2f} + "
                f"merge {t['merge']:.2f} + publish {t['publish']:.2f} s; {rm['workers']} workers"
            )
            rate = rm["bytes_read"] / t["merge"] if t["merge"] > 0 else 0.0
            cache = cache_rates.get(method, 0.0)
            ratio = rate / cache if cache else 0.0
            goal = (f" (target >= 50% for an elementwise method: {'MET' if ratio >= 0.5 else 'MISSED'})"
                    if method in ELEMENTWISE else "")
            lines.append(f"{name} {method}: merge phase read {human(rm['bytes_read'])} at {rate / 1e9:.2f} GB/s; the page "
                         f"cache gives one reader {cache / 1e9:.2f} GB/s (the faster of read() and a memory map): {ratio:.0%}{goal}")
            write = write_rates.get(method, 0.0)
            if tool == "raymerge" and write and cache:
                floor = rm["bytes_read"] / cache + rm["bytes_written"] / write
                lines.append(f"{name} {method}: the phase also writes {human(rm['bytes_written'])} into new files, which "
                             f"this machine writes at {write / 1e9:.2f} GB/s (measured after the run): reading at the "
                             f"page-cache rate and writing at that rate, one after the other, take {floor:.2f} s; "
                             f"the phase took {t['merge']:.2f} s ({t['merge'] / floor:.2f}x that)")
            plan = rm.get("plan")
            if plan:
                err = plan["measured_makespan"] / plan["predicted_makespan"] - 1 if plan["predicted_makespan"] > 0 else math.inf
                lines.append(f"{name} {method}: makespan predicted {plan['predicted_makespan']:.2f} s, measured "
                             f"{plan['measured_makespan']:.2f} s ({err:+.0%}; target within 15%: "
                             f"{'MET' if abs(err) <= 0.15 else 'MISSED'}); {plan['summary']}")
            if mk is not None:
                speed = mk["whole_s"] / rm["whole_s"]
                target = TARGETS[method]
                lines.append(f"{method}: whole command {name} {rm['whole_s']:.2f} s vs mergekit {mk['whole_s']:.2f} s: "
                             f"{speed:.2f}x (target >= {target}x: {'MET' if speed >= target else 'MISSED'})")
        rm = res["raymerge"]
        if rm is not None and mk is not None:
            lines.append(f"{method}: mergekit's merge alone (after its imports) {mk['merge_s']:.2f} s")
            if rm["peak_rss"] and mk["peak_rss"]:
                lines.append(f"{method}: peak RSS raymerge {human(rm['peak_rss'])} "
                             f"vs mergekit {human(mk['peak_rss'])}; PSS {human(rm['peak_pss'])} vs {human(mk['peak_pss'])}")
        if method in checks:
            lines.append(f"{method}: raymerge vs mergekit output: {checks[method]}")
    print()
    for line in lines:
        print(line)
    print()
    print("whole s: the command from spawn to exit, best of the --repeat runs (unwatched); memory: one extra polled run.")
    print("peak RSS/PSS: largest simultaneous sum over the merge processes (mergekit: its process; raymerge: driver +")
    print("Ray worker processes), polled every 50 ms (PSS every 0.5 s); Ray daemons: gcs_server, raylet, agents, ...")
    print(f"mergekit-yaml flags: {' '.join(mk_base + mk_flags)}")


if __name__ == "__main__":
    sys.exit(main())
