"""Shared contract: the names of every environment variable ftrain reads or sets (the environment contract).

Configuration keys are also read from ``FTRAIN_<PATH>``, e.g. ``FTRAIN_CHECKPOINT_REMOTE_URL`` (see
``ftrain/config/``);
``ftrain launch`` hands its resolved configuration to workers that way. The names
below are the others. Documented in docs/cli.md.
"""
from __future__ import annotations

#: Path of a YAML config file to load.
CONFIG = "FTRAIN_CONFIG"
#: Fault-injection specs (tests and drills only; see ``faults.py``).
FAULTS = "FTRAIN_FAULTS"
#: Directory of "already fired" markers so each injected fault fires once across restarts.
FAULTS_ONCE_DIR = "FTRAIN_FAULTS_ONCE_DIR"
#: "1": `ftrain launch` shows worker and torchrun output unfiltered, tracebacks included (for debugging;
#: by default they are folded into one line per failure: see ``supervisor/console.py``).
RAW_CONSOLE = "FTRAIN_RAW_CONSOLE"

# Set by `ftrain launch` for each worker (absent when a script runs under plain torchrun or python).
#: Identifier of the supervised run (torchrun's --rdzv-id when given).
RUN_ID = "FTRAIN_RUN_ID"
#: 0-based attempt number; increases with each restart of the job.
ATTEMPT = "FTRAIN_ATTEMPT"
#: This attempt's directory: heartbeats/, errors/, stacks/, ranks/ (torchrun's per-rank logs), preempted.json.
ATTEMPT_DIR = "FTRAIN_ATTEMPT_DIR"
#: PID of the supervising `ftrain launch` process (not FTRAIN_SUPERVISOR_*: that prefix is the config section).
LAUNCHER_PID = "FTRAIN_LAUNCHER_PID"
#: Generation of the checkpoint-root lease the launcher holds for this job (docs/FORMAT.md, "Lease"): rank 0
#: checks the record still names this run at this generation instead of acquiring the lease itself.
LEASE_GENERATION = "FTRAIN_LEASE_GENERATION"
#: The checkpoint root that lease is for (absolute); a script writing elsewhere takes its own lease there.
LEASE_DIR = "FTRAIN_LEASE_DIR"
#: Set by ftrain launch for elastic launches (--nnodes MIN:MAX with MIN<MAX); checkpoint.on_resize 'auto' then
#: means resume.
ELASTIC = "FTRAIN_ELASTIC"
#: Set by `ftrain launch` for torchrun (``ftrain.supervisor.agent``): the preemption signals torchrun ignores, comma-
#: separated; ftrain launch alone acts on them (a signal sent to every process of the job must not stop torchrun).
AGENT_IGNORES = "FTRAIN_AGENT_IGNORES"

# Warm starts (docs/FORMAT.md, "Warm starts (zygote)").
#: Set by `ftrain launch` for torchrun: the zygote's Unix socket, where `python -m ftrain.supervisor.entry` asks
#: for a warm (forked) worker. Unset or unreachable: the entry starts the script cold.
ZYGOTE_SOCKET = "FTRAIN_ZYGOTE_SOCKET"
#: Set by the zygote in each warm worker: the pid of its entry process, the process torchrun started and knows as
#: the rank. The worker's heartbeats, error files and preempted.json carry this pid (``attempt.worker_pid``).
ENTRY_PID = "FTRAIN_ENTRY_PID"
#: Set with ENTRY_PID: the warm worker's own pid. A process of another pid (a child of the worker, such as a
#: DataLoader worker, inherits both) ignores ENTRY_PID.
FORKED_PID = "FTRAIN_FORKED_PID"

# Set by torchrun for each worker; read, never written, by ftrain.
RANK = "RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_RANK = "LOCAL_RANK"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
#: The worker group: how many times torchrun restarted its workers after a failure (a scale-up restart keeps it);
#: recorded in heartbeats and error files (docs/FORMAT.md, "Attempt directory").
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
