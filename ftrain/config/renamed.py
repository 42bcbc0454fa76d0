"""Shared contract: the flat keys of the first config files, and the nested keys that replaced them.

They keep working, with one deprecation line each (logged once per key and place per process), so a config
that ran yesterday runs today (docs/configuration.md, "Renamed keys"). A file that sets both an old key and
its new one is refused: which one was meant cannot be guessed.
"""
from __future__ import annotations

import logging

from ftrain.config.schema import ENV_PREFIX

log = logging.getLogger(__name__)

#: old dotted key -> new dotted key. `checkpoint.remote` and `supervisor.notices` were values and are sections
#: now: as a plain value (a URL, a list) they are the old keys.
RENAMED: dict[str, str] = {
    "checkpoint.keep_last": "checkpoint.retention.keep_last",
    "checkpoint.keep_best": "checkpoint.retention.keep_best",
    "checkpoint.monitor": "checkpoint.selection.monitor",
    "checkpoint.mode": "checkpoint.selection.mode",
    "checkpoint.save_best_only": "checkpoint.selection.save_best_only",
    "checkpoint.load_best_at_end": "checkpoint.selection.load_best_at_end",
    "checkpoint.lease_ttl_seconds": "checkpoint.lease.ttl_seconds",
    "checkpoint.takeover": "checkpoint.lease.takeover",
    "checkpoint.remote": "checkpoint.remote.url",
    "checkpoint.remote_keep_last": "checkpoint.remote.keep_last",
    "checkpoint.remote_retries": "checkpoint.remote.retries",
    "checkpoint.remote_wait_seconds": "checkpoint.remote.wait_seconds",
    "checkpoint.on_uneven_batch": "data.on_uneven_batch",
    "supervisor.notices": "supervisor.notices.sources",
    "supervisor.notice_poll_seconds": "supervisor.notices.poll_seconds",
    "supervisor.aws_rebalance": "supervisor.notices.aws_rebalance",
    "supervisor.drain_file": "supervisor.notices.drain_file",
    "supervisor.aws_metadata_url": "supervisor.notices.aws_metadata_url",
    "supervisor.gcp_metadata_url": "supervisor.notices.gcp_metadata_url",
    "supervisor.azure_metadata_url": "supervisor.notices.azure_metadata_url",
}


def _env_name(dotted: str) -> str:
    return ENV_PREFIX + dotted.replace(".", "_").upper()


#: old environment variable -> new dotted key. (FTRAIN_CHECKPOINT_REMOTE_KEEP_LAST and the like need no entry:
#: the old and the new key have the same variable.)
RENAMED_ENV: dict[str, str] = {
    _env_name(old): new for old, new in RENAMED.items() if _env_name(old) != _env_name(new)}

_said: set[tuple[str, str]] = set()


def warn_renamed(old: str, new: str, where: str) -> None:
    """One line saying ``old`` (a key or a variable) is deprecated for ``new``, once per key and place."""
    if (old, where) in _said:
        return
    _said.add((old, where))
    log.warning("%s%s is deprecated: write %s instead (it still works; docs/configuration.md#renamed-keys)",
                old, where, new)
