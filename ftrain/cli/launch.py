"""``ftrain launch``: run a training script under torchrun, supervised (restarts, hangs, preemption).

Flag names follow torchrun wherever torchrun has the flag. Every option also
has a config key; command-line flags win over the environment, which wins over
the YAML file (see README "Configuration").
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftrain import envvars
from ftrain.errors import UsageError
from ftrain.signals import EARLY_SIGNALS

if TYPE_CHECKING:
    from ftrain.checkpoint.lease import Lease
    from ftrain.config import FtrainConfig

#: torchrun flags passed through unchanged: (flag, takes a value).
TORCHRUN_FLAGS = [("--nnodes", True), ("--node-rank", True), ("--rdzv-backend", True), ("--rdzv-endpoint", True),
                  ("--rdzv-id", True), ("--rdzv-conf", True), ("--master-addr", True), ("--master-port", True),
                  ("--local-addr", True), ("--standalone", False)]

#: ftrain flags and the config keys they set.
CONFIG_FLAGS = {
    "ckpt_dir": "checkpoint.dir", "save_every_steps": "checkpoint.every_steps",
    "save_every_seconds": "checkpoint.every_seconds", "keep_last": "checkpoint.keep_last",
    "max_restarts": "supervisor.max_restarts", "grace_seconds": "supervisor.grace_seconds",
    "hang_timeout": "supervisor.hang_timeout_seconds", "log_dir": "supervisor.log_dir",
    "force": "checkpoint.takeover",
}


def add_parser(sub: Any) -> None:
    # allow_abbrev=False: a script flag such as --save-every must reach the script, not be read as an
    # abbreviation of one of ours.
    p = sub.add_parser("launch", help="run SCRIPT under torchrun, supervised", allow_abbrev=False,
                       description="Run SCRIPT under torchrun; restart it after crashes and hangs from the newest "
                                   "valid checkpoint; save and exit cleanly on preemption signals.")
    p.add_argument("--nproc", "--nproc-per-node", "--nproc_per_node", dest="nproc", type=int, default=1,
                   help="worker processes per node (torchrun's --nproc-per-node)")
    tr = p.add_argument_group("torchrun multi-node flags (passed through)")
    for flag, takes_value in TORCHRUN_FLAGS:
        if takes_value:
            tr.add_argument(flag, dest=_dest(flag), metavar="VALUE")
        else:
            tr.add_argument(flag, dest=_dest(flag), action="store_true")
    f = p.add_argument_group("ftrain")
    f.add_argument("--config", help="YAML config file (else $FTRAIN_CONFIG)")
    f.add_argument("--ckpt-dir", help="checkpoint.dir")
    f.add_argument("--save-every-steps", type=int, help="checkpoint.every_steps")
    f.add_argument("--save-every-seconds", type=float, help="checkpoint.every_seconds")
    f.add_argument("--keep-last", type=int, help="checkpoint.keep_last")
    f.add_argument("--max-restarts", type=int, help="supervisor.max_restarts")
    f.add_argument("--grace-seconds", type=float, help="supervisor.grace_seconds")
    f.add_argument("--hang-timeout", type=float, help="supervisor.hang_timeout_seconds (0: off)")
    f.add_argument("--log-dir", help="supervisor.log_dir (default <checkpoint.dir>/logs)")
    f.add_argument("--force", action="store_true", default=None,
                   help="checkpoint.takeover: take the checkpoint dir over from another job holding it (that job "
                        "then stops committing)")
    p.add_argument("script", help="training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=cmd_launch)


def _dest(flag: str) -> str:
    return "tr_" + flag.lstrip("-").replace("-", "_")


def cmd_launch(args: argparse.Namespace) -> int:
    # Catch preemption signals from the first moment: importing the supervisor (torch, psutil) takes seconds,
    # and SLURM's SIGUSR1 would otherwise kill us before any handler exists. The supervisor takes these over.
    early: list[str] = []
    for name in EARLY_SIGNALS:
        signal.signal(getattr(signal, name), lambda signum, frame: early.append(signal.Signals(signum).name))
    from ftrain.checkpoint.store import CheckpointStore  # these import torch: seconds, so after the handlers
    from ftrain.config import load_config
    from ftrain.supervisor.supervisor import LaunchSpec, Supervisor

    script = Path(args.script)
    if not script.is_file():
        raise UsageError(f"training script {args.script!r} not found (or not a file)")
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    cfg = load_config(args.config, overrides={key: getattr(args, dest) for dest, key in CONFIG_FLAGS.items()})
    CheckpointStore(cfg.checkpoint.dir).ensure_writable()
    log_dir = Path(cfg.log_dir)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(log_dir, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise UsageError(f"log dir {str(log_dir)!r} is not writable ({e.strerror}); set supervisor.log_dir "
                     "(--log-dir) to a writable directory") from None

    torchrun_args: list[str] = []
    for flag, takes_value in TORCHRUN_FLAGS:
        value = getattr(args, _dest(flag))
        if takes_value and value is not None:
            torchrun_args += [flag, value]
        elif not takes_value and value:
            torchrun_args.append(flag)
    run_id = args.tr_rdzv_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    logging.basicConfig(level=logging.INFO, format="[ftrain launch] %(message)s")
    lease = _take_lease(cfg, run_id, args.tr_nnodes)  # before any attempt starts; held until we exit
    extra_env = {} if lease is None else {envvars.LEASE_GENERATION: str(lease.generation),
                                          envvars.LEASE_DIR: os.path.abspath(cfg.checkpoint.dir)}
    spec = LaunchSpec(script=str(script), script_args=list(args.script_args), nproc=args.nproc,
                      torchrun_args=torchrun_args, run_id=run_id, config=cfg, extra_env=extra_env)
    try:
        return Supervisor(spec, early_signals=early, lease_lost=lease.lost if lease is not None else lambda: None
                          ).run()
    finally:
        if lease is not None:
            lease.release()


def _take_lease(cfg: FtrainConfig, run_id: str, nnodes: str | None) -> Lease | None:
    """One job per checkpoint root (docs/FORMAT.md, "Lease"): on one node the launcher holds the root's lease
    for the job's whole life, and its workers check it before each commit; LeaseError (exit 2) if another job
    holds it. Across nodes rank 0's worker, which may run on any node, takes it instead."""
    from ftrain.checkpoint.lease import LAUNCH, Lease, Owner

    if nnodes not in (None, "1", "1:1"):
        return None
    lease = Lease(cfg.checkpoint.dir, Owner.current(run_id, LAUNCH, supervised=True),
                  ttl=cfg.checkpoint.lease_ttl_seconds)
    lease.acquire(force=cfg.checkpoint.takeover)
    lease.start_renewal()
    return lease
