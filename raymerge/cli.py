"""The `raymerge` command line: `merge`, `prune`, `search`, `plan`, `demo` and `methods`.

Thin by design: parse arguments, call the public API, print the summary. Errors that come from
the user's inputs (config, model paths, output path: `raymerge.errors.RaymergeError`, plus the
planner's own `PlanError`/`ProblemError`) print one line (`errors.one_line`) and exit with 2;
anything else is a bug and keeps its traceback. Ctrl-C prints one line (with where the staging
folder was kept for a resume) and exits 130; a closed stdout pipe (`| tee` died) prints one line
and exits 1, never a second "Exception ignored" at exit.

Fixed costs stay out of the way (issue 18): this module and `import raymerge` import no torch,
Ray, DeepSpeed or transformers, so `--help`, `--version` and errors in a config return at once.
Each subcommand imports what it runs when it runs, and first repeats, with `raymerge.config`
alone, the checks its job makes before anything else (`_preflight`: the actor count, then the
config file: missing, not YAML, invalid), in the same order and with the same messages; the job
then makes them again (they are cheap) and goes on to the checks that need the models. The
`raymerge` script (`run`) leaves without tearing the interpreter down once `main` returns
(`exit_quickly`: a second after a merge that imported torch and transformers).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

USER_ERRORS_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a Ctrl-C


def _user_error_types() -> tuple[type[BaseException], ...]:
    """User mistakes: raymerge's (`RaymergeError`) and the standalone planner's own. The planner's
    classes only when `planners` was imported (none of its errors can exist otherwise): importing
    it brings PuLP and HiGHS, a quarter of a second that a config error need not wait for."""
    from raymerge.errors import RaymergeError

    if "planners" not in sys.modules:
        return (RaymergeError,)
    from planners import PlanError, ProblemError

    return (RaymergeError, PlanError, ProblemError)


class _VersionAction(argparse.Action):
    """`--version`: print `raymerge X.Y.Z` and exit 0 (the version is looked up only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: Optional[str] = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: Optional[str] = None) -> None:
        from raymerge.version import installed_version

        print(f"raymerge {installed_version()}")  # on stdout, as argparse's own "version" action
        parser.exit()


def _preflight(command: str, args: argparse.Namespace) -> None:
    """The checks the job of `command` makes first, made here with `raymerge.config` alone (no
    torch, Ray or DeepSpeed imported yet), in the job's own order, so that a bad count or config
    is reported at once and with the job's own message; a local model folder that does not
    exist (the job finds it when it opens the models, after checking the output path); and the
    checks of a merge config against its method's spec that need no headers (an unknown
    merge_method or parameter, no base_model: `runtime.method_config`, torch-free; the job makes
    them when it compiles the config, also after checking the output path, so a config with both
    mistakes is told about the method here and about the output by the Python API).
    `merge --in-process` is left to the job, which checks its contradicting option (`--address`)
    before the config."""
    from raymerge.runtime.actor_resources import check_actor_count  # config/ only

    if command in ("merge", "plan"):
        check_actor_count(args.workers, "workers")
        if command == "merge" and args.in_process:
            return
        from raymerge.config.merge_config import load_config
        from raymerge.runtime.method_config import check_method_config  # torch-free specs

        cfg, label = load_config(args.config)
        _check_model_paths([m.path for m in cfg.referenced_models()])
        check_method_config(cfg, label)
    elif command == "prune":
        check_actor_count(args.stages, "stages")
        from raymerge.config.prune_config import load_prune_config

        prune_cfg, _ = load_prune_config(args.config)
        if prune_cfg.model is not None:
            _check_model_paths([prune_cfg.model.path])
    elif command == "search":
        check_actor_count(args.stages, "stages")
        from raymerge.config.search_config import load_search_config

        load_search_config(args.config)


