"""Shared contract: the ftrain configuration, validated dataclasses and the loader that fills them.

Precedence, lowest to highest (a later layer overrides an earlier one, key by key):

1. dataclass defaults (documented in ``configs/default.yaml``);
2. the YAML file (``path``, else the file named by ``FTRAIN_CONFIG``);
3. environment variables ``FTRAIN_<SECTION>_<KEY>``, e.g. ``FTRAIN_CHECKPOINT_EVERY_STEPS=100``;
4. ``overrides``: command-line flags as dotted keys, e.g. ``{"checkpoint.every_steps": 100}``.

Every mistake (unknown key, bad value, unreadable file) raises :class:`ConfigError`
with a one-line message naming the key and where it came from.

A new section is added by writing a :class:`_Section` subclass and adding it as a
field of :class:`FtrainConfig`; loading, validation, env names and docs follow.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import yaml

from ftrain import envvars
from ftrain.config_values import (
    _HTTP_URL,
    _MODULE_NAMES,
    _NON_EMPTY,
    _NON_NEGATIVE,
    _POSITIVE,
    _REMOTE_URL,
    _SIGNAL_NAMES,
    _TYPE_NAMES,
    Rule,
    _check,
    _distinct_among,
    _format_text,
    _one_of,
    _parse_text,
)
from ftrain.config_values import PREEMPTION_SIGNALS as PREEMPTION_SIGNALS  # public: re-exported
from ftrain.errors import ConfigError
from ftrain.signals import DEFAULT_PREEMPTION_SIGNALS

ENV_PREFIX = "FTRAIN_"
RESUME_MODES = ("auto", "required", "never")
WHEN_BUSY = ("wait", "skip")
SELECTION_MODES = ("auto", "min", "max")
RESIZE_MODES = ("auto", "refuse", "resume")
UNEVEN_BATCH = ("error", "nearest")
#: supervisor.notices: where preemption notices may come from (ftrain/supervisor/notices/).
NOTICE_SOURCES = ("aws", "gcp", "azure", "drain")
REBALANCE_MODES = ("log", "stop")
#: The real metadata services (link-local / internal names); tests point these keys at fakes on 127.0.0.1.
AWS_METADATA_URL = "http://169.254.169.254"
GCP_METADATA_URL = "http://metadata.google.internal"
AZURE_METADATA_URL = "http://169.254.169.254"


_NOTICE_NAMES = _distinct_among(NOTICE_SOURCES, "sources")


def _option(default: Any, help: str, rule: Rule | None = None) -> Any:
    """A dataclass field carrying its one-line help text and value rule."""
    metadata = {"help": help, "rule": rule}
    if isinstance(default, list):  # dataclasses forbid shared mutable defaults
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class _Section:
    """Base of every config section: validates each field against its type and rule."""

    #: The section's key in YAML, dotted keys and env names; equals its field name in FtrainConfig.
    section: ClassVar[str]

    def __post_init__(self) -> None:
        for key in _keys_of(type(self)).values():
            # Store the normalised value (int -> float); frozen, hence object.__setattr__.
            object.__setattr__(self, key.name, key.check(getattr(self, key.name)))


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """When and where checkpoints are written, and whether a run resumes from one."""

    section: ClassVar[str] = "checkpoint"

    dir: str = _option(
        "checkpoints", "Directory checkpoints are written to (created if missing).", _NON_EMPTY)
    every_steps: int = _option(
        0, "Save every N optimizer steps; 0 turns step-based saving off.", _NON_NEGATIVE)
    every_seconds: float = _option(
        0.0, "Save when this many seconds have passed since the last save; 0 turns it off.",
        _NON_NEGATIVE)
    keep_last: int = _option(
        3, "Number of newest checkpoints to keep; older ones are deleted; 0 keeps all.",
        _NON_NEGATIVE)
    resume: str = _option(
        "auto", "auto: resume from the newest valid checkpoint if any, else start fresh;"
        " required: fail if none validates; never: start fresh, and refuse a directory that already holds"
        " checkpoints.", _one_of(*RESUME_MODES))
    commit_timeout_seconds: float = _option(
        600.0, "Seconds rank 0 waits for every rank's shard before failing the save.", _POSITIVE)
    async_save: bool = _option(
        True, "Copy state into reused host buffers, then write, checksum and commit in a background thread;"
        " false writes synchronously.")
    when_busy: str = _option(
        "wait", "When a save falls due while the previous one is still being written: wait for it, or skip"
        " this save (counted and logged).", _one_of(*WHEN_BUSY))
    monitor: str = _option(
        "", "Metric (reported with session.report()) that ranks checkpoints for keep_best, save_best_only,"
        " load_best_at_end and early stopping; empty: none.")
    mode: str = _option(
        "auto", "min or max: whether a lower or a higher monitor value is better; auto: max for names such as"
        " acc, f1, auc, else min.", _one_of(*SELECTION_MODES))
    keep_best: int = _option(
        1, "Keep the N best checkpoints by monitor besides the keep_last newest (retention never deletes"
        " them); a report that ranks among them triggers a save; 0 disables.", _NON_NEGATIVE)
    save_best_only: bool = _option(
        False, "Write scheduled saves only when they rank among the keep_best best; preemption and"
        " explicit session.save() checkpoints are always written.")
    load_best_at_end: bool = _option(
        False, "session.close() loads the best checkpoint's state into the registered objects.")
    trainable_only: bool = _option(
        False, "Save only the parameters with requires_grad of registered modules (plus buffers, optimizer,"
        " RNG and data state); frozen weights are referenced by a fingerprint checked on resume.")
    check_replicated: bool = _option(
        False, "At each save, compare a digest of every replicated tensor across ranks and name the first that"
        " differs; catches silent divergence from DDP misuse; costs hashing the replicated state.")
    lease_ttl_seconds: float = _option(
        60.0, "The writing job renews its lease on the directory every third of this; another host's lease not"
        " renewed for this long may be taken over (on one host a dead holder is seen at once).", _POSITIVE)
    takeover: bool = _option(
        False, "Take the directory over from another job holding its lease (launch --force); it stops committing.")
    remote: str = _option(
        "", "Remote tier: s3://bucket/prefix or any fsspec URL (file:///shared/ckpt, gs://...). Each checkpoint"
        " commits locally, then uploads in the background, manifest last; restore takes the newest valid one of"
        " both tiers. Needs pip install ftrain[remote]; credentials from the library's standard chain. Empty:"
        " none.", _REMOTE_URL)
    replicas: int = _option(
        1, "With node-local checkpoint directories (each node its own disk; found out at start): copies of each"
        " node's files of every checkpoint kept on this many other nodes' disks, sent in the background after"
        " each commit, so a lost node's part is fetched from a peer. Ignored when every rank writes into one"
        " directory (a shared filesystem, or one node). 0: none (then only checkpoint.remote survives a node's"
        " loss).", _NON_NEGATIVE)
    remote_keep_last: int = _option(
        3, "Newest checkpoints kept on the remote tier (besides the keep_best best ones); 0 keeps all.",
        _NON_NEGATIVE)
    remote_retries: int = _option(
        5, "Attempts per file of an upload (5xx, timeouts, dropped connections, credentials) before that step's"
        " upload counts as failed (logged, recorded in remote.json; training goes on); backoff 0.5 s doubling to"
        " 8 s.", _POSITIVE)
    remote_wait_seconds: float = _option(
        600.0, "How long session.close() waits for the last upload; after a preemption save the wait is cut to"
        " what is left of supervisor.grace_seconds.", _NON_NEGATIVE)
    on_resize: str = _option(
        "auto", "A checkpoint written by another number of ranks: resume (replicated state as is, the data"
        " position re-striped over the new ranks, RNG streams derived anew; docs/multi-node.md) or refuse;"
        " auto: resume under ftrain launch --nnodes MIN:MAX, else refuse.", _one_of(*RESIZE_MODES))
    on_uneven_batch: str = _option(
        "error", "session.batch_plan() when the global batch cannot be split evenly over the ranks: error, or"
        " nearest (warn, and use the nearest smaller global batch that splits; the samples of each step then"
        " differ from the original run's, each sample is still seen once per epoch).", _one_of(*UNEVEN_BATCH))


@dataclass(frozen=True)
class EarlyStoppingConfig(_Section):
    """Stop training when ``checkpoint.monitor`` stops improving; the counter survives restarts."""

    section: ClassVar[str] = "early_stopping"

    patience: int = _option(
        0, "session.should_stop becomes true after this many reports of checkpoint.monitor in a row"
        " without improvement; 0 disables.", _NON_NEGATIVE)
    min_delta: float = _option(
        0.0, "A report improves only if it beats the best value so far by more than this.", _NON_NEGATIVE)


@dataclass(frozen=True)
class SupervisorConfig(_Section):
    """How ``ftrain launch`` restarts a failed or hung job, and how it handles preemption."""

    section: ClassVar[str] = "supervisor"

    max_restarts: int = _option(
        3, "Restarts of the whole job after a failure or hang before giving up.", _NON_NEGATIVE)
    max_attempts_without_progress: int = _option(
        3, "Give up after this many attempts in a row that commit no new checkpoint (a crash loop);"
        " 0 disables.", _NON_NEGATIVE)
    backoff_seconds: float = _option(
        1.0, "Delay before the first restart; doubles with each attempt in a row without progress.",
        _NON_NEGATIVE)
    backoff_max_seconds: float = _option(
        30.0, "Cap on the restart delay.", _NON_NEGATIVE)
    grace_seconds: float = _option(
        30.0, "After a preemption signal, time for all ranks to agree on a step, save and exit"
        " before the job is killed.", _POSITIVE)
    hang_timeout_seconds: float = _option(
        300.0, "A rank that reports no step progress for this long is declared hung: its stacks are"
        " dumped and the job is restarted; 0 disables.", _NON_NEGATIVE)
    startup_timeout_seconds: float = _option(
        600.0, "Allowance before a rank's first step (imports, rendezvous, restore)"
        " before it counts as hung.", _POSITIVE)
    progress_seconds: float = _option(
        60.0, "ftrain launch prints one progress line (step, steps/s, newest checkpoint, restarts, ETA) this"
        " often; 0: never.", _NON_NEGATIVE)
    preemption_signals: list[str] = _option(
        [*DEFAULT_PREEMPTION_SIGNALS], "Signals that mean preemption: save and exit"
        " (SIGTERM for Kubernetes and cloud VMs, SIGUSR1 for SLURM's --signal).",
        _SIGNAL_NAMES)
    log_dir: str = _option(
        "", "Where per-attempt, per-rank logs, error files and heartbeats go;"
        " empty means <checkpoint.dir>/logs.")
    notices: list[str] = _option(
        [], "Preemption notices to watch besides signals (aws, gcp, azure, drain): a notice stops the job"
        " like a preemption signal (final save, exit 75) and its deadline is logged; empty: none.", _NOTICE_NAMES)
    notice_poll_seconds: float = _option(
        5.0, "Seconds between polls of each notice source (backing off to 30 s while one is unreachable).",
        _POSITIVE)
    aws_metadata_url: str = _option(
        AWS_METADATA_URL, "Base URL of the AWS instance metadata service (IMDSv2) for notices: aws.", _HTTP_URL)
    aws_rebalance: str = _option(
        "log", "An AWS rebalance recommendation (it may come before the 2-minute spot notice): log it once,"
        " or stop (treat it as a notice, with no deadline).", _one_of(*REBALANCE_MODES))
    gcp_metadata_url: str = _option(
        GCP_METADATA_URL, "Base URL of the GCP metadata server for notices: gcp.", _HTTP_URL)
    azure_metadata_url: str = _option(
        AZURE_METADATA_URL, "Base URL of the Azure instance metadata service (Scheduled Events) for notices:"
        " azure.", _HTTP_URL)
    drain_file: str = _option(
        "", "For notices: drain, the file whose appearance stops the job (e.g. touched by a preStop hook);"
        " if it exists at launch the job does not start (exit 75); empty means <checkpoint.dir>/DRAIN.")
    warm_start: bool = _option(
        True, "Fork workers from a zygote that imported supervisor.preload once, so a restart costs a fork, not a"
        " torch import; cold starts, with one line saying why, where that is unsafe; false: always cold.")
    preload: list[str] = _option(
        ["torch", "torch._dynamo", "numpy", "ftrain"], "Modules the zygote imports for warm starts, besides the"
        " script's own top-level imports of modules outside its directory; -NAME: never NAME. (torch._dynamo:"
        " DistributedDataParallel and the optimizers import it on first use, 1.2 s here.)", _MODULE_NAMES)


@dataclass(frozen=True)
class FtrainConfig:
    """The whole configuration: one field per section, named as the section."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)

    def __post_init__(self) -> None:
        for name, cls in _sections().items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name}: expected a {cls.__name__}, got {getattr(self, name)!r}")
        ckpt = self.checkpoint
        needs_monitor = [k for k, on in (("checkpoint.save_best_only", ckpt.save_best_only),
                                          ("checkpoint.load_best_at_end", ckpt.load_best_at_end),
                                          ("early_stopping.patience", self.early_stopping.patience > 0)) if on]
        if needs_monitor and not ckpt.monitor:
            raise ConfigError(f"{needs_monitor[0]} needs checkpoint.monitor: set it to the name of the metric "
                              "you report with session.report(), e.g. val_loss")
        if (ckpt.save_best_only or ckpt.load_best_at_end) and ckpt.keep_best == 0:
            key = "checkpoint.save_best_only" if ckpt.save_best_only else "checkpoint.load_best_at_end"
            raise ConfigError(f"{key} needs checkpoint.keep_best >= 1 (with 0 no checkpoint is kept as a best one)")

    @property
    def log_dir(self) -> str:
        """``supervisor.log_dir``, or its default ``<checkpoint.dir>/logs`` (the one place that default lives)."""
        return self.supervisor.log_dir or os.path.join(self.checkpoint.dir, "logs")


