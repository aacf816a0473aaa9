"""What a Hugging Face Hub model reference looks like: an `org/name` id that is not a local path;
and what a missing local one looks like.

Its own module (no torch) so that every source kind (`resolve`, `lora`, `model_files`) can ask
without importing the registry of source kinds, and the command line before it imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_reference(path: str) -> bool:
    """Whether a model reference is read from the Hugging Face Hub (the `hub` source kind): an
    `org/name` id that is not a local path."""
    return bool(_HUB_ID.match(path)) and not Path(path).expanduser().exists()


def missing_local_path(path: str) -> bool:
    """Whether a model reference names a local path that does not exist: not `s3://...`, not a
    Hub id, and nothing at that path. No source kind opens it (`resolve.open_source` then says
    "model path not found")."""
    return not path.startswith("s3://") and not is_hub_reference(path) and not Path(path).expanduser().exists()
