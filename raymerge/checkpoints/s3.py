"""Models in S3 (`s3://bucket/prefix`): a lazy source that reads byte ranges, and an output sink.

Inputs (`S3Source`). The layout is a Hugging Face folder under the prefix (`model.safetensors`,
or shards listed in `model.safetensors.index.json`, plus `config.json` and tokenizer files).
Opening reads, per shard, the first 8 bytes (one ranged GET: the header length, and from the
`Content-Range` reply the object size) and then the header itself (a second ranged GET); shards
are opened concurrently. `read(name, rows)` is one ranged GET of exactly the bytes of that
tensor or row range; ranges of 32 MiB and more are split into 16 MiB sub-ranges fetched
concurrently (8 threads per process) into one buffer. So a worker downloads the bytes of its own
operators and the headers, never whole files: `bytes_read()` counts the tensor bytes fetched,
`fetch_stats()` adds header/JSON bytes and the request count. Every ranged GET of a shard carries
`If-Match: <ETag seen when its header was read>`, so an object replaced during a merge is an
error, never a silent mix of two versions. `pytorch_model*.bin` pickles are not read from S3.

Clients. One boto3 client per process and endpoint (clients are thread-safe), credentials from
boto3's default chain (environment, `AWS_PROFILE`/`~/.aws`, SSO, instance or task role). Nothing
of the credentials is ever put into a `SourceSpec`, sent through Ray, printed or logged: every
process (driver and each Ray worker) resolves them itself, so every node needs them. Retries are
botocore's: mode "adaptive" (backoff on throttling, 5xx and connection errors, and client-side
rate limiting after throttling) with 8 attempts; `AWS_RETRY_MODE` / `AWS_MAX_ATTEMPTS` override
both. botocore does not retry a body that breaks off mid-stream, so that (and only that) is
retried here, 3 times with backoff. The endpoint: the explicit option (`--s3-endpoint-url`,
`raymerge.merge(..., s3_endpoint_url=...)`), else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`
(as botocore reads them natively; `resolve_endpoint_url`). It is resolved on the driver and
travels in the picklable `SourceSpec`/`S3Target`, so workers use the same store even when their
environment differs.

Outputs (`S3StagedOutput`, same protocol as `writer.StagedOutput`):

1. `check_target` (before any work): the bucket is listable, the prefix holds no objects unless
   `overwrite`, and a small probe object put and deleted under the prefix proves it writable.
2. `prepare`: shards are laid out and pre-allocated in a local staging folder, as for local
   outputs (`tempfile.gettempdir()`, or `$RAYMERGE_STAGING_DIR`; the folder is named after the
   target URL, so a rerun after a crash resumes from it: `runtime.recovery`); workers write tensors there
   at their offsets. A merge on several nodes needs no shared folder: each node keeps its own
   copy of the folder (`writer.ensure_node_shards`), every part of a shard runs on one node, and
   a worker there uploads the shard once finished (`seal_shard`, with its sha256 and job as
   object metadata: what a resume checks, `verify_finished`, instead of hashing a local copy).
   A prune's stages still need the folder on storage every node sees when they span nodes.
3. `upload_shards(spread)`: once every tensor is written, the shards are uploaded under their
   final keys, by the job's worker actors when the runtime passes `spread` (`balance_shards`:
   largest first, each to the least loaded worker; a shard's tensors come from many workers, so
   no single worker "wrote" it; this module never imports Ray), else by this process, with boto3's managed
   transfer: multipart (64 MiB parts, 8 concurrent) above 64 MiB. With `overwrite`, the old
   model's `config.json` and index are deleted first, so the prefix stops looking like a model
   before any of its objects is replaced (an S3 overwrite is not atomic: a failure after this
   point leaves the old model unloadable).
4. `publish`: the driver uploads tokenizer files, README and config copy, then
   `model.safetensors.index.json` (sharded outputs), then **`config.json`, always the last
   object written: its presence marks a complete model**. Until then nothing loads as a model
   (`from_pretrained` needs `config.json`; S3 objects, multipart ones included, appear only
   once complete, so even `model.safetensors` alone is never seen half-written). Objects of an
   overwritten model that the new one does not have are deleted last (direct children of the
   prefix only).
5. `abort` (any failure): removes the staging folder and, if uploading had started, deletes
   every object of the new model that was uploaded and aborts its unfinished multipart uploads.

Errors name `s3://bucket/key` and say what failed (bucket missing, access denied, key missing,
endpoint unreachable) — never a credential.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterable, Mapping, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit


from raymerge.checkpoints.local import SAFE_INDEX, SAFE_SINGLE, check_relative_name, parse_weight_map
from raymerge.checkpoints.safetensors_format import HeaderError, TensorEntry, header_length, parse_header, tensor_from_bytes
from raymerge.checkpoints.source import CheckpointError, CheckpointSource, TensorInfo, row_span

if TYPE_CHECKING:
    import torch

SCHEME = "s3://"
CONFIG = "config.json"

RANGE_PART_BYTES = 16 * 1024 * 1024  # sub-range size of a large read
RANGE_CONCURRENCY = 8  # concurrent ranged GETs per process
STREAM_RETRIES = 3  # attempts at a body that breaks off mid-stream
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024
UPLOAD_CONCURRENCY = 8
MAX_ATTEMPTS = 8
STAGING_ENV = "RAYMERGE_STAGING_DIR"

_DENIED = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem", "InvalidClientTokenId",
}
_NO_BUCKET = {"NoSuchBucket"}
_NO_KEY = {"NoSuchKey", "404", "NotFound"}


def is_s3_url(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


@dataclass(frozen=True)
class S3Url:
    """`s3://bucket/prefix` split; `prefix` has no leading or trailing slash ('' = bucket root)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> "S3Url":
        if not is_s3_url(url):
            raise CheckpointError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = url[len(SCHEME):].partition("/")
        if not bucket:
            raise CheckpointError(f"{url}: no bucket name (expected s3://bucket/prefix)")
        return cls(bucket, prefix.strip("/"))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str = "") -> str:
        key = self.key(name) if name else self.prefix
        return f"{SCHEME}{self.bucket}/{key}" if key else f"{SCHEME}{self.bucket}"

    def __str__(self) -> str:
        return self.url()


