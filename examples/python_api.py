"""The Python API in a pipeline step: build tiny demo models, merge them three ways, compare.

    python examples/python_api.py [WORKDIR]

Runs offline in well under a minute; without a GPU the merges run on worker threads of this
process (`raymerge.merge`'s default there; `address="local"` would start a local Ray).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import raymerge
from raymerge.demo import build_demo_models, demo_config


def main(workdir: Path) -> None:
    paths = build_demo_models(workdir / "models")
    for method in ("ties", "dare_ties", "task_arithmetic"):
        config = demo_config(paths, method)
        result = raymerge.merge(config, workdir / f"merged-{method}", overwrite=True, quiet=True, random_seed=1)
        print(f"{method:16s} {result.tensors} tensors, {result.bytes_read / 1e6:.1f} MB read, "
              f"{result.timings['merge']:.2f} s merging -> {result.output}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="raymerge-api-")))