def _check_model_paths(paths: Sequence[str]) -> None:
    """The job's "model path not found" for the first local model folder that does not exist,
    before torch is imported (opening a source imports it)."""
    from raymerge.checkpoints.hub_id import missing_local_path
    from raymerge.errors import CheckpointError

    for path in paths:
        if missing_local_path(path):
            raise CheckpointError(f"model path not found: {path}")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="number of worker actors (default: one per GPU in the cluster, else one per CPU slot; in "
                        "this process, one per CPU core, or one for a merge reading under 16 MiB)")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS; else, on a machine without a GPU, the workers run "
                        "as threads of this process, since a local Ray costs seconds to start and stop and gives one "
                        "machine nothing; with a GPU, a local Ray of its own). 'local' starts a local Ray of its own; "
                        "'auto' joins the cluster running on this machine")
    g.add_argument("--random-seed", type=int, default=None, metavar="SEED",
                   help="seed of random methods (DARE, DELLA); each tensor is seeded from (SEED, tensor name). Default 0")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no step lines on stderr (the summary is printed)")


def _add_verbose(p: argparse.ArgumentParser, top: bool = False) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="also show other libraries' messages that raymerge hides by default (the HiGHS banner, "
                        "DeepSpeed's accelerator note, Optuna's log lines); raymerge's own warnings are always shown")


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model*.bin inputs (loaded with torch.load(weights_only=True))")
    p.add_argument("--allow-mixed-architectures", "--allow-crimes", action="store_true", dest="allow_mixed_architectures",
                   help="accept models whose config.json architectures differ (--allow-crimes is mergekit's name for it)")


def _add_plan_options(p: argparse.ArgumentParser, for_merge: bool) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--cluster", default=None, metavar="PROFILE",
                   help="cluster profile (clusters/*.yaml): workers, memory, bandwidths. "
                        + ("Merging uses its bandwidths and address; the workers are the live ones"
                           if for_merge else "Default: this machine (clusters/local.yaml)"))
    g.add_argument("--planner", choices=["milp", "lpt"], default="milp",
                   help="milp: PuLP mixed-integer program (HiGHS, else CBC), never worse than lpt (default); "
                        "lpt: longest-processing-time greedy")
    g.add_argument("--plan-time-limit", type=float, default=10.0, metavar="S",
                   help="seconds the MILP solver may take (default 10)")
    g.add_argument("--gantt", default=None, metavar="PNG",
                   help="draw the planned schedule to this image (needs matplotlib: pip install matplotlib)")
    g.add_argument("--json", default=None, metavar="FILE", dest="plan_json",
                   help="write the plan (assignments, makespan, bound, gap, solver) as JSON")


# mergekit-yaml flags that `raymerge merge` accepts but that have nothing to switch in raymerge:
# (flag, what raymerge does instead). Given (true), each prints that one line on stderr.
MERGEKIT_NOOP_FLAGS: dict[str, str] = {
    "cuda": "raymerge computes on the GPU of every worker that Ray gives one (one worker per GPU) and on "
            "the CPU elsewhere; there is no device switch",
    "low_cpu_memory": "each worker holds only the inputs of the tensor it is merging and writes its own output "
                      "shards, so neither RAM nor GPU memory ever holds the whole output",
    "lazy_unpickle": "inputs are always read tensor by tensor (safetensors by header offsets; pytorch_model*.bin, "
                     "with --allow-pickle, through torch.load(weights_only=True, mmap=True))",
}

TRUST_REMOTE_CODE_HELP = (
    "run the Python code a model ships (the classes its config.json or tokenizer_config.json auto_map names, "
    "read from the model's own files), as transformers' trust_remote_code: {where}. Default: off, and a model "
    "that needs its code is refused naming this flag")


def _add_trust_remote_code(p: argparse.ArgumentParser, where: str) -> None:
    """--trust-remote-code, explained for the command it is on."""
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help=TRUST_REMOTE_CODE_HELP.format(where=where))


