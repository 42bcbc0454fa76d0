"""``ftrain rendezvous``: host the c10d rendezvous store of a multi-node ``ftrain launch``, outside every node.

torchrun's c10d rendezvous keeps its state in a TCPStore that, by default, the first
agent to start hosts in-process; when that node dies, the store dies with it and takes
every other node down (pytorch #67742). ``ftrain launch --nnodes MIN:MAX`` therefore
tells every agent not to host it (``--rdzv-conf is_host=false``) and expects this
command to hold it, on a machine that outlives the training nodes (a login node, the
scheduler's head node). It serves until SIGTERM or SIGINT and then exits 0.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from ftrain.errors import UsageError

#: torchrun's default c10d rendezvous port (torch.distributed.elastic.rendezvous.c10d_rendezvous_backend).
DEFAULT_PORT = 29400


def add_parser(sub: Any) -> None:
    p = sub.add_parser("rendezvous", help="host the rendezvous store of a multi-node ftrain launch",
                       description="Host the c10d rendezvous store (a torch.distributed.TCPStore) that every node of "
                                   "`ftrain launch --nnodes MIN:MAX --rdzv-endpoint HOST:PORT` connects to, so that "
                                   "no training node hosts it. Runs until SIGTERM or SIGINT.")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT}, torchrun's; 0: any free port, printed)")
    p.set_defaults(func=cmd_rendezvous)


def cmd_rendezvous(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    stop = threading.Event()
    received: list[str] = []

    def handler(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    from datetime import timedelta

    from torch.distributed import TCPStore  # seconds to import: after the handlers

    try:
        # multi_tenant: the agents' own clients ask for it; wait_for_workers=False: serve whoever comes.
        store = TCPStore(args.host, args.port, is_master=True, multi_tenant=True, wait_for_workers=False,
                         timeout=timedelta(seconds=60))
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({str(e).splitlines()[0] if str(e) else e}); "
                         "is another store already there? choose another --port") from None
    print(f"rendezvous store listening on {args.host}:{store.port}", flush=True)
    while not stop.wait(1.0):
        pass
    print(f"rendezvous store on {args.host}:{store.port}: stopped by {received[0]}", file=sys.stderr, flush=True)
    del store
    return 0
