"""Storage leaf: copy committed local checkpoints to the remote tier, in the background, manifest last.

Protocol for one step (docs/FORMAT.md, "Remote tier"), run by rank 0's uploader
thread after the local commit:

1. every file of ``step-N/`` but the manifest is streamed from the local disk
   to ``<remote>/step-N/<file>``; its checksum is computed over the bytes sent
   and must equal the manifest's (a local file damaged since its commit is
   never published); then the remote object's size is checked;
2. ``step-N/manifest.json`` is written: the remote commit point. A remote
   step without a manifest is an unfinished upload, invisible to readers and
   deleted by the next upload;
3. ``latest`` (a hint, as locally) names it; then remote retention:
   ``remote_keep_last`` newest committed steps plus the best ones are kept, the
   rest deleted manifest first (so a half-deleted step is uncommitted, never
   damaged).

With node-local disks (docs/FORMAT.md, "Disks") every disk's leader uploads its own ranks' files of each
step (:class:`Share`), and only rank 0's uploader, once every other disk's share is remote, writes the
manifest (2) and does 3.

A failing file is retried with capped exponential backoff; a step whose upload
still fails is recorded in ``<local root>/remote.json`` (``ftrain ckpt ls``
shows it) and training goes on. One upload runs at a time: with ``when_busy: wait`` later steps queue
(every one is uploaded, in order), with ``skip`` a step committed while another
uploads is not uploaded (counted, logged). :meth:`Uploader.pending` lists the
steps not yet remote, which local retention must keep.

An outage (the endpoint unreachable, credentials refused, every call timing out: each step failing) is
logged once when it starts and once when it ends, not once per step and file. While it lasts the next
try waits a backoff that doubles from :data:`OUTAGE_FIRST` to :data:`OUTAGE_CAP` seconds, and only the newest
queued step is tried: the older ones would be superseded by it anyway, and keeping them all pending would
make local retention keep every checkpoint of the outage until the disk fills.
"""
from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftrain import faults
from ftrain.checkpoint import format
from ftrain.checkpoint.checksum import Hasher
from ftrain.checkpoint.manifest import Manifest
from ftrain.checkpoint.remote import RemoteStorage
from ftrain.checkpoint.storage import atomic_write
from ftrain.checkpoint.store import CheckpointStore
from ftrain.errors import CorruptCheckpoint

log = logging.getLogger("ftrain")

#: Files of one step uploaded at once.
PARALLEL_FILES = 4
#: Seconds before the next try after the first failed step of an outage, doubling per failed step up to the cap.
OUTAGE_FIRST = 2.0
OUTAGE_CAP = 60.0


