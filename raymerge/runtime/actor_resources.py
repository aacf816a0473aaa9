"""The one resource rule for every pool of Ray actors: what each actor reserves, and its threads.

Every job's actors are an `ActorPool` (`runtime.actor_pool`), started through `actor_resources` —
the merge worker pool (whose actors also run a guided merge's statistics), the prune stage
workers, the search stage workers (one rule for all pipelines' actors) — so a number of
actors the user asks for (`--workers`, `--stages`, `concurrency`) means the same thing in every
job, and either runs or fails at once with a message naming the resources. Never a silent hang:
Ray keeps an actor whose reservation no node can satisfy pending forever, without a word.

The rule, for `n` actors on a cluster:

- `n < 1` is refused (`ActorCountError`), before Ray is started or asked anything
  (`check_actor_count`, called by the jobs on their options).
- A cluster with GPUs: one GPU per actor. More actors than GPUs is refused at once, naming both
  numbers: a GPU cannot be shared the way CPU time can (memory), and an actor waiting for a GPU
  waits forever. Each GPU actor also reserves its share of the CPUs (below) but at most one CPU,
  so the CPUs stay available for other Ray work; its torch thread count is its CPU share.
- A CPU-only cluster: the CPUs are shared. With at least as many CPUs as actors each reserves
  whole CPUs, floor(cpus / n); with more actors than CPUs each reserves the fraction cpus / n
  (rounded down to Ray's resolution of 0.0001), so `--workers 4` on 2 CPUs starts four actors
  that share two CPUs. Ray reservations are for placement, not limits; more actors than cores
  is slower but correct, and the user asked for that number (to bound per-actor memory, to
  try a distributed layout on one machine). On several nodes the share is the largest one that
  places all `n` actors on the nodes' actual CPUs: a total can be big enough while no node can
  hold a whole share (two nodes of 3 and 1 CPUs cannot place two actors of 2 CPUs).
- torch threads per actor: max(1, floor(share)), so actors sharing CPUs do not oversubscribe them.
- `scheduling_strategy="SPREAD"`: actors go to different nodes where they can, so a pool uses
  the whole cluster's memory and bandwidth, not the first node's.

What this does not see: resources held at that moment by other Ray work (another job); actors
then wait for those resources like any Ray work. A pool kept by `keep_workers=True` is this
process's own: a merge or prune reuses it when it matches (a guided merge's statistics run on
it), and a job that needs other actors shuts it down first (`runtime.actor_pool`).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from raymerge.config.merge_config import ConfigError


def ray_if_imported() -> Any:
    """The `ray` module when this process has imported it, else None. A process that never
    imported Ray is neither a Ray actor nor connected to a cluster, and an in-process merge need
    not pay a quarter of a second to import Ray only to find that out."""
    return sys.modules.get("ray")


RAY_RESOURCE_UNIT = 10_000  # Ray counts fractional resources in units of 1/10000


def host_memory_bytes() -> int:
    """This machine's physical RAM."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ActorCountError(ConfigError):
    """A number of actors the cluster cannot hold (or below one): refused before anything starts.

    A `ConfigError`, so the CLI reports it as a user error (exit 2, one line)."""


@dataclass(frozen=True)
class ActorResources:
    """How to start each of a pool's actors: `ray.remote(cls).options(**options)`, `threads` torch threads."""

    options: dict[str, Any] = field(hash=False)
    threads: int

    @property
    def cpus(self) -> float:
        return float(self.options.get("num_cpus", 0))

    @property
    def gpus(self) -> int:
        return int(self.options.get("num_gpus", 0))


def check_actor_count(n: Optional[int], what: str) -> None:
    """Refuse a requested number of actors below one (`None`: the default, allowed)."""
    if n is not None and n < 1:
        raise ActorCountError(f"{what} must be at least 1 (got {n})")


def default_actor_count(cluster: Optional[Mapping[str, float]] = None) -> int:
    """One actor per GPU when the cluster has GPUs, else one per CPU (`cluster`: default, the live Ray cluster's)."""
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    gpus = int(cluster.get("GPU", 0))
    return gpus if gpus > 0 else max(1, int(cluster.get("CPU", 1)))


def actor_resources(
    n: int,
    cluster: Optional[Mapping[str, float]] = None,
    *,
    nodes: Optional[Sequence[Mapping[str, float]]] = None,
    what: str = "actors",
) -> ActorResources:
    """The Ray options and torch thread count of each of `n` actors (module docstring: the rule).

    `cluster`: the cluster's total resources (`ray.cluster_resources()`); `nodes`: each live
    node's resources, so the shares fit the nodes and not only the total (default: the totals as
    one node). Both default to the live Ray cluster's when `cluster` is None. `what` names the
    actors in messages (e.g. "merge workers"). Raises `ActorCountError`."""
    check_actor_count(n, what)
    if cluster is None:
        cluster, nodes = _live_cluster()
    if not nodes:
        nodes = [cluster]
    gpus = int(cluster.get("GPU", 0))
    cpus = float(cluster.get("CPU", 0))
    if gpus > 0:
        if n > gpus:
            raise ActorCountError(
                f"{n} {what} asked for, but the cluster has {gpus} GPU(s) and each takes one GPU: ask for at most {gpus}"
            )
        hosts = [(float(r.get("CPU", 0)), int(r.get("GPU", 0))) for r in nodes if int(r.get("GPU", 0)) > 0]
        share = _largest_share(n, hosts)
        reserve = _rounded_share(min(1.0, share))
        return ActorResources({"num_gpus": 1, "num_cpus": reserve, "scheduling_strategy": "SPREAD"}, max(1, int(share)))
    if cpus <= 0:
        raise ActorCountError(f"{n} {what} asked for, but the cluster has no CPUs")
    share = _rounded_share(_largest_share(n, [(float(r.get("CPU", 0)), n) for r in nodes]))
    if share <= 0:
        raise ActorCountError(
            f"{n} {what} asked for, but the cluster's {cpus:g} CPU(s) cannot be shared that finely "
            f"(Ray's smallest share is {1 / RAY_RESOURCE_UNIT} CPU): ask for fewer"
        )
    return ActorResources({"num_cpus": share, "scheduling_strategy": "SPREAD"}, max(1, int(share)))


def _largest_share(n: int, hosts: Sequence[tuple[float, int]]) -> float:
    """The largest CPU share s such that the hosts (cpus, most actors each) place `n` actors of s
    CPUs: sum over hosts of min(most, floor(cpus / s)) >= n. 0.0 when none does (no CPUs)."""

    def placed(s: float) -> int:
        return sum(min(most, int(c / s + 1e-9)) for c, most in hosts)

    candidates = sorted({c / k for c, _ in hosts if c > 0 for k in range(1, n + 1)}, reverse=True)
    return next((s for s in candidates if placed(s) >= n), 0.0)


def _rounded_share(share: float) -> float:
    """Whole CPUs from one CPU up (floor, as an int), else the fraction rounded down to Ray's
    resolution (rounding up could ask for 2.0001 CPUs of a 2-CPU node); rounding down never
    unplaces an actor."""
    if share >= 1:
        return int(share + 1e-9)
    return math.floor(share * RAY_RESOURCE_UNIT + 1e-6) / RAY_RESOURCE_UNIT


def _live_cluster() -> tuple[dict[str, float], list[dict[str, float]]]:
    import ray

    nodes = [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]
    return dict(ray.cluster_resources()), nodes
