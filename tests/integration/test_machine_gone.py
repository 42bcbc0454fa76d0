"""The machine disappears: a preempted run whose local disk is gone resumes from the remote tier, bit-exact.

A real S3-compatible server (moto) on 127.0.0.1, in this test process, behind a fault-injecting proxy; the
workers reach it through the standard AWS client chain (AWS_ENDPOINT_URL).
"""
from __future__ import annotations

import re
import shutil
import signal

import pytest
from remote_servers import s3_server

from ftrain import exitcodes

from helpers import EXAMPLE, Launch, assert_no_orphans, final_hash, launch_env

pytestmark = pytest.mark.slow
pytest.importorskip("moto")

STEPS = 24


def test_preempted_machine_gone_resumes_from_the_remote_tier_bit_exact(tmp_path, alongside):
    script = [str(EXAMPLE), "--steps", str(STEPS), "--save-every", "4", "--print-every", "1", "--workers", "0"]
    with s3_server() as s3:
        url = f"s3://{s3.make_bucket()}/runs/exp"
        s3.proxy.inject(errors=2, drops=1)  # the first uploads meet a flaky network: retried
        env = launch_env(**s3.env(), FTRAIN_CHECKPOINT_REMOTE_URL=url)
        ckpt = tmp_path / "vm1-disk"
        first = Launch(["--nproc", "1", "--rdzv-id", "vm1", "--ckpt-dir", str(ckpt), *script], env)
        first.wait_for(r"^step 10 ", timeout=240)
        first.proc.send_signal(signal.SIGTERM)  # the cloud's notice, as the supervisor passes it on
        assert first.wait() == exitcodes.PREEMPTED, first.output[-3000:]
        final = re.search(r"preempted \(.*\): checkpoint of step (\d+) committed and uploaded", first.output)
        assert final, first.output[-3000:]
        assert_no_orphans("vm1")
        shutil.rmtree(ckpt)  # the VM is reclaimed: its disk is gone
        # The uninterrupted run, in the background from here: the run below is one rank (the other core is free).
        # Not earlier: the SIGTERM above must land before the unpaced first run reaches its last step.
        ref = alongside(Launch(["--nproc", "1", "--rdzv-id", "ref", "--ckpt-dir", str(tmp_path / "ref"), *script],
                               launch_env()))

        second = Launch(["--nproc", "1", "--rdzv-id", "vm2", "--ckpt-dir", str(tmp_path / "vm2-disk"), *script],
                        env)
        assert second.wait() == 0, second.output[-3000:]
        assert re.search(rf"fetched .* of checkpoint step {final.group(1)} from {re.escape(url)}", second.output), \
            second.output[-3000:]
        assert ref.wait() == 0, ref.output[-3000:]
        assert final_hash(second.output) == final_hash(ref.output)