class _Key(NamedTuple):
    """One configuration key and everything needed to load, check and document it."""

    section: str
    name: str
    type: Any
    field: dataclasses.Field[Any]

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def env_var(self) -> str:
        return f"{ENV_PREFIX}{self.section}_{self.name}".upper()

    def check(self, value: Any, where: str = "") -> Any:
        """``value`` validated and normalised for this key (see :func:`_check`)."""
        return _check(self.dotted, value, self.type, self.field.metadata["rule"], where)

    def get(self, cfg: FtrainConfig) -> Any:
        return getattr(getattr(cfg, self.section), self.name)


@functools.cache
def _sections() -> dict[str, type[_Section]]:
    """Section name -> section class, read off FtrainConfig's fields."""
    hints = typing.get_type_hints(FtrainConfig)
    sections = {f.name: hints[f.name] for f in dataclasses.fields(FtrainConfig)}
    for name, cls in sections.items():
        if cls.section != name:  # messages would name a key the loader does not accept
            raise TypeError(f"FtrainConfig.{name} holds {cls.__name__} of section {cls.section!r}")
    return sections


_KEYS: dict[type[_Section], dict[str, _Key]] = {}


def _keys_of(cls: type[_Section]) -> dict[str, _Key]:
    """The keys of one section class (memoised: validation runs this for every section built)."""
    keys = _KEYS.get(cls)
    if keys is None:
        # Annotations are strings under `from __future__ import annotations`; resolve them.
        hints = typing.get_type_hints(cls)
        keys = _KEYS[cls] = {f.name: _Key(cls.section, f.name, hints[f.name], f) for f in dataclasses.fields(cls)}
    return keys


