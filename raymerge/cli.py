"""The `raymerge` command line: `merge`, `demo` and `methods`.

Thin by design: parse arguments, call the public API, print the summary. Errors that come from
the user's inputs (config, model paths, output path) print one clear message and exit with 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

USER_ERRORS_EXIT = 2


def _user_error_types() -> tuple[type[BaseException], ...]:
    from raymerge.checkpoints import CheckpointError, OutputError
    from raymerge.checkpoints.safetensors_format import HeaderError
    from raymerge.config import ConfigError
    from raymerge.methods import MethodError
    from raymerge.runtime.compute import OperatorError
    from raymerge.runtime.operators import MergePlanError

    return (ConfigError, CheckpointError, HeaderError, OutputError, MethodError, MergePlanError, OperatorError)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="number of worker actors (default: one per GPU in the cluster, else one per CPU slot)")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")
    g.add_argument("--random-seed", type=int, default=None, metavar="SEED",
                   help="seed of random methods (DARE, DELLA); each tensor is seeded from (SEED, tensor name). Default 0")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raymerge",
        description="Merge (and prune) LLM checkpoints on a Ray cluster. Configs use mergekit's YAML format.",
    )
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
    m.add_argument("output", help="output directory (a Hugging Face model folder)")
    m.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it already holds a model")
    m.add_argument("--out-shard-size", default=None, metavar="SIZE",
                   help="largest output shard, e.g. 5GB (default), 500MB, 2GiB or bytes")
    m.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model*.bin inputs (loaded with torch.load(weights_only=True))")
    m.add_argument("--allow-mixed-architectures", action="store_true",
                   help="merge models whose config.json architectures differ (mergekit's --allow-crimes)")
    _add_run_options(m)

    d = sub.add_parser(
        "demo",
        help="build tiny demo models and merge them (no downloads)",
        description=(
            "Build a tiny base model and three fine-tunes with transformers, write a TIES config "
            "for them and merge them on a local Ray: the whole pipeline on any machine in seconds."
        ),
    )
    d.add_argument("--workdir", default=None, help="where to put models, config and output (default: a temporary folder)")
    d.add_argument("--method", default="ties", help="merge method of the demo config (default: ties)")
    d.add_argument("--arch", default="llama", choices=["llama", "qwen2", "mistral"], help="demo architecture")
    _add_run_options(d)

    sub.add_parser("methods", help="list merge methods and their parameters",
                   description="List every merge method with its parameters and defaults.")
    return parser


def _merge(args: argparse.Namespace) -> int:
    import raymerge

    result = raymerge.merge(
        args.config, args.output, workers=args.workers, overwrite=args.overwrite, random_seed=args.random_seed,
        quiet=args.quiet, address=args.address, out_shard_size=args.out_shard_size,
        allow_pickle=args.allow_pickle, allow_mixed_architectures=args.allow_mixed_architectures,
    )
    print(result.summary())
    return 0


def _demo(args: argparse.Namespace) -> int:
    import raymerge
    from raymerge.demo import build_demo_models, demo_config, write_yaml

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="raymerge-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"building tiny {args.arch} models in {workdir / 'models'} ...")
    paths = build_demo_models(workdir / "models", arch=args.arch)
    config_path = write_yaml(demo_config(paths, args.method), workdir / f"{args.method}.yaml")
    print(f"config: {config_path}")
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
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"merge": _merge, "demo": _demo, "methods": _methods}[args.command]
    try:
        return handler(args)
    except _user_error_types() as err:
        print(f"raymerge: error: {err}", file=sys.stderr)
        return USER_ERRORS_EXIT


if __name__ == "__main__":
    sys.exit(main())
