"""What a Hugging Face Hub model reference looks like: an `org/name` id that is not a local path.

Its own module so that every source kind (`resolve`, `lora`, `model_files`) can ask without
importing the registry of source kinds.
"""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_reference(path: str) -> bool:
    """Whether a model reference is read from the Hugging Face Hub (the `hub` source kind): an
    `org/name` id that is not a local path."""
    return bool(_HUB_ID.match(path)) and not Path(path).expanduser().exists()