def outage_delay(failed_steps: int) -> float:
    """Seconds to wait before the next upload after ``failed_steps`` failed in a row (0: none failed)."""
    return 0.0 if failed_steps <= 0 else min(OUTAGE_CAP, OUTAGE_FIRST * 2.0 ** min(failed_steps - 1, 32))


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per file, and the backoff between them: ``min(cap, first * 2**k)`` seconds."""

    attempts: int = 5
    first: float = 0.5
    cap: float = 8.0

    def delays(self) -> list[float]:
        return [min(self.cap, self.first * 2**k) for k in range(self.attempts - 1)]


class _Hashing(io.RawIOBase):
    """Reads through ``raw`` while hashing and counting what was read (what the upload sends)."""

    def __init__(self, raw: io.RawIOBase) -> None:
        self.raw, self.hasher, self.size = raw, Hasher(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.raw.readinto(b) or 0
        if n:
            self.hasher.update(memoryview(b).cast("B")[:n])
            self.size += n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


@dataclass(frozen=True)
class Share:
    """One uploader's part of every step: all of it (one disk), or, with node-local disks, its disk's files."""

    #: The files of a step this uploader sends.
    files: Callable[[Manifest], set[str]] = lambda m: set(m.files)
    #: Whether it writes the manifest (the remote commit), ``latest`` and does remote retention: rank 0's.
    publish: bool = True
    #: Called once this share's files of a step are remote (tells the publisher).
    sent: Callable[[int], None] = lambda step: None
    #: Called when this share's files of a step could not be sent (tells the publisher at once).
    failed: Callable[[int, str], None] = lambda step, error: None
    #: The publisher, before the manifest: returns once every other share of the step is remote; raises if one
    #: failed, or not in time.
    others: Callable[[int], None] = lambda step: None


def upload_step(local: CheckpointStore, remote: RemoteStorage, step: int, *, retry: RetryPolicy = RetryPolicy(),
                sleep: Callable[[float], None] = time.sleep, share: Share = Share(),
                quiet: Callable[[str], None] = log.info) -> Manifest:
    """Publish committed local checkpoint ``step`` on ``remote`` (the protocol above); its manifest.

    ``quiet``: where a retried failure is logged (debug during an outage, which is logged once).

    Raises :class:`CorruptCheckpoint` if a local file no longer matches its manifest (nothing is published),
    or the last OSError/client error of a file that failed every attempt.
    """
    manifest = local.read_manifest(step)
    ckpt = format.step_dirname(step)
    names = sorted(share.files(manifest))  # shard files (records and tensor bytes); the manifest comes last

    def one(name: str) -> None:
        rel = f"{ckpt}/{name}"
        expect = manifest.files[name]
        for delay in [*retry.delays(), None]:
            try:
                with local.storage.open(rel) as raw:
                    src = _Hashing(raw)
                    remote.objects.put(rel, io.BufferedReader(src, 1 << 20))
                if (src.size, src.hasher.hexdigest()) != (expect.size, expect.checksum):
                    raise CorruptCheckpoint(local.storage.describe(rel), "changed since its commit (size or checksum "
                                            "differs from the manifest): not uploaded")
                faults.point("upload.file", step=step, rank=0)
                size = remote.objects.size(rel)
                if size != src.size:
                    raise OSError(f"remote object {remote.describe(rel)} holds {size} bytes, {src.size} were sent")
                return
            except CorruptCheckpoint:
                raise
            except Exception as e:
                if delay is None:
                    raise
                quiet(f"upload of {rel} failed ({type(e).__name__}: {e}); retrying in {delay:.1f}s")
                sleep(delay)

    try:
        with ThreadPoolExecutor(max_workers=PARALLEL_FILES, thread_name_prefix="ftrain-upload") as pool:
            for f in [pool.submit(one, n) for n in names]:
                f.result()
    except Exception as e:
        share.failed(step, f"{type(e).__name__}: {e}")
        raise
    share.sent(step)
    if not share.publish:
        return manifest
    share.others(step)
    faults.point("upload.before_manifest", step=step, rank=0)
    _retrying(lambda: remote.write(f"{ckpt}/{format.MANIFEST}",
                                   local.storage.read(f"{ckpt}/{format.MANIFEST}", format.MAX_MANIFEST_BYTES)),
              retry, sleep, quiet)
    _retrying(lambda: remote.write(format.LATEST, f"{ckpt}\n".encode()), retry, sleep, quiet)
    return manifest


def _retrying(fn: Callable[[], object], retry: RetryPolicy, sleep: Callable[[float], None],
              quiet: Callable[[str], None]) -> None:
    for delay in [*retry.delays(), None]:
        try:
            fn()
            return
        except Exception as e:
            if delay is None:
                raise
            quiet(f"remote write failed ({type(e).__name__}: {e}); retrying in {delay:.1f}s")
            sleep(delay)


def remote_retain(remote: CheckpointStore, keep_last: int, best: Sequence[int], uploading: int | None) -> list[int]:
    """Delete remote steps beyond the ``keep_last`` newest committed ones and ``best``; drop unfinished uploads
    (a step directory without a manifest, other than ``uploading``). Returns the steps deleted."""
    on_remote = remote.steps()
    committed = [s for s in on_remote if _has_manifest(remote, s)]
    unfinished = sorted(set(on_remote) - set(committed) - ({uploading} if uploading is not None else set()))
    keep = set(committed[-keep_last:] if keep_last else committed) | set(best)
    doomed = [s for s in committed if s not in keep]
    for s in doomed:
        d = format.step_dirname(s)
        remote.storage.delete(f"{d}/{format.MANIFEST}")  # uncommitted first: never a damaged-looking step
        remote.storage.delete(d)
    for s in unfinished:
        remote.storage.delete(format.step_dirname(s))
    return doomed + unfinished


def _has_manifest(store: CheckpointStore, step: int) -> bool:
    try:
        store.storage.size(f"{format.step_dirname(step)}/{format.MANIFEST}")
    except FileNotFoundError:
        return False
    return True


class Uploader:
    """Rank 0's background uploader: one thread, one step at a time (see the module docstring)."""

    def __init__(self, local: CheckpointStore, remote: CheckpointStore, *, keep_last: int, when_busy: str,
                 retry: RetryPolicy = RetryPolicy(),
                 on_result: Callable[[int, float, str | None], None] | None = None, share: Share = Share()) -> None:
        """``on_result(step, seconds, error)``: called from the uploader thread after each step's upload (error
        None: durable remotely), e.g. to record it in the event log. ``share``: this uploader's part."""
        assert isinstance(remote.storage, RemoteStorage)
        self._on_result = on_result
        self.share = share
        self.local, self.remote, self.keep_last, self.when_busy, self.retry = local, remote, keep_last, when_busy, retry
        self._cv = threading.Condition()
        self._queue: deque[tuple[int, tuple[int, ...]]] = deque()
        self._busy: int | None = None
        self._done: dict[int, float] = {}  # step -> when it became durable remotely
        self.skipped = 0
        self.last_error: str | None = None
        #: Steps that failed in a row (an outage when > 0), and since when.
        self.failing = 0
        self._failing_since = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ftrain-uploader", daemon=True)
        self._thread.start()

    def submit(self, step: int, best: Sequence[int] = ()) -> None:
        """Queue committed local ``step`` for upload (never blocks)."""
        with self._cv:
            if self.when_busy == "skip" and (self._busy is not None or self._queue):
                self.skipped += 1
                log.warning("checkpoint step %d is not uploaded: the upload of step %s is still running "
                            "(checkpoint.when_busy: skip; %d skipped so far)", step, self._busy, self.skipped)
                return
            self._queue.append((step, tuple(best)))
            self._cv.notify_all()

    def pending(self) -> set[int]:
        """Steps queued or being uploaded: local retention keeps them."""
        with self._cv:
            return {s for s, _ in self._queue} | ({self._busy} if self._busy is not None else set())

    def remote_time(self, step: int) -> float | None:
        with self._cv:
            return self._done.get(step)

    def wait(self, step: int, timeout: float | None) -> float | None:
        """Block until ``step`` is durable remotely (its time), it failed or was dropped (None), or ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while step not in self._done and (step in {s for s, _ in self._queue} or self._busy == step):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cv.wait(left)
            return self._done.get(step)

    def close(self, timeout: float | None = None) -> bool:
        """Finish the queued uploads (up to ``timeout``) and stop; False if some are left undone."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def unavailable(self, error: BaseException) -> None:
        """The remote tier failed before any upload (the start's check): log the outage once, record it in
        remote.json, and back off as after a failed step."""
        self._failed(f"{type(error).__name__}: {error}", None)

    def _next(self) -> tuple[int, tuple[int, ...]] | None:
        """Wait for the next step to upload (None: closed and nothing is left). During an outage, first the
        backoff (cut short by :meth:`close`), then only the newest queued step: the others are dropped."""
        with self._cv:
            resume = time.monotonic() + outage_delay(self.failing)
            while not self._closed and (not self._queue or time.monotonic() < resume):
                self._cv.wait(None if not self._queue else max(0.0, resume - time.monotonic()))
            if not self._queue:
                return None
            if self.failing:
                dropped = [s for s, _ in list(self._queue)[:-1]]
                self._queue = deque([self._queue[-1]])
                for s in dropped:
                    self.share.failed(s, "not uploaded: the remote tier was unavailable, a newer step is tried")
                log.debug("remote tier still unavailable: not uploading steps %s, trying the newest", dropped)
            step, best = self._queue.popleft()
            self._busy = step
            return step, best

    def _run(self) -> None:
        while (job := self._next()) is not None:
            step, best = job
            t0 = time.monotonic()
            quiet = log.debug if self.failing else log.info
            try:
                upload_step(self.local, self.remote.storage, step, retry=self.retry,  # type: ignore[arg-type]
                            share=self.share, quiet=quiet)
                done = time.time()
                self.last_error = None
                if self.failing:
                    log.warning("the remote tier %s is reachable again after %.0fs: uploaded step %d",
                                self.remote.storage.describe(), time.monotonic() - self._failing_since, step)
                    self.failing = 0
                if self.share.publish:
                    deleted = remote_retain(self.remote, self.keep_last, best, None)
                    log.info("uploaded step %d to %s in %.2fs%s", step, self.remote.storage.describe(),
                             time.monotonic() - t0, f"; pruned remote {deleted}" if deleted else "")
                    self._status(step, None, done)
                    self._report(step, time.monotonic() - t0, None)
            except Exception as e:
                done = None
                self._failed(f"{type(e).__name__}: {e}", step)
                self._report(step, time.monotonic() - t0, f"{type(e).__name__}: {e}")
            with self._cv:
                self._busy = None
                if done is not None:
                    self._done[step] = done
                self._cv.notify_all()

    def _failed(self, error: str, step: int | None) -> None:
        """A step failed (or the start's check): the outage's first failure is logged, the rest only recorded."""
        what = f"step {step}: {error}" if step is not None else error
        self.last_error = what
        if not self.failing:
            self._failing_since = time.monotonic()
            log.error("the remote tier %s is unavailable (%s); training goes on with local checkpoints, uploads are "
                      "retried with backoff up to %.0fs apart, and `ftrain ckpt ls` shows the outage; this is "
                      "logged again only when it ends", self.remote.storage.describe(), what, OUTAGE_CAP)
        else:
            log.debug("remote tier still unavailable: %s", what)
        with self._cv:
            self.failing += 1
        self._status(None, what, None)

    def _report(self, step: int, seconds: float, error: str | None) -> None:
        if self._on_result is not None:
            try:
                self._on_result(step, seconds, error)
            except Exception as e:  # a reporting hook must not stop the uploads
                log.warning("recording the upload of step %d failed: %s", step, e)

    def _status(self, step: int | None, error: str | None, when: float | None) -> None:
        """``<local root>/remote.json``: the newest step durable remotely, and the failure if the last one failed."""
        path = self.local.storage.describe(format.REMOTE_STATUS)
        try:
            try:
                with open(path) as f:
                    status = json.load(f)
                if not isinstance(status, dict):
                    status = {}
            except (OSError, ValueError):
                status = {}
            status["remote"] = self.remote.storage.describe()
            if step is not None:
                status.update(uploaded=step, uploaded_time=when, failing=None)
            else:
                failing = status.get("failing") or {"since": time.time()}
                status["failing"] = {"since": failing.get("since", time.time()), "error": error,
                                     "time": time.time()}
            atomic_write(Path(path), json.dumps(status).encode())
        except OSError as e:
            log.warning("could not record the remote tier's status in %s: %s", path, e)

