"""Cluster profiles: pydantic models of `clusters/*.yaml`, and their translation for the planner.

A profile describes the hardware a merge runs on, in the planner's units (bytes, seconds,
bytes/s), so that a plan can be made offline, without the cluster:

    name: aws-4x8-a100
    description: 4 x p4de.24xlarge (8 x A100-80GB each)
    address: null                 # optional Ray address for running on it
    launcher: ray/aws-4x8-a100.yaml   # optional, documentation only: the file that creates it
    storage:
      inputs: remote              # remote | local: where the input weights are read from
      remote_bandwidth: null      # optional aggregate throughput of remote storage
    node_groups:
      - name: gpu                 # nodes gpu-0 .. gpu-3, workers gpu-0/w0 .. gpu-3/w7
        count: 4
        network_bandwidth: 100 Gbps
        workers_per_node: 8
        worker: {device: gpu, memory: 80 GB, speed: 40, read_bandwidth: 2 GB/s}

This module owns the file format and its validation: unknown keys are errors, and every error
is a `ConfigError` whose lines read `FILE: field.path: problem`. Sizes are bytes or strings with
decimal or binary units ("80GB", "80 GiB", "512M"; a bare B is mergekit's billion: "5B" = 5e9
bytes, see `parse_size`); bandwidths are bytes/s or strings where an
upper-case B is bytes and a lower-case b is bits ("25 GB/s", "25GBps", "100 Gbps", "100 Gb/s",
"100 Gbit/s"; 100 Gbps = 100e9 / 8 bytes/s). Parsing lives here, not in `raymerge.checkpoints`,
because config/ depends on nothing else of ours (but `raymerge.errors`).

`auto` (the embedded local default, `clusters/local.yaml`) stands for figures measured at run
time: `device`, `workers_per_node`, `memory` and `speed` may be `auto`, and
`ClusterProfile.resolve_auto(...)` replaces them with the caller's measurements. A profile with
`auto` left in it cannot be planned.

`planner_topology()` is the only place that touches `planners` (a standalone top-level package
with no dependency on raymerge); it is imported there, lazily, so loading a profile needs
nothing but pydantic and PyYAML. Where the inputs live (`storage.inputs`) is left to the caller:
for `remote` every operator's `input_location` is None; for `local` the runtime sets it to the
node whose disk holds the operator's inputs (a node name from `node_names()`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from raymerge.config.merge_config import ConfigError

if TYPE_CHECKING:
    import planners

# Speeds relative to one server CPU core (the machine operator costs are measured on). These are
# ROUGH ESTIMATES for planning offline; the runtime replaces them with a measurement when it runs
# for real. An elementwise merge is memory-bound: one CPU core streams ~10-20 GB/s, an A100's
# HBM2e 2.0 TB/s and an H100 SXM's HBM3 3.35 TB/s; after dtype conversions and kernel launches an
# A100/H100 merges ~30-60x faster than one core, so `auto` takes 40 for a GPU.
CPU_SPEED = 1.0
GPU_SPEED = 40.0

AUTO = "auto"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(rf"^{_NUMBER}\s*([kmgt]i?)?b?$", re.IGNORECASE)
_BILLIONS = re.compile(rf"^{_NUMBER}\s*b$", re.IGNORECASE)  # mergekit's "5B": five billion (see parse_size)
# bandwidth: number, prefix (any case), then B (bytes) / b or bit (bits), then /s or ps
_BANDWIDTH = re.compile(rf"^{_NUMBER}\s*([kKmMgGtT]i?)?(B|b|bit)(/s|ps)$")


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _check_positive(value: float, text: Any) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive, finite amount, got {text!r}")
    return value


def parse_size(value: Any) -> int:
    """Bytes from a number or a string such as "80GB", "80 GiB", "512M", "5_000_000" (units are
    case-insensitive). raymerge's one size parser: cluster memory, and `out_shard_size` of merges
    and prunes.

    A bare `B` after the number is mergekit's "billion" (its `--out-shard-size 5B`, parsed by
    mergekit as K/M/B counts and compared with bytes): "5B" is 5e9 bytes, the same as "5GB";
    "500M" and "1K" are 500e6 and 1e3 bytes in both tools. Nobody sizes memory or shards in
    single bytes, so the mergekit reading is the one kept; a byte count is a plain number."""
    number = _number(value)
    if number is None:
        text = value.strip().replace("_", "") if isinstance(value, str) else None
        billions = _BILLIONS.match(text) if text is not None else None
        match = _SIZE.match(text) if text is not None and billions is None else None
        if billions is not None:
            number = float(billions.group(1)) * 1e9
        elif match is None:
            raise ValueError(f"cannot parse size {value!r} (use e.g. 5GB, 500MB, 80 GiB, mergekit's 5B or a number of bytes)")
        else:
            number = float(match.group(1)) * _PREFIX[(match.group(2) or "").lower()]
    return int(_check_positive(round(number) if math.isfinite(number) else number, value))


def parse_bandwidth(value: Any) -> float:
    """Bytes/s from a number or a string: "25 GB/s" / "25GBps" (bytes), "100 Gbps" / "100 Gb/s" (bits)."""
    number = _number(value)
    if number is None:
        match = _BANDWIDTH.match(value.strip()) if isinstance(value, str) else None
        if match is None:
            raise ValueError(
                f"cannot parse bandwidth {value!r} (use e.g. 25 GB/s or 25GBps for bytes/s, 100 Gbps or "
                "100 Gb/s for bits/s, or a number of bytes/s)"
            )
        number = float(match.group(1)) * _PREFIX[(match.group(2) or "").lower()]
        if match.group(3) != "B":
            number /= 8
    return _check_positive(number, value)


def _or_auto(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def validate(value: Any) -> Any:
        return AUTO if value == AUTO else parse(value)

    return validate


def _speed(value: Any) -> float:
    number = _number(value)
    if number is None:
        raise ValueError(f"speed must be a number (1.0 = one CPU core), got {value!r}")
    return _check_positive(number, value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be a whole number, got {value!r}")
    if value < 1:
        raise ValueError(f"must be at least 1, got {value!r}")
    return value


Size = Annotated[int, BeforeValidator(parse_size)]
Bandwidth = Annotated[float, BeforeValidator(parse_bandwidth)]
Count = Annotated[int, BeforeValidator(_count)]
AutoSize = Annotated[Union[int, Literal["auto"]], BeforeValidator(_or_auto(parse_size))]
AutoCount = Annotated[Union[int, Literal["auto"]], BeforeValidator(_or_auto(_count))]
AutoSpeed = Annotated[Union[float, Literal["auto"]], BeforeValidator(_or_auto(_speed))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerSpec(_Strict):
    """One worker (a GPU, or a CPU slot): per-worker memory, relative speed and read bandwidth."""

    device: Literal["gpu", "cpu", "auto"]
    memory: AutoSize
    speed: AutoSpeed
    read_bandwidth: Bandwidth


class NodeGroup(_Strict):
    """`count` identical nodes named `{name}-0` .. `{name}-{count-1}`, each with `workers_per_node` workers."""

    name: str = Field(pattern=_NAME.pattern)
    count: Count
    network_bandwidth: Bandwidth
    workers_per_node: AutoCount
    worker: WorkerSpec

    def node_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.count)]


class Storage(_Strict):
    """Where inputs are read from (`remote`: S3 / a shared filesystem; `local`: each node's disk)."""

    inputs: Literal["remote", "local"] = "remote"
    remote_bandwidth: Optional[Bandwidth] = None


class ClusterProfile(_Strict):
    """A cluster description the planner can use offline (see the module docstring)."""

    name: str = Field(min_length=1)
    description: str = ""
    address: Optional[str] = None
    launcher: Optional[str] = None
    storage: Storage = Storage()
    node_groups: list[NodeGroup] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_groups(self) -> "ClusterProfile":
        names = [g.name for g in self.node_groups]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"node_groups[{i}].name: duplicate node group name {name!r}")
        return self

    def auto_fields(self) -> list[str]:
        """Field paths still set to `auto`, e.g. ["node_groups[0].workers_per_node"]."""
        found = []
        for i, g in enumerate(self.node_groups):
            if g.workers_per_node == AUTO:
                found.append(f"node_groups[{i}].workers_per_node")
            for field in ("device", "memory", "speed"):
                if getattr(g.worker, field) == AUTO:
                    found.append(f"node_groups[{i}].worker.{field}")
        return found

    def resolve_auto(self, cpus: int, memory_bytes: int, gpus: int = 0, gpu_memory_bytes: int = 0) -> "ClusterProfile":
        """A copy with every `auto` replaced by figures measured on one node of each group.

        `device: auto` is gpu when `gpus > 0`, else cpu. `workers_per_node: auto` is one per GPU
        (gpu) or per CPU (cpu). `memory: auto` is `gpu_memory_bytes` (per GPU) for gpu workers, and
        `memory_bytes / workers_per_node` (a share of the host RAM raymerge may use) for cpu
        workers. `speed: auto` is `GPU_SPEED` or `CPU_SPEED`.
        """
        if cpus < 1 or memory_bytes <= 0 or gpus < 0:
            raise ValueError(f"resolve_auto needs cpus >= 1, memory_bytes > 0, gpus >= 0; got {cpus}, {memory_bytes}, {gpus}")
        if gpus and gpu_memory_bytes <= 0:
            raise ValueError("resolve_auto: gpu_memory_bytes must be > 0 when gpus > 0")
        groups = []
        for i, g in enumerate(self.node_groups):
            w = g.worker
            device = w.device if w.device != AUTO else ("gpu" if gpus else "cpu")
            if device == "gpu" and not gpus and AUTO in (g.workers_per_node, w.memory):
                raise ConfigError(
                    f"cluster profile {self.name!r}: node_groups[{i}] has gpu workers with `auto` figures, "
                    "but no GPU was detected"
                )
            per_node = g.workers_per_node if g.workers_per_node != AUTO else (gpus if device == "gpu" else cpus)
            if w.memory != AUTO:
                memory = w.memory
            else:
                memory = gpu_memory_bytes if device == "gpu" else memory_bytes // per_node
            speed = w.speed if w.speed != AUTO else (GPU_SPEED if device == "gpu" else CPU_SPEED)
            worker = w.model_copy(update={"device": device, "memory": memory, "speed": speed})
            groups.append(g.model_copy(update={"workers_per_node": per_node, "worker": worker}))
        return self.model_copy(update={"node_groups": groups})

    def node_names(self) -> list[str]:
        """Every node's name, group by group: `gpu-0`, `gpu-1`, ..."""
        return [n for g in self.node_groups for n in g.node_names()]

    def planner_topology(self) -> tuple[list["planners.Worker"], list["planners.Node"], Optional[float]]:
        """`(workers, nodes, remote_bandwidth)` for `planners.MergeProblem`.

        Workers are named `{node}/w{k}` (e.g. `gpu-0/w0`), in group, node, slot order. Raises
        `ConfigError` while any field is still `auto` (call `resolve_auto` first).
        """
        import planners

        pending = self.auto_fields()
        if pending:
            raise ConfigError(
                f"cluster profile {self.name!r} still has `auto` fields ({', '.join(pending)}); "
                "call resolve_auto(...) with the measured figures first"
            )
        workers: list[planners.Worker] = []
        nodes: list[planners.Node] = []
        for g in self.node_groups:
            for node in g.node_names():
                nodes.append(planners.Node(node, float(g.network_bandwidth)))
                for k in range(int(g.workers_per_node)):
                    workers.append(
                        planners.Worker(
                            f"{node}/w{k}", node, float(g.worker.memory), float(g.worker.speed),
                            float(g.worker.read_bandwidth),
                        )
                    )
        return workers, nodes, self.storage.remote_bandwidth


