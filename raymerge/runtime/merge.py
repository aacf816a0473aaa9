"""A whole merge, end to end: config -> headers -> operators -> plan -> workers -> atomic publish.

The actor pool (`runtime.actor_pool`: kept from an earlier merge of this process, or new) starts,
a guided merge's statistics run on it (`runtime.guidance`), it calibrates the job's methods, and the planner (`runtime.planning`)
places every operator — or its row parts — on a worker; the executor runs that plan and the
result reports the predicted and the measured makespan side by side. `plan_only` makes the
same plan from headers (or config.json shapes) and a cluster profile, starting nothing.

Everything that can fail from metadata alone (config errors, missing models or tensors, shape
mismatches, an output path that already holds a model) fails here, in the driver, before Ray
starts a worker or a byte is written. Any later failure removes the staging folder (but an
interruption keeps it for a resume, below), so nothing is ever published half-written. An `s3://bucket/prefix` output stages locally the same way; the
workers then upload the shards and the driver writes `config.json` last (`checkpoints.s3`).
The output steps (check, disk space, staging, resume manifest, publish) are `runtime.output.JobOutput`,
shared with prune and `search --materialize`.

Resume (`runtime.recovery`): the staging folder's manifest records each finished shard; an
interrupted merge (Ctrl-C, a killed driver, workers that keep dying) leaves the folder, and
rerunning the same merge reuses the shards whose checksums still match and runs only the
operators of the others. A worker actor that dies mid-merge is replaced (`runtime.executor`).

`in_process=True` (CLI `--in-process`) runs the same steps without Ray: the pool is `workers`
`PoolActor`s in the driver (`ActorPool.in_process()`; default one per CPU core), each running its
queue on a thread of its own (`runtime.executor`), calibrated and planned for like a Ray pool, so
the summary still shows predicted against measured, and the bytes are those of a Ray merge.
Whole-model trimming, guidance statistics (stages in the driver) and S3 outputs (the driver
uploads) work the same way. It is the default on a machine without a GPU when nothing names a
cluster (`local_by_default`): there a local Ray's start, its worker processes' torch imports and
its shutdown cost seconds and give one machine nothing. An `address` with it is refused as a
contradiction.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from raymerge.checkpoints import CheckpointSource, SourceSpec, plan_shards
from raymerge.config.cluster import parse_size
from raymerge.checkpoints.output_name import check_output_name
from raymerge.checkpoints.model_files import merged_model_config, model_card, processor_files, tokenizer_files
from raymerge.checkpoints.source import CheckpointError
from raymerge.checkpoints.s3 import resolve_endpoint_url
from raymerge.checkpoints.writer import DEFAULT_SHARD_BYTES, human_bytes
from raymerge.config import ConfigError, MergeConfig, ModelRef, load_config
from raymerge.runtime.actor_resources import check_actor_count, ray_if_imported
from raymerge.runtime.costs import representative_ops
from raymerge.runtime import actor_pool, executor
from raymerge.runtime.actor_pool import ActorPool
from raymerge.progress import phase
from raymerge.runtime.executor import ExecutionStats, ensure_ray, run_plan, work_items
from raymerge.runtime.global_trim import apply_model_trim, uses_model_trim
from raymerge.runtime.output import JobOutput, upload_on
from raymerge.runtime.recovery import ShardTracker, input_fingerprint, job_identity, remaining_operators
from raymerge.version import installed_version
from raymerge.runtime.planning import calibrated_costs, calibration_note, plan_merge, topology_from_workers
from raymerge.runtime.compile import MergeCompiler, open_sources  # noqa: F401 - open_sources re-exported
from raymerge.runtime.merge_options import MergeOptions, compile_options
from raymerge.runtime.offline_plan import PlanReport, plan_only  # noqa: F401 - re-exported
from raymerge.runtime.operators import MergeProgram

GB = 1e9
log = logging.getLogger("raymerge")


@dataclass
class MergeResult:
    """What a merge produced and how long it took (all sizes in bytes, times in seconds)."""

    output: Union[Path, str]  # a local directory, or the s3:// URL of an S3 output
    tensors: int
    bytes_read: int
    bytes_written: int
    workers: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    peak_worker_rss_bytes: int = 0
    peak_device_bytes: int = 0
    files: list[str] = field(default_factory=list)
    plan: Optional["PlanOutcome"] = None  # None when a resumed merge had nothing left to run
    reused_shards: int = 0  # shards kept from an interrupted run (resume)
    reused_tensors: int = 0
    worker_restarts: int = 0  # worker actors that died and were replaced
    resume_note: str = ""  # what the resume kept and redid ('' for a fresh start)
    # per node (Ray node id): its workers, the input bytes they read (fetched, from S3 or the
    # Hub), and the input bytes of the parts they ran (`node_reads`); empty in process
    per_node: dict[str, dict[str, int]] = field(default_factory=dict)
    guidance: Optional[Any] = None  # runtime.guidance.GuidanceReport of a guided merge

    @property
    def read_gbps(self) -> float:
        merge_s = self.timings.get("merge", self.seconds)
        return self.bytes_read / GB / merge_s if merge_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON values (`raymerge merge --result-json`): sizes in bytes,
        times in seconds, the phases in `timings`, and the plan's predicted and measured makespan."""
        plan = None
        if self.plan is not None:
            p = self.plan
            plan = {"predicted_makespan": p.predicted_makespan, "measured_makespan": p.measured_makespan,
                    "lower_bound": p.lower_bound, "gap": p.gap, "solver": p.solver, "status": p.status,
                    "solve_seconds": p.solve_seconds, "parts": p.parts, "moved_parts": p.moved_parts,
                    "predicted_busy": p.predicted_busy, "measured_busy": p.measured_busy, "summary": p.summary()}
        return {
            "output": str(self.output), "tensors": self.tensors, "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written, "workers": self.workers, "seconds": self.seconds,
            "timings": dict(self.timings), "peak_worker_rss_bytes": self.peak_worker_rss_bytes,
            "peak_device_bytes": self.peak_device_bytes, "files": list(self.files), "reused_shards": self.reused_shards,
            "reused_tensors": self.reused_tensors, "worker_restarts": self.worker_restarts, "plan": plan,
            "per_node": {node: dict(row) for node, row in self.per_node.items()},
        }

    def summary(self) -> str:
        t = self.timings
        line = (
            f"merged {self.tensors} tensors into {self.output} in {self.seconds:.1f} s "
            f"(plan {t.get('plan', 0):.1f} s, Ray start {t.get('ray', 0):.1f} s, workers {t.get('workers', 0):.1f} s, "
            f"merge {t.get('merge', 0):.1f} s, "
            f"publish {t.get('publish', 0):.1f} s): read {human_bytes(self.bytes_read)} at "
            f"{self.read_gbps:.2f} GB/s, wrote {human_bytes(self.bytes_written)}; {self.workers} worker(s), "
            f"peak worker memory {human_bytes(self.peak_worker_rss_bytes)} RSS"
        )
        if self.peak_device_bytes:
            line += f", {human_bytes(self.peak_device_bytes)} GPU"
        if self.worker_restarts:
            line += f"; {self.worker_restarts} worker restart(s)"
        if self.resume_note:
            line += "\n" + self.resume_note
        if len(self.per_node) > 1:
            line += "\nper node: " + "; ".join(
                f"{node[:12]} ({row['workers']} worker(s)) read {human_bytes(row['read'])}, its parts' inputs "
                f"{human_bytes(row['needed'])}" for node, row in sorted(self.per_node.items()))
        if self.guidance is not None:
            line += f"\n{self.guidance.table()}\n(statistics pass {self.guidance.seconds:.1f} s, written to guidance.json)"
        if self.plan is not None:
            line += "\n" + self.plan.summary()
        return line