# -- clients -----------------------------------------------------------------------------------

_clients: dict[tuple[int, Optional[str]], Any] = {}
_clients_lock = threading.Lock()
_pool: Optional[tuple[int, ThreadPoolExecutor]] = None


def resolve_endpoint_url(explicit: Optional[str] = None) -> Optional[str]:
    """The endpoint to use: `explicit`, else the one botocore would read from the environment
    (`AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`), else None (AWS itself)."""
    if explicit:
        return explicit
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _client_config():
    from botocore.config import Config

    mode = os.environ.get("AWS_RETRY_MODE") or "adaptive"
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or MAX_ATTEMPTS)
    return Config(
        retries={"mode": mode, "max_attempts": attempts},
        max_pool_connections=max(32, RANGE_CONCURRENCY + UPLOAD_CONCURRENCY),
        connect_timeout=10,
        read_timeout=120,
        user_agent_extra="raymerge",
    )


def s3_client(endpoint_url: Optional[str] = None):
    """This process's boto3 S3 client for `endpoint_url` (None: `resolve_endpoint_url`'s choice)."""
    endpoint_url = resolve_endpoint_url(endpoint_url)
    key = (os.getpid(), endpoint_url)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            try:
                import boto3
            except ImportError:  # pragma: no cover - boto3 is a dependency
                raise CheckpointError("S3 paths need boto3: pip install boto3") from None
            try:
                client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=_client_config())
            except ValueError as err:  # botocore rejects a malformed endpoint URL with ValueError
                raise CheckpointError(scrub(f"invalid S3 endpoint URL {safe_endpoint(endpoint_url)}: {err}", endpoint_url)) from None
            _clients[key] = client
        return client


def reset_clients() -> None:
    """Forget this process's clients (they are rebuilt, re-reading credentials, on next use)."""
    with _clients_lock:
        _clients.clear()


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _clients_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(RANGE_CONCURRENCY, thread_name_prefix="raymerge-s3"))
        return _pool[1]


def safe_endpoint(endpoint_url: Optional[str]) -> str:
    """An endpoint URL for messages: without any user:password part."""
    if not endpoint_url:
        return "(AWS default)"
    try:
        parts = urlsplit(endpoint_url)
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "(unparsable URL)"


