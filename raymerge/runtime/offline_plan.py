"""Planning a merge without running it: `raymerge plan`, `raymerge merge --plan-only`, `raymerge.plan`.

`plan_only` compiles the config as a merge does (`runtime.compile`: every check of the config
and the headers, shape-only folders allowed) and asks the planner (`runtime.planning`) for the
plan on a cluster profile, or on this machine (`clusters/local.yaml`'s rule). It starts no Ray
and reads no weights. For safetensors models, local or on the Hub (whose headers are read
over HTTP), nothing here imports torch, so a plan takes about a second; a folder holding only a
config.json is listed by building the model on torch's meta device (`checkpoints.shapes`), and
pickled or DeepSpeed inputs are read with torch, so those plans import it.

This machine's GPUs are counted with torch only when the machine may have any: a Linux machine
without any GPU device file (`GPU_DEVICE_PATHS`: NVIDIA, Jetson, WSL2, ROCm) has no GPU torch
could use.
"""

from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from raymerge.checkpoints.writer import human_bytes
from raymerge.config import MergeConfig, load_config
from raymerge.runtime.actor_resources import check_actor_count, host_memory_bytes
from raymerge.runtime.compile import MergeCompiler
from raymerge.runtime.merge_options import MergeOptions, compile_options
from raymerge.runtime.planning import Topology, plan_merge, plan_summary, topology_from_profile


@dataclass
class PlanReport:
    """A plan made without running anything: for `raymerge plan` and `merge --plan-only`."""

    plan: Any  # planners.Plan
    problem: Any  # planners.MergeProblem
    topology: Topology

    @property
    def tensors(self) -> int:
        return len(self.problem.operators)

    @property
    def bytes_in(self) -> int:
        return int(sum(op.bytes_read for op in self.problem.operators))

    def summary(self) -> str:
        return (
            f"{self.plan.load_table(self.problem)}\n"
            f"{plan_summary(self.plan, self.problem, self.topology)}\n"
            f"inputs {human_bytes(self.bytes_in)} for {self.tensors} output tensors"
        )


def plan_only(config: Union[str, Path, dict[str, Any], MergeConfig], options: MergeOptions) -> PlanReport:
    """Plan a merge from headers (or config.json shapes) without starting Ray or reading weights."""
    check_actor_count(options.workers, "workers")
    cfg, label = load_config(config)
    with MergeCompiler(compile_options(options, shape_only=True)) as compiler:
        program = compiler.compile(cfg, label).program
    topology = offline_topology(options)
    plan, problem = plan_merge(program.operators, topology, planner=options.planner, time_limit=options.plan_time_limit)
    return PlanReport(plan, problem, topology)


# What a Linux machine with a GPU torch can use exposes: NVIDIA's driver (/proc/driver/nvidia,
# /dev/nvidia*), Jetson's integrated GPU (/dev/nvhost-*, /dev/nvgpu), WSL2's (/dev/dxg), ROCm (/dev/kfd).
GPU_DEVICE_PATHS = ("/proc/driver/nvidia", "/dev/nvidia*", "/dev/nvhost-*", "/dev/nvgpu", "/dev/dxg", "/dev/kfd")


def may_have_gpu() -> bool:
    """Whether torch could find a GPU here: False only on Linux with none of `GPU_DEVICE_PATHS`."""
    if not sys.platform.startswith("linux"):
        return True
    return any(glob.glob(pattern) for pattern in GPU_DEVICE_PATHS)


def offline_topology(options: MergeOptions) -> Topology:
    """The cluster of `options.cluster`, else this machine: its CPUs (or `workers`), RAM and GPUs."""
    from raymerge.config import load_cluster, local_profile

    if options.cluster is not None:
        return topology_from_profile(load_cluster(options.cluster), str(options.cluster))
    gpus, gpu_memory = 0, 0
    if may_have_gpu():
        try:
            import torch

            if torch.cuda.is_available():
                gpus = torch.cuda.device_count()
                gpu_memory = torch.cuda.get_device_properties(0).total_memory
        except Exception:  # noqa: BLE001 - no usable GPU
            pass
    cpus = options.workers or os.cpu_count() or 1
    if gpus and options.workers:
        gpus = options.workers
    profile = local_profile(cpus=cpus, memory_bytes=host_memory_bytes(), gpus=gpus, gpu_memory_bytes=gpu_memory)
    return topology_from_profile(profile, "this machine (clusters/local.yaml)")