@dataclass
class PlanOutcome:
    """What the planner predicted for a merge and what the workers then took (seconds)."""

    predicted_makespan: float
    measured_makespan: float
    lower_bound: float
    gap: float
    solver: str
    status: str
    solve_seconds: float
    parts: int
    moved_parts: int = 0  # parts taken over at run time by a worker that ran out of work
    predicted_busy: dict[str, float] = field(default_factory=dict)
    measured_busy: dict[str, float] = field(default_factory=dict)
    calibration: str = ""  # what the workers measured for the cost model (`runtime.planning.calibration_note`)
    report: Optional["PlanReport"] = field(default=None, repr=False)  # the plan itself, for --gantt/--json

    def summary(self) -> str:
        # A comparison, not an error: tiny merges are dominated by fixed costs the model leaves out.
        ratio = (f" ({self.measured_makespan / self.predicted_makespan:.1f}x the prediction)"
                 if self.predicted_makespan > 0 else "")
        return (
            f"plan: {self.parts} parts, solver {self.solver} ({self.status}, gap {self.gap:.1%}, {self.solve_seconds:.2f} s); "
            f"measured makespan {self.measured_makespan:.2f} s vs predicted makespan {self.predicted_makespan:.2f} s{ratio}; "
            f"{self.moved_parts} part(s) moved at run time" + (f"; {self.calibration}" if self.calibration else "")
        )