def _error_code(err: BaseException) -> str:
    response = getattr(err, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code") or "")
    if not code:
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = str(status or "")
    return code


def _is_client_error(err: BaseException) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(err, ClientError)


def scrub(text: str, endpoint_url: Optional[str]) -> str:
    """`text` with the user and password of `endpoint_url` (if it embeds any) masked: botocore's
    own messages can quote the URL as given."""
    if not endpoint_url:
        return text
    try:
        parts = urlsplit(endpoint_url)
        secrets = [s for s in (parts.password, parts.username) if s]
    except ValueError:
        secrets = [endpoint_url]  # unparsable: never echo it at all
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def explain(err: BaseException, where: str, bucket: str, endpoint_url: Optional[str] = None) -> str:
    """One clear line for an S3 failure at `where` (never containing credentials)."""
    return scrub(_explain(err, where, bucket, endpoint_url), endpoint_url)


def _explain(err: BaseException, where: str, bucket: str, endpoint_url: Optional[str] = None) -> str:
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(err, ClientError):
        code = _error_code(err)
        op = getattr(err, "operation_name", "") or "request"
        if code in _NO_BUCKET:
            return f"{where}: S3 bucket {bucket!r} does not exist"
        if code in _DENIED:
            return (
                f"{where}: access denied ({code} on {op}); check the AWS credentials (boto3's default chain: "
                "environment, AWS_PROFILE or ~/.aws, instance role) and the bucket's policy"
            )
        if code in _NO_KEY:
            return f"{where}: not found in S3"
        if code in ("PreconditionFailed", "412"):
            return f"{where}: the object changed while it was being read (ETag mismatch); run the merge again"
        message = (err.response.get("Error") or {}).get("Message") or ""
        return f"{where}: S3 error {code or 'unknown'} on {op}" + (f": {message}" if message else "")
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return (
            f"{where}: no usable AWS credentials ({type(err).__name__}); boto3's default chain looks at "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws, and the instance role"
        )
    if isinstance(err, (EndpointConnectionError, ConnectTimeoutError)):
        return f"{where}: cannot reach the S3 endpoint {safe_endpoint(endpoint_url)} ({type(err).__name__})"
    if isinstance(err, BotoCoreError):
        return f"{where}: S3 request failed ({type(err).__name__}: {err})"
    return f"{where}: S3 request failed ({type(err).__name__})"


def _s3_failures() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def _stream_failures() -> tuple[type[BaseException], ...]:
    """Errors of a response body breaking off: retried here (botocore does not)."""
    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    extra: tuple[type[BaseException], ...] = ()
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error

        extra = (Urllib3Error,)
    except ImportError:  # pragma: no cover
        pass
    return (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError, ConnectionError, _ShortBody) + extra


class _ShortBody(Exception):
    """A ranged GET returned fewer bytes than asked for."""


class _Missing(Exception):
    """The object does not exist (NoSuchKey)."""


def _get_range(client, bucket: str, key: str, begin: int, end: int, into: memoryview, etag: Optional[str]) -> dict:
    """GET bytes [begin, end) of an object into `into`; returns the response's metadata
    (ContentRange, ETag). Retries a body that breaks off mid-stream."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={begin}-{end - 1}"}
    if etag:
        kwargs["IfMatch"] = etag
    failures = _stream_failures()
    last: Optional[BaseException] = None
    for attempt in range(STREAM_RETRIES):
        response = client.get_object(**kwargs)
        body = response["Body"]
        try:
            pos = 0
            n = end - begin
            while pos < n:
                chunk = body.read(min(1 << 20, n - pos))
                if not chunk:
                    raise _ShortBody(f"{pos} of {n} bytes")
                into[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
            body.read()  # the end of the body: the connection goes back to the pool for the next GET
            return {"ContentRange": response.get("ContentRange", ""), "ETag": response.get("ETag")}
        except failures as err:
            body.close()  # a broken connection is not reused
            last = err
            time.sleep(min(4.0, 0.25 * 2**attempt))
    raise CheckpointError(f"s3://{bucket}/{key}: download broke off {STREAM_RETRIES} times ({type(last).__name__})")


def _object_size(content_range: str) -> Optional[int]:
    """The total size from a `Content-Range: bytes a-b/SIZE` reply."""
    _, _, total = content_range.rpartition("/")
    return int(total) if total.isdigit() else None


# -- source ------------------------------------------------------------------------------------


class S3Source(CheckpointSource):
    """A Hugging Face model folder under an S3 prefix, read with ranged GETs."""

    def __init__(self, url: str, *, endpoint_url: Optional[str] = None, allow_pickle: bool = False):
        self.s3 = S3Url.parse(url)
        self.location = str(self.s3)
        self.endpoint_url = endpoint_url
        self._client = s3_client(endpoint_url)
        self._lock = threading.Lock()
        self._tensor_bytes = 0
        self._meta_bytes = 0
        self._requests = 0
        self._entries: dict[str, tuple[str, TensorEntry]] = {}
        self._etags: dict[str, Optional[str]] = {}
        index = self._get_whole(SAFE_INDEX)
        if index is not None:
            weight_map = parse_weight_map(index, self.s3.url(SAFE_INDEX))
            files = sorted(set(weight_map.values()))
            for fname in files:  # keys stay under the model's prefix
                check_relative_name(fname, self.s3.url(SAFE_INDEX), f"shard listed in {SAFE_INDEX}")
            headers = list(_thread_pool().map(self._shard_header, files))
            for fname, entries in zip(files, headers):
                if entries is None:
                    raise CheckpointError(f"{self.s3.url(fname)}: shard listed in {SAFE_INDEX} is missing")
                for name, entry in entries.items():
                    if weight_map.get(name) == fname:  # the index is authoritative
                        self._entries[name] = (fname, entry)
            missing = [n for n in weight_map if n not in self._entries]
            if missing:
                raise CheckpointError(
                    f"{self.s3.url(SAFE_INDEX)}: tensor {missing[0]!r} is listed in shard "
                    f"{weight_map[missing[0]]} but that shard does not contain it"
                )
            return
        entries = self._shard_header(SAFE_SINGLE)
        if entries is None:
            self._no_weights(allow_pickle)
        self._entries = {name: (SAFE_SINGLE, e) for name, e in entries.items()}  # type: ignore[union-attr]

    # -- opening ---------------------------------------------------------------------------
    def _fail(self, err: BaseException, name: str = "") -> CheckpointError:
        where = self.location if _error_code(err) in _NO_BUCKET else self.s3.url(name)
        return CheckpointError(explain(err, where, self.s3.bucket, self.endpoint_url))

    def _shard_header(self, fname: str) -> Optional[dict[str, TensorEntry]]:
        """The header of one shard (two ranged GETs), or None when the object does not exist."""
        where, key = self.s3.url(fname), self.s3.key(fname)
        try:
            prefix = bytearray(8)
            meta = _get_range(self._client, self.s3.bucket, key, 0, 8, memoryview(prefix), None)
            size = _object_size(meta["ContentRange"])
            etag = meta["ETag"]
            n = header_length(bytes(prefix), where, size)
            header = bytearray(n)
            _get_range(self._client, self.s3.bucket, key, 8, 8 + n, memoryview(header), etag)
            entries, _ = parse_header(bytes(header), where, size)
        except HeaderError as err:
            raise CheckpointError(str(err)) from None
        except _s3_failures() as err:
            code = _error_code(err)
            if code in _NO_KEY:
                return None
            if code == "InvalidRange":  # an object shorter than 8 bytes (e.g. empty)
                raise CheckpointError(f"{where}: not a safetensors file (shorter than 8 bytes)") from None
            raise self._fail(err, fname) from None
        with self._lock:
            self._etags[fname] = etag
            self._meta_bytes += 8 + n
            self._requests += 2
        return entries

    def _no_weights(self, allow_pickle: bool) -> None:
        """Raise the clearest error for a prefix without safetensors weights."""
        try:
            listing = self._client.list_objects_v2(Bucket=self.s3.bucket, Prefix=self.s3.key(""), Delimiter="/", MaxKeys=1000)
        except _s3_failures() as err:
            if _error_code(err) in _NO_BUCKET:
                raise self._fail(err) from None
            listing = None  # listing may be denied where reading is allowed: fall back to the generic message
        if listing is not None:
            names = {obj["Key"].rsplit("/", 1)[-1] for obj in listing.get("Contents", [])}
            if not names and not listing.get("CommonPrefixes"):
                raise CheckpointError(f"model path not found: {self.location} (no objects under this prefix)")
            if any(n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")) for n in names):
                raise CheckpointError(
                    f"{self.location}: only pytorch_model*.bin weights found; S3 inputs must be safetensors "
                    "(pickles cannot be read by byte range)"
                )
        raise CheckpointError(f"{self.location}: no weights found (expected {SAFE_SINGLE} or {SAFE_INDEX})")

    def _get_whole(self, name: str) -> Optional[bytes]:
        """A whole (small) object under the prefix, or None when it does not exist."""
        try:
            response = self._client.get_object(Bucket=self.s3.bucket, Key=self.s3.key(name))
            data = response["Body"].read()
        except _s3_failures() as err:
            if _error_code(err) in _NO_KEY:
                return None
            raise self._fail(err, name) from None
        with self._lock:
            self._meta_bytes += len(data)
            self._requests += 1
        return data

    # -- CheckpointSource --------------------------------------------------------------------
    def tensors(self) -> dict[str, TensorInfo]:
        return {name: TensorInfo(name, e.shape, e.dtype, fname, e.nbytes) for name, (fname, e) in self._entries.items()}

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        try:
            fname, entry = self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.location}: no tensor {name!r}") from None
        begin, end, shape = entry.begin, entry.end, entry.shape
        if rows is not None:
            first, past, shape = row_span(shape, rows, entry.row_bytes, self.s3.url(fname), name)
            begin, end = entry.begin + first, entry.begin + past
        buf = bytearray(end - begin)
        if end > begin:
            requests = self._fetch(fname, begin, end, memoryview(buf))
            with self._lock:
                self._tensor_bytes += end - begin
                self._requests += requests
        return tensor_from_bytes(buf, entry.dtype, shape)

    def _fetch(self, fname: str, begin: int, end: int, into: memoryview) -> int:
        """Bytes [begin, end) of a shard into `into`: one GET, or concurrent sub-ranges when
        large. Returns the number of GETs."""
        key, etag = self.s3.key(fname), self._etags.get(fname)
        bounds = [(begin, end)]
        if end - begin >= 2 * RANGE_PART_BYTES:
            bounds = [(a, min(a + RANGE_PART_BYTES, end)) for a in range(begin, end, RANGE_PART_BYTES)]

        def one(bound: tuple[int, int]) -> None:
            a, b = bound
            _get_range(self._client, self.s3.bucket, key, a, b, into[a - begin : b - begin], etag)

        try:
            if len(bounds) == 1:
                one(bounds[0])
            else:
                list(_thread_pool().map(one, bounds))
        except _s3_failures() as err:
            raise self._fail(err, fname) from None
        return len(bounds)

    def file_label(self, filename: str) -> str:
        return self.s3.url(filename)

    def read_bytes(self, filename: str) -> Optional[bytes]:
        # a key below the model's prefix only (as a local folder's boundary): no `..`, no absolute name
        return self._get_whole(check_relative_name(filename, self.location, "file"))

    def bytes_read(self) -> int:
        return self._tensor_bytes

    def fetch_stats(self) -> dict[str, int]:
        """Bytes fetched so far: tensor bytes, header/JSON bytes, and the number of GETs."""
        with self._lock:
            return {"tensor_bytes": self._tensor_bytes, "meta_bytes": self._meta_bytes, "requests": self._requests}


# -- output ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Target:
    """Where an output goes (picklable: workers upload with it; no credentials in it)."""

    bucket: str
    prefix: str
    endpoint_url: Optional[str] = None

    @property
    def url(self) -> S3Url:
        return S3Url(self.bucket, self.prefix)


def _fail_output(err: BaseException, where: str, target: S3Target):
    from raymerge.checkpoints.writer import OutputError

    return OutputError(explain(err, where, target.bucket, target.endpoint_url))


def upload_files(
    target: S3Target,
    staging: str | os.PathLike,
    filenames: Iterable[str],
    *,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    multipart_chunk: int = MULTIPART_CHUNK,
    metadata: Optional[dict[str, str]] = None,
) -> int:
    """Upload files of a staging folder under the target prefix (multipart above the threshold;
    boto3's managed transfer aborts a failed multipart upload). Returns the bytes uploaded."""
    from boto3.s3.transfer import TransferConfig

    client = s3_client(target.endpoint_url)
    config = TransferConfig(
        multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunk,
        max_concurrency=UPLOAD_CONCURRENCY, use_threads=True,
    )
    total = 0
    for name in filenames:
        path = Path(staging) / name
        where = target.url.url(name)
        try:
            client.upload_file(str(path), target.bucket, target.url.key(name), Config=config,
                               ExtraArgs={"Metadata": metadata} if metadata else None)
        except _s3_failures() as err:
            raise _fail_output(err, where, target) from None
        except Exception as err:  # noqa: BLE001 - s3transfer wraps failures in its own types
            cause = err.__cause__ or err.__context__
            if cause is not None and isinstance(cause, _s3_failures()):
                raise _fail_output(cause, where, target) from None
            raise
        total += path.stat().st_size
    return total


SHA_META = "raymerge-sha256"  # user metadata of an uploaded shard: the sha256 of its bytes
JOB_META = "raymerge-job"  # ... and the job (`runtime.recovery.job_identity`) that wrote it


def seal_shard(target: S3Target, staging: str | os.PathLike, name: str, job: str) -> str:
    """Upload one finished shard from the staging folder of *this* node, with its sha256 and
    job as object metadata (what a resume checks: `S3StagedOutput.verify_finished`); returns the
    sha256. Run by a worker on the node that wrote the shard: the driver never reads it."""
    from raymerge.checkpoints.manifest import file_sha256

    digest = file_sha256(Path(staging) / name, fsync=True)
    upload_files(target, staging, [name], metadata={SHA_META: digest, JOB_META: job})
    return digest


def balance_shards(shards: Sequence[tuple[str, int]], ways: int) -> list[list[str]]:
    """(name, size) shards split `ways` ways: largest first, each to the least loaded."""
    loads = [0] * max(1, ways)
    assigned: list[list[str]] = [[] for _ in loads]
    for name, size in sorted(shards, key=lambda s: -s[1]):
        i = loads.index(min(loads))
        assigned[i].append(name)
        loads[i] += size
    return assigned


def private_folder(path: Path) -> Path:
    """`path`, created with mode 0700 if missing; refused (OutputError) when it is a symlink, is
    owned by another user, or lets others in."""
    from raymerge.checkpoints.writer import OutputError

    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as err:
        raise OutputError(f"cannot create the private staging folder {path}: {err.strerror}") from None
    import stat

    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OutputError(
            f"staging folder {path} is not private (a symlink, another user's, or open to others); "
            f"remove it or set {STAGING_ENV} to a folder of your own"
        )
    return path


class S3StagedOutput:
    """An `s3://bucket/prefix` output: local staging, shards uploaded by workers, config last."""

    def __init__(self, url: str, *, overwrite: bool = False, endpoint_url: Optional[str] = None):
        s3 = S3Url.parse(url)
        self.target = S3Target(s3.bucket, s3.prefix, endpoint_url)
        self.output = str(s3)
        self.overwrite = overwrite
        root = Path(os.environ.get(STAGING_ENV) or tempfile.gettempdir())
        # Named after the target, so a rerun after a crash finds it again (resume: runtime.recovery),
        # inside a folder only this user can enter (`private_folder`): a predictable name in a shared
        # temp folder must not let another user plant or read the staged model.
        key = hashlib.sha256(f"{endpoint_url or ''} {self.output}".encode()).hexdigest()[:16]
        self.staging = private_folder(root / f"raymerge-{os.getuid()}") / f"staging-{key}"
        self.published: list[str] = []
        self._existing: set[str] = set()
        self._shards: list[tuple[str, int]] = []
        self._upload_started = False
        self._interrupted: dict[str, tuple[int, str, str]] = {}  # shards of an interrupted run in the bucket
        self.uploaded: set[str] = set()  # shards already up (sealed by workers as they finished, or kept by a resume)

    @property
    def _client(self):
        return s3_client(self.target.endpoint_url)

    def _remove_staging(self) -> None:
        """Remove this output's staging folder, and the private parent when nothing else is in it."""
        shutil.rmtree(self.staging, ignore_errors=True)
        try:
            self.staging.parent.rmdir()
        except OSError:
            pass  # another output's staging is still there

    def _fail(self, err: BaseException, name: str = ""):
        return _fail_output(err, self.target.url.url(name), self.target)

    def _children(self) -> tuple[set[str], bool]:
        """Names of the objects directly under the prefix, and whether there are deeper ones."""
        names: set[str] = set()
        deeper = False
        prefix = self.target.url.key("")
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.target.bucket, Prefix=prefix, Delimiter="/"):
            names.update(obj["Key"][len(prefix):] for obj in page.get("Contents", []))
            deeper = deeper or bool(page.get("CommonPrefixes"))
        return names, deeper

    def _own_unfinished_upload(self, names: set[str]) -> bool:
        """The objects under the prefix are an earlier, interrupted run of this output by this
        user: no `config.json` (uploaded last, so never a model) and this output's staging folder
        still holds its resume manifest. The rerun resumes and replaces them."""
        from raymerge.checkpoints.manifest import MANIFEST_NAME

        return CONFIG not in names and (self.staging / MANIFEST_NAME).is_file()

    def _uploaded_shards(self, names: set[str]) -> Optional[dict[str, tuple[int, str, str]]]:
        """When the objects `names` are an interrupted raymerge upload: no `config.json` (so never
        a model), and shards that raymerge workers uploaded (`seal_shard`: their metadata names
        the job and the sha256), maybe with the small files a publish puts before config.json:
        each shard's name -> (size, sha256, job). Else None."""
        shards = sorted(n for n in names if n.endswith(".safetensors"))
        if not shards or CONFIG in names:
            return None
        found = {}
        for name in shards:
            head = self._client.head_object(Bucket=self.target.bucket, Key=self.target.url.key(name))
            meta = head.get("Metadata") or {}
            if SHA_META not in meta or JOB_META not in meta:
                return None
            found[name] = (int(head.get("ContentLength", -1)), meta[SHA_META], meta[JOB_META])
        return found

    def finished_in_bucket(self, job: str, sizes: Mapping[str, int]) -> list[tuple[str, int, str]]:
        """The shards an interrupted run of `job` uploaded under the prefix (`check_target` found
        them) that the layout (`sizes`: name -> bytes) still has, as (name, size, sha256): a
        rerun whose driver lacks that run's staging folder (another node, a new pod) resumes
        from them. Shards of another job there are refused (OutputError: pass --overwrite),
        before any work."""
        from raymerge.checkpoints.writer import OutputError

        other = sorted(n for n, (_, _, owner) in self._interrupted.items() if owner != job)
        if other:
            raise OutputError(f"output path {self.output} holds shards of another, interrupted merge ({other[0]}, ...); "
                              f"pass --overwrite (overwrite=True) to replace them")
        return [(n, size, sha) for n, (size, sha, _) in sorted(self._interrupted.items()) if sizes.get(n) == size]

    def check_target(self) -> None:
        """Fail early, before any work: bucket missing, not listable or writable, prefix in use."""
        from raymerge.checkpoints.writer import OutputError

        try:
            names, deeper = self._children()
        except _s3_failures() as err:
            raise self._fail(err) from None
        if (names or deeper) and not self.overwrite and not self._own_unfinished_upload(names):
            try:
                uploaded = None if deeper else self._uploaded_shards(names)
            except _s3_failures() as err:
                raise self._fail(err) from None
            if uploaded is None:
                holds = CONFIG in names or SAFE_INDEX in names or any(n.endswith((".safetensors", ".bin")) for n in names)
                what = "already holds a model" if holds else "is not empty"
                raise OutputError(f"output path {self.output} {what}; pass --overwrite (overwrite=True) to replace it")
            self._interrupted = uploaded
        self._existing = names
        probe = f".raymerge-write-probe-{uuid.uuid4().hex[:12]}"
        try:
            self._client.put_object(Bucket=self.target.bucket, Key=self.target.url.key(probe), Body=b"")
            self._client.delete_object(Bucket=self.target.bucket, Key=self.target.url.key(probe))
        except _s3_failures() as err:
            raise self._fail(err, probe) from None

    def prepare(self, layout, keep: Collection[str] = ()) -> None:
        """As `writer.StagedOutput.prepare` (`keep`: the finished shards of a resumed merge)."""
        from raymerge.checkpoints.writer import reset_staging

        self.check_target()
        reset_staging(self.staging, layout, keep)
        self._shards = [(s.filename, s.size) for s in layout.shards]

    def write_file(self, name: str, data: bytes | str) -> None:
        (self.staging / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)

    def _delete(self, names: Iterable[str]) -> None:
        keys = [{"Key": self.target.url.key(n)} for n in names]
        for i in range(0, len(keys), 1000):
            response = self._client.delete_objects(Bucket=self.target.bucket, Delete={"Objects": keys[i : i + 1000], "Quiet": True})
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise self._fail_delete(first.get("Key", ""), first.get("Code", ""))

    def _fail_delete(self, key: str, code: str):
        from raymerge.checkpoints.writer import OutputError

        return OutputError(f"s3://{self.target.bucket}/{key}: cannot delete ({code})")

    def begin_upload(self) -> None:
        """Before the first shard is uploaded (shards go up as they finish: `seal_shard`): with
        `overwrite`, the old model's `config.json` and index are deleted first."""
        if self._upload_started:
            return
        self._upload_started = True
        if self.overwrite:
            stale_markers = [n for n in (CONFIG, SAFE_INDEX) if n in self._existing]
            if stale_markers:
                try:
                    self._delete(stale_markers)
                except _s3_failures() as err:
                    raise self._fail(err) from None

    def verify_finished(self, name: str, size: int, sha256: str) -> bool:
        """A shard a resumed job recorded as finished is in the bucket with that size and sha256
        (the metadata `seal_shard` put): kept as uploaded, never downloaded."""
        try:
            head = self._client.head_object(Bucket=self.target.bucket, Key=self.target.url.key(name))
        except _s3_failures():
            return False
        ok = head.get("ContentLength") == size and (head.get("Metadata") or {}).get(SHA_META) == sha256
        if ok:
            self.uploaded.add(name)
            self._upload_started = True
        return ok

    def upload_shards(self, spread: Optional[Callable[[S3Target, str, list[tuple[str, int]]], None]] = None) -> None:
        """Upload the (complete) shards under their final keys: from this process, or with
        `spread(target, staging, shards)` ((name, size) pairs), which uploads them elsewhere and
        returns once all are up. The runtime passes one that spreads them over its worker actors
        (`runtime.output`); this module never talks to Ray."""
        self.begin_upload()
        left = [(n, size) for n, size in self._shards if n not in self.uploaded]
        if not left:
            return
        try:
            if spread is None:
                upload_files(self.target, self.staging, [n for n, _ in left])
            else:
                spread(self.target, str(self.staging), left)
        except _s3_failures() as err:
            raise self._fail(err) from None

    def publish(self) -> str:
        """Upload the small files, the index, then config.json (last); delete stale objects."""
        if not self._upload_started:
            self.upload_shards()
        shards = {n for n, _ in self._shards}
        # raymerge's own bookkeeping (the resume manifest, ".raymerge-*") stays local: it is kept
        # until the model is published, so a publish killed half-way still resumes.
        small = sorted(p.name for p in self.staging.iterdir() if p.name not in shards and not p.name.startswith(".raymerge"))
        last = [n for n in (SAFE_INDEX, CONFIG) if n in small]
        first = [n for n in small if n not in last]
        try:
            list(_thread_pool().map(lambda n: upload_files(self.target, self.staging, [n]), first))
            for name in last:
                upload_files(self.target, self.staging, [name])
            new = shards | set(small)
            stale = sorted(self._existing - new)
            if stale:
                self._delete(stale)
        except _s3_failures() as err:
            raise self._fail(err) from None
        self.published = sorted(new)
        self._remove_staging()
        return self.output

    def abort(self) -> None:
        """Remove the staging folder and whatever of the new model was uploaded (best effort)."""
        names = {n for n, _ in self._shards}
        if self.staging.exists():
            names |= {p.name for p in self.staging.iterdir()}
        self._remove_staging()
        if not self._upload_started or not names:
            return
        try:
            self._delete(sorted(names))
        except Exception:  # noqa: BLE001 - cleanup must not hide the original error
            pass
        keys = {self.target.url.key(n) for n in names}
        try:
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.target.bucket, Prefix=self.target.url.key("")):
                for upload in page.get("Uploads", []):
                    if upload["Key"] in keys:
                        self._client.abort_multipart_upload(Bucket=self.target.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        except Exception:  # noqa: BLE001
            pass
