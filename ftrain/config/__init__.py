"""Shared contract: the ftrain configuration: validated dataclasses nested by component, and their loader.

- ``sections.py``: the sections (``checkpoint``, ``checkpoint.remote``, ``supervisor.notices``, ...), each
  field with its help and value rule: the one home of every key and default;
- ``values.py``: one value's rules, check and text form;
- ``schema.py``: every key read off the sections: its path, type and environment variable;
- ``loader.py``: defaults < YAML < environment < overrides, and the environment written back for workers;
- ``renamed.py``: the first releases' flat keys, which still load, with a deprecation line.
"""
from __future__ import annotations

from ftrain.config.loader import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_VALUE_CHARS,
    config_keys,
    config_to_dict,
    config_to_env,
    describe_keys,
    load_config,
)
from ftrain.config.schema import ENV_PREFIX
from ftrain.config.sections import (
    AWS_METADATA_URL,
    AZURE_METADATA_URL,
    GCP_METADATA_URL,
    NOTICE_SOURCES,
    REBALANCE_MODES,
    RESIZE_MODES,
    RESUME_MODES,
    SELECTION_MODES,
    UNEVEN_BATCH,
    WHEN_BUSY,
    CheckpointConfig,
    DataConfig,
    EarlyStoppingConfig,
    FtrainConfig,
    LeaseConfig,
    NoticesConfig,
    RemoteConfig,
    RetentionConfig,
    SelectionConfig,
    SupervisorConfig,
)
from ftrain.config.values import PREEMPTION_SIGNALS

__all__ = [
    "AWS_METADATA_URL", "AZURE_METADATA_URL", "ENV_PREFIX", "GCP_METADATA_URL", "MAX_CONFIG_BYTES",
    "MAX_CONFIG_VALUE_CHARS", "NOTICE_SOURCES", "PREEMPTION_SIGNALS", "REBALANCE_MODES", "RESIZE_MODES",
    "RESUME_MODES", "SELECTION_MODES", "UNEVEN_BATCH", "WHEN_BUSY", "CheckpointConfig", "DataConfig",
    "EarlyStoppingConfig", "FtrainConfig", "LeaseConfig", "NoticesConfig", "RemoteConfig", "RetentionConfig",
    "SelectionConfig", "SupervisorConfig", "config_keys", "config_to_dict", "config_to_env", "describe_keys",
    "load_config",
]
