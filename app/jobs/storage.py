"""Where images live: a directory, or an S3-compatible bucket; never Redis.

Results are written by workers before the job's status says `succeeded` (a crash in between
leaves at most an orphan file, which the sweep removes), read by the API for their owner, and
swept once they are older than the result TTL. Keys are made here from validated job ids only:
nothing a client sends becomes a path.

- `file:///path`: one directory, shared by the API and the workers of one host (a volume).
- `s3://bucket/prefix`: endpoint, region and credentials from the usual AWS variables
  (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

RESULTS = "results"


def result_key(job_id: str, index: int) -> str:
    return f"{RESULTS}/{job_id}/{index}.png"


# A job's input images, beside its results (the same owner check, TTL and sweep).
INPUTS = ("image", "mask", *(f"control{k}" for k in range(4)))  # 4: CONTROLNETS_MAX


def input_key(job_id: str, name: str) -> str:
    if name not in INPUTS:
        raise ValueError(f"no input image called {name!r}")
    return f"{RESULTS}/{job_id}/{name}.png"


class Storage(Protocol):
    def check(self) -> None:
        """Raise (OSError or the client's error) unless the storage can be written."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes | None:
        """The bytes, or None when there is no such object (never written, or swept)."""

    def delete(self, key: str) -> None:
        """Remove an object; nothing if there is none."""

    def url(self, key: str, expires_s: int) -> str | None:
        """A short-lived URL that serves the object without the API; None if unsupported."""

    def sweep(self, older_than: float) -> int:
        """Delete results written before `older_than` (a Unix time); answers how many."""


class DirectoryStorage:
    def __init__(self, root: Path) -> None:
        self.root = root

    def check(self) -> None:
        (self.root / RESULTS).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.root / RESULTS):
            pass

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        for attempt in range(3):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                # Written aside, then renamed: a reader never sees half a file.
                with tempfile.NamedTemporaryFile(
                    dir=path.parent, delete=False, suffix=".part"
                ) as tmp:
                    tmp.write(data)
                os.replace(tmp.name, path)
                return
            except FileNotFoundError:
                # The sweep takes empty folders, this one too if it ran between the mkdir and
                # the write: make it again.
                if attempt == 2:
                    raise

    def get(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        _unlink(str(self.root / key))

    def url(self, key: str, expires_s: int) -> str | None:
        return None

    def sweep(self, older_than: float) -> int:
        removed = 0
        try:
            jobs = list(os.scandir(self.root / RESULTS))
        except FileNotFoundError:
            return 0
        for job in jobs:
            if not job.is_dir(follow_symlinks=False):
                continue
            try:
                files = list(os.scandir(job.path))
                old = all(f.stat(follow_symlinks=False).st_mtime < older_than for f in files)
            except FileNotFoundError:  # another sweeper (a lock that outlived its TTL) was first
                continue
            if old:
                for f in files:
                    _unlink(f.path)
                    removed += 1
                # A file that came in meanwhile (a re-run) keeps the folder, till next time.
                with contextlib.suppress(OSError):
                    os.rmdir(job.path)
        return removed


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # another sweeper was first
        os.unlink(path)


class BucketStorage:
    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._s3 = client

    def check(self) -> None:
        self._s3.head_bucket(Bucket=self.bucket)

    def put(self, key: str, data: bytes) -> None:
        self._s3.put_object(
            Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType="image/png"
        )

    def get(self, key: str) -> bytes | None:
        try:
            reply = self._s3.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except self._s3.exceptions.NoSuchKey:
            return None
        data: bytes = reply["Body"].read()
        return data

    def delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def url(self, key: str, expires_s: int) -> str | None:
        url: str = self._s3.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.prefix + key},
            ExpiresIn=expires_s,
        )
        return url

    def sweep(self, older_than: float) -> int:
        removed = 0
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}{RESULTS}/"
        )
        for page in pages:
            old = [
                {"Key": item["Key"]}
                for item in page.get("Contents", [])
                if item["LastModified"].timestamp() < older_than
            ]
            if old:  # at most 1000 a page, as DeleteObjects takes
                self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": old, "Quiet": True})
                removed += len(old)
        return removed


def is_storage_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "file":
        return bool(parts.path) and not parts.netloc
    return parts.scheme == "s3" and bool(parts.netloc)


def open_storage(url: str) -> Storage:
    """The storage a `SDSERVE_STORAGE` URL names (validated by the settings)."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return DirectoryStorage(Path(parts.path))
    import boto3  # only where a bucket is used
    from botocore.config import Config

    # SigV4: what S3, MinIO and their presigned URLs expect today.
    config = Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": 3})
    client = boto3.client("s3", config=config)
    return BucketStorage(parts.netloc, parts.path, client)


def expiry_cutoff(result_ttl_s: int) -> float:
    """Files written before this are swept. A file is written just before its job's status, so
    the margin (up to a minute) keeps an image until its job says `expired`."""
    return time.time() - result_ttl_s - min(60, result_ttl_s)
