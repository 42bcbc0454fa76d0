"""The remote tier against a real S3-compatible server on 127.0.0.1 (moto), through a fault-injecting proxy.

In-process (one rank, no processes): a Session commits locally, its uploader publishes manifest last; restore on
an empty local disk downloads and verifies; damage and outages fall back or retry; retention per tier.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

import ftrain
from ftrain.checkpoint import format
from ftrain.checkpoint.download import download_files
from ftrain.checkpoint.storage import LocalStorage
from ftrain.checkpoint.store import open_store
from ftrain.checkpoint.upload import RetryPolicy, upload_step
from ftrain import exitcodes
from ftrain.checkpoint.remote import RemoteUnavailable
from ftrain.errors import CorruptCheckpoint, RemoteNotFound
from ftrain.events import read_events

from helpers import Job, cfg, job_state

pytest.importorskip("moto")
pytest.importorskip("boto3")
botocore = pytest.importorskip("botocore")


def run(root: Path, url: str, steps: int, *, every: int = 2, job: Job | None = None, **ckpt) -> Job:
    job = job or Job()
    ckpt.setdefault("remote_retries", 2)  # one retry, 0.5 s later: enough to meet an injected fault, and fast
    session = ftrain.Session(cfg(root, every_steps=every, remote=url, **ckpt))
    job.register(session)
    start = session.restore()
    for step in range(start + 1, steps + 1):
        job.train(1)
        session.step(step)
    session.close()  # waits for the uploads
    return job


def remote_steps(url: str) -> list[int]:
    return [m.step for m in open_store(url).candidates()]


def test_commits_upload_manifest_last_and_an_empty_disk_resumes_exactly(tmp_path, remote, s3):
    ref = run(tmp_path / "ref", "", 10)
    first = run(tmp_path / "a", remote, 6, remote_keep_last=2)
    assert remote_steps(remote) == [6, 4]  # the newest two: remote retention is its own
    puts = [r for r in s3.proxy.faults.seen if r.startswith("PUT") and "step-000000000006" in r]
    assert puts[-1].endswith("step-000000000006/manifest.json"), puts  # the commit point, last of its step
    shutil.rmtree(tmp_path / "a")  # the machine is gone, and its disk with it
    resumed = Job()
    run(tmp_path / "b", remote, 10, job=resumed)
    assert job_state(resumed) == job_state(ref)
    assert (tmp_path / "b" / "step-000000000010").is_dir() and first is not None
    status = json.loads((tmp_path / "b" / format.REMOTE_STATUS).read_text())
    assert status["uploaded"] == 10 and status["failing"] is None
    # Each upload is in the event log too (ftrain goodput, ftrain status).
    uploaded = [e["step"] for e in read_events(tmp_path / "b") if e["ev"] == "uploaded"]
    assert uploaded == [8, 10]  # (step 6 came from the remote tier)


def test_a_corrupt_newest_remote_checkpoint_falls_back_to_the_previous(tmp_path, remote, s3):
    import boto3

    ref = run(tmp_path / "ref", "", 8)
    run(tmp_path / "a", remote, 6)
    shutil.rmtree(tmp_path / "a")
    bucket, _, prefix = remote.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=s3.url)
    key = f"{prefix}/step-000000000006/shard-00000.bin"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the tensor bytes: same size, other checksum
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    job = Job()
    run(tmp_path / "b", remote, 8, job=job)  # restores step 4 (verified while streaming), trains 5..8
    assert job_state(job) == job_state(ref)
    assert not any(p.name.startswith(format.TMP_PREFIX) for p in (tmp_path / "b").iterdir())


def test_uploads_retry_through_5xx_and_dropped_connections(tmp_path, remote, s3):
    s3.proxy.inject(errors=3, drops=2)
    run(tmp_path / "a", remote, 2, every=2, remote_retries=5)
    assert remote_steps(remote) == [2]
    assert s3.proxy.faults.errors == 0 and s3.proxy.faults.drops == 0  # every injected fault was met


def test_a_persistent_outage_is_recorded_and_training_goes_on(tmp_path, remote, s3, caplog):
    s3.proxy.inject(errors=10**6)  # every upload fails
    run(tmp_path / "a", remote, 4, every=2, keep_last=1, remote_wait_seconds=60)
    s3.proxy.inject(errors=0)
    local = [s for s, _ in open_store(tmp_path / "a").step_dirs()]
    assert local[-1] == 4  # local checkpoints committed as usual
    status = json.loads((tmp_path / "a" / format.REMOTE_STATUS).read_text())
    assert status["failing"] and "step" in status["failing"]["error"], status
    outage = [r for r in caplog.records if "is unavailable" in r.getMessage()]
    assert len(outage) == 1 and "training goes on" in outage[0].getMessage()  # logged once, not per step or file
    assert remote_steps(remote) == []
    failed = [e for e in read_events(tmp_path / "a") if e["ev"] == "upload_failed"]
    assert [e["step"] for e in failed] == [2, 4] and all(e["error"] for e in failed)
    assert not any(e["ev"] == "uploaded" for e in read_events(tmp_path / "a"))


def test_a_missing_bucket_is_refused_at_start_naming_it(tmp_path, remote, s3):
    missing = remote.replace("s3://", "s3://no-such-").split("/runs")[0] + "/runs/exp"
    session = ftrain.Session(cfg(tmp_path / "a", every_steps=1, remote=missing))
    with pytest.raises(RemoteNotFound, match="the bucket 'no-such-ftrain-[0-9a-f]+' does not exist") as caught:
        session.restore()
    assert caught.value.permanent and caught.value.exit_code == exitcodes.USAGE
    session.close()
    assert [s for s, _ in open_store(tmp_path / "a").step_dirs()] == []


def _outage_run(tmp_path, remote, caplog, steps: int = 6) -> list[str]:
    """Train ``steps`` steps saving every 2 with the remote tier down; the outage's log lines."""
    with caplog.at_level("INFO", logger="ftrain"):
        run(tmp_path, remote, steps, every=2, remote_wait_seconds=30)
    assert [s for s, _ in open_store(tmp_path).step_dirs()][-1] == steps  # local checkpoints went on
    status = json.loads((tmp_path / format.REMOTE_STATUS).read_text())
    assert status["failing"]["error"], status
    return [r.getMessage() for r in caplog.records if "remote" in r.getMessage()]