def _add_mergekit_options(p: argparse.ArgumentParser) -> None:
    """mergekit-yaml's flags, so that `mergekit-yaml CONFIG OUT [flags]` runs as `raymerge merge`."""
    g = p.add_argument_group(
        "mergekit-yaml compatibility",
        "flags of mergekit-yaml, accepted so that its command lines work unchanged "
        "(--allow-crimes and --out-shard-size are above)")
    g.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the tokenizer and generation files (of the base model, else the first model, or of "
                        "tokenizer_source) to OUTPUT (default: on)")
    g.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write README.md (a Hugging Face model card: base_model, tags merge/raymerge, the method and "
                        "the config) and mergekit_config.yml (default: on)")
    g.add_argument("--lora-merge-dtype", default=None, metavar="DTYPE",
                   help="dtype (float32, float16, bfloat16) in which a model given with a LoRA adapter "
                        "(MODEL+ADAPTER in the config) is read and the adapter applied (default: as stored)")
    g.add_argument("--lora-merge-cache", default=None, metavar="DIR",
                   help="accepted, no effect: raymerge applies a LoRA adapter to each tensor as it is read, "
                        "so no merged copy of the model is written anywhere")
    _add_trust_remote_code(g, "the tokenizers of a tokenizer_source / tokenizer: merge, and the layers a guided "
                              "merge's statistics pass builds on its stage workers (a plain merge reads tensors and "
                              "config.json only and runs no model code)")
    for flag, instead in MERGEKIT_NOOP_FLAGS.items():
        g.add_argument(f"--{flag.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=False,
                       help=f"accepted, no effect: {instead}")


