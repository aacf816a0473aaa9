"""Model and tokenizer code shipped with a checkpoint: transformers' `trust_remote_code`.

A model whose `config.json` (or `tokenizer_config.json`) has an `auto_map` names Python classes
in files next to its weights (`"AutoConfig": "configuration_x.XConfig"`). transformers runs such
code only when asked to (`trust_remote_code=True`), and so does raymerge: only with
`--trust-remote-code` (`trust_remote_code=True` in the Python API), off by default.

- The code is read through the checkpoint source, like the tokenizer files (so a Hub, S3 or
  DeepSpeed model works like a local folder): the modules the `auto_map` names, plus the modules
  they import relatively (`from .configuration_x import ...`), found with transformers' own
  `get_relative_imports`. The files are written, with the config, into a temporary folder named
  after a hash of their contents, and transformers loads the classes from there (it copies them
  into its module cache under that stable name, so the same code is one module however often
  a stage is built).
- An `auto_map` entry that points at another repository (`org/repo--module.Class`) is refused:
  raymerge reads code only from the model's own files.
- Without the flag, a model that cannot be built without its code is refused with a
  `CheckpointError` naming the file and the flag, before anything runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from raymerge.checkpoints.source import CheckpointError

FLAG_HINT = "--trust-remote-code (Python API: trust_remote_code=True)"


def auto_map(config: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """The `auto_map` of a config.json / tokenizer_config.json dict ({} when it has none)."""
    value = (config or {}).get("auto_map")
    return dict(value) if isinstance(value, Mapping) else {}


def _modules(mapping: Mapping[str, Any], where: str) -> list[str]:
    """The module names (`configuration_x`) an auto_map's class references live in."""
    refs: list[str] = []
    for value in mapping.values():
        refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    modules = []
    for ref in refs:
        if "--" in ref:
            raise CheckpointError(
                f"{where}: auto_map entry {ref!r} names code in another repository ({ref.split('--')[0]}); "
                f"raymerge runs only code that ships with the model itself"
            )
        modules.append(ref.rsplit(".", 1)[0])  # a plain module name, or `code_files` refuses it (`_module_file`)
    return list(dict.fromkeys(modules))


def _module_file(module: str, where: str, why: str) -> str:
    """`module.py` for a module next to config.json; a `CheckpointError` for any other name (a
    dotted or path-like one: `.../x`, `a.b`), which could name a file outside the model folder."""
    if not module.isidentifier():
        raise CheckpointError(f"{where}: {why} {module!r}, which is not a module next to config.json; refused")
    return f"{module}.py"


def code_files(mapping: Mapping[str, Any], read: Callable[[str], Optional[bytes]], where: str) -> dict[str, bytes]:
    """The Python files behind `mapping` (an auto_map), and those they import relatively, read
    with `read(filename)`; a `CheckpointError` naming `where` when one is missing, or when a name
    is not a plain module next to config.json (only such files are read or written)."""
    from transformers.dynamic_module_utils import get_relative_imports

    files: dict[str, bytes] = {}
    pending = [(m, "auto_map names") for m in _modules(mapping, where)]
    with tempfile.TemporaryDirectory(prefix="raymerge-code-scan-") as tmp:
        while pending:
            module, why = pending.pop()
            name = _module_file(module, where, why)
            if name in files:
                continue
            data = read(name)
            if data is None:
                raise CheckpointError(f"{where}: auto_map names {module}, but the model has no {name}")
            files[name] = data
            path = Path(tmp, name)
            path.write_bytes(data)
            try:
                imports = get_relative_imports(str(path))
            except (UnicodeDecodeError, OSError) as err:
                raise CheckpointError(f"{where}: {name} cannot be read as Python source ({err})") from None
            pending += [(m, f"{name} imports") for m in imports if f"{m}.py" not in files]
    return files


@contextlib.contextmanager
def code_folder(files: Mapping[str, bytes]) -> Iterator[Path]:
    """A temporary folder holding `files` (config, tokenizer and code files), named after a hash
    of them, so that transformers loads the same code under the same module name every time."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    with tempfile.TemporaryDirectory(prefix="raymerge-code-") as tmp:
        folder = Path(tmp, f"raymerge_code_{digest.hexdigest()[:16]}")
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        yield folder


def model_code_files(config: Mapping[str, Any], read: Callable[[str], Optional[bytes]], where: str) -> dict[str, bytes]:
    """`config.json` (as given) and the code its auto_map names: what transformers needs to
    build the model with `trust_remote_code=True`."""
    files = code_files(auto_map(config), read, where)
    files["config.json"] = json.dumps(dict(config)).encode()
    return files


def tokenizer_auto_map(files: Mapping[str, bytes]) -> dict[str, Any]:
    """The `AutoTokenizer` entries of a model's tokenizer_config.json and config.json auto_maps
    (`files` holds those JSON files when the model has them), by file name; {} when none."""
    mapping: dict[str, Any] = {}
    for name in ("config.json", "tokenizer_config.json"):
        if name in files:
            try:
                data = json.loads(files[name])
            except ValueError:
                continue  # the tokenizer loader reports a broken file itself
            entry = auto_map(data if isinstance(data, dict) else None).get("AutoTokenizer")
            if entry is not None:
                mapping[name] = entry
    return mapping


def tokenizer_code_files(files: Mapping[str, bytes], read: Callable[[str], Optional[bytes]], where: str) -> dict[str, bytes]:
    """The code behind the `AutoTokenizer` entries of `files`' auto_maps (`tokenizer_auto_map`)."""
    return code_files(tokenizer_auto_map(files), read, where)


def needs_code_error(where: str, what: str, err: BaseException) -> CheckpointError:
    """The error for a model or tokenizer that transformers could not load without its code."""
    return CheckpointError(
        f"{where}: its {what} is defined by code shipped with the model (auto_map), which runs only with "
        f"{FLAG_HINT}; pass it if you trust that code ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
    )