def test_an_unreachable_endpoint_is_an_outage_logged_once_and_training_goes_on(tmp_path, remote, monkeypatch,
                                                                                caplog):
    with socket.socket() as s:  # a loopback port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
    lines = _outage_run(tmp_path / "a", remote, caplog)
    outage = [m for m in lines if "is unavailable" in m]
    assert len(outage) == 1 and "EndpointConnectionError" in outage[0], lines
    assert not any("Traceback" in m for m in lines)
    status = json.loads((tmp_path / "a" / format.REMOTE_STATUS).read_text())
    assert "EndpointConnectionError" in status["failing"]["error"]


def test_refused_credentials_are_an_outage_and_the_tier_comes_back(tmp_path, remote, s3, caplog):
    # Every call refused (403, as for a revoked key), the start's check included; then the service answers again.
    s3.proxy.inject(errors=10**6, status=403, only_methods=("GET", "HEAD", "PUT", "POST", "DELETE"))
    session = ftrain.Session(cfg(tmp_path / "a", every_steps=2, remote=remote, remote_retries=1))
    job = Job()
    job.register(session)
    with caplog.at_level("INFO", logger="ftrain"):
        session.restore()  # the remote tier's listing is refused too: restore goes on from the local disk
        for step in range(1, 7):
            job.train(1)
            session.step(step)
        session._checkpointer.wait()
        s3.proxy.inject(errors=0, status=503, only_methods=("PUT", "POST"))
        for step in range(7, 9):
            job.train(1)
            session.step(step)
        session.close()  # waits for the last upload
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "is unavailable" in m]) == 1, messages
    assert any("reachable again" in m for m in messages), messages
    assert remote_steps(remote)[0] == 8  # the newest step reached the remote tier once it answered
    status = json.loads((tmp_path / "a" / format.REMOTE_STATUS).read_text())
    assert status["uploaded"] == 8 and status["failing"] is None