def _note_mergekit_flags(args: argparse.Namespace) -> None:
    """One line on stderr per mergekit flag given that raymerge has no use for."""
    for flag, instead in MERGEKIT_NOOP_FLAGS.items():
        if getattr(args, flag, False):
            print(f"raymerge: note: --{flag.replace('_', '-')} has no effect in raymerge: {instead}", file=sys.stderr)
    if getattr(args, "lora_merge_cache", None):
        print("raymerge: note: --lora-merge-cache has no effect in raymerge: LoRA adapters are applied to each "
              "tensor as it is read, nothing is cached", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymerge",
        description="Merge (and prune) LLM checkpoints on a Ray cluster. Configs use mergekit's YAML format.",
    )
    _add_verbose(parser, top=True)
    parser.add_argument("--version", action=_VersionAction, help="print raymerge's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser(
        "merge",
        help="merge models described by a mergekit-format YAML config",
        description=(
            "Merge the models of CONFIG (mergekit YAML) and publish the result at OUTPUT. Nothing is "
            "written to OUTPUT until the merge is complete; errors in the config or the models are "
            "reported before any work starts."
        ),
    )
    m.add_argument("config", help="merge config (mergekit YAML format)")
    m.add_argument("output", help="output directory (a Hugging Face model folder), or s3://bucket/prefix")
    m.add_argument("--s3-endpoint-url", default=None, metavar="URL",
                   help="endpoint of an S3-compatible store for s3:// models and output (default: AWS, or "
                        "$AWS_ENDPOINT_URL); credentials come from boto3's default chain")
    m.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it already holds a model")
    m.add_argument("--out-shard-size", default=None, metavar="SIZE",
                   help="largest output shard in bytes: 5GB (default), 500MB, 2GiB, a number of bytes, or "
                        "mergekit's counts 5B / 500M / 1K (5 billion / 500 million / 1000 bytes, as mergekit-yaml "
                        "compares them with bytes)")
    m.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the finished shards of an interrupted run of the same merge (its staging folder beside "
                        "OUTPUT; each shard is checked against its recorded sha256). Default: automatic, when the "
                        "staging folder was made by this very merge (same config, inputs, version, shard size), else "
                        "it is discarded; --resume: refuse to discard one from a different merge; --no-resume: "
                        "always start afresh")
    _add_input_options(m)
    m.add_argument("--scan-nonfinite", action="store_true",
                   help="before any work, read every input tensor once and stop at the first holding NaN or Inf "
                        "(costs a full read of the inputs)")
    m.add_argument("--in-process", action="store_true",
                   help="run the workers as threads of this process (one per CPU core, one for a merge reading "
                        "under 16 MiB, or --workers N), without "
                        "Ray: the default on a machine without a GPU when no cluster is named (see --address); the "
                        "bytes are those of a merge on Ray")
    m.add_argument("--plan-only", action="store_true",
                   help="print the placement plan for --cluster (default: this machine) and stop: nothing is "
                        "read but headers, nothing is written, Ray is not started")
    m.add_argument("--result-json", default=None, metavar="FILE",
                   help="also write the merge's result as JSON: bytes read and written, seconds per phase (plan, "
                        "Ray start, workers, merge, publish), the predicted and measured makespan")
    _add_run_options(m)
    _add_plan_options(m, for_merge=True)
    _add_mergekit_options(m)

    pr = sub.add_parser(
        "prune",
        help="prune a model with magnitude, Wanda or SparseGPT (unstructured or N:M) using calibration text",
        description=(
            "Prune the model of CONFIG (a prune YAML: model, method, sparsity, pattern, layerwise, modules, mode, "
            "calibration; see README) and publish the sparse checkpoint at OUTPUT with prune_report.json. The "
            "decoder layers are spread over stage workers (contiguous blocks, sized by the pipeline planner) and "
            "calibration activations flow through them, so no worker holds the whole model. Prints per-layer "
            "target and achieved sparsity and perplexity before/after on held-out calibration text."
        ),
    )
    pr.add_argument("config", help="prune config (YAML)")
    pr.add_argument("output", help="output directory (a Hugging Face model folder), or s3://bucket/prefix")
    pr.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it already holds a model")
    pr.add_argument("--stages", type=int, default=None, metavar="N",
                    help="layer-stage workers the decoder layers are split over (default: one per GPU in the cluster, "
                         "else one per CPU slot; at most one per layer)")
    pr.add_argument("--workers", type=int, dest="stages", help=argparse.SUPPRESS)  # the old spelling
    pr.add_argument("--in-process", action="store_true", help="run in this process as a single stage, without Ray")
    pr.add_argument("--allow-pickle", action="store_true",
                    help="accept pytorch_model*.bin and DeepSpeed ZeRO inputs (torch.load(weights_only=True)); "
                         "a config file cannot opt in")
    pr.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray of its own; 'auto' joins the cluster running on this machine)")
    pr.add_argument("--plot", default=None, metavar="PNG", help="write a per-layer sparsity chart (needs matplotlib)")
    pr.add_argument("--json", default=None, metavar="FILE", dest="report_json",
                    help="also write the report (prune_report.json in OUTPUT) to FILE")
    pr.add_argument("--s3-endpoint-url", default=None, metavar="URL",
                    help="endpoint of an S3-compatible store for an s3:// model and output (default: AWS, or $AWS_ENDPOINT_URL)")
    pr.add_argument("--quiet", action="store_true", help="no progress bars and no step lines on stderr (the report is printed)")
    _add_trust_remote_code(pr, "the model's layers, built on every stage worker, and its tokenizer")

    se = sub.add_parser(
        "search",
        help="search merge coefficients or layerwise sparsities with Optuna, trials evaluated in memory on Ray",
        description=(
            "Run (or continue) the Optuna study of CONFIG (a search YAML: `merge:` with ranges such as "
            "{low: 0, high: 1} in place of numbers, or `prune:` with `space:`; `objective`, `evaluation`, `study`; "
            "see README). Resident stage workers hold the input models' layers and re-merge or re-mask them per "
            "trial; nothing is written to disk per trial. OUT receives study.journal (rerun to continue), "
            "best.yaml (ready for `raymerge merge`/`prune`) and plots. An objective written as "
            "package.module:function imports that module and runs that function, by design: run only "
            "search configs you trust. Exit status 1 when every trial of the study failed (the first error "
            "is printed)."
        ),
    )
    se.add_argument("config", help="search config (YAML)")
    se.add_argument("output", help="folder for the study journal, best config(s) and plots")
    se.add_argument("--stages", type=int, default=1, metavar="N",
                    help="stage workers per trial; the model's layers are split over them (default 1)")
    se.add_argument("--in-process", action="store_true", help="evaluate in this process, one trial at a time, without Ray")
    se.add_argument("--materialize", nargs="?", const=True, default=False, metavar="TARGET",
                    help="also write the best model: to OUT/best-model, or to TARGET (a folder or s3://bucket/prefix, "
                         "published like `raymerge merge` does; checked before the study starts)")
    se.add_argument("--overwrite", action="store_true", help="replace what the --materialize TARGET holds")
    se.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray of its own; 'auto' joins the cluster running on this machine)")
    se.add_argument("--quiet", action="store_true", help="no progress bar and no step lines on stderr (the summary is printed)")
    se.add_argument("--s3-endpoint-url", default=None, metavar="URL",
                    help="endpoint of an S3-compatible store for s3:// models and an s3:// --materialize TARGET "
                         "(default: AWS, or $AWS_ENDPOINT_URL)")
    _add_input_options(se)
    _add_trust_remote_code(se, "the layers the stage workers build, the tokenizer, and --materialize")

    pl = sub.add_parser(
        "plan",
        help="plan a merge on a cluster (from headers or config.json shapes) without running it",
        description=(
            "Plan the merge of CONFIG on the cluster of --cluster: which worker computes each output tensor "
            "(or each row part of a large one), chosen by a mixed-integer program that minimises the makespan "
            "under worker memory and network bandwidth. Models may be folders holding only config.json "
            "(shape-only), so a 70B plan can be made on a laptop: e.g. "
            "`raymerge plan examples/plan_70b.yaml --cluster clusters/aws-4x8-a100.yaml --gantt plan.png`. "
            "Prints a table per worker, the predicted makespan, the lower bound, the gap, the solver and its status."
        ),
    )
    pl.add_argument("config", help="merge config (mergekit YAML format)")
    pl.add_argument("--workers", type=int, default=None, metavar="N",
                    help="without --cluster: plan for N workers on this machine (default: one per GPU, else per CPU)")
    _add_input_options(pl)
    _add_plan_options(pl, for_merge=False)

    d = sub.add_parser(
        "demo",
        help="build tiny demo models and merge them (no downloads)",
        description=(
            "Build a tiny base model and three fine-tunes with transformers, write a TIES config "
            "for them, merge them where `raymerge merge` would (no GPU and no --address: on worker threads of "
            "this process; with a GPU or --address: on Ray) and load the result with transformers: the whole pipeline, "
            "offline, in well under a minute. With --workdir the models, a calibration text and ready configs "
            "for `raymerge merge`, `prune` and `search` (ties.yaml, prune.yaml, search.yaml) stay there "
            "(README, 'The first hour')."
        ),
    )
    d.add_argument("--workdir", default=None,
                   help="where to put models, config and output, kept afterwards (default: a temporary folder, "
                        "removed at the end)")
    d.add_argument("--method", default="ties", help="merge method of the demo config (default: ties)")
    d.add_argument("--arch", default="llama", choices=["llama", "qwen2", "mistral"], help="demo architecture")
    _add_run_options(d)

    sub.add_parser("methods", help="list merge methods and their parameters",
                   description="List every merge method with its parameters and defaults.")
    for command in sub.choices.values():
        _add_verbose(command)
    return parser