def _chat_template_file(
    config: MergeConfig, label: str, specs: dict[ModelRef, tuple[SourceSpec, CheckpointSource]],
) -> Optional[str]:
    """The chat_template.jinja to publish: the config's template, a named one
    (`checkpoints.chat_templates.NAMED_TEMPLATES`), or for `auto` the one most inputs share
    (None when none has one: the copied tokenizer files keep the donor's)."""
    from raymerge.checkpoints.chat_templates import (
        AUTO, NAMED_TEMPLATES, is_template_text, model_chat_template, most_common_template,
    )

    tmpl = config.chat_template
    if tmpl is None:
        return None
    if is_template_text(tmpl):
        return tmpl
    name = tmpl.strip()
    if name == AUTO:
        return most_common_template(
            model_chat_template(src.read_json("tokenizer_config.json"), src.read_bytes("chat_template.jinja"))
            for _, src in specs.values()
        )
    if name in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name]
    raise ConfigError(
        f"{label}: chat_template: {tmpl!r} is neither a Jinja template nor a known name "
        f"(names: {', '.join(sorted(NAMED_TEMPLATES))}, or auto: the template most input models share)"
    )


def _published_files(
    config: MergeConfig, label: str, program: MergeProgram, specs: dict[ModelRef, tuple[SourceSpec, CheckpointSource]],
    options: MergeOptions,
) -> dict[str, bytes | str]:
    """config.json, tokenizer and processor files, chat template, model card and config copy, by file name."""
    donor_ref = program.models[program.donor]
    donor_src = specs[donor_ref][1]
    donor_cfg = donor_src.read_json("config.json")
    if donor_cfg is None:
        raise CheckpointError(f"{donor_src.location}: config.json not found (needed for the output's config)")
    layer_sources = None
    if program.changes_layers:
        cfgs = [specs[m][1].read_json("config.json") or {} for m in program.models]
        layer_sources = [(cfgs[m], layer) for m, layer in program.layer_sources]
    files: dict[str, bytes | str] = {}
    dtype = config.out_dtype or config.dtype
    out_cfg = merged_model_config(donor_cfg, dtype=dtype, layer_sources=layer_sources, untie=bool(program.tied_heads))
    vocabulary = program.vocabulary  # a tokenizer choice: the merged tokenizer (runtime.vocabulary)
    if vocabulary is not None:
        key = "vocab_size" if "vocab_size" in out_cfg or not isinstance(out_cfg.get("text_config"), dict) else None
        (out_cfg if key else out_cfg["text_config"])["vocab_size"] = vocabulary.rows
    files["config.json"] = json.dumps(out_cfg, indent=2) + "\n"
    files.update(processor_files(donor_src))
    tmpl = _chat_template_file(config, label, specs)
    if vocabulary is not None:
        # as mergekit: the built tokenizer is saved (save_pretrained) whatever copy_tokenizer says
        files.update(vocabulary.files(chat_template=tmpl))
    elif options.copy_tokenizer:
        files.update(tokenizer_files(donor_src))
        if tmpl is not None:
            files["chat_template.jinja"] = tmpl
    elif tmpl is not None:
        log.warning("%s: chat_template is not written: the tokenizer is not copied (copy_tokenizer off)", label)
    if options.write_model_card:
        yaml_text = config.to_yaml()
        files["mergekit_config.yml"] = yaml_text
        base = str(config.base_model) if config.base_model else None
        files["README.md"] = model_card(
            method=config.merge_method, models=[str(m) for m in program.models], base=base, config_yaml=yaml_text,
            version=installed_version(), name=config.name,
        )
    return files


