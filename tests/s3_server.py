"""A real S3 API for tests: moto's server on 127.0.0.1 (any free port), wrapped in a WSGI
recorder that counts the bytes of every response. Used by `tests/test_s3.py` and the
private-disk cluster tests (`tests/test_private_disk_cluster.py`), where it is the only storage
the nodes share."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Iterator


class Recorder:
    """WSGI middleware: one record per request (method, path, range, status, bytes sent)."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.faults: list[tuple[int, str]] = []  # (status, S3 error code) answered to the next GETs

    def __call__(self, environ, start_response):
        rec = {"method": environ["REQUEST_METHOD"], "path": environ.get("PATH_INFO", ""),
               "query": environ.get("QUERY_STRING", ""), "range": environ.get("HTTP_RANGE"), "status": 0, "sent": 0}
        with self.lock:
            self.log.append(rec)
            fault = self.faults.pop(0) if self.faults and rec["method"] == "GET" else None
        if fault is not None:
            status, code = fault
            rec["status"] = status
            start_response(f"{status} {code}", [("Content-Type", "application/xml")])
            return [f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()]

        def recording_start(status, headers, exc_info=None):
            rec["status"] = int(status.split()[0])
            return start_response(status, headers, exc_info)

        result = self.app(environ, recording_start)

        def counted():
            try:
                for chunk in result:
                    rec["sent"] += len(chunk)
                    yield chunk
            finally:
                if hasattr(result, "close"):
                    result.close()

        return counted()

    def clear(self) -> None:
        with self.lock:
            self.log.clear()

    def records(self, method: str = "GET", prefix: str = "/") -> list[dict]:
        with self.lock:
            return [r for r in self.log if r["method"] == method and r["path"].startswith(prefix)]

    def bytes_sent(self, prefix: str = "/") -> int:
        return sum(r["sent"] for r in self.records("GET", prefix) if r["status"] in (200, 206))


class S3:
    def __init__(self, url: str, recorder: Recorder):
        import boto3

        self.url = url
        self.recorder = recorder
        self.client = boto3.client("s3", endpoint_url=url)

    def objects(self, bucket: str, prefix: str) -> dict[str, bytes]:
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix.rstrip("/")) + 1:]
                out[name] = self.client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return out

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> None:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                self.client.put_object(Bucket=bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())


@contextlib.contextmanager
def serve(buckets=()) -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1 with `buckets` created; yields an `S3` (its `url`, a client)."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    from raymerge.checkpoints import s3 as s3mod

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    recorder = Recorder(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, recorder, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    s3mod.reset_clients()
    try:
        store = S3(f"http://127.0.0.1:{server.server_address[1]}", recorder)
        for bucket in buckets:
            store.client.create_bucket(Bucket=bucket)
        yield store
    finally:
        server.shutdown()
        thread.join()
        s3mod.reset_clients()