def _merge(args: argparse.Namespace) -> int:
    import raymerge

    _note_mergekit_flags(args)
    if args.plan_only:
        return _plan(args)
    _preflight("merge", args)
    result = raymerge.merge(
        args.config, args.output, workers=args.workers, overwrite=args.overwrite, random_seed=args.random_seed,
        quiet=args.quiet, address=args.address, out_shard_size=args.out_shard_size,
        allow_pickle=args.allow_pickle, allow_mixed_architectures=args.allow_mixed_architectures,
        cluster=args.cluster, planner=args.planner, plan_time_limit=args.plan_time_limit,
        s3_endpoint_url=args.s3_endpoint_url, scan_nonfinite=args.scan_nonfinite, resume=args.resume,
        in_process=args.in_process, copy_tokenizer=args.copy_tokenizer, write_model_card=args.write_model_card,
        lora_merge_dtype=args.lora_merge_dtype, trust_remote_code=args.trust_remote_code,
    )
    print(result.summary())
    if args.result_json:
        import json

        Path(args.result_json).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    if result.plan is not None and result.plan.report is not None:
        _write_plan_outputs(args, result.plan.report)
    return 0


def _prune(args: argparse.Namespace) -> int:
    import raymerge

    _preflight("prune", args)
    result = raymerge.prune(
        args.config, args.output, stages=args.stages, in_process=args.in_process, overwrite=args.overwrite,
        quiet=args.quiet, address=args.address, plot=args.plot, s3_endpoint_url=args.s3_endpoint_url,
        allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
    )
    print(result.report.table())
    print(result.summary())
    if args.plot:
        print(f"per-layer sparsity chart: {args.plot}")
    if args.report_json:
        Path(args.report_json).write_text(result.report.to_json())
    return 0