def _prepare(cfg: MergeConfig, label: str, options: MergeOptions, *, shape_only: bool = False, inputs_out: Optional[list] = None):
    """Program, source specs and the small files to publish; every metadata check happens here
    (the compile step is `runtime.compile`, shared with plan, merge-then-prune and search trials).
    `inputs_out` receives each program model's fingerprint (`recovery.input_fingerprint`)."""
    with MergeCompiler(compile_options(options, shape_only=shape_only)) as compiler:
        compiled = compiler.compile(cfg, label)
        program = compiled.program
        extra_files = None if shape_only else _published_files(cfg, label, program, compiler.opened, options)
        if inputs_out is not None:
            inputs_out.extend(input_fingerprint(compiler.opened[m][1]) for m in program.models)
    return program, compiled.specs, extra_files


def run_merge(config: Union[str, Path, dict[str, Any], MergeConfig], output: Union[str, Path], options: MergeOptions) -> MergeResult:
    """Run one merge; see `raymerge.merge` for the user-facing description."""
    t0 = time.perf_counter()
    check_actor_count(options.workers, "workers")  # before anything starts (runtime.actor_resources)
    _check_in_process(options)
    if local_by_default(options):
        options = replace(options, in_process=True)
    # The driver resolves the S3 endpoint (option, else AWS_ENDPOINT_URL[_S3]) so that workers,
    # whose environment may differ, get it through the source specs and the output target.
    options = replace(options, s3_endpoint_url=resolve_endpoint_url(options.s3_endpoint_url))
    cfg, label = load_config(config)
    settings = cfg.raymerge
    shard_size = options.out_shard_size or (settings.out_shard_size if settings else None) or DEFAULT_SHARD_BYTES
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as err:
        raise ConfigError(f"out_shard_size: {err}") from None
    check_output_name(output)  # a dangling symlink or an over-long name: refused now, not after the merge
    from raymerge.runtime.job_env import check_output_outside_job_dir
    check_output_outside_job_dir(output)  # not into a Ray job's working dir, which Ray may delete (runtime.job_env)
    dest = JobOutput(output, overwrite=options.overwrite, s3_endpoint_url=options.s3_endpoint_url,
                     resume=options.resume, resumable=True,  # checked now, before any work
                     keep=[label, *(p for m in cfg.referenced_models() for p in (m.path, m.lora) if p)])
    profile = None
    if options.cluster is not None:
        from raymerge.config import load_cluster

        profile = load_cluster(options.cluster)
    inputs: list = []
    program, specs, extra_files = _prepare(cfg, label, options, inputs_out=inputs)
    # Guided merges and the 1bit export change what is written: both come before the job hash
    # (so a resume never mixes shards of different statistics) and the disk-space check.
    guidance = None
    t_guide = time.perf_counter()
    pool: Optional[ActorPool] = None
    keep = options.keep_workers
    try:
        if settings is not None and settings.guidance is not None:
            from raymerge.runtime.guidance import check_guidance, check_guidance_memory, guide_program

            checked = check_guidance(cfg, label, program)
            facts = check_guidance_memory(checked, specs[program.models.index(cfg.base_model)], options.trust_remote_code)
            # The statistics run on the merge's own pool (a kept one too): no other actors.
            pool = _start_pool(options, profile)
            guidance = guide_program(checked, cfg, program, specs, pool, facts, quiet=options.quiet,
                                     trust_remote_code=options.trust_remote_code)
            extra_files = {**(extra_files or {}), "guidance.json": guidance.to_json()}
        if settings is not None and settings.export_task_vectors:
            from raymerge.runtime.onebit_export import task_vector_files

            extra_files = {**(extra_files or {}), **task_vector_files(program, specs, quiet=options.quiet)}
        t_guide = time.perf_counter() - t_guide
        layout = plan_shards([(op.name, op.out_dtype, op.shape) for op in program.operators], shard_bytes)
        job = job_identity(cfg.to_yaml(), program.operators, layout, inputs, installed_version())
        # The output's lock (one writer per output), a resumable staging folder, disk space.
        dest.reserve(layout, list((extra_files or {}).values()), job, inputs)
        if options.scan_nonfinite:
            from raymerge.runtime.scan import inputs_by_model, scan_nonfinite

            scan_nonfinite(specs, inputs_by_model(program.operators, len(specs)), quiet=options.quiet)
        t_plan = time.perf_counter()
        if pool is None:
            with phase("starting the merge workers", options.quiet):
                pool = _start_pool(options, profile, input_bytes=sum(op.bytes_in for op in program.operators))
        t_ray = time.perf_counter()
    except BaseException:
        dest.release()  # nothing staged yet: the output's lock goes, its staging folder stays as it was
        if pool is not None:
            actor_pool.release(pool, keep=False)
        raise
    nodes: Optional[list[str]] = None
    try:
        resumed = dest.open(layout)
        # An S3 output on a cluster: each node stages the shards it writes on its own disk (no
        # shared path needed); every part of a shard runs on one node, and a worker there uploads
        # the shard as soon as it is finished (`checkpoints.s3.seal_shard`).
        nodes = [info.node_id for info in pool.infos()] if pool.remote and dest.remote else None
        node_shards = ((job, [(s.filename, s.header, s.size) for s in layout.shards if s.filename not in resumed.finished])
                       if nodes is not None else None)
        executor.begin(pool, specs, str(dest.staging), node_shards)
        if uses_model_trim(program.operators):
            program.operators, _ = apply_model_trim(program.operators, pool, [str(m) for m in program.models], label)
        todo = remaining_operators(program.operators, layout, resumed.finished)
        plan = problem = topology = None
        stats = ExecutionStats(workers=len(pool), seconds=0.0)
        t_planned = time.perf_counter()
        if todo:
            with phase(f"timing the methods on the workers and planning {len(todo)} tensor(s)",
                       options.quiet):
                samples = representative_ops(todo)
                measured = executor.calibrate(pool, samples)
                table, speeds = calibrated_costs(list(samples), measured)
                io = executor.measure_io(pool, todo)
                topology = topology_from_workers(pool.infos(), speeds, profile, description=_pool_description(pool, options), io=io)
                plan, problem = plan_merge(todo, topology, table, planner=options.planner, time_limit=options.plan_time_limit)
            t_planned = time.perf_counter()
            queues = work_items(plan, todo, layout, [w.name for w in problem.workers])
            memory = [w.memory_bytes for w in problem.workers]
            seal = None
            if dest.remote:
                sealer: dict[str, int] = {}
                if nodes is not None:
                    queues, sealer = executor.shards_on_one_node(
                        queues, nodes, {s.filename: i for i, s in enumerate(layout.shards)})
                target, staging_dir = dest.staged.target, str(dest.staging)

                def seal(name: str) -> str:
                    digest = pool.get(pool.workers[sealer.get(name, 0)].seal_shard(target, staging_dir, name, job))
                    dest.staged.uploaded.add(name)
                    return digest

                dest.staged.begin_upload()
            multi_node = nodes is not None and len(set(nodes)) > 1
            tracker = ShardTracker(resumed.manifest, dest.staging, layout, queues, seal=seal)
            try:
                stats = run_plan(pool, queues, len(todo), quiet=options.quiet, on_done=tracker.done,
                                 may_take_from=lambda thief, owner: memory[thief] >= memory[owner]
                                 and (nodes is None or nodes[thief] == nodes[owner]),
                                 nodes=nodes if multi_node else None)
            except BaseException:
                tracker.close(wait=False)
                raise
            # An S3 upload takes a while: have every shard recorded first, so a crash in it resumes.
            tracker.close(wait=dest.remote)
        ends = executor.finish(pool)
        stats.peak_worker_rss_bytes = max([stats.peak_worker_rss_bytes, *(e.peak_rss_bytes for e in ends)])
        per_node = (node_reads([info.node_id for info in pool.infos()], ends, stats.per_worker_needed)
                    if pool.remote else {})
        t_merge = time.perf_counter()
        # An S3 output's shards are uploaded by the workers; config.json comes last.
        out = dest.publish(layout, extra_files or {}, spread=upload_on(pool.actors if pool.remote else []))
        if node_shards is not None and pool.remote:  # published: the nodes' staging copies go
            pool.get([w.drop_node_shards(str(dest.staging), node_shards[0]) for w in pool.workers])
    except BaseException as err:
        keep = False  # a failed job may leave work queued on the actors
        dead = actor_pool.actor_lost(err) if nodes is not None and len(set(nodes)) > 1 else None
        if dead is not None and not isinstance(err, actor_pool.WorkerLostError):
            # Shards are staged on each node's own disk: what a lost worker wrote is gone with it.
            lost = actor_pool.WorkerLostError(
                f"merge: a worker was lost ({actor_pool.first_line(dead)}); the parts it wrote were on its node's own "
                f"disk: rerun the same merge to resume (finished shards are kept)")
            dest.fail(lost)
            raise lost from None
        if dest.fail(err) and not isinstance(err, KeyboardInterrupt):  # the CLI prints Ctrl-C's note
            log.warning("raymerge: merge interrupted (%s); staging folder %s kept: rerun the same merge to resume",
                        type(err).__name__, dest.staging)
        raise
    finally:
        actor_pool.release(pool, keep)
    t_end = time.perf_counter()
    return MergeResult(
        output=out,
        tensors=len(program.operators),
        bytes_read=stats.bytes_read,
        bytes_written=stats.bytes_written,
        workers=stats.workers,
        seconds=t_end - t0,
        timings={
            "plan": t_plan - t0 - t_guide, "guidance": t_guide, "ray": t_ray - t_plan, "workers": t_planned - t_ray,
            "merge": t_merge - t_planned, "publish": t_end - t_merge,
        },
        peak_worker_rss_bytes=stats.peak_worker_rss_bytes,
        peak_device_bytes=stats.peak_device_bytes,
        files=dest.files,
        reused_shards=len(resumed.finished),
        reused_tensors=resumed.reused_tensors(layout),
        worker_restarts=stats.worker_restarts,
        resume_note=resumed.summary(layout),
        per_node=per_node,
        guidance=guidance,
        plan=None if plan is None else PlanOutcome(
            predicted_makespan=plan.makespan, measured_makespan=stats.seconds, lower_bound=plan.lower_bound,
            gap=plan.gap, solver=plan.solver, status=plan.status, solve_seconds=plan.solve_seconds,
            parts=len(plan.assignments), moved_parts=stats.stolen_parts, predicted_busy={w.name: plan.loads.get(w.name, 0.0) for w in problem.workers},
            measured_busy={problem.workers[i].name: s for i, s in sorted(stats.per_worker_seconds.items())},
            calibration=calibration_note(topology), report=PlanReport(plan, problem, topology),
        ),
    )