def _schema() -> dict[str, dict[str, _Key]]:
    return {name: _keys_of(cls) for name, cls in _sections().items()}


def _all_keys() -> list[_Key]:
    return [key for keys in _schema().values() for key in keys.values()]


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> FtrainConfig:
    """Build the configuration from defaults, a YAML file, the environment and overrides.

    ``path`` None means the file named by ``FTRAIN_CONFIG`` (in ``env``), else no file.
    ``env`` None means ``os.environ``. ``overrides`` maps dotted keys to values; None
    values are skipped so unset argparse flags do not override, and string values are
    parsed like environment variables (for generic ``--set key=value`` flags).
    """
    env = os.environ if env is None else env
    if path is None:
        path = env.get(envvars.CONFIG) or None
    values: dict[str, dict[str, Any]] = {name: {} for name in _sections()}
    if path is not None:
        _apply_yaml(values, os.fspath(path))
    _apply_env(values, env)
    _apply_overrides(values, overrides or {})
    sections: dict[str, Any] = {name: cls(**values[name]) for name, cls in _sections().items()}
    return FtrainConfig(**sections)


#: Config files larger than this are refused before parsing (docs/configuration.md). A real one is a few
#: KB; the bound keeps PyYAML's pure-Python parser to a fraction of a second and caps what aliases can expand.
MAX_CONFIG_BYTES = 1 << 20
#: A single value spelled out longer than this is refused (docs/configuration.md): the longest real one is a
#: path (at most 4096 bytes on Linux); the bound stops YAML aliases from multiplying a value (see below).
MAX_CONFIG_VALUE_CHARS = 1 << 16