# The embedded local default (clusters/local.yaml says the same): this machine's disk is the
# storage every worker shares, so it is "remote" storage to the planner, at a typical NVMe SSD's
# ~2 GB/s; those figures are rough and replaced by measurements when the merge runs.
LOCAL_DISK_BANDWIDTH = 2e9


def _local_auto() -> ClusterProfile:
    return ClusterProfile(
        name="local",
        description="The embedded default: a local Ray on this machine, one worker per GPU, else per CPU.",
        storage=Storage(inputs="remote", remote_bandwidth=LOCAL_DISK_BANDWIDTH),
        node_groups=[
            NodeGroup(
                name="local",
                count=1,
                network_bandwidth=LOCAL_DISK_BANDWIDTH,
                workers_per_node=AUTO,
                worker=WorkerSpec(device=AUTO, memory=AUTO, speed=AUTO, read_bandwidth=LOCAL_DISK_BANDWIDTH),
            )
        ],
    )


def local_profile(cpus: int, memory_bytes: int, gpus: int = 0, gpu_memory_bytes: int = 0) -> ClusterProfile:
    """The embedded local default for a machine with these (caller-measured) resources."""
    return _local_auto().resolve_auto(cpus=cpus, memory_bytes=memory_bytes, gpus=gpus, gpu_memory_bytes=gpu_memory_bytes)