def node_reads(node_ids: Sequence[str], ends: Sequence[Any], needed: Mapping[int, int]) -> dict[str, dict[str, int]]:
    """Per node, from worker i's node id, its `worker.JobEnd` and the input bytes of the parts
    it ran: {"workers", "read" (what the node's workers read or fetched, their storage probe
    included), "needed" (what their parts' operators read)}. A replaced worker's reads before
    it died are not counted."""
    out: dict[str, dict[str, int]] = {}
    for i, node in enumerate(node_ids):
        row = out.setdefault(node, {"workers": 0, "read": 0, "needed": 0})
        row["workers"] += 1
        row["read"] += ends[i].bytes_read
        row["needed"] += needed.get(i, 0)
    return out


def local_by_default(options: MergeOptions) -> bool:
    """Whether a merge given no cluster runs its workers as threads of this process rather than
    on a local Ray of its own: yes on a machine without a GPU when nothing asks for Ray (no
    `address`, no `RAY_ADDRESS`, no cluster profile, no Ray session already in this process, no
    kept workers). On one machine a local Ray buys nothing a merge needs and costs seconds: its
    daemons' start and stop and a torch import per worker process (`examples/benchmark_merge.py`
    measures both ways). The bytes are the same either way. `address="local"` still starts a
    local Ray; with a GPU, Ray gives each worker its own."""
    if options.in_process or options.address is not None or options.cluster is not None or options.keep_workers:
        return False
    if os.environ.get("RAY_ADDRESS"):
        return False
    ray = ray_if_imported()
    if ray is not None and ray.is_initialized():
        return False
    from raymerge.runtime.worker import pick_device

    return pick_device().type == "cpu"


