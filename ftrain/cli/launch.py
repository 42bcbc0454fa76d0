"""``ftrain launch``: run a training script under torchrun, supervised (restarts, hangs, preemption).

Flag names follow torchrun wherever torchrun has the flag. Every option also
has a config key; command-line flags win over the environment, which wins over
the YAML file (see docs/configuration.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftrain import envvars
from ftrain.errors import UsageError
from ftrain.signals import EARLY_SIGNALS
from ftrain.supervisor.stop import StopRequest  # light: the early handlers need it before the heavy imports

if TYPE_CHECKING:
    from ftrain.checkpoint.lease import Lease
    from ftrain.config import FtrainConfig

#: torchrun flags passed through unchanged: (flag, takes a value).
TORCHRUN_FLAGS = [("--nnodes", True), ("--node-rank", True), ("--rdzv-backend", True), ("--rdzv-endpoint", True),
                  ("--rdzv-id", True), ("--rdzv-conf", True), ("--master-addr", True), ("--master-port", True),
                  ("--local-addr", True), ("--standalone", False)]

#: What a multi-node launch passes to torchrun's c10d rendezvous (``--rdzv-conf``) unless the user's own
#: ``--rdzv-conf`` sets the key. torchrun's defaults are last_call_timeout=30 (after MIN nodes joined, wait this
#: long for more: every re-rendezvous after a node loss pays it) and keep-alive every 5 s, 3 misses before a
#: silent node counts as dead. Ours: 5 s of last call (a node slower than that to arrive joins at the next
#: rendezvous, as a scale-up), keep-alive every 2 s (a dead node is dropped from the rendezvous after ~6 s).
RDZV_CONF_DEFAULTS = {"last_call_timeout": "5", "keep_alive_interval": "2", "keep_alive_max_attempt": "3"}
#: torchrun's default c10d rendezvous port.
RDZV_DEFAULT_PORT = 29400

#: ftrain flags and the config keys they set.
CONFIG_FLAGS = {
    "ckpt_dir": "checkpoint.dir", "save_every_steps": "checkpoint.every_steps",
    "save_every_seconds": "checkpoint.every_seconds", "keep_last": "checkpoint.retention.keep_last",
    "max_restarts": "supervisor.max_restarts", "grace_seconds": "supervisor.grace_seconds",
    "hang_timeout": "supervisor.hang_timeout_seconds", "log_dir": "supervisor.log_dir",
    "force": "checkpoint.lease.takeover",
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
    tr.add_argument("--rdzv-store", choices=("external", "agent"), default="external",
                    help="multi-node: where the c10d rendezvous store lives. external (default): an `ftrain "
                         "rendezvous` process at --rdzv-endpoint, which must be running (no node hosts it, so "
                         "losing any node is survivable); agent: torchrun's own behaviour, the first node's agent "
                         "hosts it, and losing that node stops every node (pytorch #67742)")
    f = p.add_argument_group("ftrain")
    f.add_argument("--config", help="YAML config file (else $FTRAIN_CONFIG)")
    f.add_argument("--ckpt-dir", help="checkpoint.dir")
    f.add_argument("--save-every-steps", type=int, help="checkpoint.every_steps")
    f.add_argument("--save-every-seconds", type=float, help="checkpoint.every_seconds")
    f.add_argument("--keep-last", type=int, help="checkpoint.retention.keep_last")
    f.add_argument("--max-restarts", type=int, help="supervisor.max_restarts")
    f.add_argument("--grace-seconds", type=float, help="supervisor.grace_seconds")
    f.add_argument("--hang-timeout", type=float, help="supervisor.hang_timeout_seconds (0: off)")
    f.add_argument("--log-dir", help="supervisor.log_dir (default <checkpoint.dir>/logs)")
    f.add_argument("--force", action="store_true", default=None,
                   help="checkpoint.lease.takeover: take the checkpoint dir over from another job holding it "
                        "(that job then stops committing)")
    p.add_argument("script", help="training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=cmd_launch)


def _dest(flag: str) -> str:
    return "tr_" + flag.lstrip("-").replace("-", "_")


def cmd_launch(args: argparse.Namespace) -> int:
    # Catch preemption signals from the first moment: importing the supervisor (torch, psutil) takes seconds,
    # and SLURM's SIGUSR1 would otherwise kill us before any handler exists. The supervisor takes these over.
    early: list[StopRequest] = []
    for name in EARLY_SIGNALS:
        signal.signal(getattr(signal, name),
                      lambda signum, frame: early.append(StopRequest.signal(signal.Signals(signum).name)))
    from ftrain.checkpoint.store import CheckpointStore  # imports take a moment: after the handlers
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

    nnodes = _nnodes(args.tr_nnodes)
    if nnodes[1] > 1:
        _check_multinode(args, nnodes)
    torchrun_args: list[str] = []
    for flag, takes_value in TORCHRUN_FLAGS:
        value = getattr(args, _dest(flag))
        if flag == "--rdzv-conf" and nnodes[1] > 1:
            value = _rdzv_conf(value, external=args.rdzv_store == "external")
        if takes_value and value is not None:
            torchrun_args += [flag, value]
        elif not takes_value and value:
            torchrun_args.append(flag)
    run_id = args.tr_rdzv_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    logging.basicConfig(level=logging.INFO, format="[ftrain launch] %(message)s")
    lease = _take_lease(cfg, run_id, args.tr_nnodes)  # before any attempt starts; held until we exit
    extra_env = {} if lease is None else {envvars.LEASE_GENERATION: str(lease.generation),
                                          envvars.LEASE_DIR: os.path.abspath(cfg.checkpoint.dir)}
    if nnodes[1] > 1 and args.tr_rdzv_backend is None:
        torchrun_args += ["--rdzv-backend", "c10d"]
    spec = LaunchSpec(script=str(script), script_args=list(args.script_args), nproc=args.nproc,
                      torchrun_args=torchrun_args, run_id=run_id, config=cfg, extra_env=extra_env, nnodes=nnodes)
    try:
        return Supervisor(spec, early_stops=early, lease_lost=lease.lost if lease is not None else lambda: None
                          ).run()
    finally:
        if lease is not None:
            lease.release()


def _nnodes(value: str | None) -> tuple[int, int]:
    """(MIN, MAX) from ``--nnodes N`` or ``--nnodes MIN:MAX`` (absent: one node)."""
    if value is None:
        return (1, 1)
    try:
        lo, sep, hi = value.partition(":")
        nodes = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise UsageError(f"--nnodes must be N or MIN:MAX, got {value!r}") from None
    if not 1 <= nodes[0] <= nodes[1]:
        raise UsageError(f"--nnodes {value}: need 1 <= MIN <= MAX")
    return nodes


def _check_multinode(args: argparse.Namespace, nnodes: tuple[int, int]) -> None:
    """Refuse a multi-node launch the nodes cannot agree on; check the external store is reachable."""
    if not args.tr_rdzv_id or not args.tr_rdzv_endpoint:
        missing = " and ".join(f for f, v in (("--rdzv-id", args.tr_rdzv_id), ("--rdzv-endpoint",
                                                                               args.tr_rdzv_endpoint)) if not v)
        raise UsageError(f"--nnodes {args.tr_nnodes} needs {missing}: the same --rdzv-id on every node (it names the "
                         "job), and --rdzv-endpoint HOST:PORT of the rendezvous store (`ftrain rendezvous`)")
    if args.tr_standalone:
        raise UsageError("--standalone is single-node; drop it for --nnodes " + args.tr_nnodes)
    if args.tr_node_rank is not None and nnodes[0] < nnodes[1]:
        logging.getLogger("ftrain.launch").warning(
            "--node-rank %s is ignored with --nnodes %s: the c10d rendezvous assigns node ranks (pytorch #182223)",
            args.tr_node_rank, args.tr_nnodes)
    backend = args.tr_rdzv_backend or "c10d"
    if args.rdzv_store == "external" and backend == "c10d":
        host, port = _endpoint(args.tr_rdzv_endpoint)
        try:
            socket.create_connection((host, port), timeout=5.0).close()
        except OSError as e:
            raise UsageError(f"cannot reach the rendezvous store at {host}:{port} ({e.strerror or e}); start it "
                             f"first, on a machine that outlives the nodes: `ftrain rendezvous --host {host} --port "
                             f"{port}` (or pass --rdzv-store agent to let the first node host it, at the risk that "
                             "losing that node stops them all)") from None


def _endpoint(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, RDZV_DEFAULT_PORT
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise UsageError(f"--rdzv-endpoint must be HOST:PORT, got {value!r}") from None


def _rdzv_conf(user: str | None, *, external: bool) -> str:
    """The ``--rdzv-conf`` of a multi-node launch: ours (:data:`RDZV_CONF_DEFAULTS`, ``is_host=false`` for an
    external store) with the user's ``key=value,...`` winning per key."""
    conf = dict(RDZV_CONF_DEFAULTS)
    if external:
        conf["is_host"] = "false"
    for item in filter(None, (user or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--rdzv-conf must be key=value[,key=value...], got {user!r}")
        conf[key.strip()] = value.strip()
    return ",".join(f"{k}={v}" for k, v in conf.items())


def _take_lease(cfg: FtrainConfig, run_id: str, nnodes: str | None) -> Lease | None:
    """One job per checkpoint root (docs/FORMAT.md, "Lease"): on one node the launcher holds the root's lease
    for the job's whole life, and its workers check it before each commit; LeaseError (exit 2) if another job
    holds it. Across nodes rank 0's worker, which may run on any node, takes it instead."""
    from ftrain.checkpoint.lease import LAUNCH, Lease, Owner

    if nnodes not in (None, "1", "1:1"):
        return None
    lease = Lease(cfg.checkpoint.dir, Owner.current(run_id, LAUNCH, supervised=True),
                  ttl=cfg.checkpoint.lease.ttl_seconds)
    lease.acquire(force=cfg.checkpoint.lease.takeover)
    lease.start_renewal()
    return lease
