"""Shared contract: the configuration's sections, as validated frozen dataclasses, nested by component.

Each field carries its one-line help (the source of docs/configuration.md) and its value rule. A section may
hold sections of its own (``checkpoint.remote``), so a key is a path: ``checkpoint.remote.url``.
A new section is a :class:`_Section` subclass added as a field of its parent; loading, validation, env names
and docs follow.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ftrain.config.values import (
    HTTP_URL,
    MODULE_NAMES,
    NON_EMPTY,
    NON_NEGATIVE,
    POSITIVE,
    REMOTE_URL,
    SIGNAL_NAMES,
    Rule,
    check,
    distinct_among,
    one_of,
)
from ftrain.errors import ConfigError
from ftrain.signals import DEFAULT_PREEMPTION_SIGNALS

RESUME_MODES = ("auto", "required", "never")
WHEN_BUSY = ("wait", "skip")
SELECTION_MODES = ("auto", "min", "max")
RESIZE_MODES = ("auto", "refuse", "resume")
UNEVEN_BATCH = ("error", "nearest")
#: supervisor.notices.sources: where preemption notices may come from (ftrain/supervisor/notices/).
NOTICE_SOURCES = ("aws", "gcp", "azure", "drain")
REBALANCE_MODES = ("log", "stop")
#: The real metadata services (link-local / internal names); tests point these keys at fakes on 127.0.0.1.
AWS_METADATA_URL = "http://169.254.169.254"
GCP_METADATA_URL = "http://metadata.google.internal"
AZURE_METADATA_URL = "http://169.254.169.254"


def _option(default: Any, help: str, rule: Rule | None = None, *, internal: bool = False) -> Any:
    """A dataclass field carrying its one-line help text and value rule.

    ``internal``: a key that exists for tests (a fake service's address); it loads like any other but is left
    out of the user-facing reference.
    """
    metadata = {"help": help, "rule": rule, "internal": internal}
    if isinstance(default, list):  # dataclasses forbid shared mutable defaults
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _section(cls: type[_Section]) -> Any:
    """A dataclass field holding a nested section, built with its defaults."""
    return field(default_factory=cls)


@dataclass(frozen=True)
class _Section:
    """Base of every config section: validates each value against its type and rule, and each nested section."""

    #: The section's name: its key in YAML, dotted keys and env names, and its field name in the parent.
    section: ClassVar[str]

    def __post_init__(self) -> None:
        cls: type = type(self)
        path = paths().get(cls, self.section)
        for f, tp in _fields_of(cls):
            value = getattr(self, f.name)
            if isinstance(tp, type) and issubclass(tp, _Section):
                if not isinstance(value, tp):
                    raise ConfigError(f"{path}.{f.name}: expected a {tp.__name__}, got {value!r}")
                continue
            # Store the normalised value (int -> float); frozen, hence object.__setattr__.
            object.__setattr__(self, f.name, check(f"{path}.{f.name}", value, tp, f.metadata["rule"]))


@functools.cache
def _fields_of(cls: type) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    """``(field, resolved type)`` of a section class or FtrainConfig; memoised, as validation runs often."""
    # Annotations are strings under `from __future__ import annotations`; resolve them.
    hints = typing.get_type_hints(cls)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class RetentionConfig(_Section):
    """Which checkpoints are deleted, and which never are."""

    section: ClassVar[str] = "retention"

    keep_last: int = _option(
        3, "Number of newest checkpoints to keep; older ones are deleted; 0 keeps all. The newest is never"
        " deleted.", NON_NEGATIVE)
    keep_best: int = _option(
        1, "Keep the N best checkpoints by checkpoint.selection.monitor besides the keep_last newest (retention"
        " never deletes them); a report that ranks among them triggers a save; 0 disables.", NON_NEGATIVE)


@dataclass(frozen=True)
class SelectionConfig(_Section):
    """Model selection: the metric that ranks checkpoints, and what the best ones are used for."""

    section: ClassVar[str] = "selection"

    monitor: str = _option(
        "", "Metric (reported with session.report()) that ranks checkpoints for retention.keep_best,"
        " save_best_only, load_best_at_end and early stopping; empty: none.")
    mode: str = _option(
        "auto", "min or max: whether a lower or a higher monitor value is better; auto: max for names such as"
        " acc, f1, auc, else min.", one_of(*SELECTION_MODES))
    save_best_only: bool = _option(
        False, "Write scheduled saves only when they rank among the retention.keep_best best; preemption and"
        " explicit session.save() checkpoints are always written. Needs monitor.")
    load_best_at_end: bool = _option(
        False, "session.close() loads the best checkpoint's state into the registered objects. Needs monitor.")


@dataclass(frozen=True)
class LeaseConfig(_Section):
    """One job per checkpoint directory: the lease that enforces it (docs/FORMAT.md, "Lease")."""

    section: ClassVar[str] = "lease"

    ttl_seconds: float = _option(
        60.0, "The writing job renews its lease on the directory every third of this; another host's lease not"
        " renewed for this long may be taken over (on one host a dead holder is seen at once). Hosts' clocks"
        " must agree to well within it.", POSITIVE)
    takeover: bool = _option(
        False, "Take the directory over from another job holding its lease (ftrain launch --force); that job"
        " stops committing. Meant for one run, not to be left on.")


@dataclass(frozen=True)
class RemoteConfig(_Section):
    """The remote tier: every checkpoint also uploaded to an object store or a shared filesystem."""

    section: ClassVar[str] = "remote"

    url: str = _option(
        "", "s3://bucket/prefix or any fsspec URL (file:///shared/ckpt, gs://...; anything else, such as"
        " s3:/bucket or a plain path, is refused at load with exit 2). Each checkpoint commits locally, then"
        " uploads in the background, manifest last; restore takes the newest valid one of both tiers"
        " (docs/cloud.md). Needs pip install ftrain[remote]; credentials from the library's standard chain."
        " Empty: no remote tier.", REMOTE_URL)
    keep_last: int = _option(
        3, "Newest checkpoints kept on the remote tier (besides the keep-best ones); 0 keeps all.", NON_NEGATIVE)
    retries: int = _option(
        5, "Attempts per file of an upload (5xx, timeouts, dropped connections, credentials) before that step's"
        " upload counts as failed (logged, recorded in remote.json and ftrain ckpt ls; training goes on);"
        " backoff 0.5 s doubling to 8 s.", POSITIVE)
    wait_seconds: float = _option(
        600.0, "How long session.close() waits for the last upload; after a preemption save the wait is cut to"
        " what is left of supervisor.grace_seconds.", NON_NEGATIVE)


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """When and where checkpoints are written, and whether a run resumes from one."""

    section: ClassVar[str] = "checkpoint"

    dir: str = _option(
        "checkpoints", "Directory checkpoints are written to (created if missing). Multi-node jobs may use a"
        " shared filesystem or each node's own disk (found out at start; docs/multi-node.md). One job per"
        " directory (checkpoint.lease).", NON_EMPTY)
    every_steps: int = _option(
        0, "Save every N optimizer steps; 0 turns step-based saving off.", NON_NEGATIVE)
    every_seconds: float = _option(
        0.0, "Save when this many seconds have passed since the last save; 0 turns it off.", NON_NEGATIVE)
    resume: str = _option(
        "auto", "auto: resume from the newest valid checkpoint if any, else start fresh; required: fail if none"
        " validates; never: start fresh, and refuse (exit 2) a directory that already holds checkpoints, so an"
        " old run cannot be mixed with a new one.", one_of(*RESUME_MODES))
    commit_timeout_seconds: float = _option(
        600.0, "Seconds rank 0 waits for every rank's shard before failing the save.", POSITIVE)
    async_save: bool = _option(
        True, "Copy state into reused host buffers, then write, checksum and commit in a background thread;"
        " false writes synchronously.")
    when_busy: str = _option(
        "wait", "When a save falls due while the previous one is still being written: wait for it, or skip"
        " this save (counted and logged).", one_of(*WHEN_BUSY))
    trainable_only: bool = _option(
        False, "Save only the parameters with requires_grad of registered modules (plus buffers, optimizer,"
        " RNG and data state); frozen weights are referenced by a fingerprint checked on resume.")
    check_replicated: bool = _option(
        False, "At each save, compare a digest of every replicated tensor across ranks and name the first that"
        " differs (StateMismatch on every rank); catches silent divergence from DDP misuse; costs hashing the"
        " replicated state. Buffers of replicated modules are not compared (they differ by design under DDP).")
    replicas: int = _option(
        1, "With node-local checkpoint directories (each node its own disk; found out at start): copies of each"
        " node's files of every checkpoint kept on this many other nodes' disks, made as part of each commit"
        " (in the background), so a lost node's part is fetched from a peer. Ignored when every rank writes"
        " into one directory (a shared filesystem, or one node). 0: none (then only checkpoint.remote.url"
        " survives a node's loss; a warning at start says so).", NON_NEGATIVE)
    on_resize: str = _option(
        "auto", "A checkpoint written by another number of ranks: resume (replicated state as is, the data"
        " position re-striped over the new ranks, RNG streams derived anew; docs/multi-node.md) or refuse"
        " (exit 1, naming both world sizes); auto: resume under ftrain launch --nnodes MIN:MAX, else refuse.",
        one_of(*RESIZE_MODES))
    retention: RetentionConfig = _section(RetentionConfig)
    selection: SelectionConfig = _section(SelectionConfig)
    lease: LeaseConfig = _section(LeaseConfig)
    remote: RemoteConfig = _section(RemoteConfig)


@dataclass(frozen=True)
class DataConfig(_Section):
    """How the data is split over the ranks (session.batch_plan())."""

    section: ClassVar[str] = "data"

    on_uneven_batch: str = _option(
        "error", "session.batch_plan() when the global batch cannot be split evenly over the ranks: error"
        " (naming the world sizes that work), or nearest (warn, and use the nearest smaller global batch that"
        " splits; the samples of each step then differ from the original run's, each sample is still seen once"
        " per epoch).", one_of(*UNEVEN_BATCH))


@dataclass(frozen=True)
class EarlyStoppingConfig(_Section):
    """Stop training when ``checkpoint.selection.monitor`` stops improving; the counter survives restarts."""

    section: ClassVar[str] = "early_stopping"

    patience: int = _option(
        0, "session.should_stop becomes true after this many reports of checkpoint.selection.monitor in a row"
        " without improvement; 0 disables. Needs the monitor.", NON_NEGATIVE)
    min_delta: float = _option(
        0.0, "A report improves only if it beats the best value so far by more than this.", NON_NEGATIVE)


@dataclass(frozen=True)
class NoticesConfig(_Section):
    """Preemption notices watched besides signals: cloud metadata services and a drain file (docs/cloud.md)."""

    section: ClassVar[str] = "notices"

    sources: list[str] = _option(
        [], "Where notices come from: aws, gcp, azure, drain. A notice stops the job like a preemption signal"
        " (final save, exit 75) and its deadline is logged; empty: none.", distinct_among(NOTICE_SOURCES, "sources"))
    poll_seconds: float = _option(
        5.0, "Seconds between polls of each notice source (backing off to 30 s while one is unreachable).",
        POSITIVE)
    aws_rebalance: str = _option(
        "log", "An AWS rebalance recommendation (it may come before the 2-minute spot notice): log it once and"
        " keep training, or stop (treat it as a notice, with no deadline).", one_of(*REBALANCE_MODES))
    drain_file: str = _option(
        "", "For the drain source: the file whose appearance stops the job (e.g. touched by a preStop hook); if"
        " it exists at launch the job does not start (exit 75); empty means <checkpoint.dir>/DRAIN.")
    aws_metadata_url: str = _option(
        AWS_METADATA_URL, "Base URL of the AWS instance metadata service (IMDSv2).", HTTP_URL, internal=True)
    gcp_metadata_url: str = _option(
        GCP_METADATA_URL, "Base URL of the GCP metadata server.", HTTP_URL, internal=True)
    azure_metadata_url: str = _option(
        AZURE_METADATA_URL, "Base URL of the Azure instance metadata service (Scheduled Events).", HTTP_URL,
        internal=True)


@dataclass(frozen=True)
class SupervisorConfig(_Section):
    """How ``ftrain launch`` restarts a failed or hung job, and how it handles preemption."""

    section: ClassVar[str] = "supervisor"

    max_restarts: int = _option(
        3, "Restarts of the whole job after a failure or hang before giving up.", NON_NEGATIVE)
    max_attempts_without_progress: int = _option(
        3, "Give up after this many attempts in a row that commit no new checkpoint (a crash loop);"
        " 0 disables. Scripts without a Session count every failure as progress.", NON_NEGATIVE)
    backoff_seconds: float = _option(
        1.0, "Delay before a restart after an attempt that made no progress (committed no new checkpoint);"
        " doubles with each such attempt in a row (half of it jittered). After progress the restart is"
        " immediate.", NON_NEGATIVE)
    backoff_max_seconds: float = _option(
        30.0, "Cap on the restart delay.", NON_NEGATIVE)
    grace_seconds: float = _option(
        30.0, "After a preemption signal, time for all ranks to agree on a step, save and exit"
        " before the job is killed.", POSITIVE)
    hang_timeout_seconds: float = _option(
        300.0, "A rank that reports no step progress for this long is declared hung: its stacks are"
        " dumped and the job is restarted; 0 disables.", NON_NEGATIVE)
    startup_timeout_seconds: float = _option(
        600.0, "Allowance before a rank's first step (imports, rendezvous, restore)"
        " before it counts as hung.", POSITIVE)
    progress_seconds: float = _option(
        60.0, "ftrain launch prints one progress line (step, steps/s, newest checkpoint, restarts, ETA) this"
        " often; 0: never.", NON_NEGATIVE)
    preemption_signals: list[str] = _option(
        [*DEFAULT_PREEMPTION_SIGNALS], "Signals that mean preemption: save and exit"
        " (SIGTERM for Kubernetes and cloud VMs, SIGUSR1 for SLURM's --signal). SIGUSR2 is reserved for stack"
        " dumps.", SIGNAL_NAMES)
    log_dir: str = _option(
        "", "Where per-attempt, per-rank logs, error files and heartbeats go;"
        " empty means <checkpoint.dir>/logs.")
    warm_start: bool = _option(
        True, "Fork workers from a zygote that imported supervisor.preload once, so a restart costs a fork, not a"
        " torch import (docs/FORMAT.md, \"Warm starts\"). Where that is unsafe (a preloaded module started a"
        " thread or initialized CUDA, the interpreter differs, the zygote is gone) a worker starts cold and its"
        " log says why in one line; false: always cold.")
    preload: list[str] = _option(
        ["torch", "torch._dynamo", "numpy", "ftrain"], "Modules the zygote imports for warm starts, besides the"
        " script's own top-level imports of modules outside its directory; -NAME keeps NAME (and its"
        " submodules) out, e.g. a module that reads the rank's environment at import. (torch._dynamo:"
        " DistributedDataParallel and the optimizers import it on first use, 1.2 s here.)", MODULE_NAMES)
    notices: NoticesConfig = _section(NoticesConfig)


@dataclass(frozen=True)
class FtrainConfig:
    """The whole configuration: one field per top-level section, named as the section."""

    checkpoint: CheckpointConfig = _section(CheckpointConfig)
    data: DataConfig = _section(DataConfig)
    early_stopping: EarlyStoppingConfig = _section(EarlyStoppingConfig)
    supervisor: SupervisorConfig = _section(SupervisorConfig)

    def __post_init__(self) -> None:
        for f, cls in _fields_of(FtrainConfig):
            if not isinstance(getattr(self, f.name), cls):
                raise ConfigError(f"{f.name}: expected a {cls.__name__}, got {getattr(self, f.name)!r}")
        sel = self.checkpoint.selection
        needs_monitor = [k for k, on in (("checkpoint.selection.save_best_only", sel.save_best_only),
                                          ("checkpoint.selection.load_best_at_end", sel.load_best_at_end),
                                          ("early_stopping.patience", self.early_stopping.patience > 0)) if on]
        if needs_monitor and not sel.monitor:
            raise ConfigError(f"{needs_monitor[0]} needs checkpoint.selection.monitor: set it to the name of the "
                              "metric you report with session.report(), e.g. val_loss")
        if (sel.save_best_only or sel.load_best_at_end) and self.checkpoint.retention.keep_best == 0:
            key = "save_best_only" if sel.save_best_only else "load_best_at_end"
            raise ConfigError(f"checkpoint.selection.{key} needs checkpoint.retention.keep_best >= 1 (with 0 no "
                              "checkpoint is kept as a best one)")

    @property
    def log_dir(self) -> str:
        """``supervisor.log_dir``, or its default ``<checkpoint.dir>/logs`` (the one place that default lives)."""
        return self.supervisor.log_dir or os.path.join(self.checkpoint.dir, "logs")


@functools.cache
def paths() -> dict[type, str]:
    """Each section class -> its dotted path from the root (``checkpoint.remote``), each section before the ones
    nested in it: the one walk of the section tree (messages here, keys and env names in ``schema.py``)."""
    out: dict[type, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for f, tp in _fields_of(cls):
            if isinstance(tp, type) and issubclass(tp, _Section):
                if tp.section != f.name:  # messages would name a key the loader does not accept
                    raise TypeError(f"{cls.__name__}.{f.name} holds {tp.__name__} of section {tp.section!r}")
                out[tp] = f"{prefix}{f.name}"
                walk(tp, f"{prefix}{f.name}.")
    walk(FtrainConfig, "")
    return out