@pytest.mark.parametrize("make, expect", [
    (lambda: _client_error("NoSuchBucket"), RemoteNotFound),
    (lambda: _client_error("AccessDenied"), RemoteUnavailable),
    (lambda: _client_error("InvalidAccessKeyId"), RemoteUnavailable),
    (lambda: botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), RemoteUnavailable),
    (lambda: botocore.exceptions.NoCredentialsError(), RemoteUnavailable),
    (lambda: botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), OSError),  # (is one)
    (lambda: RuntimeError("an fsspec backend's own error"), RemoteUnavailable),
    (lambda: FileNotFoundError(2, "no such object"), FileNotFoundError),
])
def test_client_library_errors_become_the_two_kinds_callers_handle(make, expect):
    from ftrain.checkpoint.remote import _client_errors

    with pytest.raises(expect) as caught:
        with _client_errors("s3://b/p"):
            raise make()
    assert isinstance(caught.value, OSError) or caught.value.permanent  # an outage, or a mistake: nothing else


def _client_error(code: str) -> Exception:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": code}}, "ListObjectsV2")


def test_local_damage_since_the_commit_is_never_published(tmp_path, remote):
    run(tmp_path / "a", "", 2, every=2)  # local only
    local = open_store(tmp_path / "a")
    shard = tmp_path / "a" / "step-000000000002" / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="changed since its commit"):
        upload_step(local, open_store(remote).storage, 2, retry=RetryPolicy(attempts=1))  # type: ignore[arg-type]
    assert remote_steps(remote) == []


def test_a_pending_upload_keeps_its_local_checkpoint(tmp_path, remote, s3):
    s3.proxy.inject(errors=10**6)
    session = ftrain.Session(cfg(tmp_path / "a", every_steps=1, keep_last=1, remote=remote, remote_retries=1))
    job = Job()
    job.register(session)
    session.restore()
    for step in (1, 2, 3):
        job.train(1)
        session.step(step)
    session._checkpointer.wait()
    tier = session._checkpointer.tier
    assert tier is not None
    pending = tier.pending()
    on_disk = {s for s, _ in open_store(tmp_path / "a").step_dirs()}
    assert set(pending) <= on_disk, (pending, on_disk)
    s3.proxy.inject(errors=0)
    session.close()


def test_ckpt_ls_and_verify_take_a_remote_url(tmp_path, remote, capsys):
    from ftrain.cli import main

    run(tmp_path / "a", remote, 4, every=2)
    assert main(["ckpt", "ls", remote]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:3]] == ["2", "4"] and "valid" in out, out
    assert main(["ckpt", "verify", remote]) == 0
    capsys.readouterr()
    assert main(["ckpt", "inspect", remote, "--json", "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    out_file = tmp_path / "model.safetensors"
    assert main(["ckpt", "export", f"{remote}/step-000000000002", str(out_file)]) == 0
    from safetensors.torch import load_file

    exported = load_file(out_file)
    local = open_store(tmp_path / "a")
    from ftrain.checkpoint import reader

    _, trees = reader.load(local, 2, name="model")
    assert all(torch.equal(exported[k], v) for k, v in trees["model"].items())
    assert main(["ckpt", "ls", str(tmp_path / "a")]) == 0
    assert "newest uploaded step 4" in capsys.readouterr().out


def test_file_urls_work_like_a_shared_filesystem(tmp_path):
    url = (tmp_path / "shared").as_uri()
    first = run(tmp_path / "a", url, 4, every=2)
    assert remote_steps(url) == [4, 2]
    assert os.path.isfile(tmp_path / "shared" / "step-000000000004" / "manifest.json")
    job = Job()
    run(tmp_path / "b", url, 4, job=job)  # nothing left to train: step 4 restored from the shared tier
    assert job_state(job) == job_state(first)


def test_uploads_and_downloads_never_draw_from_the_global_rng(tmp_path, remote, s3):
    """The uploader runs beside the training loop: a draw from Python's global `random` (botocore's retry jitter
    does, by default) would shift the training stream; a resumed run would then differ from the uninterrupted."""
    import random

    run(tmp_path / "a", "", 2, every=2)
    local = open_store(tmp_path / "a")
    target = open_store(remote)
    random.seed(1234)
    before = random.getstate()
    s3.proxy.inject(errors=2, drops=1)  # retries, at every layer that retries
    upload_step(local, target.storage, 2, retry=RetryPolicy(attempts=4, first=0.05))  # type: ignore[arg-type]
    assert random.getstate() == before
    state = random.getstate()  # a download on an empty disk, as a restore does it (sources.py)
    manifest = target.read_manifest(2)
    empty = LocalStorage(tmp_path / "b")
    empty.ensure_writable()
    download_files(target.storage, empty, manifest, sorted(manifest.files), ".tmp-download")  # type: ignore[arg-type]
    assert random.getstate() == state
