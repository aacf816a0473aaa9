"""Picking the sink of an output path: a local directory or an `s3://bucket/prefix`.

Its own module so that neither sink imports the other: `writer` (local `StagedOutput`, shard
layout and writes) knows nothing of S3, `s3` builds on `writer` (its `OutputError`, staging
folder), and this module, above both, chooses between them.
"""

from __future__ import annotations

import os
from typing import Optional

from raymerge.checkpoints.s3 import S3StagedOutput
from raymerge.checkpoints.writer import StagedOutput


def open_output(output: str | os.PathLike, *, overwrite: bool = False, s3_endpoint_url: Optional[str] = None):
    """The staged output for `output`: a local directory (`StagedOutput`) or an
    `s3://bucket/prefix` (`s3.S3StagedOutput`: local staging, uploads, `config.json` last)."""
    text = str(output)
    if isinstance(output, os.PathLike) and text.startswith("s3:/") and not text.startswith("s3://"):
        text = "s3://" + text[len("s3:/"):]  # Path("s3://b/p") collapses the double slash
    if text.startswith("s3://"):
        return S3StagedOutput(text, overwrite=overwrite, endpoint_url=s3_endpoint_url)
    return StagedOutput(output, overwrite=overwrite)
