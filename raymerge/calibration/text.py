"""Reading calibration text: local files, directories of them, or a Hugging Face dataset.

Owns `CalibrationError` (every calibration failure; the message names the file, field or value)
and `load_texts`, which returns a list of documents:

- `.txt`: documents separated by blank lines (a file without blank lines is one document);
- `.jsonl`, or `.json` holding JSON lines: the `field` of each record (a `.json` file holding
  one JSON array of records, or one record, is read too);
- `.parquet`: the column `field`, read with pyarrow;
- a directory: every file of the above kinds directly inside it, sorted by name;
- anything else that does not exist locally and does not look like a path: a Hugging Face
  datasets name, loaded with `datasets.load_dataset(name, subset, split=split)` (optional
  dependency; `split` may slice, e.g. `train[:2000]`).

Null values are skipped, as are documents that are empty or whitespace only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from raymerge.errors import RaymergeError

if TYPE_CHECKING:
    from raymerge.config.calibration import CalibrationConfig

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


class CalibrationError(RaymergeError, ValueError):
    """Calibration data is missing or unusable; the message names the file, field or value."""


def load_texts(
    dataset: Union["CalibrationConfig", str, Path],
    *,
    field: Optional[str] = None,
    split: Optional[str] = None,
    subset: Optional[str] = None,
) -> list[str]:
    """Read the documents of `dataset` (a CalibrationConfig, or a path / datasets name).

    With a CalibrationConfig, `field`, `split` and `subset` default to the config's values;
    otherwise to "text", "train" and None.
    """
    source, field, split, subset = _source_args(dataset, field, split, subset)
    path = Path(source).expanduser()
    if path.is_dir():
        texts = _read_directory(path, field)
    elif path.is_file():
        texts = _read_file(path, field)
    elif _looks_like_path(source):
        raise CalibrationError(f"calibration dataset not found: {source} (no such file or directory)")
    else:
        return _non_empty(_read_hf_dataset(source, field, split, subset), f"Hugging Face dataset {source!r}")
    return _non_empty(texts, str(path))


def _source_args(
    dataset: Union["CalibrationConfig", str, Path],
    field: Optional[str],
    split: Optional[str],
    subset: Optional[str],
) -> tuple[str, str, str, Optional[str]]:
    if isinstance(dataset, (str, Path)):
        return str(dataset), field or "text", split or "train", subset
    return (
        dataset.dataset,
        field or dataset.field,
        split or dataset.split,
        subset if subset is not None else dataset.subset,
    )


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or source.lower().endswith(SUPPORTED_SUFFIXES)
        or (len(source) > 1 and source[1] == ":")  # a Windows drive letter
    )


def _non_empty(texts: list[str], where: str) -> list[str]:
    if not texts:
        raise CalibrationError(f"no calibration text in {where}")
    return texts


def _clean(values: Iterable[Optional[str]]) -> list[str]:
    return [v.strip() for v in values if v is not None and v.strip()]


def _read_directory(path: Path, field: str) -> list[str]:
    files = sorted(
        p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SUPPORTED_SUFFIXES
    )
    if not files:
        raise CalibrationError(
            f"no calibration files in directory {path} (looked for {', '.join(SUPPORTED_SUFFIXES)})"
        )
    texts: list[str] = []
    for file in files:
        texts.extend(_read_file(file, field))
    return texts


def _read_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_json_lines(path, field, _read_utf8(path))
    if suffix == ".json":
        return _read_json(path, field)
    if suffix == ".parquet":
        return _read_parquet(path, field)
    raise CalibrationError(
        f"unsupported calibration file {path}: use one of {', '.join(SUPPORTED_SUFFIXES)} or a directory of them"
    )


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text: {err}") from None


def _read_txt(path: Path) -> list[str]:
    text = _read_utf8(path).replace("\r\n", "\n")
    return _clean(_BLANK_LINES.split(text))


def _read_json(path: Path, field: str) -> list[str]:
    """A `.json` file: one JSON array of records, one record, or JSON lines."""
    raw = _read_utf8(path)
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return _read_json_lines(path, field, raw)
    if isinstance(data, dict):
        return _clean([_record_text(data, field, path, "line 1")])
    if isinstance(data, list):
        return _clean([_record_text(rec, field, path, f"record {i}") for i, rec in enumerate(data)])
    raise CalibrationError(f"{path}: expected JSON records (objects with a {field!r} field), got {type(data).__name__}")


def _read_json_lines(path: Path, field: str, raw: str) -> list[str]:
    values: list[Optional[str]] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path}, line {lineno}: invalid JSON: {err.msg}") from None
        values.append(_record_text(record, field, path, f"line {lineno}"))
    return _clean(values)


def _record_text(record: Any, field: str, path: Path, where: str) -> Optional[str]:
    if not isinstance(record, dict):
        raise CalibrationError(f"{path}, {where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(map(repr, record)) or "none"
        raise CalibrationError(f"{path}, {where}: no field {field!r} (calibration.field); the record has {keys}")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise CalibrationError(
            f"{path}, {where}: field {field!r} must be a string, got {type(value).__name__}"
        )
    return value


def _read_parquet(path: Path, field: str) -> list[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CalibrationError(
            f"reading {path} needs pyarrow: pip install pyarrow (or pip install 'raymerge[calibration]')"
        ) from None
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise CalibrationError(f"{path}: not a readable parquet file: {err}") from None
    if field not in schema.names:
        raise CalibrationError(
            f"{path}: no column {field!r} (calibration.field); the columns are {', '.join(schema.names)}"
        )
    column_type = schema.field(field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise CalibrationError(f"{path}: column {field!r} must hold strings, it is {column_type}")
    return _clean(pq.read_table(path, columns=[field]).column(field).to_pylist())


def _read_hf_dataset(name: str, field: str, split: str, subset: Optional[str]) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CalibrationError(
            f"calibration dataset {name!r} is not a local file or directory, so it is read as a Hugging Face "
            "dataset, which needs the optional 'datasets' package: pip install datasets "
            "(or pip install 'raymerge[calibration]'), or point calibration.dataset at a local "
            f"{'/'.join(SUPPORTED_SUFFIXES)} file or a directory of them"
        ) from None
    label = f"Hugging Face dataset {name!r}" + (f" (subset {subset!r})" if subset else "") + f", split {split!r}"
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as err:  # datasets raises many types (network, missing config, bad split)
        raise CalibrationError(f"could not load {label}: {type(err).__name__}: {err}") from None
    columns = list(getattr(ds, "column_names", None) or [])
    if field not in columns:
        raise CalibrationError(f"{label}: no column {field!r} (calibration.field); the columns are {', '.join(columns)}")
    values = ds[field]
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise CalibrationError(f"{label}: column {field!r} must hold strings, found {type(bad).__name__}")
    return _clean(values)