def _search(args: argparse.Namespace) -> int:
    import raymerge

    _preflight("search", args)
    result = raymerge.optimize(args.config, args.output, stages=args.stages, in_process=args.in_process,
                               address=args.address, quiet=args.quiet, materialize=args.materialize,
                               overwrite=args.overwrite, allow_pickle=args.allow_pickle, allow_mixed_architectures=args.allow_mixed_architectures,
                               s3_endpoint_url=args.s3_endpoint_url, trust_remote_code=args.trust_remote_code)
    print(result.summary())
    for path in result.plots:
        print(f"plot: {path}")
    if result.materialized is not None:
        print(f"best model: {result.materialized}")
    if result.failed and not result.completed:
        from raymerge.errors import one_line

        first = next((t.user_attrs.get("error", "") for t in result.study.trials if t.user_attrs.get("error")), "")
        print(f"raymerge search: every trial failed ({result.failed}); first error: {one_line(first) or 'unknown'}",
              file=sys.stderr)
        return 1
    return 0


def _plan(args: argparse.Namespace) -> int:
    import raymerge

    _preflight("plan", args)
    report = raymerge.plan(
        args.config, cluster=args.cluster, workers=args.workers, planner=args.planner,
        time_limit=args.plan_time_limit, allow_pickle=args.allow_pickle,
        allow_mixed_architectures=args.allow_mixed_architectures,
        s3_endpoint_url=getattr(args, "s3_endpoint_url", None),
    )
    print(report.summary())
    _write_plan_outputs(args, report)
    return 0


def _write_plan_outputs(args: argparse.Namespace, report) -> None:
    """--json and --gantt, for `plan`, `merge --plan-only` and a real merge alike."""
    import json

    if args.plan_json:
        Path(args.plan_json).write_text(json.dumps(report.plan.to_dict(), indent=1) + "\n")
        print(f"plan written to {args.plan_json}")
    if args.gantt:
        from raymerge.gantt import draw_gantt

        title = f"{Path(args.config).name} on {report.topology.description}"
        print(f"schedule drawn to {draw_gantt(report.plan, report.problem, args.gantt, title=title)}")


def _demo(args: argparse.Namespace) -> int:
    if args.workdir:
        return _run_demo(args, Path(args.workdir))
    import shutil

    workdir = Path(tempfile.mkdtemp(prefix="raymerge-demo-"))
    try:
        return _run_demo(args, workdir)
    finally:  # the temporary folder goes, however the demo ends; --workdir keeps its files
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"removed the temporary folder {workdir} (--workdir DIR keeps the models, config and output)")


def _run_demo(args: argparse.Namespace, workdir: Path) -> int:
    import raymerge
    from raymerge.demo import write_demo_workdir
    from raymerge.progress import phase

    workdir.mkdir(parents=True, exist_ok=True)
    with phase(f"building tiny {args.arch} models in {workdir / 'models'}", quiet=args.quiet):
        configs = write_demo_workdir(workdir, arch=args.arch, method=args.method)
    config_path = configs["merge"]
    print(f"configs: {config_path} (merge), {configs['prune']} (prune), {configs['search']} (search)")
    result = raymerge.merge(config_path, workdir / "merged", workers=args.workers, overwrite=True,
                            random_seed=args.random_seed, quiet=args.quiet, address=args.address)
    print(result.summary())
    from transformers import AutoModelForCausalLM

    import torch

    model = AutoModelForCausalLM.from_pretrained(result.output)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    print(f"loaded the merged model with transformers: forward pass OK, logits {list(logits.shape)}")
    return 0


