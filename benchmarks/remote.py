"""The remote tier against floors measured in the same run, on a real S3-compatible server on 127.0.0.1 (moto).

    .venv/bin/python benchmarks/remote.py [--mib 64] [--repeat 2]

* upload: ``upload_step`` of a committed checkpoint (streamed from disk, checksummed, size-checked, manifest
  last, ``latest``) against a raw multipart PUT (boto3 ``upload_fileobj``, 8 MiB parts) of the same bytes;
* restore on an empty disk: ``Session.restore()`` with only the remote tier holding the checkpoint (download
  verified while streaming, local commit, the local restore's own verification, load) against a raw GET of the
  same bytes, and against a raw GET written to a local file and fsynced (the download caches durably);
* notice -> local commit and notice -> remote commit: ``ftrain launch --nproc 1`` of the example job with the
  AWS notice watcher on a fake IMDSv2 server; from the moment the fake starts serving the notice to the final
  checkpoint's local commit (``preempted.json`` ``time``) and to its upload (``remote_time``).

The server is pure Python (moto in threads of this process), so absolute throughput is the server's; the ratios
say what ftrain adds on top of the same transfers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import ftrain  # noqa: E402
from ftrain.checkpoint.store import open_store  # noqa: E402
from ftrain.checkpoint.upload import upload_step  # noqa: E402
from ftrain.config import CheckpointConfig, FtrainConfig, RemoteConfig  # noqa: E402


def session(root: Path, url: str, model: torch.nn.Module) -> ftrain.Session:
    s = ftrain.Session(FtrainConfig(checkpoint=CheckpointConfig(dir=str(root), remote=RemoteConfig(url=url), async_save=False)))
    s.register(model=model)
    return s


def transfers(s3, mib: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    import boto3
    from boto3.s3.transfer import TransferConfig

    work = Path(tempfile.mkdtemp(prefix="ftrain-remote-bench-"))
    bucket = s3.make_bucket()
    url = f"s3://{bucket}/run"
    model = torch.nn.Linear(1024, mib * 256)  # 4 bytes x 1024 x 256 = 1 MiB per unit
    s = session(work / "a", "", model)
    s.restore()
    s.save(1, blocking=True)
    s.close()
    local = open_store(work / "a")
    shard = work / "a" / "step-000000000001" / "shard-00000.bin"
    size = sum(e.size for e in local.read_manifest(1).files.values())
    client = boto3.client("s3", endpoint_url=s3.url)
    out: dict[str, float] = {"bytes": float(size)}
    t0 = time.perf_counter()
    with open(shard, "rb") as f:
        client.upload_fileobj(f, bucket, "raw/shard.bin", Config=TransferConfig(multipart_chunksize=8 << 20,
                                                                                 multipart_threshold=8 << 20))
    out["raw multipart PUT"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    upload_step(local, open_store(url).storage, 1)  # type: ignore[arg-type]
    out["ftrain upload"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    body = client.get_object(Bucket=bucket, Key="raw/shard.bin")["Body"]
    for _ in body.iter_chunks(8 << 20):
        pass
    out["raw GET"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    body = client.get_object(Bucket=bucket, Key="raw/shard.bin")["Body"]
    with open(work / "raw-copy.bin", "wb") as f:
        for chunk in body.iter_chunks(8 << 20):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    out["raw GET + write + fsync"] = time.perf_counter() - t0
    warm = torch.nn.Linear(1024, mib * 256)
    t0 = time.perf_counter()
    w = session(work / "a", "", warm)
    assert w.restore() == 1
    out["ftrain restore from the local disk"] = time.perf_counter() - t0
    w.close()
    fresh = torch.nn.Linear(1024, mib * 256)
    t0 = time.perf_counter()
    r = session(work / "empty-disk", url, fresh)
    assert r.restore() == 1
    out["ftrain restore from remote (empty disk)"] = time.perf_counter() - t0
    r.close()
    assert torch.equal(fresh.weight, model.weight)
    shutil.rmtree(work, ignore_errors=True)
    return out


def notice(s3) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from fake_clouds import FakeAws

    work = Path(tempfile.mkdtemp(prefix="ftrain-notice-bench-"))
    url = f"s3://{s3.make_bucket()}/run"
    fake = FakeAws()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **s3.env(),
           "FTRAIN_CHECKPOINT_REMOTE_URL": url, "FTRAIN_SUPERVISOR_NOTICES_SOURCES": "aws",
           "FTRAIN_SUPERVISOR_NOTICES_AWS_METADATA_URL": fake.url, "FTRAIN_SUPERVISOR_NOTICES_POLL_SECONDS": "1"}
    cmd = [sys.executable, "-m", "ftrain", "launch", "--nproc", "1", "--rdzv-id", "bench", "--ckpt-dir",
           str(work / "ckpt"), "examples/train.py", "--steps", "100000", "--print-every", "1", "--workers", "0",
           "--save-every", "1000000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step 20 "):
            break
    noticed = time.time()
    fake.trigger()
    proc.stdout.read()
    proc.wait()
    fake.close()
    [marker_path] = (work / "ckpt" / "logs" / "bench").glob("*/attempt-000/preempted.json")
    marker = json.loads(marker_path.read_text())
    committed = open_store(work / "ckpt").read_manifest(marker["step"]).created_unix  # the local commit
    shutil.rmtree(work, ignore_errors=True)
    return {"notice -> local commit": committed - noticed,
            "notice -> remote commit": marker["remote_time"] - noticed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    from remote_servers import s3_server

    with s3_server() as s3:
        for k, v in s3.env(through_proxy=False).items():
            os.environ[k] = v
        runs = [transfers(s3, args.mib) for _ in range(args.repeat)]
        notices = [notice(s3) for _ in range(args.repeat)]
    size = runs[0]["bytes"]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "bytes"}
    print(f"checkpoint of {size / 2**20:.1f} MiB, median of {args.repeat}")
    print(f"{'measure':44s} {'seconds':>8s} {'MB/s':>8s} {'x floor':>8s}")
    for key, floor in (("raw multipart PUT", None), ("ftrain upload", "raw multipart PUT"), ("raw GET", None),
                       ("ftrain restore from the local disk", "raw GET"),
                       ("raw GET + write + fsync", "raw GET"),
                       ("ftrain restore from remote (empty disk)", "raw GET + write + fsync")):
        ratio = f"{med[key] / med[floor]:8.2f}" if floor else f"{1.0:8.2f}"
        print(f"{key:44s} {med[key]:8.2f} {size / med[key] / 1e6:8.1f} {ratio}")
    for key in notices[0]:
        vals = [n[key] for n in notices]
        print(f"{key:44s} {statistics.median(vals):8.2f}  (runs: {' '.join(f'{v:.2f}' for v in vals)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