def _check_in_process(options: MergeOptions) -> None:
    """`in_process` runs its workers in this process: an address (a Ray cluster) contradicts it."""
    if not options.in_process:
        return
    if options.address is not None:
        raise ConfigError(f"in_process starts no Ray; address={options.address!r} asks for a Ray cluster (drop one of them)")


def _start_pool(options: MergeOptions, profile: Any, input_bytes: Optional[int] = None) -> ActorPool:
    """The merge's actor pool: one `PoolActor` in this process (`in_process`), else the kept
    pool or new Ray actors (`actor_pool.acquire`; Ray is started or joined first). `input_bytes`:
    what the merge reads, for the default number of in-process workers (`_local_worker_count`)."""
    if options.in_process:  # the same actor code in this process, one thread each: no Ray, no actors
        return ActorPool.in_process("in-process worker", options.workers or _local_worker_count(input_bytes))
    ensure_ray(options.address or (profile.address if profile is not None else None))
    return actor_pool.acquire(options.workers)


# A merge reading less than this runs on one in-process worker unless `workers` says otherwise.
# Its parts are tiny tensors whose time is Python's, not torch's kernels', and worker threads
# take turns on the GIL for it: the demo's TIES merge (2.45 MB, 39 parts) took 0.073-0.094 s to
# merge on two threads and 0.047-0.063 s on one (three runs each; a part alone 0.6-0.9 ms, 2-7 ms
# while the other thread runs too). A job of 63 MB (1M-element tensors) already gains from two
# (TIES 0.36-0.40 s vs 0.45-0.46 s, DARE 0.28 s vs 0.45-0.50 s).
SMALL_JOB_BYTES = 16 * 1024 * 1024


def _local_worker_count(input_bytes: Optional[int] = None) -> int:
    """In-process workers by default: one per CPU core, or one on a GPU (they would share it), or
    one for a merge reading less than SMALL_JOB_BYTES."""
    from raymerge.runtime.worker import pick_device

    if input_bytes is not None and input_bytes < SMALL_JOB_BYTES:
        return 1
    return 1 if pick_device().type == "cuda" else max(1, os.cpu_count() or 1)


def _pool_description(pool: ActorPool, options: MergeOptions) -> str:
    if not pool.remote:
        return f"in process (no Ray), {len(pool)} worker thread(s), calibrated"
    nodes = len({i.node_id for i in pool.infos()})
    where = "local Ray" if (options.address or os.environ.get("RAY_ADDRESS")) is None else "Ray cluster"
    return f"{where}, {len(pool)} worker(s) on {nodes} node(s), calibrated"
