"""Storage leaf: the remote tier's bytes, in an object store (S3) or any fsspec filesystem.

``checkpoint.remote.url`` is a URL. ``s3://bucket/prefix`` goes through boto3 (the
standard AWS credential chain, and ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
for S3-compatible servers); any other URL (``file:///shared/ckpt``, ``gs://``,
``az://``, ...) through fsspec and that protocol's fsspec backend. Both need
``pip install ftrain[remote]``; credentials never come from ftrain's config.

:class:`RemoteStorage` gives a remote root the :class:`~ftrain.checkpoint.storage.Storage`
interface, so the store, the readers and ``ftrain ckpt`` work on it unchanged.
Objects are written whole (one PUT is atomic), so a reader sees an object or
none; "directories" are key prefixes, and the commit point of a remote
checkpoint is its ``manifest.json`` object, written after every other file
(``upload.py``; docs/FORMAT.md, "Remote tier"). ``commit`` (a directory rename)
has no object-store equivalent and is refused.

Thread-safety: one instance may be used from several threads (boto3 clients and
fsspec filesystems are thread-safe for these calls).
"""
from __future__ import annotations

import contextlib
import errno
import io
import posixpath
import random
from collections.abc import Iterator, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from ftrain.checkpoint.storage import Entry, TooLarge, UnsafeEntry, read_bounded
from ftrain.errors import FtrainError, RemoteNotFound

#: Bytes per part of a multipart upload, and per read from a remote object.
CHUNK = 8 << 20


class RemoteUnavailable(OSError):
    """The remote tier cannot be used: its client library is missing, the URL is not understood, or the service
    failed (unreachable endpoint, refused credentials, a timeout, a 5xx): every error of boto3/botocore and of
    fsspec's backends is translated to this (or to FileNotFoundError, or :class:`RemoteNotFound` for a missing
    bucket) at this module's boundary, so callers handle one family, the OSErrors they already handle."""


def _translated(url: str, e: Exception) -> Exception:
    """``e``, raised by a client library, as the error callers handle: OSErrors as they are; a missing bucket
    as :class:`RemoteNotFound` (a mistake: permanent); anything else as :class:`RemoteUnavailable`."""
    if isinstance(e, OSError):
        return e
    text = " ".join(str(e).split())
    if _code(e) == "NoSuchBucket" or "NoSuchBucket" in text:  # s3transfer wraps a ClientError in its own class
        return _missing_bucket(url)
    return RemoteUnavailable(errno.EIO, f"{type(e).__name__}: {text[:300]}", url)


def _missing_bucket(url: str) -> RemoteNotFound:
    return RemoteNotFound(f"checkpoint.remote.url {url}: the bucket {urlsplit(url).netloc!r} does not exist (or this "
                          "endpoint does not have it); create it, or fix the bucket name in the URL")


@contextlib.contextmanager
def _client_errors(url: str) -> Iterator[None]:
    """Translate whatever the client library raises inside the block (see :func:`_translated`)."""
    try:
        yield
    except (OSError, FtrainError, StopIteration):  # (StopIteration: the end of a download's chunks)
        raise
    except Exception as e:
        raise _translated(url, e) from e


def is_url(location: str) -> bool:
    """Whether ``location`` names a remote root (``scheme://...``) rather than a local path."""
    return "://" in str(location)


class Objects(Protocol):
    """The few object operations the remote tier needs; ``key``s are relative to the root, ``/``-separated."""

    url: str

    def check(self) -> None:
        """Ask the service whether the root can exist: :class:`RemoteNotFound` for a missing bucket,
        RemoteUnavailable when it cannot be asked; nothing for services without such a question."""
        ...

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """(key relative to ``prefix``, size) of every object under ``prefix`` (recursively)."""
        ...

    def size(self, key: str) -> int:
        """The object's size; FileNotFoundError if there is none."""
        ...

    def open(self, key: str) -> io.RawIOBase:
        """The object opened for sequential reading; FileNotFoundError if there is none."""
        ...

    def put(self, key: str, data: bytes | io.BufferedIOBase) -> None:
        """Create or replace the object (atomically: readers see the old one or the whole new one)."""
        ...

    def delete(self, keys: Sequence[str]) -> None:
        """Remove the objects; missing ones are not an error."""
        ...