def _loc(parts: tuple) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not str(p).startswith(("function-", "union[", "literal[")) and p not in ("int", "float", "str"):
            out += f".{p}" if out else str(p)
    return out


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see clusters/README.md for the fields)"
        loc = _loc(e["loc"])
        if not loc and re.match(r"^[\w.\[\]]+: ", msg):  # model-level checks name their own field
            loc, msg = msg.split(": ", 1)
        lines.append(f"{source}: {loc or '<top level>'}: {msg}")
    return "\n".join(lines)


def parse_cluster(data: Any, source: str = "<dict>") -> ClusterProfile:
    """Validate a profile mapping; raise `ConfigError` with `SOURCE: field.path: problem` lines."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <top level>: a cluster profile must be a mapping")
    try:
        return ClusterProfile.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def load_cluster(path: Union[str, Path]) -> ClusterProfile:
    """Load and validate a cluster profile YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: cluster profile not found")
    from raymerge.config.yaml_loader import load_yaml_file

    return parse_cluster(load_yaml_file(path), str(path))


__all__ = [
    "ClusterProfile",
    "NodeGroup",
    "WorkerSpec",
    "Storage",
    "load_cluster",
    "parse_cluster",
    "local_profile",
    "parse_size",
    "parse_bandwidth",
    "CPU_SPEED",
    "GPU_SPEED",
]