def _apply_yaml(values: dict[str, dict[str, Any]], path: str) -> None:
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_CONFIG_BYTES + 1)  # bounded: a huge file (or /dev/zero) is never read whole
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"cannot read config file {path}: {reason}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than the {MAX_CONFIG_BYTES} byte (1 MiB) limit; "
                          "a config file holds a few settings")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        # PyYAML messages span several lines; keep the one-line promise.
        detail = " ".join(str(err).split())
        raise ConfigError(f"invalid YAML in config file {path}: {detail}") from None
    except RecursionError:  # PyYAML's parser and constructor recurse once per level: a few hundred `[` suffice
        raise ConfigError(f"invalid YAML in config file {path}: nested too deeply") from None
    except MemoryError:
        raise ConfigError(f"invalid YAML in config file {path}: out of memory while parsing it") from None
    except Exception as err:  # PyYAML's constructors let some errors out raw (a timestamp with month 13: ValueError)
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(f"invalid YAML in config file {path}: {type(err).__name__}: {detail}") from None
    if data is None:  # an empty file sets nothing
        return
    schema = _schema()
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections "
                          f"({', '.join(schema)}) at top level, got {type(data).__name__}")
    for section, settings in data.items():
        if section not in schema:
            raise ConfigError(f"unknown section {section!r} in {path}; "
                              f"valid sections: {', '.join(schema)}")
        if settings is None:  # a section whose keys are all commented out
            continue
        if not isinstance(settings, dict):
            raise ConfigError(f"config file {path}: section {section!r} must be a mapping of keys, "
                              f"got {type(settings).__name__}")
        for name, value in settings.items():
            key = schema[section].get(name)
            if key is None:
                raise ConfigError(f"unknown key {section}.{name} in {path}; "
                                  f"valid keys of {section}: {', '.join(schema[section])}")
            if _spelled_out_exceeds(value, MAX_CONFIG_VALUE_CHARS):
                # Checked before key.check, whose error message would print the value in full.
                raise ConfigError(f"{section}.{name}: invalid value in {path}: longer than {MAX_CONFIG_VALUE_CHARS} "
                                  f"characters written out (YAML aliases?); expected {_TYPE_NAMES[key.type]}")
            values[section][name] = key.check(value, f" in {path}")