class _Stream(io.RawIOBase):
    """A file-like view of an iterator of byte chunks (a download), for ``readinto``-style readers."""

    def __init__(self, chunks: Iterator[bytes], close: Any = None, url: str = "") -> None:
        self._chunks = chunks
        self._buf = memoryview(b"")
        self._close = close
        self._url = url

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        while not self._buf:
            try:
                with _client_errors(self._url):  # a connection dropped mid-download
                    self._buf = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(view), len(self._buf))
        view[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        try:
            if self._close is not None:
                with _client_errors(self._url):
                    self._close()
        finally:
            self._close = None
            super().close()


def _isolate_rng() -> None:
    """Give boto3's helpers their own random generator instead of Python's global one.

    botocore draws from the global ``random`` module for retry jitter and for the
    jittered refresh of instance-metadata credentials, s3transfer for temp-file
    names; called from the uploader's thread, each draw would shift the training
    process's own ``random`` stream (restored exactly on resume) at a moment no
    rerun reproduces. A private ``random.Random`` has the same methods.
    """
    import importlib

    for name in ("botocore.utils", "botocore.retries.standard", "botocore.retryhandler", "s3transfer",
                 "s3transfer.utils"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(mod, "random", None) is random:
            mod.random = random.Random()  # type: ignore[attr-defined]


class S3Objects:
    """Objects under ``s3://bucket/prefix`` through boto3."""

    def __init__(self, url: str) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise RemoteUnavailable(errno.ENOPKG, "the S3 remote tier needs boto3: pip install 'ftrain[remote]'",
                                    url) from None
        parts = urlsplit(url)
        if not parts.netloc:
            raise RemoteUnavailable(errno.EINVAL, "an S3 URL is s3://BUCKET[/PREFIX]", url)
        self.url = url.rstrip("/")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        # No botocore retries: its backoff jitter draws from Python's global `random`, and this client runs in
        # the uploader's thread beside a training loop whose per-sample seeding (SeededDataset in the main
        # process) must see every draw it makes: a retry would shift the training stream (measured: a resumed
        # run differing from step 6). Retries are ours (upload.py), per whole file, with fixed delays.
        _isolate_rng()
        self.client = boto3.session.Session().client(
            "s3", config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10,
                                read_timeout=60))

    def _key(self, key: str) -> str:
        return posixpath.join(self.prefix, key) if self.prefix else key

    def check(self) -> None:
        """The bucket exists and answers: :class:`RemoteNotFound` if it does not exist, RemoteUnavailable if it
        cannot be asked (unreachable, refused credentials)."""
        with _client_errors(self.url):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except Exception as e:
                if _code(e) in ("404", "NoSuchBucket", "NotFound"):  # a HEAD's error has no body: only its status
                    raise _missing_bucket(self.url) from e
                raise

    def list(self, prefix: str) -> list[tuple[str, int]]:
        full = self._key(prefix).rstrip("/") + "/" if prefix or self.prefix else ""
        out = []
        with _client_errors(self.url):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    out.append((obj["Key"][len(full):], int(obj["Size"])))
        return out

    def size(self, key: str) -> int:
        with _client_errors(self.url):
            try:
                return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
            except Exception as e:
                if _code(e) in ("404", "NoSuchKey", "NotFound"):
                    raise FileNotFoundError(errno.ENOENT, "no such object", f"{self.url}/{key}") from None
                raise

    def open(self, key: str) -> io.RawIOBase:
        with _client_errors(self.url):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            except Exception as e:
                if _code(e) in ("404", "NoSuchKey", "NotFound"):
                    raise FileNotFoundError(errno.ENOENT, "no such object", f"{self.url}/{key}") from None
                raise
        return _Stream(body.iter_chunks(CHUNK), body.close, self.url)

    def put(self, key: str, data: bytes | io.BufferedIOBase) -> None:
        from boto3.s3.transfer import TransferConfig

        body = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        with _client_errors(self.url):
            self.client.upload_fileobj(body, self.bucket, self._key(key),
                                       Config=TransferConfig(multipart_chunksize=CHUNK, multipart_threshold=CHUNK))

    def delete(self, keys: Sequence[str]) -> None:
        with _client_errors(self.url):
            for i in range(0, len(keys), 1000):
                batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
                if batch:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def _code(e: Exception) -> str:
    """A botocore ClientError's error code ("404", "NoSuchKey", ...); "" for any other exception."""
    response = getattr(e, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


class FsspecObjects:
    """Objects (files) under any fsspec URL: ``file:///shared/ckpt``, ``gs://bucket/prefix``, ..."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError:
            raise RemoteUnavailable(errno.ENOPKG, "the remote tier needs fsspec: pip install 'ftrain[remote]'",
                                    url) from None
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise RemoteUnavailable(errno.ENOPKG, f"no fsspec backend for this URL ({e})", url) from None
        self.url = url.rstrip("/")
        self.root = root.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def check(self) -> None:
        """Nothing to ask in advance: a missing root directory is made by the first upload."""

    def list(self, prefix: str) -> list[tuple[str, int]]:
        base = self._path(prefix.rstrip("/"))
        with _client_errors(self.url):
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return []
        out = []
        for path, info in found.items():
            if info.get("type") == "file":
                out.append((path[len(base):].lstrip("/"), int(info.get("size") or 0)))
        return out

    def size(self, key: str) -> int:
        with _client_errors(self.url):
            info = self.fs.info(self._path(key))
        if info.get("type") != "file":
            raise FileNotFoundError(errno.ENOENT, "not a file", f"{self.url}/{key}")
        return int(info["size"])

    def open(self, key: str) -> io.RawIOBase:
        with _client_errors(self.url):
            f = self.fs.open(self._path(key), "rb", block_size=CHUNK)
        return _Stream(iter(lambda: f.read(CHUNK), b""), f.close, self.url)

    def put(self, key: str, data: bytes | io.BufferedIOBase) -> None:
        path = self._path(key)
        tmp = f"{path}.partial"  # a shared filesystem: write beside, then rename, so readers never see a torn file
        with _client_errors(self.url):
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(tmp, "wb") as out:
                if isinstance(data, (bytes, bytearray)):
                    out.write(data)
                else:
                    for chunk in iter(lambda: data.read(CHUNK), b""):
                        out.write(chunk)
            self.fs.mv(tmp, path)

    def delete(self, keys: Sequence[str]) -> None:
        with _client_errors(self.url):
            for key in keys:
                try:
                    self.fs.rm(self._path(key))
                except FileNotFoundError:
                    pass


def objects_for(url: str) -> Objects:
    """The object client for ``url`` (RemoteUnavailable if its library is missing)."""
    if urlsplit(url).scheme in ("s3", "s3a"):
        return S3Objects(url)
    return FsspecObjects(url)


class RemotePath:
    """The few ``pathlib.Path`` operations callers use on a checkpoint location, for a remote one (messages,
    ``is_dir``): ``str()`` is the URL."""

    def __init__(self, storage: RemoteStorage, rel: str = "") -> None:
        self._storage, self._rel = storage, rel

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self._storage, posixpath.join(self._rel, name) if self._rel else name)

    def __str__(self) -> str:
        return self._storage.describe(self._rel)

    @property
    def name(self) -> str:
        return posixpath.basename(self._rel) or str(self)

    def is_dir(self) -> bool:
        return self._storage.is_dir(self._rel)

    def resolve(self) -> RemotePath:
        return self


class RemoteStorage:
    """:class:`~ftrain.checkpoint.storage.Storage` over :class:`Objects` (reads, whole-object writes, deletes)."""

    def __init__(self, objects: Objects) -> None:
        self.objects = objects

    def describe(self, path: str = "") -> str:
        return f"{self.objects.url}/{path}" if path else self.objects.url

    def check(self) -> None:
        """See :meth:`Objects.check`."""
        self.objects.check()

    def ensure_writable(self) -> None:
        self.objects.put(".ftrain-probe", b"")
        self.objects.delete([".ftrain-probe"])

    def list(self, path: str = "") -> list[Entry]:
        _check(path, self)
        names: dict[str, Entry] = {}
        for key, size in self.objects.list(path):
            head, sep, _ = key.partition("/")
            if sep:
                names.setdefault(head, Entry(head, "dir"))
            else:
                names[head] = Entry(head, "file", size)
        return list(names.values())

    def is_dir(self, path: str) -> bool:
        _check(path, self)
        return bool(self.objects.list(path))

    def size(self, path: str) -> int:
        _check(path, self)
        return self.objects.size(path)

    def read(self, path: str, limit: int) -> bytes:
        size = self.size(path)
        if size > limit:
            raise TooLarge(errno.EFBIG, f"{size} bytes, over the {limit}-byte limit for this file",
                           self.describe(path))
        with self.objects.open(path) as f:
            return read_bounded(f, limit, self.describe(path))

    def open(self, path: str) -> io.RawIOBase:
        _check(path, self)
        return self.objects.open(path)

    def write(self, path: str, data: bytes) -> None:
        _check(path, self)
        self.objects.put(path, data)

    def makedir(self, path: str) -> None:
        pass  # prefixes exist by their objects

    def commit(self, src: str, dst: str) -> None:
        raise OSError(errno.ENOTSUP, "an object store has no atomic directory rename; the remote tier commits by "
                      "writing manifest.json last", self.describe(dst))

    def delete(self, path: str) -> None:
        _check(path, self)
        keys = [posixpath.join(path, k) for k, _ in self.objects.list(path)]
        self.objects.delete(keys or [path])


def _check(path: str, storage: RemoteStorage) -> None:
    if path and any(p in ("", ".", "..") for p in path.split("/")):
        raise UnsafeEntry(errno.EINVAL, "not a plain relative path inside the checkpoint root",
                          storage.describe(path))