def _methods(_: argparse.Namespace) -> int:
    from raymerge.methods import available_methods, get_method

    for name in available_methods():
        spec = get_method(name)
        base = {"required": "needs base_model", "optional": "base_model optional", "none": "no base"}[spec.base]
        print(f"{name}  ({base}{', random' if spec.random else ''})")
        print(f"    {spec.doc}")
        for p in spec.params:
            scope = "per model" if p.per_model else "global"
            default = "required" if p.required else f"default {p.default!r}"
            print(f"    - {p.name} ({scope}, {default}): {p.doc}")
    print("\nguided merges (any per-tensor method above with a base_model, plus `raymerge: guidance:`;"
          " see README 'Guided merges'):")
    from raymerge.runtime.guidance_methods import available_guidance_methods, get_guidance_method

    for method in available_guidance_methods():
        g = get_guidance_method(method)
        print(f"    {method:<5} {g.parameter} (default {g.default:g}): {g.doc}")
    return 0


# The command line's garbage collector runs every GC_THRESHOLD allocations instead of every 700:
# importing torch and transformers makes a million long-lived objects, and each of the dozens of
# collections the default triggers walks them (about 0.3 s of a merge's start on a 2-core
# machine). Only this process's setting: the Python API leaves the caller's collector alone.
GC_THRESHOLD = 50_000


def main(argv: Optional[Sequence[str]] = None) -> int:
    import gc

    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        from raymerge.progress import set_verbose

        set_verbose()
    handler = {"merge": _merge, "prune": _prune, "search": _search, "plan": _plan, "demo": _demo, "methods": _methods}[args.command]
    try:
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, as one line, not as "Exception ignored" at exit
        return code
    except _user_error_types() as err:
        from raymerge.errors import one_line

        print(f"raymerge: error: {one_line(err)}", file=sys.stderr)
        return USER_ERRORS_EXIT
    except KeyboardInterrupt as err:
        _settle_stdout()
        print(f"raymerge: interrupted{_kept_note(err)}", file=sys.stderr)
        return INTERRUPTED_EXIT
    except BrokenPipeError as err:
        _settle_stdout()
        print(f"raymerge: standard output was closed (broken pipe){_kept_note(err)}", file=sys.stderr)
        return 1


def _kept_note(err: BaseException) -> str:
    """'; staging folder ... kept: ...' when the job kept its staging folder (`JobOutput.fail`'s note)."""
    notes = getattr(err, "__notes__", None) or []
    return f"; {notes[0]}" if notes else ""


def _settle_stdout() -> None:
    """Flush stdout; when it is a closed pipe (`| tee` died), point it at /dev/null so that the
    exit's own flush prints no second error."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, OSError, ValueError):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


def run() -> None:
    """The `raymerge` console script (and `python -m raymerge.cli`): `main()`, then `exit_quickly`."""
    exit_quickly(main())


def exit_quickly(code: int) -> None:
    """Leave the process with `code` without tearing the interpreter down.

    A normal exit finalizes every module and collects the objects that torch, transformers and
    Ray made: 0.6-1.3 s after a merge on the 2-core VM (`raymerge merge` of the benchmark's linear
    config, alternating the two exits: 4.5-5.6 s with a normal exit, 3.5-4.2 s with this one), time
    in which the work is done and nothing is left to save. What must run still does: every `atexit` handler, in order
    (Ray's shutdown of a local cluster this process started, `weakref.finalize` callbacks such as
    temporary folders' removal, logging's flush), then the flush of stdout and stderr. Only when
    a thread the interpreter would wait for is still running does the exit take the normal way.
    The Python API never calls this: `main()` returns its code to a caller that keeps running."""
    import atexit
    import threading

    waited_for = [t for t in threading.enumerate() if t.is_alive() and not t.daemon and t is not threading.main_thread()]
    if waited_for:
        sys.exit(code)
    atexit._run_exitfuncs()  # CPython's own hook for the handlers a normal exit runs
    _settle_stdout()
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


if __name__ == "__main__":
    run()