def _spelled_out_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` written out in full (one per item plus each string's length) is longer than ``limit``.

    YAML aliases let a small file load as a structure that shares its parts, or contains itself ("billion
    laughs"): loading stays linear, but printing it would write out every copy. Iterative, and stops as soon
    as the budget is spent, so the walk itself is bounded too.
    """
    budget = limit
    stack = [value]
    while stack:
        v = stack.pop()
        budget -= 1 + (len(v) if isinstance(v, (str, bytes)) else 0)
        if budget < 0:
            return True
        if isinstance(v, dict):
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, (list, tuple, set)):
            stack += v
    return False


def _apply_env(values: dict[str, dict[str, Any]], env: Mapping[str, str]) -> None:
    schema = _schema()
    by_var = {key.env_var: key for key in _all_keys()}
    prefixes = {f"{ENV_PREFIX}{section.upper()}_": section for section in schema}
    for var, text in env.items():
        key = by_var.get(var)
        if key is None:
            # Only names under a known section are ours to police: other modules use FTRAIN_*.
            section = next((s for p, s in prefixes.items() if var.startswith(p)), None)
            if section is not None:
                valid = ", ".join(k.env_var for k in schema[section].values())
                raise ConfigError(f"unknown environment variable {var}; "
                                  f"valid {section} variables: {valid}")
            continue
        where = f" from {var}"
        value = _parse_text(key.dotted, text, key.type, where)
        values[key.section][key.name] = key.check(value, where)


def _apply_overrides(values: dict[str, dict[str, Any]], overrides: Mapping[str, object]) -> None:
    schema = _schema()
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, name = dotted.partition(".")
        key = schema.get(section, {}).get(name)
        if key is None:
            raise ConfigError(f"unknown override key {dotted!r}; "
                              f"valid keys: {', '.join(config_keys())}")
        where = " from command-line override"
        if isinstance(value, str):
            value = _parse_text(key.dotted, value, key.type, where)
        values[section][name] = key.check(value, where)


def config_to_dict(cfg: FtrainConfig) -> dict[str, dict[str, Any]]:
    """The configuration as nested plain dicts (section -> key -> value), e.g. for logging."""
    return dataclasses.asdict(cfg)


def config_to_env(cfg: FtrainConfig) -> dict[str, str]:
    """Every key as its ``FTRAIN_<SECTION>_<KEY>`` variable; ``load_config(env=...)`` reads it back.

    A launcher passes this to worker processes so they see exactly its resolved config.
    (List items containing commas cannot round-trip: commas separate items.)
    """
    return {key.env_var: _format_text(key.get(cfg)) for key in _all_keys()}


def config_keys() -> list[str]:
    """Every dotted key, e.g. ``checkpoint.every_steps``, in declaration order."""
    return [key.dotted for key in _all_keys()]


def describe_keys() -> list[tuple[str, object, str]]:
    """``(dotted key, default, one-line help)`` for every key, for ``--help`` and docs."""
    defaults = FtrainConfig()
    return [(key.dotted, key.get(defaults), key.field.metadata["help"]) for key in _all_keys()]
